//! CQRS projections' read-model side ([`custody_core::projection`]), the
//! part every SQL backend shares: the statements that read the same on
//! each, the conversions between the contract's numbers and the stored
//! `BIGINT`s, and [`projection_impl!`](crate::projection_impl), the Rust
//! around them. Each backend keeps what differs: how it stores time, ids
//! and flags, and the statements that spell booleans or casts its own way.

use custody_core::projection::Request;

/// Projection `$1`'s active generation and pending request.
pub const LOAD: &str = "SELECT active, request, request_to FROM custody_projection WHERE name = $1";
/// Projection `$1`'s generation records, oldest first.
pub const GENERATIONS: &str = "SELECT generation, version, checkpoint, applied \
     FROM custody_projection_generation WHERE name = $1 ORDER BY generation";
/// The projection's row, if it has none yet.
pub const ENSURE: &str =
    "INSERT INTO custody_projection (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
/// A new generation's record.
pub const CREATE_GENERATION: &str = "INSERT INTO custody_projection_generation \
     (name, generation, version, checkpoint, applied, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
/// A generation's checkpoint, and the events applied since.
pub const CHECKPOINT: &str = "UPDATE custody_projection_generation \
     SET checkpoint = $3, applied = applied + $4 WHERE name = $1 AND generation = $2";
/// Projection `$1`'s active generation, read before a switch.
pub const ACTIVE: &str = "SELECT active FROM custody_projection WHERE name = $1";
/// The pointer to the active generation (not the request columns, which
/// are the operator's).
pub const SET_ACTIVE: &str = "UPDATE custody_projection SET active = $2 WHERE name = $1";
/// A dropped generation's record.
pub const FORGET_GENERATION: &str =
    "DELETE FROM custody_projection_generation WHERE name = $1 AND generation = $2";
/// A dropped generation's dead letters.
pub const FORGET_DEAD: &str =
    "DELETE FROM custody_projection_dead_letter WHERE name = $1 AND generation = $2";
/// The operator's request, done.
pub const CLEAR_REQUEST: &str = "UPDATE custody_projection \
     SET request = NULL, request_to = NULL, requested_at = NULL WHERE name = $1";
/// The runner's lag report (not the request columns, which are the
/// operator's).
pub const REPORT: &str = "UPDATE custody_projection \
     SET head = $2, lag_events = $3, lag_seconds = $4, reported_at = $5 WHERE name = $1";
/// A dead letter retried and applied.
pub const REMOVE_DEAD: &str = "DELETE FROM custody_projection_dead_letter \
     WHERE name = $1 AND generation = $2 AND position = $3";
/// Every projection's name.
pub const KNOWN: &str = "SELECT name FROM custody_projection ORDER BY name";
/// The operator's request on a projection that has an active generation.
pub const REQUEST: &str = "UPDATE custody_projection \
     SET request = $2, request_to = $3, requested_at = $4 WHERE name = $1 AND active IS NOT NULL";
/// Projection `$1`'s dead letters in its active generation.
pub const DEAD_LETTERS: &str =
    "SELECT d.generation, d.position, d.stream, d.stream_version, d.event_id, \
       d.event_type, d.reason, d.failed_at, d.retry_requested \
     FROM custody_projection_dead_letter d JOIN custody_projection p \
       ON p.name = d.name AND p.active = d.generation \
     WHERE d.name = $1 ORDER BY d.position";

