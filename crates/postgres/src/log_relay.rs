//! The state of relays that publish from the event log
//! ([`custody_core::log_relay`]) on PostgreSQL: migration 0014's tables, in
//! the event store's database.
//!
//! Fencing: every write of a holder first reads its relay's row `FOR
//! UPDATE` and checks holder and token. A takeover is an UPDATE of that row,
//! so it waits until the write's transaction ends, and every write that
//! starts after it sees the new token and is refused. The lease decision
//! itself also runs under that row lock, so two processes racing for a free
//! lease cannot both take it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::log_relay::{
    JournalEntry, JournalStatus, JournalWrite, LogRelayHolder, LogRelayState, LogRelayStore,
};
use custody_core::Result;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::db as map_err;

/// A relay's row, created with a new producer id the first time it is named.
const ENSURE: &str = "INSERT INTO custody_log_relay (relay, producer, updated_at) \
     VALUES ($1, $2, $3) ON CONFLICT (relay) DO NOTHING";
/// The row lock every lease decision and every fenced write takes first.
const LEASE: &str =
    "SELECT holder, lease_until, token FROM custody_log_relay WHERE relay = $1 FOR UPDATE";
const RENEW: &str =
    "UPDATE custody_log_relay SET lease_until = $2, updated_at = $3 WHERE relay = $1";
const TAKE: &str = "UPDATE custody_log_relay \
     SET holder = $2, lease_until = $3, token = token + 1, updated_at = $4 \
     WHERE relay = $1 RETURNING token";
const RELEASE: &str = "UPDATE custody_log_relay SET holder = NULL, lease_until = NULL \
     WHERE relay = $1 AND holder = $2";
const STATE: &str = "SELECT checkpoint, producer FROM custody_log_relay WHERE relay = $1";
const HEADS: &str = "SELECT topic, last FROM custody_log_relay_seq WHERE relay = $1";
const COLUMNS: &str =
    "relay, position, event_id, stream, topic, seq, status, attempts, republish, \
     retry_at, error, marker_id, ack_ref, published_at";
const UPSERT: &str = "INSERT INTO custody_log_relay_journal \
     (relay, position, event_id, stream, topic, seq, status, attempts, republish, retry_at, error, \
      marker_id, ack_ref, published_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
     ON CONFLICT (relay, position) DO UPDATE SET event_id = excluded.event_id, \
       stream = excluded.stream, topic = excluded.topic, seq = excluded.seq, \
       status = excluded.status, attempts = excluded.attempts, republish = excluded.republish, \
       retry_at = excluded.retry_at, error = excluded.error, marker_id = excluded.marker_id, \
       ack_ref = excluded.ack_ref, published_at = excluded.published_at, \
       updated_at = excluded.updated_at";
const SET_HEAD: &str =
    "INSERT INTO custody_log_relay_seq (relay, topic, last) VALUES ($1, $2, $3) \
     ON CONFLICT (relay, topic) DO UPDATE SET last = GREATEST(custody_log_relay_seq.last, excluded.last)";
/// The checkpoint only rises.
const RAISE: &str =
    "UPDATE custody_log_relay SET checkpoint = GREATEST(checkpoint, $2), updated_at = $3 \
     WHERE relay = $1";
const PRUNE: &str = "DELETE FROM custody_log_relay_journal WHERE relay = $1 AND position IN ( \
     SELECT j.position FROM custody_log_relay_journal j JOIN custody_log_relay r ON r.relay = j.relay \
     WHERE j.relay = $1 AND j.position <= r.checkpoint AND j.status IN (1, 3) AND j.updated_at < $2 \
     LIMIT $3)";
const REPUBLISH: &str = "UPDATE custody_log_relay_journal \
     SET status = 0, republish = republish + 1, retry_at = NULL, attempts = 0, updated_at = $3 \
     WHERE relay = $1 AND event_id = $2 RETURNING position";
const LOWER: &str = "UPDATE custody_log_relay SET checkpoint = LEAST(checkpoint, $2), \
     token = token + 1, updated_at = $3 WHERE relay = $1";

/// A log relay's state on PostgreSQL (see the module docs).
#[derive(Debug, Clone)]
pub struct PgLogRelayStore {
    pool: PgPool,
}

