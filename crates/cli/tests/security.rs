//! Secure links and least privilege as a user runs them: the real `custody`
//! binary (docs/SECURITY.md).
//!
//! - the read-only commands (`reconcile`, `trace`, `dlq list`) work under a
//!   role that can only SELECT; `dlq redrive` fails with a permission error;
//! - `custody relay` moves an outbox on a private PostgreSQL (TLS
//!   verify-full, scram-sha-256, password from a file) to a private NATS
//!   server (TLS, user + password file) and the messages arrive; wrong
//!   credentials on either link stop it at once with one line naming the
//!   link; every line it and the other commands print (`CUSTODY_LOG=debug`),
//!   `--help` included, is searched for the secrets: none appears.
#![allow(missing_docs)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use custody::nats::{ConnectOptions, NatsSubscriber, StreamSpec};
use custody::postgres::{PgEmbeddedSubscriber, PgInbox, PgOutbox};
use custody::{Consumer, ConsumerConfig, Handler, HandlerError, Message, Subscriber};
use custody_testkit::{unique_name, NatsServer, PgCluster, TestCerts};
use sqlx::Connection;

fn custody() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_custody"));
    c.env_remove("CUSTODY_DB")
        .env_remove("CUSTODY_NATS")
        .env_remove("CUSTODY_CONFIG")
        .stdin(Stdio::null());
    c
}

/// Run with a bound: a command that hangs is a failure, not a stuck test.
fn run(mut command: Command, bound: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > bound {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "{command:?} did not finish within {bound:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child.wait_with_output()?)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Steps;

impl Handler<sqlx::Transaction<'static, sqlx::Postgres>> for Steps {
    async fn handle(
        &self,
        _tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        if msg.message_type == "Step" {
            Ok(())
        } else {
            Err(HandlerError::UnknownType(msg.message_type.clone()))
        }
    }
}

/// A role of the cluster (roles are not per database): dropped at the end.
struct Role {
    server: String,
    name: String,
}

impl Drop for Role {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        custody_testkit::block_on_own_runtime(async move {
            if let Ok(mut c) = sqlx::PgConnection::connect(&server).await {
                let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {name}"))
                    .execute(&mut c)
                    .await;
            }
        });
    }
}

#[tokio::test]
async fn read_only_commands_work_under_a_select_only_role() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let out = run(
        {
            let mut c = custody();
            c.args(["migrate", "--db", &db.url]);
            c
        },
        Duration::from_secs(60),
    )?;
    assert!(out.status.success(), "{}", text(&out));

    // producer and consumer in one database: 3 processed, 1 dead-lettered
    let pool = custody::postgres::connect(&db.url).await?;
    let outbox = PgOutbox::new(pool.clone());
    let mut msgs = Vec::new();
    for i in 0..3 {
        msgs.push(Message::builder("steps", "k", "Step").json(&i)?.build()?);
    }
    msgs.push(
        Message::builder("steps", "k", "Unknown")
            .json(&9)?
            .build()?,
    );
    let mut tx = pool.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let sub = PgEmbeddedSubscriber::new(pool.clone(), "billing", &["steps".to_owned()]).await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(20);
    let mut consumer = Consumer::new(PgInbox::new(pool.clone()), sub, Steps, cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.stats().processed + consumer.stats().dead_lettered < 4 {
        anyhow::ensure!(Instant::now() < deadline, "the consumer did not finish");
        consumer.run_once().await?;
    }
    pool.close().await;

    // the grants docs/SECURITY.md gives for the read-only commands
    let role = Role {
        server: custody_testkit::postgres_server_url(),
        name: unique_name("custody_ro"),
    };
    let mut admin = sqlx::PgConnection::connect(&db.url).await?;
    for stmt in [
        format!("CREATE ROLE {} LOGIN", role.name),
        format!("GRANT CONNECT ON DATABASE {} TO {}", db.name, role.name),
        format!("GRANT USAGE ON SCHEMA public TO {}", role.name),
        format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}",
            role.name
        ),
    ] {
        sqlx::query(&stmt).execute(&mut admin).await?;
    }
    admin.close().await?;
    let ro = db
        .url
        .replacen("://postgres@", &format!("://{}@", role.name), 1);
    assert_ne!(
        ro, db.url,
        "the test URL has no postgres@ to replace: {}",
        db.url
    );

    let ok = |args: &[&str]| -> anyhow::Result<String> {
        let mut c = custody();
        c.args(args).env("CUSTODY_LOG", "warn");
        let out = run(c, Duration::from_secs(60))?;
        let t = text(&out);
        assert!(
            out.status.success(),
            "{args:?} failed under the read-only role: {t}"
        );
        Ok(t)
    };
    let reconciled = ok(&[
        "reconcile",
        "--producer",
        &ro,
        "--consumer",
        &ro,
        "--consumer-name",
        "billing",
        "--topic",
        "steps",
        "--to",
        "0s",
    ])?;
    assert!(reconciled.contains("RESULT: OK"), "{reconciled}");
    let traced = ok(&["trace", &msgs[0].id.to_string(), "--db", &ro])?;
    assert!(traced.contains("processed"), "{traced}");
    let listed = ok(&["dlq", "list", "--db", &ro])?;
    assert!(listed.contains("1 dead letter(s)"), "{listed}");

    let mut c = custody();
    c.args([
        "dlq",
        "redrive",
        "--consumer",
        "billing",
        "--yes",
        "--db",
        &ro,
    ]);
    let out = run(c, Duration::from_secs(60))?;
    let t = text(&out);
    assert!(
        !out.status.success(),
        "redrive wrote under a read-only role: {t}"
    );
    assert!(t.contains("permission denied"), "{t}");
    Ok(())
}

