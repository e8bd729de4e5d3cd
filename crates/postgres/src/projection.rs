//! CQRS projections' read-model side on PostgreSQL
//! ([`custody_core::projection`]): generations, checkpoints, requests and
//! dead letters in `custody_projection*` (migration 0013), the runner's
//! transaction being [`PgInbox`]'s (fenced by the consumer lease
//! `projection:<name>`, held FOR SHARE until it ends), and the operator's
//! port [`PgProjectionAdmin`].
//!
//! PostgreSQL's DDL is transactional, so the switch to a rebuilt generation
//! (drop and create the views, drop the old tables, move the pointer) is
//! one transaction: a reader sees the old read model or the new one
//! (`DROP VIEW` takes the view's ACCESS EXCLUSIVE lock, so a query on the
//! view waits for the switch to commit and then reads the new generation).
//!
//! The runner is the only writer of these rows except the operator's
//! request columns (`custody projection rebuild|reset|retry`), which the
//! runner's own updates never overwrite: `REPORT` and `SET_ACTIVE` set
//! other columns, and under READ COMMITTED a concurrent request only waits
//! for the row lock.

use chrono::{DateTime, Utc};
use custody_core::admin::BoxFuture;
use custody_core::event::RecordedEvent;
use custody_core::projection::{
    unknown_projection, validate_table, Generation, ProjectionAdmin, ProjectionDeadLetter,
    ProjectionState, ProjectionStatus, ProjectionStore, Request, Tables,
};
use custody_core::{Error, Result};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::error::db as map_err;
use crate::PgInbox;

type Tx = Transaction<'static, Postgres>;

const LOAD: &str = "SELECT active, request, request_to FROM custody_projection WHERE name = $1";
const GENERATIONS: &str = "SELECT generation, version, checkpoint, applied \
     FROM custody_projection_generation WHERE name = $1 ORDER BY generation";
const ENSURE: &str =
    "INSERT INTO custody_projection (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
const CREATE_GENERATION: &str = "INSERT INTO custody_projection_generation \
     (name, generation, version, checkpoint, applied, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
const CHECKPOINT: &str = "UPDATE custody_projection_generation \
     SET checkpoint = $3, applied = applied + $4 WHERE name = $1 AND generation = $2";
const SET_ACTIVE: &str = "UPDATE custody_projection SET active = $2 WHERE name = $1";
const FORGET_GENERATION: &str =
    "DELETE FROM custody_projection_generation WHERE name = $1 AND generation = $2";
const FORGET_DEAD: &str =
    "DELETE FROM custody_projection_dead_letter WHERE name = $1 AND generation = $2";
const CLEAR_REQUEST: &str = "UPDATE custody_projection \
     SET request = NULL, request_to = NULL, requested_at = NULL WHERE name = $1";
const REPORT: &str = "UPDATE custody_projection \
     SET head = $2, lag_events = $3, lag_seconds = $4, reported_at = $5 WHERE name = $1";
const DEAD_LETTER: &str = "INSERT INTO custody_projection_dead_letter \
     (name, generation, position, stream, stream_version, event_id, event_type, reason, failed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     ON CONFLICT (name, generation, position) DO UPDATE SET \
       reason = excluded.reason, failed_at = excluded.failed_at, retry_requested = FALSE";
const RETRIES: &str = "SELECT position FROM custody_projection_dead_letter \
     WHERE name = $1 AND generation = $2 AND retry_requested ORDER BY position";
const REMOVE_DEAD: &str = "DELETE FROM custody_projection_dead_letter \
     WHERE name = $1 AND generation = $2 AND position = $3";