impl PgLogRelayStore {
    /// The log relay state in `pool`'s database (migrated with
    /// [`crate::migrate`]: it has migration 0014).
    pub fn new(pool: PgPool) -> Self {
        PgLogRelayStore { pool }
    }

    async fn begin(&self, op: &'static str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool.begin().await.map_err(map_err(op))
    }
}

fn entry(row: &PgRow, op: &'static str) -> Result<(String, JournalEntry)> {
    let get = |e: sqlx::Error| map_err(op)(e);
    let position: i64 = row.try_get("position").map_err(get)?;
    let seq: Option<i64> = row.try_get("seq").map_err(get)?;
    Ok((
        row.try_get("relay").map_err(get)?,
        JournalEntry {
            position: u64::try_from(position).unwrap_or(0),
            event_id: row.try_get("event_id").map_err(get)?,
            stream: row.try_get("stream").map_err(get)?,
            topic: row.try_get("topic").map_err(get)?,
            sequence: seq.and_then(|s| u64::try_from(s).ok()),
            status: JournalStatus::from_code(i64::from(
                row.try_get::<i16, _>("status").map_err(get)?,
            )),
            attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(get)?).unwrap_or(0),
            republish: u32::try_from(row.try_get::<i32, _>("republish").map_err(get)?).unwrap_or(0),
            retry_at: row.try_get("retry_at").map_err(get)?,
            error: row.try_get("error").map_err(get)?,
            marker_id: row.try_get("marker_id").map_err(get)?,
            reference: row.try_get("ack_ref").map_err(get)?,
            published_at: row.try_get("published_at").map_err(get)?,
        },
    ))
}

fn pos(p: u64) -> i64 {
    i64::try_from(p).unwrap_or(i64::MAX)
}

async fn ensure(conn: &mut PgConnection, relay: &str, now: DateTime<Utc>) -> Result<()> {
    sqlx::query(ENSURE)
        .bind(relay)
        .bind(format!("log-{}", Uuid::now_v7().simple()))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(map_err("create log relay"))?;
    Ok(())
}