/// The relay's grants of docs/SECURITY.md: DML on custody's tables and
/// SELECT on the migration table; no CREATE. On a migrated database the
/// relay runs under them and publishes everything.
#[tokio::test]
async fn relay_runs_under_a_dml_only_role() -> anyhow::Result<()> {
    let Some(nats_url) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let mut c = custody();
    c.args(["migrate", "--db", &db.url]);
    let out = run(c, Duration::from_secs(60))?;
    assert!(out.status.success(), "{}", text(&out));
    let pool = custody::postgres::connect(&db.url).await?;
    let msgs: Vec<Message> = (0..4)
        .map(|i| {
            Message::builder("orders", format!("k{i}"), "Step")
                .json(&i)?
                .build()
        })
        .collect::<Result<_, _>>()?;
    let mut tx = pool.begin().await?;
    PgOutbox::new(pool.clone())
        .enqueue_batch(&mut tx, &msgs)
        .await?;
    tx.commit().await?;

    let role = Role {
        server: custody_testkit::postgres_server_url(),
        name: unique_name("custody_relay"),
    };
    let mut admin = sqlx::PgConnection::connect(&db.url).await?;
    for stmt in [
        format!("CREATE ROLE {} LOGIN", role.name),
        format!("GRANT CONNECT ON DATABASE {} TO {}", db.name, role.name),
        format!("GRANT USAGE ON SCHEMA public TO {}", role.name),
        format!("GRANT SELECT ON custody_migrations TO {}", role.name),
        format!(
            "DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'custody\\_%' AND tablename <> 'custody_migrations' LOOP EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO {}', t); END LOOP; END $$",
            role.name
        ),
    ] {
        sqlx::query(&stmt).execute(&mut admin).await?;
    }
    admin.close().await?;
    let relay_url = db
        .url
        .replacen("://postgres@", &format!("://{}@", role.name), 1);

    let mut child = custody()
        .args(["relay", "--db", &relay_url, "--nats", &nats_url])
        .args(["--stream", &unique_name("ROLE").to_uppercase()])
        .args(["--subject-prefix", &unique_name("role")])
        .env("CUSTODY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (pending,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM custody_outbox WHERE status = 0")
                .fetch_one(&pool)
                .await?;
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "the relay under its role did not publish everything: {}",
                text(&out)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(&mut child)?;
    let out = child.wait_with_output()?;
    assert!(text(&out).contains("published 4"), "{}", text(&out));
    pool.close().await;
    Ok(())
}

