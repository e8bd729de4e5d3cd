//! Names of the metrics the engines emit through the `metrics` facade.
//! Libraries only emit; the binary installs an exporter.

/// Messages the relay published and marked (label: `relay`).
pub const RELAY_PUBLISHED_TOTAL: &str = "custody_relay_published_total";
/// Failed publish attempts (label: `retryable`).
pub const RELAY_PUBLISH_FAILURES_TOTAL: &str = "custody_relay_publish_failures_total";
/// Messages the relay moved to the dead-letter table.
pub const RELAY_DEAD_LETTERED_TOTAL: &str = "custody_relay_dead_lettered_total";
/// Outbox rows pruned after their retention.
pub const RELAY_PRUNED_TOTAL: &str = "custody_relay_pruned_total";
/// Partitions the relay holds.
pub const RELAY_PARTITIONS_HELD: &str = "custody_relay_partitions_held";
/// 1 when the relay's circuit breaker is open.
pub const RELAY_BREAKER_OPEN: &str = "custody_relay_breaker_open";
/// Messages a consumer processed (label: `consumer`).
pub const CONSUMER_PROCESSED_TOTAL: &str = "custody_consumer_processed_total";
/// Redeliveries recognised by the inbox and skipped (label: `consumer`).
pub const CONSUMER_DUPLICATES_TOTAL: &str = "custody_consumer_duplicates_suppressed_total";
/// Messages a consumer dead-lettered (labels: `consumer`, `reason`).
pub const CONSUMER_DEAD_LETTERED_TOTAL: &str = "custody_consumer_dead_lettered_total";
/// Handler retries after a transient error (label: `consumer`).
pub const CONSUMER_RETRIES_TOTAL: &str = "custody_consumer_retries_total";
/// Redriven dead letters a consumer took from its redrive queue (label: `consumer`).
pub const CONSUMER_REDRIVEN_TOTAL: &str = "custody_consumer_redriven_total";
/// Inbox rows pruned after their retention (label: `consumer`).
pub const CONSUMER_INBOX_PRUNED_TOTAL: &str = "custody_consumer_inbox_pruned_total";
/// Missing sequence numbers below the highest one a consumer has seen,
/// summed over producer partitions (labels: `consumer`, `producer`).
pub const CONSUMER_SEQUENCE_HOLES: &str = "custody_consumer_sequence_holes";
/// Age in seconds of the oldest open sequence gap (labels: `consumer`, `producer`); 0 when none.
pub const CONSUMER_SEQUENCE_GAP_AGE: &str = "custody_consumer_sequence_gap_age_seconds";
/// Inbox rows folded into sequence floors (label: `consumer`).
pub const CONSUMER_INBOX_COMPACTED_TOTAL: &str = "custody_consumer_inbox_compacted_total";
/// Skip markers accounted for (the relay dead-lettered the message; label: `consumer`).
pub const CONSUMER_SKIPPED_TOTAL: &str = "custody_consumer_skipped_total";
/// Gaps found by the last reconciliation (labels: `topic`, `consumer`, `kind` = missing | unexpected | dead_lettered).
pub const RECONCILE_GAPS: &str = "custody_reconcile_gaps";
/// Windows checked by the last reconciliation (labels: `topic`, `consumer`, `result` = matching | mismatching).
pub const RECONCILE_WINDOWS: &str = "custody_reconcile_windows";
/// Missing sequence numbers found by the last `reconcile --live` round (labels: `consumer`, `kind` = hole | tail).
pub const RECONCILE_LIVE_MISSING: &str = "custody_reconcile_live_missing";
/// Commands an aggregate repository ran (labels: `aggregate`, `outcome` = applied | idempotent | rejected | gave_up | tombstoned).
pub const AGGREGATE_COMMANDS_TOTAL: &str = "custody_aggregate_commands_total";
/// Conflicting appends a repository retried or gave up on (label: `aggregate`).
pub const AGGREGATE_CONFLICTS_TOTAL: &str = "custody_aggregate_conflicts_total";
/// Snapshots a repository failed to encode or save (label: `aggregate`); the commands were applied.
pub const AGGREGATE_SNAPSHOT_FAILURES_TOTAL: &str = "custody_aggregate_snapshot_failures_total";
/// Events a projection applied (label: `projection`).
pub const PROJECTION_APPLIED_TOTAL: &str = "custody_projection_events_applied_total";
/// Events a projection failed on permanently and dead-lettered (label: `projection`).
pub const PROJECTION_DEAD_LETTERED_TOTAL: &str = "custody_projection_dead_lettered_total";
/// Positions between a projection's checkpoint and the event log's gap-free head (label: `projection`).
pub const PROJECTION_LAG_EVENTS: &str = "custody_projection_lag_events";
/// While a projection is behind, seconds since its last applied event was recorded; 0 when caught up (label: `projection`).
pub const PROJECTION_LAG_SECONDS: &str = "custody_projection_lag_seconds";
/// 1 when this process's runner holds the projection's lease (label: `projection`).
pub const PROJECTION_ACTIVE: &str = "custody_projection_active";
/// The checkpoint of the generation a rebuild is building (label: `projection`).
pub const PROJECTION_REBUILD_POSITION: &str = "custody_projection_rebuild_position";
/// A log relay's checkpoint: the global-log position up to which every event
/// of its filter is settled (label: `relay`, the log relay's name).
pub const LOG_RELAY_CHECKPOINT: &str = "custody_log_relay_checkpoint";