impl PgLogRelayStore {
    /// The stream and version of the event with id `id` in this database's
    /// event store (`custody trace`), `None` when it holds no such event.
    pub async fn locate_event(&self, id: Uuid) -> Result<Option<(String, u64)>> {
        let found: Option<(String, i64)> =
            sqlx::query_as("SELECT stream, version FROM custody_events WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err("find event by id"))?;
        Ok(found.map(|(s, v)| (s, u64::try_from(v).unwrap_or(0))))
    }

    /// The database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl LogRelayStore for PgLogRelayStore {
    async fn acquire(
        &self,
        relay: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>> {
        const OP: &str = "acquire log relay lease";
        let mut tx = self.begin(OP).await?;
        ensure(&mut tx, relay, now).await?;
        let (current, until, token): (Option<String>, Option<DateTime<Utc>>, i64) =
            sqlx::query_as(LEASE)
                .bind(relay)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        let expiry = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let token = if current.as_deref() == Some(holder) {
            sqlx::query(RENEW)
                .bind(relay)
                .bind(expiry)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            Some(token)
        } else if current.is_none() || until.is_none_or(|u| u <= now) {
            let (token,): (i64,) = sqlx::query_as(TAKE)
                .bind(relay)
                .bind(holder)
                .bind(expiry)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            Some(token)
        } else {
            None
        };
        tx.commit().await.map_err(map_err(OP))?;
        Ok(token)
    }

    async fn release(&self, relay: &str, holder: &str) -> Result<()> {
        sqlx::query(RELEASE)
            .bind(relay)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(map_err("release log relay lease"))?;
        Ok(())
    }

    async fn load(&self, relay: &str) -> Result<LogRelayState> {
        const OP: &str = "load log relay state";
        let mut tx = self.begin(OP).await?;
        ensure(&mut tx, relay, Utc::now()).await?;
        let (checkpoint, producer): (i64, String) = sqlx::query_as(STATE)
            .bind(relay)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let heads: Vec<(String, i64)> = sqlx::query_as(HEADS)
            .bind(relay)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM custody_log_relay_journal WHERE relay = $1 AND position > $2 ORDER BY position"
        ))
        .bind(relay)
        .bind(checkpoint)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err(OP))?;
        tx.commit().await.map_err(map_err(OP))?;
        Ok(LogRelayState {
            checkpoint: u64::try_from(checkpoint).unwrap_or(0),
            producer,
            heads: heads
                .into_iter()
                .map(|(t, l)| (t, u64::try_from(l).unwrap_or(0)))
                .collect(),
            journal: rows
                .iter()
                .map(|r| entry(r, OP).map(|(_, e)| e))
                .collect::<Result<_>>()?,
        })
    }

    async fn write(
        &self,
        holder: &LogRelayHolder,
        write: JournalWrite<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        const OP: &str = "write log relay journal";
        let mut tx = self.begin(OP).await?;
        // The fence: the row lock (FOR UPDATE) is held to the commit, so a
        // takeover (an UPDATE of the row) waits for this write.
        let lease: Option<(Option<String>, Option<DateTime<Utc>>, i64)> = sqlx::query_as(LEASE)
            .bind(&holder.relay)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        match lease {
            Some((Some(h), _, token)) if h == holder.holder && token == holder.token => {}
            _ => return Ok(false),
        }
        let at = now;
        for e in write.entries {
            sqlx::query(UPSERT)
                .bind(&holder.relay)
                .bind(pos(e.position))
                .bind(e.event_id)
                .bind(&e.stream)
                .bind(&e.topic)
                .bind(e.sequence.map(pos))
                .bind(e.status.code() as i16)
                .bind(i32::try_from(e.attempts).unwrap_or(i32::MAX))
                .bind(i32::try_from(e.republish).unwrap_or(i32::MAX))
                .bind(e.retry_at)
                .bind(&e.error)
                .bind(e.marker_id)
                .bind(&e.reference)
                .bind(e.published_at)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        for (topic, last) in write.heads {
            sqlx::query(SET_HEAD)
                .bind(&holder.relay)
                .bind(topic)
                .bind(pos(*last))
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        if let Some(c) = write.checkpoint {
            sqlx::query(RAISE)
                .bind(&holder.relay)
                .bind(pos(c))
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        tx.commit().await.map_err(map_err(OP))?;
        Ok(true)
    }

    async fn prune(&self, relay: &str, older_than: DateTime<Utc>, limit: usize) -> Result<u64> {
        let done = sqlx::query(PRUNE)
            .bind(relay)
            .bind(older_than)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(map_err("prune log relay journal"))?;
        Ok(done.rows_affected())
    }

    async fn entries_by_id(&self, ids: &[Uuid]) -> Result<Vec<(String, JournalEntry)>> {
        const OP: &str = "read log relay journal";
        let mut out = Vec::new();
        for id in ids {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM custody_log_relay_journal WHERE event_id = $1 ORDER BY relay"
            ))
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(OP))?;
            for r in &rows {
                out.push(entry(r, OP)?);
            }
        }
        Ok(out)
    }

    async fn entries_in(
        &self,
        relay: &str,
        topic: &str,
        from: Uuid,
        to: Uuid,
    ) -> Result<Vec<JournalEntry>> {
        const OP: &str = "read log relay journal";
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM custody_log_relay_journal \
             WHERE relay = $1 AND topic = $2 AND event_id >= $3 AND event_id < $4"
        ))
        .bind(relay)
        .bind(topic)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err(OP))?;
        rows.iter().map(|r| entry(r, OP).map(|(_, e)| e)).collect()
    }

    async fn republish(&self, relay: &str, ids: &[Uuid]) -> Result<u64> {
        const OP: &str = "republish log relay events";
        let mut tx = self.begin(OP).await?;
        let now = Utc::now();
        let mut lowest: Option<i64> = None;
        let mut n = 0;
        for id in ids {
            let rows: Vec<(i64,)> = sqlx::query_as(REPUBLISH)
                .bind(relay)
                .bind(id)
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            for (p,) in rows {
                n += 1;
                lowest = Some(lowest.map_or(p, |l| l.min(p)));
            }
        }
        if let Some(p) = lowest {
            // below the first reset event, and a new token: the holder's
            // next write is refused, so it reloads and reads from here
            sqlx::query(LOWER)
                .bind(relay)
                .bind(p - 1)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        tx.commit().await.map_err(map_err(OP))?;
        Ok(n)
    }
}
