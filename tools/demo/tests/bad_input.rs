//! Issue 11, scenario 1 through the real `custody-demo` binary: the demo's
//! billing consumer process (`custody-demo worker --role consume-pg`, NATS →
//! PostgreSQL) is fed bytes published straight onto its subject with
//! async-nats — NUL bytes percent-encoded in the producer stamp, the key and
//! the topic, a `text/plain` message with a JSON body — and must dead-letter
//! each of them, apply the good order after them and keep running.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custody::nats::{encode_headers, StreamSpec};
use custody::Message;
use sqlx::PgPool;
use uuid::Uuid;

/// Kills the worker when the test ends, however it ends.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn order(customer: &str) -> anyhow::Result<Message> {
    let order_id = Uuid::now_v7();
    Ok(Message::builder("orders", customer, "OrderPlaced")
        .json(&serde_json::json!({
            "order_id": order_id, "customer": customer, "amount_cents": 990, "seq": 1
        }))?
        .build()?)
}

async fn counts(b: &PgPool) -> anyhow::Result<(i64, i64)> {
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(b)
        .await?;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_dead_letter")
        .fetch_one(b)
        .await?;
    Ok((ledger, dead))
}

#[tokio::test]
async fn the_consumer_process_dead_letters_bytes_it_cannot_store_and_goes_on() -> anyhow::Result<()>
{
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(nats) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let b = custody::postgres::connect(&db.url).await?;
    custody::postgres::migrate(&b).await?;
    // the demo's billing table (tools/scenario/src/billing.rs, B_SCHEMA_PG)
    sqlx::query(
        "CREATE TABLE ledger (entry BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         order_id UUID NOT NULL, customer TEXT NOT NULL, amount_cents BIGINT NOT NULL, \
         seq BIGINT NOT NULL)",
    )
    .execute(&b)
    .await?;
    let name = custody_testkit::unique_name("custody_badcli");
    let spec = StreamSpec::new(&name.to_uppercase(), &name);
    let client = custody::nats::connect(&nats).await?;
    custody::nats::ensure_stream(&client, &spec).await?;
    let js = async_nats::jetstream::new(client.clone());

    let good = order("customer-1")?;
    let nul_producer = order("customer-2")?;
    let nul_key = order("customer-3")?;
    let nul_topic = order("customer-4")?;
    let text_plain = Message::builder("orders", "customer-5", "OrderPlaced")
        .payload(
            "text/plain",
            serde_json::to_vec(&serde_json::json!({
                "order_id": Uuid::now_v7(), "customer": "customer-5", "amount_cents": 1, "seq": 1
            }))?,
        )
        .build()?;
    let edits: [(&Message, &[(&str, &str)]); 4] = [
        (
            &nul_producer,
            &[
                ("ce-custodyproducer", "p%00x"),
                ("ce-custodypartition", "0"),
                ("ce-custodyseq", "1"),
            ],
        ),
        (
            &nul_key,
            &[("ce-partitionkey", "c%00"), ("ce-subject", "c%00")],
        ),
        (&nul_topic, &[("ce-custodytopic", "or%00ders")]),
        (&text_plain, &[]),
    ];
    for (m, headers) in edits {
        let mut h = encode_headers(m);
        for (name, value) in headers {
            h.insert(*name, *value);
        }
        js.publish_with_headers(spec.subject("orders"), h, m.payload.clone().into())
            .await?
            .await?;
    }
    js.publish_with_headers(
        spec.subject("orders"),
        encode_headers(&good),
        good.payload.clone().into(),
    )
    .await?
    .await?;

    let mut worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_custody-demo"))
            .args(["worker", "--role", "consume-pg", "--a", "unused"])
            .args(["--b", &db.url, "--nats", &nats, "--stream"])
            .args([
                spec.name.as_str(),
                "--subject-prefix",
                spec.subject_prefix.as_str(),
            ])
            .env("CUSTODY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = (0, 0);
    while Instant::now() < deadline {
        seen = counts(&b).await?;
        if seen == (1, 4) {
            break;
        }
        if let Some(status) = worker.0.try_wait()? {
            panic!("the consumer process stopped ({status}) on bad input; seen {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, (1, 4), "(applied, dead-lettered)");
    assert!(
        worker.0.try_wait()?.is_none(),
        "the consumer process is still running"
    );
    let ledger: Uuid = sqlx::query_scalar("SELECT order_id FROM ledger")
        .fetch_one(&b)
        .await?;
    let good_order: serde_json::Value = good.decode_json()?;
    assert_eq!(
        ledger.to_string(),
        good_order["order_id"].as_str().unwrap_or("")
    );
    let errors: Vec<(Option<Uuid>, String)> =
        sqlx::query_as("SELECT message_id, error FROM custody_dead_letter ORDER BY seq")
            .fetch_all(&b)
            .await?;
    let error_of = |id: Uuid| {
        errors
            .iter()
            .find(|(m, _)| *m == Some(id))
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    };
    assert!(error_of(nul_producer.id).contains("NUL"), "{errors:?}");
    assert!(
        error_of(nul_key.id).contains("key holds a NUL"),
        "{errors:?}"
    );
    assert!(error_of(nul_topic.id).contains("topic holds"), "{errors:?}");
    assert!(error_of(text_plain.id).contains("text/plain"), "{errors:?}");
    drop(worker);
    let _ = js.delete_stream(&spec.name).await;
    Ok(())
}
