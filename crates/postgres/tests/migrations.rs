//! custody's migrations in their own table (`custody_migrations`), next to
//! an application's own sqlx migrations, the upgrade of a database migrated
//! the old way (into `_sqlx_migrations`), a changed checksum, concurrent
//! migrators, and connection errors that say what is wrong. Real PostgreSQL.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::msg;
use custody_postgres::{check_schema, connect, migrate, PgOutbox};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// The versions of custody's migration files, read from the directory.
fn custody_versions() -> anyhow::Result<Vec<i64>> {
    custody_testkit::migration_versions(&Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
}

async fn recorded(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT version FROM custody_migrations ORDER BY version")
            .fetch_all(pool)
            .await?,
    )
}

async fn sqlx_rows(pool: &PgPool) -> anyhow::Result<Option<Vec<i64>>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
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

/// An application's own sqlx migrations 1, 2, 3 in a temp dir (the numbers
/// custody's 0001… used to collide with).
async fn app_migrator(dir: &Path) -> anyhow::Result<Migrator> {
    std::fs::write(
        dir.join("1_accounts.sql"),
        "CREATE TABLE app_accounts (id BIGINT PRIMARY KEY);",
    )?;
    std::fs::write(
        dir.join("2_orders.sql"),
        "CREATE TABLE app_orders (id BIGINT PRIMARY KEY, account BIGINT REFERENCES app_accounts (id));",
    )?;
    std::fs::write(
        dir.join("3_order_total.sql"),
        "ALTER TABLE app_orders ADD COLUMN total BIGINT NOT NULL DEFAULT 0;",
    )?;
    Ok(Migrator::new(dir).await?)
}

#[tokio::test]
async fn a_fresh_database_records_custodys_migrations_in_its_own_table() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = connect(&db.url).await?;
    let versions = custody_versions()?;

    let first = migrate(&pool).await?;
    let applied: Vec<i64> = first.applied.iter().map(|m| m.version).collect();
    assert_eq!(applied, versions);
    assert_eq!((first.already, first.adopted), (0, 0));
    assert_eq!(first.applied[0].description, "custody");
    assert_eq!(recorded(&pool).await?, versions);
    assert_eq!(sqlx_rows(&pool).await?, None, "_sqlx_migrations created");
    check_schema(&pool).await?;

    let second = migrate(&pool).await?;
    assert!(second.up_to_date(), "{second:?}");
    assert_eq!(second.already, versions.len());
    assert_eq!(recorded(&pool).await?, versions);
    Ok(())
}

#[tokio::test]
async fn an_applications_own_sqlx_migrations_1_2_3_live_beside_custodys_in_either_order(
) -> anyhow::Result<()> {
    let versions = custody_versions()?;
    for app_first in [true, false] {
        let Some(db) = custody_testkit::postgres_db().await? else {
            return Ok(());
        };
        let pool = connect(&db.url).await?;
        let dir = tempfile::tempdir()?;
        let app = app_migrator(dir.path()).await?;
        if app_first {
            app.run(&pool).await?;
            migrate(&pool).await?;
        } else {
            migrate(&pool).await?;
            app.run(&pool).await?;
        }
        // both again: each sees only its own rows, nothing is applied twice
        app.run(&pool).await?;
        assert!(migrate(&pool).await?.up_to_date());
        assert_eq!(sqlx_rows(&pool).await?, Some(vec![1, 2, 3]));
        assert_eq!(recorded(&pool).await?, versions);
        check_schema(&pool).await?;

        // and both schemas work
        sqlx::query("INSERT INTO app_accounts (id) VALUES (1)")
            .execute(&pool)
            .await?;
        let outbox = PgOutbox::new(pool.clone());
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO app_orders (id, account, total) VALUES (1, 1, 990)")
            .execute(&mut *tx)
            .await?;
        outbox.enqueue(&mut tx, &msg("orders", "1", 1)).await?;
        tx.commit().await?;
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_outbox")
            .fetch_one(&pool)
            .await?;
        assert_eq!(pending, 1, "app_first = {app_first}");
    }
    Ok(())
}

#[tokio::test]
async fn a_database_migrated_the_old_way_is_adopted_once() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = connect(&db.url).await?;
    let versions = custody_versions()?;
    // what custody did before it had its own table
    let mut old = sqlx::migrate!("./migrations");
    old.set_ignore_missing(true);
    old.run(&pool).await?;
    // an application's own row in the same table, which must stay
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("20250101000000_app.sql"),
        "CREATE TABLE app_things (id BIGINT PRIMARY KEY);",
    )?;
    let mut app = Migrator::new(dir.path()).await?;
    app.set_ignore_missing(true);
    app.run(&pool).await?;
    let outbox = PgOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    outbox.enqueue(&mut tx, &msg("orders", "k", 7)).await?;
    tx.commit().await?;

    // the read-only check tells what to do, and changes nothing
    let Err(e) = check_schema(&pool).await else {
        panic!("an old-style database passes the schema check")
    };
    let text = e.to_string();
    assert!(
        text.contains("_sqlx_migrations") && text.contains("custody migrate"),
        "{text}"
    );
    let mut legacy = versions.clone();
    legacy.push(20250101000000);
    assert_eq!(sqlx_rows(&pool).await?, Some(legacy));

    let report = migrate(&pool).await?;
    assert_eq!(report.adopted, versions.len(), "{report:?}");
    assert!(report.up_to_date(), "re-applied: {report:?}");
    assert_eq!(recorded(&pool).await?, versions);
    assert_eq!(sqlx_rows(&pool).await?, Some(vec![20250101000000]));
    // adopted with the checksums of the embedded migrations, as custody's own
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM custody_migrations ORDER BY version")
            .fetch_all(&pool)
            .await?;
    let embedded: Vec<(i64, Vec<u8>)> = sqlx::migrate!("./migrations")
        .iter()
        .map(|m| (m.version, m.checksum.to_vec()))
        .collect();
    assert_eq!(rows, embedded);
    check_schema(&pool).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 1, "the data stayed");

    // the application's migrator, strict again, sees only its own rows
    let strict = Migrator::new(dir.path()).await?;
    strict.run(&pool).await?;
    let again = migrate(&pool).await?;
    assert_eq!((again.adopted, again.applied.len()), (0, 0));
    Ok(())
}

