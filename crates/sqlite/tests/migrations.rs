//! custody's migrations in their own table (`custody_migrations`) on
//! SQLite: a fresh file, an application's own sqlx migrations beside them,
//! the upgrade of a file migrated the old way (into `_sqlx_migrations`), a
//! changed checksum, concurrent migrators, and open errors that say what is
//! wrong (a missing directory, a file that is not a database, a URL of
//! another database).

use std::collections::BTreeSet;
use std::path::Path;

use custody_sqlite::{check_schema, connect, migrate};
use sqlx::migrate::Migrator;
use sqlx::SqlitePool;

/// The versions of custody's migration files, read from the directory.
fn custody_versions() -> anyhow::Result<Vec<i64>> {
    custody_testkit::migration_versions(&Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
}

async fn recorded(pool: &SqlitePool) -> anyhow::Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT version FROM custody_migrations ORDER BY version")
            .fetch_all(pool)
            .await?,
    )
}

async fn sqlx_rows(pool: &SqlitePool) -> anyhow::Result<Option<Vec<i64>>> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(None);
    }
    Ok(Some(
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(pool)
            .await?,
    ))
}

/// `installed_on` is in unix milliseconds (like every custody timestamp
/// here) and within ten minutes of now.
async fn assert_installed_now(pool: &SqlitePool) -> anyhow::Result<()> {
    let installed: i64 = sqlx::query_scalar("SELECT MIN(installed_on) FROM custody_migrations")
        .fetch_one(pool)
        .await?;
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now - 600_000..=now + 600_000).contains(&installed),
        "{installed}"
    );
    Ok(())
}

#[tokio::test]
async fn a_fresh_file_records_custodys_migrations_in_its_own_table() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = connect(&dir.path().join("a.db").to_string_lossy()).await?;
    let versions = custody_versions()?;
    let first = migrate(&pool).await?;
    let applied: Vec<i64> = first.applied.iter().map(|m| m.version).collect();
    assert_eq!(applied, versions);
    assert_eq!((first.already, first.adopted), (0, 0));
    assert_eq!(recorded(&pool).await?, versions);
    assert_eq!(sqlx_rows(&pool).await?, None, "_sqlx_migrations created");
    assert_installed_now(&pool).await?;
    check_schema(&pool).await?;

    let second = migrate(&pool).await?;
    assert!(second.up_to_date(), "{second:?}");
    assert_eq!(second.already, versions.len());
    Ok(())
}

