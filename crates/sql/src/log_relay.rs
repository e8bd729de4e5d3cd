//! The state of relays that publish from the event log
//! ([`custody_core::log_relay`]), the part every SQL backend shares: the
//! statements that read the same on each and
//! [`log_relay_impl!`](crate::log_relay_impl), the Rust around them. Each
//! backend keeps its fence (how a lease check holds off a takeover until
//! the write commits), the statements it spells its own way and how it
//! stores times, ids and small numbers.

/// A relay's row, created with a new producer id the first time it is named.
pub const ENSURE: &str = "INSERT INTO custody_log_relay (relay, producer, updated_at) \
     VALUES ($1, $2, $3) ON CONFLICT (relay) DO NOTHING";
/// The holder's lease, renewed.
pub const RENEW: &str =
    "UPDATE custody_log_relay SET lease_until = $2, updated_at = $3 WHERE relay = $1";
/// A free or expired lease, taken: a new token fences the previous holder.
pub const TAKE: &str = "UPDATE custody_log_relay \
     SET holder = $2, lease_until = $3, token = token + 1, updated_at = $4 \
     WHERE relay = $1 RETURNING token";
/// The holder's lease, given up.
pub const RELEASE: &str = "UPDATE custody_log_relay SET holder = NULL, lease_until = NULL \
     WHERE relay = $1 AND holder = $2";
/// A relay's checkpoint and producer id.
pub const STATE: &str = "SELECT checkpoint, producer FROM custody_log_relay WHERE relay = $1";
/// A relay's last sequence number per topic.
pub const HEADS: &str = "SELECT topic, last FROM custody_log_relay_seq WHERE relay = $1";
/// A journal row's columns, as the backend's `entry` reads them.
pub const COLUMNS: &str =
    "relay, position, event_id, stream, topic, seq, status, attempts, republish, \
     retry_at, error, marker_id, ack_ref, published_at";
/// A journal row, written or overwritten.
pub const UPSERT: &str = "INSERT INTO custody_log_relay_journal \
     (relay, position, event_id, stream, topic, seq, status, attempts, republish, retry_at, error, \
      marker_id, ack_ref, published_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
     ON CONFLICT (relay, position) DO UPDATE SET event_id = excluded.event_id, \
       stream = excluded.stream, topic = excluded.topic, seq = excluded.seq, \
       status = excluded.status, attempts = excluded.attempts, republish = excluded.republish, \
       retry_at = excluded.retry_at, error = excluded.error, marker_id = excluded.marker_id, \
       ack_ref = excluded.ack_ref, published_at = excluded.published_at, \
       updated_at = excluded.updated_at";
/// A journal row set back to pending to be published again.
pub const REPUBLISH: &str = "UPDATE custody_log_relay_journal \
     SET status = 0, republish = republish + 1, retry_at = NULL, attempts = 0, updated_at = $3 \
     WHERE relay = $1 AND event_id = $2 RETURNING position";

/// A position as stored.
pub fn pos(p: u64) -> i64 {
    i64::try_from(p).unwrap_or(i64::MAX)
}

