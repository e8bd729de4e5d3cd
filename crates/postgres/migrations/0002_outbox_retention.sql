-- no-transaction
-- Retention: serves OutboxStore::prune (PgOutbox's PRUNE), which deletes the
-- oldest published / dead rows. The expression is published_at for
-- published rows and enqueued_at for dead ones, and must match PRUNE's
-- spelling exactly. Partial on status <> 0: inserts (status 0) never touch
-- it; mark_published adds one entry (that UPDATE changes `status`, a column
-- the pending index's predicate uses, so it is never a HOT update anyway).
-- No partition column: PostgreSQL 15 checks non-key conditions of an index
-- scan on the heap row anyway, so it would only make the index bigger.
-- Without this index, a prune call that finds nothing old enough scans every row kept
-- for the retention window. Measured in docs/OUTBOX_RETENTION.md.
--
-- CONCURRENTLY (hence no transaction): the outbox this is added to has been
-- growing without bound, and a plain CREATE INDEX would block enqueues for
-- the whole build.
CREATE INDEX CONCURRENTLY IF NOT EXISTS custody_outbox_done
    ON custody_outbox ((COALESCE(published_at, enqueued_at)))
    WHERE status <> 0;