#[tokio::test]
async fn an_applications_own_sqlx_migrations_live_beside_custodys() -> anyhow::Result<()> {
    let versions = custody_versions()?;
    for app_first in [true, false] {
        let dir = tempfile::tempdir()?;
        let pool = connect(&dir.path().join("a.db").to_string_lossy()).await?;
        let sql = dir.path().join("migrations");
        std::fs::create_dir(&sql)?;
        std::fs::write(sql.join("1_a.sql"), "CREATE TABLE app_a (id INTEGER);")?;
        std::fs::write(sql.join("2_b.sql"), "CREATE TABLE app_b (id INTEGER);")?;
        std::fs::write(sql.join("3_c.sql"), "ALTER TABLE app_b ADD COLUMN c TEXT;")?;
        let app = Migrator::new(sql.as_path()).await?;
        if app_first {
            app.run(&pool).await?;
            migrate(&pool).await?;
        } else {
            migrate(&pool).await?;
            app.run(&pool).await?;
        }
        app.run(&pool).await?;
        assert!(migrate(&pool).await?.up_to_date());
        assert_eq!(sqlx_rows(&pool).await?, Some(vec![1, 2, 3]));
        assert_eq!(recorded(&pool).await?, versions);
        check_schema(&pool).await?;
        sqlx::query("INSERT INTO app_b (id, c) VALUES (1, 'x')")
            .execute(&pool)
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_file_migrated_the_old_way_is_adopted_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = connect(&dir.path().join("a.db").to_string_lossy()).await?;
    let versions = custody_versions()?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    let Err(e) = check_schema(&pool).await else {
        panic!("an old-style database passes the schema check")
    };
    assert!(e.to_string().contains("_sqlx_migrations"), "{e}");
    assert_eq!(sqlx_rows(&pool).await?, Some(versions.clone()));

    let report = migrate(&pool).await?;
    assert_eq!(report.adopted, versions.len(), "{report:?}");
    assert!(report.up_to_date(), "re-applied: {report:?}");
    assert_eq!(recorded(&pool).await?, versions);
    assert_eq!(sqlx_rows(&pool).await?, Some(vec![]));
    // sqlx's TIMESTAMP text became unix milliseconds
    assert_installed_now(&pool).await?;
    check_schema(&pool).await?;
    assert_eq!(migrate(&pool).await?.adopted, 0);
    Ok(())
}

#[tokio::test]
async fn a_changed_checksum_is_an_error_naming_the_migration() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = connect(&dir.path().join("a.db").to_string_lossy()).await?;
    migrate(&pool).await?;
    sqlx::query("UPDATE custody_migrations SET checksum = x'00' WHERE version = 2")
        .execute(&pool)
        .await?;
    let Err(e) = migrate(&pool).await else {
        panic!("a tampered checksum was accepted")
    };
    assert!(e.to_string().contains("custody migration 0002"), "{e}");
    let Err(e) = check_schema(&pool).await else {
        panic!("the schema check accepted a tampered checksum")
    };
    assert!(e.to_string().contains("custody migration 0002"), "{e}");
    Ok(())
}

#[tokio::test]
async fn four_concurrent_migrators_apply_each_migration_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.db").to_string_lossy().into_owned();
    let versions = custody_versions()?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let path = path.clone();
        tasks.spawn(async move {
            let pool = connect(&path).await?;
            let report = migrate(&pool).await?;
            pool.close().await;
            anyhow::Ok(report)
        });
    }
    let mut applied = Vec::new();
    let mut total = BTreeSet::new();
    while let Some(report) = tasks.join_next().await {
        let report = report??;
        total.insert(report.total());
        applied.extend(report.applied.iter().map(|m| m.version));
    }
    applied.sort();
    assert_eq!(applied, versions, "each migration applied exactly once");
    assert_eq!(total, BTreeSet::from([versions.len()]));
    Ok(())
}

#[tokio::test]
async fn a_missing_directory_or_a_file_that_is_no_database_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("no/such/dir");
    let Err(e) = connect(&missing.join("a.db").to_string_lossy()).await else {
        panic!("opened a file in a directory that does not exist")
    };
    let text = e.to_string();
    assert!(
        text.contains(&format!("directory {} does not exist", missing.display())),
        "{text}"
    );
    assert!(text.contains("mkdir -p"), "{text}");
    assert!(!missing.exists(), "the directory was created");

    let text_file = dir.path().join("notes.txt");
    std::fs::write(&text_file, "these are notes, not a database; ".repeat(200))?;
    let Err(e) = connect(&text_file.to_string_lossy()).await else {
        panic!("opened a text file as a database")
    };
    let text = e.to_string();
    assert!(
        text.contains(&format!("{} is not a SQLite database", text_file.display())),
        "{text}"
    );
    assert!(
        std::fs::read_to_string(&text_file)?.starts_with("these are notes"),
        "the file was changed"
    );
    Ok(())
}

#[tokio::test]
async fn another_databases_url_is_not_taken_for_a_path() {
    for url in ["mysql://app:secret@127.0.0.1:3306/shop", "mariadb://h/db"] {
        let Err(e) = connect(url).await else {
            panic!("{url} accepted as a SQLite path")
        };
        let text = e.to_string();
        assert!(text.contains("MySQL/MariaDB is not supported"), "{text}");
        assert!(text.contains("sqlite://path/to/file.db"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