/// [`custody_core::log_relay::LogRelayStore`] for a backend's store type,
/// written once. The backend gives:
///
/// - `store`, `conn`: its store (with a `pool` field and a
///   `begin(op)` method opening the transaction its fence needs) and its
///   connection type; `err`: its sqlx error mapping;
/// - `entry`: its reading of a journal row (`fn(&Row, op) -> Result<(relay, JournalEntry)>`);
/// - `at`: how it binds a time; `time`: its stored time type;
///   `expiry`: `fn(now, ttl) -> stored time`; `bind_id`: how it binds an
///   id (given `&Uuid`); `status`, `count`: how it binds a status code
///   (`i64`) and an attempt count (`u32`);
/// - `sql`: its `lease` (holder, lease_until, token of `$1`, under its
///   fence), `set_head` (a topic's last number, only rising), `raise` (the
///   checkpoint, only rising), `prune` and `lower` statements.
#[macro_export]
macro_rules! log_relay_impl {
    (
        store: $store:ty,
        conn: $conn:ty,
        err: $err:path,
        entry: $entry:path,
        at: $at:path,
        time: $Time:ty,
        expiry: $expiry:path,
        bind_id: $bind_id:path,
        status: $status:path,
        count: $count:path,
        sql: {
            lease: $LEASE:expr,
            set_head: $SET_HEAD:expr,
            raise: $RAISE:expr,
            prune: $PRUNE:expr,
            lower: $LOWER:expr $(,)?
        } $(,)?
    ) => {
        async fn ensure(
            conn: &mut $conn,
            relay: &str,
            now: $crate::chrono::DateTime<$crate::chrono::Utc>,
        ) -> $crate::custody_core::Result<()> {
            $crate::sqlx::query($crate::log_relay::ENSURE)
                .bind(relay)
                .bind(format!("log-{}", $crate::uuid::Uuid::now_v7().simple()))
                .bind($at(now))
                .execute(&mut *conn)
                .await
                .map_err($err("create log relay"))?;
            Ok(())
        }

        impl $crate::custody_core::log_relay::LogRelayStore for $store {
            async fn acquire(
                &self,
                relay: &str,
                holder: &str,
                ttl: std::time::Duration,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<Option<i64>> {
                const OP: &str = "acquire log relay lease";
                let mut tx = self.begin(OP).await?;
                ensure(&mut tx, relay, now).await?;
                let (current, until, token): (Option<String>, Option<$Time>, i64) =
                    $crate::sqlx::query_as($LEASE)
                        .bind(relay)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                let expiry = $expiry(now, ttl);
                let token = if current.as_deref() == Some(holder) {
                    $crate::sqlx::query($crate::log_relay::RENEW)
                        .bind(relay)
                        .bind(expiry)
                        .bind($at(now))
                        .execute(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                    Some(token)
                } else if current.is_none() || until.is_none_or(|u| u <= $at(now)) {
                    let (token,): (i64,) = $crate::sqlx::query_as($crate::log_relay::TAKE)
                        .bind(relay)
                        .bind(holder)
                        .bind(expiry)
                        .bind($at(now))
                        .fetch_one(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                    Some(token)
                } else {
                    None
                };
                tx.commit().await.map_err($err(OP))?;
                Ok(token)
            }

            async fn release(&self, relay: &str, holder: &str) -> $crate::custody_core::Result<()> {
                $crate::sqlx::query($crate::log_relay::RELEASE)
                    .bind(relay)
                    .bind(holder)
                    .execute(&self.pool)
                    .await
                    .map_err($err("release log relay lease"))?;
                Ok(())
            }

            async fn load(
                &self,
                relay: &str,
            ) -> $crate::custody_core::Result<$crate::custody_core::log_relay::LogRelayState> {
                const OP: &str = "load log relay state";
                let mut tx = self.begin(OP).await?;
                ensure(&mut tx, relay, $crate::chrono::Utc::now()).await?;
                let (checkpoint, producer): (i64, String) =
                    $crate::sqlx::query_as($crate::log_relay::STATE)
                        .bind(relay)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                let heads: Vec<(String, i64)> = $crate::sqlx::query_as($crate::log_relay::HEADS)
                    .bind(relay)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err($err(OP))?;
                let rows = $crate::sqlx::query(&format!(
                    "SELECT {} FROM custody_log_relay_journal WHERE relay = $1 AND position > $2 ORDER BY position",
                    $crate::log_relay::COLUMNS
                ))
                .bind(relay)
                .bind(checkpoint)
                .fetch_all(&mut *tx)
                .await
                .map_err($err(OP))?;
                tx.commit().await.map_err($err(OP))?;
                Ok($crate::custody_core::log_relay::LogRelayState {
                    checkpoint: u64::try_from(checkpoint).unwrap_or(0),
                    producer,
                    heads: heads
                        .into_iter()
                        .map(|(t, l)| (t, u64::try_from(l).unwrap_or(0)))
                        .collect(),
                    journal: rows
                        .iter()
                        .map(|r| $entry(r, OP).map(|(_, e)| e))
                        .collect::<$crate::custody_core::Result<_>>()?,
                })
            }

            async fn write(
                &self,
                holder: &$crate::custody_core::log_relay::LogRelayHolder,
                write: $crate::custody_core::log_relay::JournalWrite<'_>,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<bool> {
                use $crate::log_relay::pos;
                const OP: &str = "write log relay journal";
                let mut tx = self.begin(OP).await?;
                // The fence: `begin` and `lease` keep a takeover (a write
                // of the relay's row) out from this check to the commit
                // (the backend's module docs say how).
                let lease: Option<(Option<String>, Option<$Time>, i64)> =
                    $crate::sqlx::query_as($LEASE)
                        .bind(&holder.relay)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                match lease {
                    Some((Some(h), _, token)) if h == holder.holder && token == holder.token => {}
                    _ => return Ok(false),
                }
                let at = $at(now);
                for e in write.entries {
                    $crate::sqlx::query($crate::log_relay::UPSERT)
                        .bind(&holder.relay)
                        .bind(pos(e.position))
                        .bind($bind_id(&e.event_id))
                        .bind(&e.stream)
                        .bind(&e.topic)
                        .bind(e.sequence.map(pos))
                        .bind($status(e.status.code()))
                        .bind($count(e.attempts))
                        .bind($count(e.republish))
                        .bind(e.retry_at.map($at))
                        .bind(&e.error)
                        .bind(e.marker_id.as_ref().map($bind_id))
                        .bind(&e.reference)
                        .bind(e.published_at.map($at))
                        .bind(at)
                        .execute(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                }
                for (topic, last) in write.heads {
                    $crate::sqlx::query($SET_HEAD)
                        .bind(&holder.relay)
                        .bind(topic)
                        .bind(pos(*last))
                        .execute(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                }
                if let Some(c) = write.checkpoint {
                    $crate::sqlx::query($RAISE)
                        .bind(&holder.relay)
                        .bind(pos(c))
                        .bind(at)
                        .execute(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                }
                tx.commit().await.map_err($err(OP))?;
                Ok(true)
            }

            async fn prune(
                &self,
                relay: &str,
                older_than: $crate::chrono::DateTime<$crate::chrono::Utc>,
                limit: usize,
            ) -> $crate::custody_core::Result<u64> {
                let done = $crate::sqlx::query($PRUNE)
                    .bind(relay)
                    .bind($at(older_than))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await
                    .map_err($err("prune log relay journal"))?;
                Ok(done.rows_affected())
            }

            async fn entries_by_id(
                &self,
                ids: &[$crate::uuid::Uuid],
            ) -> $crate::custody_core::Result<Vec<(String, $crate::custody_core::log_relay::JournalEntry)>>
            {
                const OP: &str = "read log relay journal";
                let mut out = Vec::new();
                for id in ids {
                    let rows = $crate::sqlx::query(&format!(
                        "SELECT {} FROM custody_log_relay_journal WHERE event_id = $1 ORDER BY relay",
                        $crate::log_relay::COLUMNS
                    ))
                    .bind($bind_id(id))
                    .fetch_all(&self.pool)
                    .await
                    .map_err($err(OP))?;
                    for r in &rows {
                        out.push($entry(r, OP)?);
                    }
                }
                Ok(out)
            }

            async fn entries_in(
                &self,
                relay: &str,
                topic: &str,
                from: $crate::uuid::Uuid,
                to: $crate::uuid::Uuid,
            ) -> $crate::custody_core::Result<Vec<$crate::custody_core::log_relay::JournalEntry>> {
                const OP: &str = "read log relay journal";
                // the stored ids' order is the ids' byte order on every
                // backend (SQLite's hyphenated lower-case text sorts so too)
                let rows = $crate::sqlx::query(&format!(
                    "SELECT {} FROM custody_log_relay_journal \
                     WHERE relay = $1 AND topic = $2 AND event_id >= $3 AND event_id < $4",
                    $crate::log_relay::COLUMNS
                ))
                .bind(relay)
                .bind(topic)
                .bind($bind_id(&from))
                .bind($bind_id(&to))
                .fetch_all(&self.pool)
                .await
                .map_err($err(OP))?;
                rows.iter().map(|r| $entry(r, OP).map(|(_, e)| e)).collect()
            }

            async fn republish(
                &self,
                relay: &str,
                ids: &[$crate::uuid::Uuid],
            ) -> $crate::custody_core::Result<u64> {
                const OP: &str = "republish log relay events";
                let mut tx = self.begin(OP).await?;
                let now = $at($crate::chrono::Utc::now());
                let mut lowest: Option<i64> = None;
                let mut n = 0;
                for id in ids {
                    let rows: Vec<(i64,)> = $crate::sqlx::query_as($crate::log_relay::REPUBLISH)
                        .bind(relay)
                        .bind($bind_id(id))
                        .bind(now)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                    for (p,) in rows {
                        n += 1;
                        lowest = Some(lowest.map_or(p, |l| l.min(p)));
                    }
                }
                if let Some(p) = lowest {
                    // below the first reset event, and a new token: the holder's
                    // next write is refused, so it reloads and reads from here
                    $crate::sqlx::query($LOWER)
                        .bind(relay)
                        .bind(p - 1)
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                }
                tx.commit().await.map_err($err(OP))?;
                Ok(n)
            }
        }
    };
}