/// A NATS server that starts refusing the relay's credentials (the password
/// changed, the server restarted) is not hidden behind the client's
/// reconnect loop: the relay logs an error naming the link at every refusal.
#[tokio::test]
async fn relay_reports_credentials_refused_after_a_reconnect() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let users = |pw: &str| format!("authorization {{ user: \"relay\", password: \"{pw}\" }}\n");
    let Some(mut nats) = NatsServer::start_with_config(&users("first-pw")).await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, "first-pw\n")?;
    let mut child = custody()
        .args(["relay", "--db", &db.url, "--nats", &nats.url])
        .args(["--stream", &unique_name("RECON").to_uppercase()])
        .args(["--subject-prefix", &unique_name("recon")])
        .env("CUSTODY_NATS__USER", "relay")
        .env("CUSTODY_NATS__PASSWORD_FILE", &pw_file)
        .env("CUSTODY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        use std::io::BufRead;
        if let Some(stderr) = stderr {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
    });
    // running: the relay has connected (the migrations ran, it polls)
    tokio::time::sleep(Duration::from_secs(2)).await;
    anyhow::ensure!(child.try_wait()?.is_none(), "the relay stopped at start");

    nats.set_config(&users("second-pw"));
    nats.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let hit = line.contains(&format!("NATS {}", nats.url))
                    && line.contains("refused custody's credentials");
                seen.push(line);
                if hit {
                    break true;
                }
            }
            Err(_) if Instant::now() > deadline => break false,
            Err(_) => {}
        }
    };
    stop(&mut child)?;
    let _ = child.wait();
    assert!(found, "no error about the refused credentials: {seen:#?}");
    assert!(seen.iter().all(|l| !l.contains("first-pw")), "{seen:#?}");
    Ok(())
}

/// SIGTERM, then SIGKILL if it is still running after 20 s.
fn stop(child: &mut std::process::Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait()?.is_none() {
        let _ = child.kill();
    }
    Ok(())
}

