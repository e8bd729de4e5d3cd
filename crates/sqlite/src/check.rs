//! Read-only checks for the operator commands (`custody reconcile`, `trace`,
//! `dlq`): is this custody's database, with its schema up to date, and has it
//! ever seen a topic or a consumer name? None of them creates or changes
//! anything: a check never writes to what it checks (docs/ARCHITECTURE.md invariant 8).

use custody_core::admin::schema_verdict;
use custody_core::Result;
use sqlx::migrate::Migrator;
use sqlx::SqlitePool;

use crate::error::map_err;

/// custody's migrations, to compare with what the database has applied.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

const HAS_MIGRATIONS_TABLE: &str =
    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";
const HAS_OUTBOX_TABLE: &str =
    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'custody_outbox'";
const APPLIED: &str = "SELECT version, success FROM _sqlx_migrations";

// Every place a topic is written down. The outbox lookup uses the
// (topic, position) index; the inbox has no topic index, so it comes last
// (only reached when nothing else knows the topic).
const TOPIC_SEEN: &str = "SELECT \
    EXISTS (SELECT 1 FROM custody_outbox WHERE topic = ?1) \
 OR EXISTS (SELECT 1 FROM custody_sequence WHERE topic = ?1) \
 OR EXISTS (SELECT 1 FROM custody_dead_letter WHERE topic = ?1) \
 OR EXISTS (SELECT 1 FROM custody_inbox_watermark WHERE topic = ?1) \
 OR EXISTS (SELECT 1 FROM custody_redrive WHERE topic = ?1) \
 OR EXISTS (SELECT 1 FROM custody_inbox WHERE topic = ?1)";

// The inbox lookup is a prefix of its primary key (consumer, message_id).
const CONSUMER_SEEN: &str = "SELECT \
    EXISTS (SELECT 1 FROM custody_inbox WHERE consumer = ?1) \
 OR EXISTS (SELECT 1 FROM custody_inbox_watermark WHERE consumer = ?1) \
 OR EXISTS (SELECT 1 FROM custody_redrive WHERE consumer = ?1) \
 OR EXISTS (SELECT 1 FROM custody_dead_letter WHERE origin = 'consumer:' || ?1)";

// Distinct values through their indexes (a loose index scan: one index seek
// per distinct value, not a read of every row), for "names known here".
const TOPICS: &str = "\
WITH RECURSIVE t(topic) AS (
  SELECT MIN(topic) FROM custody_outbox
  UNION ALL
  SELECT (SELECT MIN(topic) FROM custody_outbox WHERE topic > t.topic) FROM t WHERE t.topic IS NOT NULL
)
SELECT topic FROM t WHERE topic IS NOT NULL
UNION SELECT topic FROM custody_sequence
UNION SELECT topic FROM custody_inbox_watermark
ORDER BY 1 LIMIT ?1";
const CONSUMERS: &str = "\
WITH RECURSIVE c(consumer) AS (
  SELECT MIN(consumer) FROM custody_inbox
  UNION ALL
  SELECT (SELECT MIN(consumer) FROM custody_inbox WHERE consumer > c.consumer) FROM c WHERE c.consumer IS NOT NULL
)
SELECT consumer FROM c WHERE consumer IS NOT NULL
UNION SELECT consumer FROM custody_inbox_watermark
ORDER BY 1 LIMIT ?1";

/// Check that `pool` holds custody's tables with every migration of this
/// build applied, without applying any.
///
/// Errors ([`custody_core::Error::Config`]) say which case it is and what to do: no
/// custody tables at all (a wrong file, or one never set up with
/// `custody migrate`), an older schema, or a migration that failed midway.
/// Migrations the database has and this build does not know are tolerated
/// (a newer custody migrated it).
pub async fn check_schema(pool: &SqlitePool) -> Result<()> {
    let has_table: i64 = sqlx::query_scalar(HAS_MIGRATIONS_TABLE)
        .fetch_one(pool)
        .await
        .map_err(map_err("check schema"))?;
    let has_outbox: i64 = sqlx::query_scalar(HAS_OUTBOX_TABLE)
        .fetch_one(pool)
        .await
        .map_err(map_err("check schema"))?;
    let applied: Vec<(i64, bool)> = if has_table == 0 {
        Vec::new()
    } else {
        sqlx::query_as(APPLIED)
            .fetch_all(pool)
            .await
            .map_err(map_err("check schema"))?
    };
    schema_verdict(
        has_table != 0 && has_outbox != 0,
        &applied,
        MIGRATOR.iter().map(|m| m.version),
        "path",
        "path",
    )
}

/// Whether `topic` appears anywhere in this database: outbox rows, numbers
/// given, dead letters, inbox rows, floors or redrives.
pub async fn topic_seen(pool: &SqlitePool, topic: &str) -> Result<bool> {
    sqlx::query_scalar(TOPIC_SEEN)
        .bind(topic)
        .fetch_one(pool)
        .await
        .map_err(map_err("look up topic"))
}

/// Whether consumer `name` has recorded anything in this database: inbox
/// rows, floors, redrives or dead letters of its own.
pub async fn consumer_seen(pool: &SqlitePool, name: &str) -> Result<bool> {
    sqlx::query_scalar(CONSUMER_SEEN)
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(map_err("look up consumer"))
}

/// Up to `limit` topics this database holds outbox rows, numbers or floors
/// of, sorted (for "topics known here" in error messages).
pub async fn topics(pool: &SqlitePool, limit: u32) -> Result<Vec<String>> {
    sqlx::query_scalar(TOPICS)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(map_err("list topics"))
}

/// Up to `limit` consumer names with inbox rows or floors in this database,
/// sorted.
pub async fn consumers(pool: &SqlitePool, limit: u32) -> Result<Vec<String>> {
    sqlx::query_scalar(CONSUMERS)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(map_err("list consumers"))
}
