//! PostgreSQL over TLS with scram-sha-256, against a private cluster that
//! accepts only `hostssl` (see docs/SECURITY.md): verify-full works end to
//! end; a wrong password, a plaintext client and an untrusted CA are each
//! one terminal error naming the link and what to fix, with no secret in it.
#![allow(missing_docs)]

use chrono::Utc;
use custody_core::{Message, OutboxStore};
use custody_postgres::{connect, migrate, PgOutbox, PASSWORD_FILE_ENV};
use custody_testkit::{PgCluster, TestCerts};

const ALL: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// One cluster, the scenarios in sequence: the password-file scenario sets
/// a process environment variable, which must not race another test.
#[tokio::test]
async fn tls_links_connect_verified_and_refusals_are_clear() -> anyhow::Result<()> {
    let certs = TestCerts::generate()?;
    let Some(cluster) = PgCluster::start(&certs).await? else {
        return Ok(());
    };
    let ca = certs.ca.display().to_string();
    let verify_full = format!("sslmode=verify-full&sslrootcert={ca}");

    // verify-full: migrate, enqueue and read back over a verified TLS link
    let url = cluster.url("postgres", &verify_full);
    let pool = connect(&url).await?;
    migrate(&pool).await?;
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await?;
    assert!(ssl, "the session is not encrypted");
    let outbox = PgOutbox::new(pool.clone());
    let msg = Message::builder("orders", "k1", "OrderPlaced")
        .payload("application/json", b"{}".to_vec())
        .build()?;
    let mut tx = pool.begin().await?;
    outbox.enqueue(&mut tx, &msg).await?;
    tx.commit().await?;
    let batch = outbox.fetch_batch(&ALL, 10, Utc::now()).await?;
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].message.id, msg.id);
    pool.close().await;

    // wrong password
    let wrong = format!(
        "postgres://postgres:not-the-password@127.0.0.1:{}/postgres?{verify_full}",
        cluster.port
    );
    let err = connect(&wrong)
        .await
        .expect_err("a wrong password connected");
    let text = err.to_string();
    assert!(
        !err.retryable(),
        "a wrong password must be terminal: {text}"
    );
    assert!(
        text.contains("PostgreSQL postgres://postgres:***@127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("refused the password"), "{text}");
    assert!(
        !text.contains("not-the-password"),
        "the password leaked: {text}"
    );
    assert!(!text.contains('\n'), "not one line: {text}");

    // plaintext client: the server has only hostssl lines
    let err = connect(&cluster.url("postgres", "sslmode=disable"))
        .await
        .expect_err("a plaintext client connected");
    let text = err.to_string();
    assert!(!err.retryable(), "{text}");
    assert!(text.contains("does not accept this connection"), "{text}");
    assert!(text.contains("sslmode=verify-full"), "{text}");
    assert!(
        !text.contains(&cluster.password),
        "the password leaked: {text}"
    );

    // a CA that did not sign the server's certificate
    let other = TestCerts::generate()?;
    let untrusted = format!("sslmode=verify-full&sslrootcert={}", other.ca.display());
    let err = connect(&cluster.url("postgres", &untrusted))
        .await
        .expect_err("an untrusted certificate was accepted");
    let text = err.to_string();
    assert!(!err.retryable(), "{text}");
    assert!(text.contains("not signed by a trusted CA"), "{text}");
    assert!(text.contains("sslrootcert"), "{text}");
    assert!(
        !text.contains(&cluster.password),
        "the password leaked: {text}"
    );

    // a sslrootcert that does not exist is named before connecting
    let err = connect(&cluster.url(
        "postgres",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .expect_err("a missing CA file was accepted");
    assert!(
        err.to_string().contains("sslrootcert=/nonexistent/ca.pem"),
        "{err}"
    );

    // the password from the file CUSTODY_DB_PASSWORD_FILE names, not the URL
    let pw_file = certs.dir().join("pg-password");
    std::fs::write(&pw_file, format!("{}\n", cluster.password))?;
    let no_password = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?{verify_full}",
        cluster.port
    );
    std::env::set_var(PASSWORD_FILE_ENV, &pw_file);
    let from_file = connect(&no_password).await;
    std::env::set_var(PASSWORD_FILE_ENV, certs.dir().join("missing"));
    let missing = connect(&no_password).await;
    std::env::remove_var(PASSWORD_FILE_ENV);
    let pool = from_file?;
    let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&pool).await?;
    assert_eq!(one, 1);
    pool.close().await;
    let text = missing
        .expect_err("a missing password file was accepted")
        .to_string();
    assert!(
        text.contains(PASSWORD_FILE_ENV) && text.contains("missing"),
        "{text}"
    );
    Ok(())
}