#[tokio::test]
async fn a_changed_checksum_is_an_error_naming_the_migration() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = connect(&db.url).await?;
    migrate(&pool).await?;
    sqlx::query("UPDATE custody_migrations SET checksum = '\\x00'::bytea WHERE version = 3")
        .execute(&pool)
        .await?;
    let Err(e) = migrate(&pool).await else {
        panic!("a tampered checksum was accepted")
    };
    let text = e.to_string();
    assert!(text.contains("custody migration 0003"), "{text}");
    assert!(text.contains("another checksum"), "{text}");
    let Err(e) = check_schema(&pool).await else {
        panic!("the schema check accepted a tampered checksum")
    };
    assert!(e.to_string().contains("custody migration 0003"), "{e}");
    // the runner released its lock: another migrate is refused the same way, not stuck
    let Err(e) = migrate(&pool).await else {
        panic!("a tampered checksum was accepted")
    };
    assert!(e.to_string().contains("0003"), "{e}");
    Ok(())
}

/// The checksum 0001_custody.sql had before its comment was reworded (it
/// cited an invariant by a document outside the repository), as databases
/// migrated before then recorded it.
const OLD_0001: &str = "763e0fdc18c2c962e777d5c910ac5853747cca27ca2abb6852fa1efb26aaa5ce18655aa7494af490e7a3c614a7d7466b";

#[tokio::test]
async fn a_database_recorded_before_a_comment_only_edit_is_current() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = connect(&db.url).await?;
    migrate(&pool).await?;
    // as custody_migrations read before 0001's comment changed
    sqlx::query("UPDATE custody_migrations SET checksum = decode($1, 'hex') WHERE version = 1")
        .bind(OLD_0001)
        .execute(&pool)
        .await?;
    check_schema(&pool).await?;
    let report = migrate(&pool).await?;
    assert!(report.applied.is_empty(), "{report:?}");
    // and the same in _sqlx_migrations, where an earlier custody recorded it
    let legacy = custody_testkit::postgres_db()
        .await?
        .expect("PostgreSQL is up");
    let old = connect(&legacy.url).await?;
    sqlx::migrate!("./migrations").run(&old).await?;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 1")
        .bind(OLD_0001)
        .execute(&old)
        .await?;
    let report = migrate(&old).await?;
    assert!(report.applied.is_empty(), "0001 applied again: {report:?}");
    assert_eq!(report.adopted, custody_versions()?.len(), "{report:?}");
    check_schema(&old).await?;
    Ok(())
}

#[tokio::test]
async fn four_concurrent_migrators_apply_each_migration_once() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let versions = custody_versions()?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.spawn(async move {
            let pool = connect(&url).await?;
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
    let pool = connect(&db.url).await?;
    assert_eq!(recorded(&pool).await?, versions);
    Ok(())
}

#[tokio::test]
async fn a_refused_connection_says_so_at_once() -> anyhow::Result<()> {
    // a port nothing listens on
    let port = custody_testkit::free_port()?;
    let Err(e) = connect(&format!("postgres://postgres:pw@127.0.0.1:{port}/test")).await else {
        panic!("connected to a closed port")
    };
    let text = e.to_string();
    assert!(
        text.contains(&format!("connection refused at 127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.contains("is PostgreSQL running there?"), "{text}");
    assert!(
        !text.contains("timed out") && !text.contains("within"),
        "{text}"
    );
    assert!(!text.contains(":pw@"), "password shown: {text}");
    assert!(e.retryable(), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_missing_database_or_role_is_named_with_what_to_do() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let base = db.url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&db.url);
    let missing = custody_testkit::unique_name("custody_missing");
    let Err(e) = connect(&format!("{base}/{missing}")).await else {
        panic!("connected to a database that does not exist")
    };
    let text = e.to_string();
    assert!(
        text.contains(&format!("database \"{missing}\" does not exist")),
        "{text}"
    );
    assert!(
        text.contains("createdb") && text.contains("CREATE DATABASE"),
        "{text}"
    );
    assert!(!e.retryable(), "{text}");

    let role = custody_testkit::unique_name("nobody");
    let url = db
        .url
        .replacen("postgres://postgres", &format!("postgres://{role}"), 1);
    anyhow::ensure!(url != db.url, "test URL {} has no postgres user", db.url);
    let Err(e) = connect(&url).await else {
        panic!("connected as a role that does not exist")
    };
    let text = e.to_string();
    assert!(text.contains(&format!("refused user \"{role}\"")), "{text}");
    assert!(text.contains("check the user and password"), "{text}");
    Ok(())
}

#[tokio::test]
async fn another_databases_url_is_refused_naming_the_accepted_forms() {
    for url in ["mysql://app:secret@127.0.0.1:3306/shop", "mariadb://h/db"] {
        let Err(e) = connect(url).await else {
            panic!("{url} accepted")
        };
        let text = e.to_string();
        assert!(text.contains("MySQL/MariaDB is not supported"), "{text}");
        assert!(
            text.contains("postgres://user:password@host:port/database"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
    }
    let Err(e) = connect("redis://127.0.0.1/0").await else {
        panic!("redis:// accepted")
    };
    assert!(e.to_string().contains("not a database URL"), "{e}");
}
