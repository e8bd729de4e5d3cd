//! Throwaway resources of one demo, bench or chaos run on the real
//! services: fresh PostgreSQL databases and a JetStream stream, removed at
//! the end whatever happened.

use std::future::Future;

use anyhow::Context;
use sqlx::Connection;
use uuid::Uuid;

/// A random tag for the database, stream and subject names of one run.
pub fn run_tag() -> String {
    Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// The `--seed` given, or one from the clock (printed by the caller, so a
/// run can be replayed).
pub fn seed_or_now(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7)
    })
}

/// `postgres://u@h:p/db?q` → `postgres://u@h:p/<name>?q`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// The database a `postgres://…/<name>?…` URL names, if it names one.
pub fn database_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (_, name) = rest.split_once('/')?;
    Some(name.to_owned()).filter(|n| !n.is_empty())
}

/// PostgreSQL refused the connection because the database named does not
/// exist. sqlx has no portable classification for this, so the SQLSTATE
/// `3D000` (invalid_catalog_name) decides.
fn is_missing_database(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "3D000")
}

/// Fresh PostgreSQL databases of one run, dropped by [`Databases::drop_all`].
pub struct Databases {
    server: String,
    names: Vec<String>,
}

impl Databases {
    /// Create each of `names` on `server`; if one cannot be created, those
    /// already created are dropped again.
    pub async fn create(server: &str, names: &[String]) -> anyhow::Result<Databases> {
        let mut c = match sqlx::PgConnection::connect(server).await {
            Ok(c) => c,
            Err(e) if is_missing_database(&e) => {
                let name = database_of(server).unwrap_or_else(|| "postgres".to_owned());
                anyhow::bail!(
                    "database {name:?} named in {} does not exist on that server. \
                     The run creates its own fresh databases there and uses the one in the URL only to connect: \
                     name one that exists (e.g. {}), or create it first (`createdb {name}`, or `CREATE DATABASE {name}` in psql)",
                    crate::process::redact(server),
                    crate::process::redact(&with_database(server, "postgres"))
                );
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot connect to PostgreSQL at {}",
                        crate::process::redact(server)
                    )
                })
            }
        };
        let mut dbs = Databases {
            server: server.to_owned(),
            names: Vec::new(),
        };
        for name in names {
            if let Err(e) = sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut c)
                .await
            {
                dbs.drop_all().await;
                return Err(e).context(format!("cannot create database {name}"));
            }
            dbs.names.push(name.clone());
        }
        Ok(dbs)
    }

    /// The URL of each database, in the order they were named.
    pub fn urls(&self) -> Vec<String> {
        self.names
            .iter()
            .map(|n| with_database(&self.server, n))
            .collect()
    }

    /// Drop every database of the run (errors ignored: cleanup).
    pub async fn drop_all(&self) {
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.server).await {
            for n in &self.names {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        }
    }
}

/// Run `f` with the URLs of fresh databases `names` on `server`; the
/// databases are dropped afterwards, whether `f` succeeded or not.
pub async fn with_databases<T, F, Fut>(server: &str, names: &[String], f: F) -> anyhow::Result<T>
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let dbs = Databases::create(server, names).await?;
    let result = f(dbs.urls()).await;
    dbs.drop_all().await;
    result
}

/// Delete a JetStream stream (cleanup; errors ignored).
pub async fn delete_stream(nats: &str, stream: &str) {
    if let Ok(client) = custody::nats::connect(nats).await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(stream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url() {
        assert_eq!(
            with_database("postgres://p@127.0.0.1:5432/test?sslmode=disable", "x"),
            "postgres://p@127.0.0.1:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://p@h", "x"), "postgres://p@h/x");
        assert_eq!(
            database_of("postgres://p:s@h:5432/test?sslmode=disable").as_deref(),
            Some("test")
        );
        assert_eq!(database_of("postgres://p@h"), None);
        assert_eq!(database_of("postgres://p@h/"), None);
    }
}