#[tokio::test]
async fn relay_over_tls_links_delivers_and_no_secret_is_ever_printed() -> anyhow::Result<()> {
    let certs = TestCerts::generate()?;
    let Some(pg) = PgCluster::start(&certs).await? else {
        return Ok(());
    };
    let nats_password = unique_name("natspw");
    let conf = format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, timeout: 5 }}\nauthorization {{ users = [ {{ user: \"relay\", password: \"{nats_password}\" }} ] }}\n",
        certs.server_cert, certs.server_key
    );
    let Some(nats) = NatsServer::start_with_config(&conf).await? else {
        return Ok(());
    };
    let secrets = certs.dir();
    let pg_pw_file = secrets.join("pg-password");
    let nats_pw_file = secrets.join("nats-password");
    let wrong_file = secrets.join("wrong");
    std::fs::write(&pg_pw_file, format!("{}\n", pg.password))?;
    std::fs::write(&nats_pw_file, format!("{nats_password}\n"))?;
    std::fs::write(&wrong_file, "wrong-secret-0b7\n")?;
    let tls = format!("sslmode=verify-full&sslrootcert={}", certs.ca.display());
    let with_password = pg.url("postgres", &tls);
    let no_password = format!("postgres://postgres@127.0.0.1:{}/postgres?{tls}", pg.port);
    let nats_with_password = nats
        .url
        .replace("nats://", &format!("nats://relay:{nats_password}@"));
    let mut printed = Vec::new();

    // migrate with the password in the URL: shown redacted
    let mut c = custody();
    c.args(["migrate", "--db", &with_password])
        .env("CUSTODY_LOG", "debug");
    let out = run(c, Duration::from_secs(60))?;
    printed.push(text(&out));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("postgres://postgres:***@127.0.0.1"),
        "{}",
        text(&out)
    );

    // messages to relay
    let pool = custody::postgres::connect(&with_password).await?;
    let outbox = PgOutbox::new(pool.clone());
    let mut msgs = Vec::new();
    for i in 0..5 {
        msgs.push(
            Message::builder("orders", format!("k{i}"), "Step")
                .json(&i)?
                .build()?,
        );
    }
    let mut tx = pool.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    let stream = unique_name("SEC").to_uppercase();
    let prefix = unique_name("sec");
    let relay = |pg_pw: &std::path::Path, nats_pw: &std::path::Path| {
        let mut c = custody();
        c.args(["relay", "--stream", &stream, "--subject-prefix", &prefix])
            .env("CUSTODY_DB", &no_password)
            .env("CUSTODY_DB_PASSWORD_FILE", pg_pw)
            .env("CUSTODY_NATS", &nats.url)
            .env("CUSTODY_NATS__USER", "relay")
            .env("CUSTODY_NATS__PASSWORD_FILE", nats_pw)
            .env("CUSTODY_NATS__TLS_CA_FILE", &certs.ca)
            .env("CUSTODY_LOG", "debug");
        c
    };

    // wrong NATS password: stops at once, one line naming the link
    let out = run(relay(&pg_pw_file, &wrong_file), Duration::from_secs(30))?;
    let t = text(&out);
    printed.push(t.clone());
    assert!(!out.status.success(), "{t}");
    // the error line: the NATS client's background task may still log its
    // `closed` event after it (seen on a loaded machine)
    let last = t
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(last.contains(&format!("NATS {}", nats.url)), "{t}");
    assert!(last.contains("refused the credentials"), "{t}");

    // wrong PostgreSQL password
    let out = run(relay(&wrong_file, &nats_pw_file), Duration::from_secs(30))?;
    let t = text(&out);
    printed.push(t.clone());
    assert!(!out.status.success(), "{t}");
    // the error line: the NATS client's background task may still log its
    // `closed` event after it (seen on a loaded machine)
    let last = t
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        last.contains("PostgreSQL postgres://postgres@127.0.0.1"),
        "{t}"
    );
    assert!(last.contains("refused the password"), "{t}");

    // NATS credentials in the URL (connects: the client logs the server
    // address at debug level), then a wrong PostgreSQL password stops it
    let mut c = custody();
    c.args(["relay", "--stream", &stream, "--subject-prefix", &prefix])
        .env("CUSTODY_DB", &no_password)
        .env("CUSTODY_DB_PASSWORD_FILE", &wrong_file)
        .env("CUSTODY_NATS", &nats_with_password)
        .env("CUSTODY_NATS__TLS_CA_FILE", &certs.ca)
        .env("CUSTODY_LOG", "debug");
    let out = run(c, Duration::from_secs(30))?;
    let t = text(&out);
    printed.push(t.clone());
    assert!(
        !t.contains(&nats_password),
        "the NATS password was printed: {t}"
    );
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("connected successfully"),
        "NATS did not connect: {t}"
    );
    assert!(t.contains("PostgreSQL postgres://"), "{t}");

    // the real run: until the outbox is empty, then SIGTERM
    let mut child = relay(&pg_pw_file, &nats_pw_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (pending,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM custody_outbox WHERE status = 0")
                .fetch_one(&pool)
                .await?;
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!("the relay did not publish everything: {}", text(&out));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(&mut child)?;
    let out = child.wait_with_output()?;
    let t = text(&out);
    printed.push(t.clone());
    assert!(t.contains("published 5"), "{t}");

    // the consumer side reads them from the TLS server with its own credentials
    let opts = ConnectOptions {
        user: Some("relay".to_owned()),
        password_file: Some(nats_pw_file.clone()),
        tls_ca_file: Some(certs.ca.clone()),
        ..Default::default()
    };
    let client = custody::nats::connect_with(&nats.url, &opts).await?;
    let spec = StreamSpec::new(&stream, &prefix);
    let mut sub = NatsSubscriber::new(client, &spec, "billing", &["orders".to_owned()]).await?;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < msgs.len() && Instant::now() < deadline {
        for d in sub.fetch(10, Duration::from_millis(500)).await? {
            if let Ok(m) = &d.message {
                got.push(m.id);
            }
            sub.ack(d.token).await?;
        }
    }
    got.sort();
    let mut want: Vec<_> = msgs.iter().map(|m| m.id).collect();
    want.sort();
    assert_eq!(got, want);

    // operator commands with secrets in their URLs and environment
    for args in [
        vec!["dlq", "list", "--db", &with_password],
        vec!["trace", &msgs[0].id.to_string(), "--db", &with_password],
        vec!["relay", "--help"],
        vec!["migrate", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["consume", "--help"],
        vec!["produce", "--help"],
        vec!["reconcile", "--help"],
        vec!["trace", "--help"],
        vec!["events", "streams", "--db", &with_password],
        vec!["events", "read", "no-such-stream", "--db", &with_password],
        vec!["projection", "status", "--db", &with_password],
        vec!["events", "append", "--help"],
        vec!["events", "tail", "--help"],
        vec!["projection", "status", "--help"],
    ]
    .iter()
    {
        let mut c = custody();
        c.args(args)
            .env("CUSTODY_DB", &with_password)
            .env("CUSTODY_NATS", &nats_with_password)
            .env("CUSTODY_LOG", "debug");
        let out = run(c, Duration::from_secs(60))?;
        printed.push(text(&out));
    }
    // a bad URL's error also stays redacted
    let mut c = custody();
    c.args([
        "migrate",
        "--db",
        &with_password.replace("127.0.0.1", "127.0.0.1:notaport"),
    ])
    .env("CUSTODY_LOG", "debug");
    printed.push(text(&run(c, Duration::from_secs(60))?));

    let all = printed.join("\n");
    assert!(
        all.lines().count() > 20,
        "too little captured to prove anything: {all}"
    );
    for secret in [
        pg.password.as_str(),
        nats_password.as_str(),
        "wrong-secret-0b7",
    ] {
        let leaks: Vec<&str> = all.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "a secret was printed: {leaks:#?}");
    }
    Ok(())
}
