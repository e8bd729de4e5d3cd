//! `custody migrate` as a user runs it: the real binary on a fresh
//! PostgreSQL database and a fresh SQLite file, a database migrated by an
//! earlier custody (into `_sqlx_migrations`), `--config`, and the errors of
//! a wrong port or a URL of another database.

use std::process::Command;

use sqlx::Connection;

/// Run `custody args…` with `CUSTODY_LOG=info`, so that a PostgreSQL notice
/// (logged at info) would show on stderr: (exit code, stdout, stderr).
fn custody(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(args)
        .env("CUSTODY_LOG", "info")
        .env_remove("CUSTODY_CONFIG")
        .env_remove("CUSTODY_DB")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn migration_files(backend: &str) -> anyhow::Result<usize> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(backend)
        .join("migrations");
    let n = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sql"))
        .count();
    anyhow::ensure!(n > 0, "no {backend} migrations found");
    Ok(n)
}

fn no_notice(stderr: &str) {
    for noise in ["already exists", "NOTICE", "notice"] {
        assert!(!stderr.contains(noise), "notice on stderr: {stderr}");
    }
}

#[tokio::test]
async fn fresh_postgres_database_then_up_to_date_without_notices() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let n = migration_files("postgres")?;
    let (code, out, err) = custody(&["migrate", "--db", &db.url])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!(
            "applied {n} migrations to {}: 0001 custody, 0002 ",
            db.url
        )),
        "{out}"
    );
    no_notice(&err);
    let mut c = sqlx::PgConnection::connect(&db.url).await?;
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_migrations")
        .fetch_one(&mut c)
        .await?;
    assert_eq!(recorded as usize, n);
    let sqlx_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut c)
        .await?;
    assert!(!sqlx_table, "custody created _sqlx_migrations");
    c.close().await?;

    let (code, out, err) = custody(&["migrate", "--db", &db.url])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "custody's tables are up to date ({n} migrations) in {}",
            db.url
        )
    );
    no_notice(&err);
    Ok(())
}

#[tokio::test]
async fn fresh_sqlite_file_then_up_to_date() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shop.db").to_string_lossy().into_owned();
    let n = migration_files("sqlite")?;
    let (code, out, err) = custody(&["migrate", "--db", &path])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("applied {n} migrations to {path}: 0001 custody, ")),
        "{out}"
    );
    let (code, out, err) = custody(&["migrate", "--db", &path])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("custody's tables are up to date ({n} migrations) in {path}")
    );
    Ok(())
}

#[tokio::test]
async fn a_database_migrated_by_an_earlier_custody_is_adopted_and_usable() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let n = migration_files("postgres")?;
    let pool = custody::postgres::connect(&db.url).await?;
    // what custody did before it had its own table
    let mut old = sqlx::migrate!("../postgres/migrations");
    old.set_ignore_missing(true);
    old.run(&pool).await?;
    let outbox = custody::postgres::PgOutbox::new(pool.clone());
    let msg = custody::Message::builder("orders", "o-1", "OrderPlaced")
        .json(&serde_json::json!({ "total": 990 }))?
        .build()?;
    let mut tx = pool.begin().await?;
    outbox.enqueue(&mut tx, &msg).await?;
    tx.commit().await?;

    // before the upgrade, the read-only commands say what to do
    let id = msg.id.to_string();
    let (code, _, err) = custody(&["trace", &id, "--db", &db.url])?;
    assert_ne!(code, 0);
    assert!(
        err.contains("_sqlx_migrations") && err.contains("custody migrate"),
        "{err}"
    );

    let (code, out, err) = custody(&["migrate", "--db", &db.url])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("adopted {n} migrations")), "{out}");
    assert!(
        out.contains(&format!("custody's tables are up to date ({n} migrations)")),
        "applied something twice: {out}"
    );
    no_notice(&err);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 0, "custody's rows stayed in _sqlx_migrations");

    let (code, out, err) = custody(&["trace", &id, "--db", &db.url])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");
    let (code, _, err) = custody(&["dlq", "list", "--db", &db.url])?;
    assert_eq!(code, 0, "{err}");
    pool.close().await;
    Ok(())
}

#[test]
fn config_is_loaded_and_checked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("a.db").to_string_lossy().into_owned();
    let missing = dir.path().join("nonexistent.toml");
    let missing = missing.to_string_lossy();
    let (code, out, err) = custody(&["migrate", "--config", &missing, "--db", &db])?;
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains(&format!("cannot read config file {missing}")),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&db).exists(),
        "migrated despite the config"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[relay]\nbatch-size = 100\nno-such-key = 1\n")?;
    let (code, out, err) = custody(&["migrate", "--config", &bad.to_string_lossy(), "--db", &db])?;
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("no-such-key"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[relay]\nbatch-size = 100\n")?;
    let (code, out, err) = custody(&["migrate", "--config", &good.to_string_lossy(), "--db", &db])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("applied "), "{out}");
    Ok(())
}

#[test]
fn a_wrong_port_is_refused_at_once_and_mysql_is_not_a_path() -> anyhow::Result<()> {
    let port = custody_testkit::free_port()?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let (code, _, err) = custody(&["migrate", "--db", &url])?;
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "connection refused at 127.0.0.1:{port}: is PostgreSQL running there?"
        )),
        "{err}"
    );
    assert!(!err.contains("timed out"), "{err}");

    let dir = tempfile::tempdir()?;
    let (code, _, err) = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["migrate", "--db", "mysql://app:secret@127.0.0.1:3306/shop"])
        .current_dir(dir.path())
        .output()
        .map(|o| {
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })?;
    assert_ne!(code, 0);
    assert!(err.contains("MySQL/MariaDB is not supported"), "{err}");
    assert!(
        err.contains("postgres://user:password@host:port/database")
            && err.contains("sqlite://path/to/file.db"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "created a file");
    Ok(())
}
