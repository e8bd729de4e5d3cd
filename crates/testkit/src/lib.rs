//! Test support for custody's integration tests.
//!
//! Tests talk to the real services on 127.0.0.1. A test that needs a service
//! asks for it here: when the service is not reachable the test is skipped
//! with a message, unless `CUSTODY_REQUIRE_SERVICES=1` is set (as in CI), in
//! which case it fails.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let Some(db) = custody_testkit::postgres_db().await? else { return Ok(()) };
//! let pool = sqlx::PgPool::connect(&db.url).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;

use sqlx::Connection;

mod certs;
pub mod conformance;
pub mod memory;
mod nats_server;
mod pg_cluster;
pub mod process;
mod proxy;
pub use certs::TestCerts;
pub use nats_server::*;
pub use pg_cluster::PgCluster;
pub use proxy::FaultProxy;

/// Whether missing services must fail tests (`CUSTODY_REQUIRE_SERVICES=1`).
pub fn require_services() -> bool {
    matches!(
        std::env::var("CUSTODY_REQUIRE_SERVICES").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// Skip (return `Ok(None)`) or fail when `service` is unreachable.
fn unavailable<T>(service: &str, detail: &str) -> anyhow::Result<Option<T>> {
    if require_services() {
        anyhow::bail!(
            "{service} is required (CUSTODY_REQUIRE_SERVICES=1) but unreachable: {detail}. Start it (see docs/ARCHITECTURE.md, section Services for development and CI, or .ci/run)"
        );
    }
    report_skip(&format!(
        "{service} unreachable ({detail}); set CUSTODY_REQUIRE_SERVICES=1 to make this a failure"
    ));
    Ok(None)
}

/// Print `SKIP <test>: <why>` straight to the process's stderr.
///
/// The test harness captures what `eprintln!` prints and shows it only for
/// failing tests, so a skipped test (which passes) would skip silently: a
/// newcomer without PostgreSQL could not tell how much did not run. Writing
/// to the stderr handle itself bypasses that capture, so every skip shows in
/// `cargo test`'s output, named by its test (the harness names each test's
/// thread after it); `cargo test --workspace 2>&1 | grep -c 'SKIP '` counts them.
pub fn report_skip(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .map(str::to_owned)
        .unwrap_or_else(|| "(unnamed test)".to_owned());
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "SKIP {test}: {why}");
}

/// A unique lowercase name with `prefix`, usable as a database, schema,
/// stream or subject token.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    // the random tail of a v7 uuid, so names created in the same millisecond differ
    format!("{prefix}_{}", &id[id.len() - 16..])
}

/// Server URL of the machine's PostgreSQL (override with `CUSTODY_TEST_POSTGRES`).
pub fn postgres_server_url() -> String {
    std::env::var("CUSTODY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// URL of the machine's NATS server (override with `CUSTODY_TEST_NATS`).
pub fn nats_url() -> String {
    std::env::var("CUSTODY_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A fresh PostgreSQL database for one test; dropped when this value is dropped.
#[derive(Debug)]
pub struct PgTestDb {
    /// Connection URL of the fresh database.
    pub url: String,
    /// Its name.
    pub name: String,
    server: String,
}

/// Create a fresh PostgreSQL database, or skip / fail as [`require_services`] says.
pub async fn postgres_db() -> anyhow::Result<Option<PgTestDb>> {
    let server = postgres_server_url();
    let mut conn =
        match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&server))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return unavailable("PostgreSQL", &format!("{server}: {e}")),
            Err(_) => return unavailable("PostgreSQL", &format!("{server}: connect timed out")),
        };
    let name = unique_name("custody_t");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    let base = server
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or(server.clone());
    Ok(Some(PgTestDb {
        url: format!("{base}/{name}"),
        name,
        server,
    }))
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        block_on_own_runtime(async move {
            if let Ok(mut c) = sqlx::PgConnection::connect(&server).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        });
    }
}

/// Run `cleanup` to completion on a thread with a runtime of its own and
/// wait for it. For `Drop` impls, which may run inside a runtime (where
/// `block_on` would panic) or outside any. Failures are ignored: cleanup is
/// best effort.
pub fn block_on_own_runtime<F>(cleanup: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(cleanup);
        }
    })
    .join();
}

/// Check that NATS answers at [`nats_url`]; skip / fail otherwise.
pub async fn nats() -> anyhow::Result<Option<String>> {
    let url = nats_url();
    let addr = url.trim_start_matches("nats://").to_owned();
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(_)) => Ok(Some(url)),
        Ok(Err(e)) => unavailable("NATS", &format!("{url}: {e}")),
        Err(_) => unavailable("NATS", &format!("{url}: connect timed out")),
    }
}

/// A free TCP port on 127.0.0.1 (for a test's own server).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The versions of the migration files (`<version>_<name>.sql`) in `dir`,
/// sorted: what a backend's `migrate` must apply and record. An error if the
/// directory cannot be read, a version is not a number, or there is none.
pub fn migration_versions(dir: &std::path::Path) -> anyhow::Result<Vec<i64>> {
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read migrations in {}: {e}", dir.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some((v, _)) = name.split_once('_').filter(|_| name.ends_with(".sql")) {
            versions.push(
                v.parse()
                    .map_err(|e| anyhow::anyhow!("{name}: version {v:?} is not a number: {e}"))?,
            );
        }
    }
    versions.sort();
    anyhow::ensure!(
        !versions.is_empty(),
        "no migration files in {}",
        dir.display()
    );
    Ok(versions)
}