fn pos(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn request_of(kind: Option<String>, to: Option<i64>) -> Option<Request> {
    match kind.as_deref() {
        Some("rebuild") => Some(Request::Rebuild),
        Some("reset") => Some(Request::Reset {
            to: to.map_or(0, pos),
        }),
        _ => None,
    }
}

impl ProjectionStore for PgInbox {
    async fn load(&self, tx: &mut Tx, name: &str) -> Result<Option<ProjectionState>> {
        let Some(row) = sqlx::query(LOAD)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err("load projection"))?
        else {
            return Ok(None);
        };
        let active: Option<i64> = row.get(0);
        let request = request_of(row.get(1), row.get(2));
        let Some(active) = active.map(pos) else {
            return Ok(None);
        };
        let rows = sqlx::query(GENERATIONS)
            .bind(name)
            .fetch_all(&mut **tx)
            .await
            .map_err(map_err("load projection generations"))?;
        let mut active_gen = None;
        let mut building = None;
        for r in rows {
            let g = Generation {
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
            return Err(Error::store(
                "postgres",
                "load projection",
                false,
                format!("projection {name:?}: its active generation {active} has no record; the read-model database was edited by hand, reset the projection (custody projection reset)"),
            ));
        };
        Ok(Some(ProjectionState {
            active,
            building,
            request,
        }))
    }

    async fn create_generation(
        &self,
        tx: &mut Tx,
        name: &str,
        generation: &Generation,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(ENSURE)
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(map_err("create projection"))?;
        sqlx::query(CREATE_GENERATION)
            .bind(name)
            .bind(int(generation.generation))
            .bind(i64::from(generation.version))
            .bind(int(generation.checkpoint))
            .bind(int(generation.applied))
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(map_err("create projection generation"))?;
        Ok(())
    }

    async fn save_checkpoint(
        &self,
        tx: &mut Tx,
        name: &str,
        generation: u64,
        position: u64,
        applied: u64,
    ) -> Result<()> {
        sqlx::query(CHECKPOINT)
            .bind(name)
            .bind(int(generation))
            .bind(int(position))
            .bind(int(applied))
            .execute(&mut **tx)
            .await
            .map_err(map_err("save projection checkpoint"))?;
        Ok(())
    }

    async fn activate(
        &self,
        tx: &mut Tx,
        name: &str,
        generation: u64,
        bases: &[String],
    ) -> Result<Option<u64>> {
        let previous: Option<i64> =
            sqlx::query_scalar("SELECT active FROM custody_projection WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut **tx)
                .await
                .map_err(map_err("load projection"))?
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
                sqlx::query(&ddl)
                    .execute(&mut **tx)
                    .await
                    .map_err(map_err("switch projection views"))?;
            }
        }
        sqlx::query(SET_ACTIVE)
            .bind(name)
            .bind(int(generation))
            .execute(&mut **tx)
            .await
            .map_err(map_err("switch projection"))?;
        let previous = previous.map(pos).filter(|p| *p != generation);
        if let Some(old) = previous {
            self.drop_generation(tx, name, old, bases).await?;
        }
        Ok(previous)
    }

    async fn drop_generation(
        &self,
        tx: &mut Tx,
        name: &str,
        generation: u64,
        bases: &[String],
    ) -> Result<()> {
        let old = Tables::new(generation);
        for base in bases {
            validate_table(base)?;
            sqlx::query(&format!("DROP TABLE IF EXISTS \"{}\"", old.name(base)))
                .execute(&mut **tx)
                .await
                .map_err(map_err("drop projection generation"))?;
        }
        for q in [FORGET_DEAD, FORGET_GENERATION] {
            sqlx::query(q)
                .bind(name)
                .bind(int(generation))
                .execute(&mut **tx)
                .await
                .map_err(map_err("drop projection generation"))?;
        }
        Ok(())
    }

    async fn clear_request(&self, tx: &mut Tx, name: &str) -> Result<()> {
        sqlx::query(CLEAR_REQUEST)
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(map_err("clear projection request"))?;
        Ok(())
    }

    async fn report(
        &self,
        tx: &mut Tx,
        name: &str,
        head: u64,
        lag_events: u64,
        lag_seconds: f64,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(REPORT)
            .bind(name)
            .bind(int(head))
            .bind(int(lag_events))
            .bind(lag_seconds)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(map_err("report projection lag"))?;
        Ok(())
    }

    async fn dead_letter_event(
        &self,
        tx: &mut Tx,
        name: &str,
        generation: u64,
        event: &RecordedEvent,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(DEAD_LETTER)
            .bind(name)
            .bind(int(generation))
            .bind(int(event.position))
            .bind(custody_core::storable_text(&event.stream).as_ref())
            .bind(int(event.version))
            .bind(event.id)
            .bind(custody_core::storable_text(&event.event_type).as_ref())
            .bind(custody_core::storable_text(reason).as_ref())
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(map_err("dead-letter projection event"))?;
        Ok(())
    }

    async fn retries(&self, tx: &mut Tx, name: &str, generation: u64) -> Result<Vec<u64>> {
        let rows: Vec<i64> = sqlx::query_scalar(RETRIES)
            .bind(name)
            .bind(int(generation))
            .fetch_all(&mut **tx)
            .await
            .map_err(map_err("read projection retries"))?;
        Ok(rows.into_iter().map(pos).collect())
    }

    async fn remove_dead_letter(
        &self,
        tx: &mut Tx,
        name: &str,
        generation: u64,
        position: u64,
    ) -> Result<()> {
        sqlx::query(REMOVE_DEAD)
            .bind(name)
            .bind(int(generation))
            .bind(int(position))
            .execute(&mut **tx)
            .await
            .map_err(map_err("remove projection dead letter"))?;
        Ok(())
    }
}

/// The operator's port ([`ProjectionAdmin`]) on a PostgreSQL read-model
/// database: status, requests, dead letters. It only writes requests; the
/// active runner does the work.
#[derive(Debug, Clone)]
pub struct PgProjectionAdmin {
    pool: PgPool,
}

impl PgProjectionAdmin {
    /// The port on `pool` (a read-model database migrated by custody).
    pub fn new(pool: PgPool) -> Self {
        PgProjectionAdmin { pool }
    }
}