/// A stored number as the contract's (never negative when custody wrote it).
pub fn pos(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The contract's number as stored.
pub fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The stored request columns as a [`Request`].
pub fn request_of(kind: Option<String>, to: Option<i64>) -> Option<Request> {
    match kind.as_deref() {
        Some("rebuild") => Some(Request::Rebuild),
        Some("reset") => Some(Request::Reset {
            to: to.map_or(0, pos),
        }),
        _ => None,
    }
}

/// The operator's status query (`status_impl`): every projection, or only
/// `$1`'s (`filter`, the backend's spelling of "`$1` is NULL or
/// `p.name = $1`"), with its active and rebuilding generations, runner lease
/// (custody_core::projection::lease_name's `projection:<name>`) and the
/// active generation's dead-letter count.
#[macro_export]
macro_rules! projection_status_sql {
    ($filter:literal) => {
        concat!(
            "SELECT p.name, p.request, p.request_to, p.head, p.lag_events, p.lag_seconds, \
               p.reported_at, l.holder, l.expires_at, \
               g.generation, g.version, g.checkpoint, g.applied, \
               b.generation, b.version, b.checkpoint, b.applied, \
               (SELECT COUNT(*) FROM custody_projection_dead_letter d \
                 WHERE d.name = p.name AND d.generation = p.active) \
             FROM custody_projection p \
             JOIN custody_projection_generation g ON g.name = p.name AND g.generation = p.active \
             LEFT JOIN custody_projection_generation b ON b.name = p.name AND b.generation > p.active \
             LEFT JOIN custody_consumer_lease l ON l.consumer = 'projection:' || p.name \
             WHERE ",
            $filter,
            " ORDER BY p.name"
        )
    };
}

/// The projection store on an inbox ([`custody_core::projection::ProjectionStore`],
/// the runner's side, in the inbox's transaction) and the operator's port
/// ([`custody_core::projection::ProjectionAdmin`]) on a pool, written once
/// for every SQL backend. The backend gives:
///
/// - `inbox`, `db`, `pool`, `row`: its inbox, sqlx database, pool and row types;
/// - `backend`: its name in errors; `err`: its sqlx error mapping;
/// - `at`: how it binds a time; `time: Stored => read`: how it reads one;
/// - `bind_id`: how it binds an event id (given `&Uuid`);
///   `id: Stored => read`: how it reads one;
/// - `flag: Stored => read`: how it reads a boolean column;
/// - `sql`: the statements it spells its own way (booleans, casts):
///   `dead_letter` (upsert of `$1..$9`, clearing `retry_requested`),
///   `retries` (positions of `$1`/`$2`'s dead letters to retry), `status`
///   (every projection, or `$1`'s, with its generations, runner lease and
///   dead-letter count) and `retry` (`$1`'s dead letter at `$2`, or all of
///   them when `$2` is NULL, marked for retry);
/// - the admin struct's doc and name: the macro defines it on `pool`.
#[macro_export]
macro_rules! projection_impl {
    (
        inbox: $inbox:ty,
        db: $db:ty,
        pool: $pool:ty,
        row: $Row:ty,
        backend: $backend:expr,
        err: $err:path,
        at: $at:path,
        time: $Time:ty => $time:path,
        bind_id: $bind_id:path,
        id: $Id:ty => $uuid:path,
        flag: $Flag:ty => $flag:path,
        sql: {
            dead_letter: $DEAD_LETTER:expr,
            retries: $RETRIES:expr,
            status: $STATUS:expr,
            retry: $RETRY:expr $(,)?
        } $(,)?;
        $(#[$meta:meta])*
        pub struct $admin:ident;
    ) => {
        impl $crate::custody_core::projection::ProjectionStore for $inbox {
            async fn load(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
            ) -> $crate::custody_core::Result<
                Option<$crate::custody_core::projection::ProjectionState>,
            > {
                use $crate::projection::{pos, request_of};
                use $crate::sqlx::Row as _;
                let Some(row) = $crate::sqlx::query($crate::projection::LOAD)
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err($err("load projection"))?
                else {
                    return Ok(None);
                };
                let active: Option<i64> = row.get(0);
                let request = request_of(row.get(1), row.get(2));
                let Some(active) = active.map(pos) else {
                    return Ok(None);
                };
                let rows = $crate::sqlx::query($crate::projection::GENERATIONS)
                    .bind(name)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err($err("load projection generations"))?;
                let mut active_gen = None;
                let mut building = None;
                for r in rows {
                    let g = $crate::custody_core::projection::Generation {
                        generation: pos(r.get(0)),
                        version: u32::try_from(r.get::<i64, _>(1)).unwrap_or(0),
                        checkpoint: pos(r.get(2)),
                        applied: pos(r.get(3)),
                    };
                    if g.generation == active {
                        active_gen = Some(g);
                    } else if g.generation > active {
                        building = Some(g);
                    }
                }
                let Some(active) = active_gen else {
                    return Err($crate::custody_core::Error::store(
                        $backend,
                        "load projection",
                        false,
                        format!("projection {name:?}: its active generation {active} has no record; the read-model database was edited by hand, reset the projection (custody projection reset)"),
                    ));
                };
                Ok(Some($crate::custody_core::projection::ProjectionState {
                    active,
                    building,
                    request,
                }))
            }

            async fn create_generation(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: &$crate::custody_core::projection::Generation,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<()> {
                use $crate::projection::int;
                $crate::sqlx::query($crate::projection::ENSURE)
                    .bind(name)
                    .execute(&mut **tx)
                    .await
                    .map_err($err("create projection"))?;
                $crate::sqlx::query($crate::projection::CREATE_GENERATION)
                    .bind(name)
                    .bind(int(generation.generation))
                    .bind(i64::from(generation.version))
                    .bind(int(generation.checkpoint))
                    .bind(int(generation.applied))
                    .bind($at(now))
                    .execute(&mut **tx)
                    .await
                    .map_err($err("create projection generation"))?;
                Ok(())
            }

            async fn save_checkpoint(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: u64,
                position: u64,
                applied: u64,
            ) -> $crate::custody_core::Result<()> {
                use $crate::projection::int;
                $crate::sqlx::query($crate::projection::CHECKPOINT)
                    .bind(name)
                    .bind(int(generation))
                    .bind(int(position))
                    .bind(int(applied))
                    .execute(&mut **tx)
                    .await
                    .map_err($err("save projection checkpoint"))?;
                Ok(())
            }

            async fn activate(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: u64,
                bases: &[String],
            ) -> $crate::custody_core::Result<Option<u64>> {
                use $crate::custody_core::projection::{validate_table, Tables};
                use $crate::projection::{int, pos};
                let previous: Option<i64> = $crate::sqlx::query_scalar($crate::projection::ACTIVE)
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err($err("load projection"))?
                    .flatten();
                let new = Tables::new(generation);
                for base in bases {
                    validate_table(base)?;
                    // names checked above: [A-Za-z0-9_] only
                    for ddl in [
                        format!("DROP VIEW IF EXISTS \"{base}\""),
                        format!(
                            "CREATE VIEW \"{base}\" AS SELECT * FROM \"{}\"",
                            new.name(base)
                        ),
                    ] {
                        $crate::sqlx::query(&ddl)
                            .execute(&mut **tx)
                            .await
                            .map_err($err("switch projection views"))?;
                    }
                }
                $crate::sqlx::query($crate::projection::SET_ACTIVE)
                    .bind(name)
                    .bind(int(generation))
                    .execute(&mut **tx)
                    .await
                    .map_err($err("switch projection"))?;
                let previous = previous.map(pos).filter(|p| *p != generation);
                if let Some(old) = previous {
                    self.drop_generation(tx, name, old, bases).await?;
                }
                Ok(previous)
            }

            async fn drop_generation(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: u64,
                bases: &[String],
            ) -> $crate::custody_core::Result<()> {
                use $crate::custody_core::projection::{validate_table, Tables};
                use $crate::projection::int;
                let old = Tables::new(generation);
                for base in bases {
                    validate_table(base)?;
                    $crate::sqlx::query(&format!("DROP TABLE IF EXISTS \"{}\"", old.name(base)))
                        .execute(&mut **tx)
                        .await
                        .map_err($err("drop projection generation"))?;
                }
                for q in [$crate::projection::FORGET_DEAD, $crate::projection::FORGET_GENERATION] {
                    $crate::sqlx::query(q)
                        .bind(name)
                        .bind(int(generation))
                        .execute(&mut **tx)
                        .await
                        .map_err($err("drop projection generation"))?;
                }
                Ok(())
            }

            async fn clear_request(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
            ) -> $crate::custody_core::Result<()> {
                $crate::sqlx::query($crate::projection::CLEAR_REQUEST)
                    .bind(name)
                    .execute(&mut **tx)
                    .await
                    .map_err($err("clear projection request"))?;
                Ok(())
            }

            async fn report(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                head: u64,
                lag_events: u64,
                lag_seconds: f64,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<()> {
                use $crate::projection::int;
                $crate::sqlx::query($crate::projection::REPORT)
                    .bind(name)
                    .bind(int(head))
                    .bind(int(lag_events))
                    .bind(lag_seconds)
                    .bind($at(now))
                    .execute(&mut **tx)
                    .await
                    .map_err($err("report projection lag"))?;
                Ok(())
            }

            async fn dead_letter_event(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: u64,
                event: &$crate::custody_core::event::RecordedEvent,
                reason: &str,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<()> {
                use $crate::projection::int;
                $crate::sqlx::query($DEAD_LETTER)
                    .bind(name)
                    .bind(int(generation))
                    .bind(int(event.position))
                    .bind($crate::custody_core::storable_text(&event.stream).as_ref())
                    .bind(int(event.version))
                    .bind($bind_id(&event.id))
                    .bind($crate::custody_core::storable_text(&event.event_type).as_ref())
                    .bind($crate::custody_core::storable_text(reason).as_ref())
                    .bind($at(now))
                    .execute(&mut **tx)
                    .await
                    .map_err($err("dead-letter projection event"))?;
                Ok(())
            }

            async fn retries(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: u64,
            ) -> $crate::custody_core::Result<Vec<u64>> {
                use $crate::projection::{int, pos};
                let rows: Vec<i64> = $crate::sqlx::query_scalar($RETRIES)
                    .bind(name)
                    .bind(int(generation))
                    .fetch_all(&mut **tx)
                    .await
                    .map_err($err("read projection retries"))?;
                Ok(rows.into_iter().map(pos).collect())
            }

            async fn remove_dead_letter(
                &self,
                tx: &mut $crate::sqlx::Transaction<'static, $db>,
                name: &str,
                generation: u64,
                position: u64,
            ) -> $crate::custody_core::Result<()> {
                use $crate::projection::int;
                $crate::sqlx::query($crate::projection::REMOVE_DEAD)
                    .bind(name)
                    .bind(int(generation))
                    .bind(int(position))
                    .execute(&mut **tx)
                    .await
                    .map_err($err("remove projection dead letter"))?;
                Ok(())
            }
        }

        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $admin {
            pool: $pool,
        }

        impl $admin {
            /// The port on `pool` (a read-model database migrated by custody).
            pub fn new(pool: $pool) -> Self {
                $admin { pool }
            }

            fn generation_at(
                row: &$Row,
                at: usize,
            ) -> Option<$crate::custody_core::projection::Generation> {
                use $crate::projection::pos;
                use $crate::sqlx::Row as _;
                let generation: Option<i64> = row.get(at);
                generation.map(|g| $crate::custody_core::projection::Generation {
                    generation: pos(g),
                    version: u32::try_from(row.get::<i64, _>(at + 1)).unwrap_or(0),
                    checkpoint: pos(row.get(at + 2)),
                    applied: pos(row.get(at + 3)),
                })
            }

            async fn known(&self) -> $crate::custody_core::Result<Vec<String>> {
                $crate::sqlx::query_scalar($crate::projection::KNOWN)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($err("list projections"))
            }

            async fn status_impl(
                &self,
                name: Option<&str>,
            ) -> $crate::custody_core::Result<
                Vec<$crate::custody_core::projection::ProjectionStatus>,
            > {
                use $crate::projection::{pos, request_of};
                use $crate::sqlx::Row as _;
                let rows = $crate::sqlx::query($STATUS)
                    .bind(name)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($err("read projection status"))?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let Some(active) = Self::generation_at(&row, 9) else {
                        continue;
                    };
                    let holder: Option<String> = row.get(7);
                    let until: Option<$Time> = row.get(8);
                    out.push($crate::custody_core::projection::ProjectionStatus {
                        name: row.get(0),
                        request: request_of(row.get(1), row.get(2)),
                        head: pos(row.get(3)),
                        lag_events: pos(row.get(4)),
                        lag_seconds: row.get(5),
                        reported_at: row.get::<Option<$Time>, _>(6).map($time),
                        runner_until: holder.as_ref().and(until).map($time),
                        runner: holder,
                        active,
                        rebuild: Self::generation_at(&row, 13),
                        dead_letters: pos(row.get(17)),
                    });
                }
                if let Some(name) = name {
                    if out.is_empty() {
                        return Err($crate::custody_core::projection::unknown_projection(
                            name,
                            &self.known().await?,
                        ));
                    }
                }
                Ok(out)
            }

            async fn request_impl(
                &self,
                name: &str,
                request: $crate::custody_core::projection::Request,
            ) -> $crate::custody_core::Result<()> {
                use $crate::custody_core::projection::Request;
                let (kind, to) = match request {
                    Request::Rebuild => ("rebuild", None),
                    Request::Reset { to } => ("reset", Some($crate::projection::int(to))),
                };
                let done = $crate::sqlx::query($crate::projection::REQUEST)
                    .bind(name)
                    .bind(kind)
                    .bind(to)
                    .bind($at($crate::chrono::Utc::now()))
                    .execute(&self.pool)
                    .await
                    .map_err($err("request projection rebuild"))?;
                if done.rows_affected() == 0 {
                    return Err($crate::custody_core::projection::unknown_projection(
                        name,
                        &self.known().await?,
                    ));
                }
                Ok(())
            }

            async fn dead_letters_impl(
                &self,
                name: &str,
            ) -> $crate::custody_core::Result<
                Vec<$crate::custody_core::projection::ProjectionDeadLetter>,
            > {
                use $crate::projection::pos;
                use $crate::sqlx::Row as _;
                let rows = $crate::sqlx::query($crate::projection::DEAD_LETTERS)
                    .bind(name)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($err("list projection dead letters"))?;
                Ok(rows
                    .into_iter()
                    .map(|r| $crate::custody_core::projection::ProjectionDeadLetter {
                        projection: name.to_owned(),
                        generation: pos(r.get(0)),
                        position: pos(r.get(1)),
                        stream: r.get(2),
                        stream_version: pos(r.get(3)),
                        event_id: $uuid(r.get::<$Id, _>(4)),
                        event_type: r.get(5),
                        reason: r.get(6),
                        failed_at: $time(r.get::<$Time, _>(7)),
                        retry_requested: $flag(r.get::<$Flag, _>(8)),
                    })
                    .collect())
            }

            async fn retry_impl(
                &self,
                name: &str,
                position: Option<u64>,
            ) -> $crate::custody_core::Result<u64> {
                let done = $crate::sqlx::query($RETRY)
                    .bind(name)
                    .bind(position.map($crate::projection::int))
                    .execute(&self.pool)
                    .await
                    .map_err($err("request projection retry"))?;
                if done.rows_affected() == 0 && !self.known().await?.iter().any(|k| k == name) {
                    return Err($crate::custody_core::projection::unknown_projection(
                        name,
                        &self.known().await?,
                    ));
                }
                Ok(done.rows_affected())
            }
        }

        impl $crate::custody_core::projection::ProjectionAdmin for $admin {
            fn status<'a>(
                &'a self,
                name: Option<&'a str>,
            ) -> $crate::custody_core::admin::BoxFuture<
                'a,
                $crate::custody_core::Result<Vec<$crate::custody_core::projection::ProjectionStatus>>,
            > {
                Box::pin(self.status_impl(name))
            }
            fn request<'a>(
                &'a self,
                name: &'a str,
                request: $crate::custody_core::projection::Request,
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<()>> {
                Box::pin(self.request_impl(name, request))
            }
            fn dead_letters<'a>(
                &'a self,
                name: &'a str,
            ) -> $crate::custody_core::admin::BoxFuture<
                'a,
                $crate::custody_core::Result<
                    Vec<$crate::custody_core::projection::ProjectionDeadLetter>,
                >,
            > {
                Box::pin(self.dead_letters_impl(name))
            }
            fn retry<'a>(
                &'a self,
                name: &'a str,
                position: Option<u64>,
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<u64>> {
                Box::pin(self.retry_impl(name, position))
            }
        }
    };
}