// The runner's lease row is custody_core::projection::lease_name's
// `projection:<name>`.
const STATUS: &str =
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
     WHERE $1::text IS NULL OR p.name = $1 \
     ORDER BY p.name";

const REQUEST: &str = "UPDATE custody_projection \
     SET request = $2, request_to = $3, requested_at = $4 WHERE name = $1 AND active IS NOT NULL";

const DEAD_LETTERS: &str =
    "SELECT d.generation, d.position, d.stream, d.stream_version, d.event_id, \
       d.event_type, d.reason, d.failed_at, d.retry_requested \
     FROM custody_projection_dead_letter d JOIN custody_projection p \
       ON p.name = d.name AND p.active = d.generation \
     WHERE d.name = $1 ORDER BY d.position";

const RETRY: &str = "UPDATE custody_projection_dead_letter SET retry_requested = TRUE \
     WHERE name = $1 AND generation = (SELECT active FROM custody_projection WHERE name = $1) \
       AND ($2::bigint IS NULL OR position = $2)";

fn generation_at(row: &sqlx::postgres::PgRow, at: usize) -> Option<Generation> {
    let generation: Option<i64> = row.get(at);
    generation.map(|g| Generation {
        generation: pos(g),
        version: u32::try_from(row.get::<i64, _>(at + 1)).unwrap_or(0),
        checkpoint: pos(row.get(at + 2)),
        applied: pos(row.get(at + 3)),
    })
}

impl PgProjectionAdmin {
    async fn known(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT name FROM custody_projection ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err("list projections"))
    }

    async fn status_impl(&self, name: Option<&str>) -> Result<Vec<ProjectionStatus>> {
        let rows = sqlx::query(STATUS)
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err("read projection status"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(active) = generation_at(&row, 9) else {
                continue;
            };
            let holder: Option<String> = row.get(7);
            let until: Option<DateTime<Utc>> = row.get(8);
            out.push(ProjectionStatus {
                name: row.get(0),
                request: request_of(row.get(1), row.get(2)),
                head: pos(row.get(3)),
                lag_events: pos(row.get(4)),
                lag_seconds: row.get(5),
                reported_at: row.get::<Option<DateTime<Utc>>, _>(6),
                runner_until: holder.as_ref().and(until),
                runner: holder,
                active,
                rebuild: generation_at(&row, 13),
                dead_letters: pos(row.get(17)),
            });
        }
        if let Some(name) = name {
            if out.is_empty() {
                return Err(unknown_projection(name, &self.known().await?));
            }
        }
        Ok(out)
    }

    async fn request_impl(&self, name: &str, request: Request) -> Result<()> {
        let (kind, to) = match request {
            Request::Rebuild => ("rebuild", None),
            Request::Reset { to } => ("reset", Some(int(to))),
        };
        let done = sqlx::query(REQUEST)
            .bind(name)
            .bind(kind)
            .bind(to)
            .bind(Utc::now())
            .execute(&self.pool)
            .await
            .map_err(map_err("request projection rebuild"))?;
        if done.rows_affected() == 0 {
            return Err(unknown_projection(name, &self.known().await?));
        }
        Ok(())
    }

    async fn dead_letters_impl(&self, name: &str) -> Result<Vec<ProjectionDeadLetter>> {
        let rows = sqlx::query(DEAD_LETTERS)
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err("list projection dead letters"))?;
        Ok(rows
            .into_iter()
            .map(|r| ProjectionDeadLetter {
                projection: name.to_owned(),
                generation: pos(r.get(0)),
                position: pos(r.get(1)),
                stream: r.get(2),
                stream_version: pos(r.get(3)),
                event_id: r.get(4),
                event_type: r.get(5),
                reason: r.get(6),
                failed_at: r.get(7),
                retry_requested: r.get(8),
            })
            .collect())
    }

    async fn retry_impl(&self, name: &str, position: Option<u64>) -> Result<u64> {
        let done = sqlx::query(RETRY)
            .bind(name)
            .bind(position.map(int))
            .execute(&self.pool)
            .await
            .map_err(map_err("request projection retry"))?;
        if done.rows_affected() == 0 && !self.known().await?.iter().any(|k| k == name) {
            return Err(unknown_projection(name, &self.known().await?));
        }
        Ok(done.rows_affected())
    }
}

impl ProjectionAdmin for PgProjectionAdmin {
    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<ProjectionStatus>>> {
        Box::pin(self.status_impl(name))
    }
    fn request<'a>(&'a self, name: &'a str, request: Request) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.request_impl(name, request))
    }
    fn dead_letters<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ProjectionDeadLetter>>> {
        Box::pin(self.dead_letters_impl(name))
    }
    fn retry<'a>(&'a self, name: &'a str, position: Option<u64>) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.retry_impl(name, position))
    }
}
