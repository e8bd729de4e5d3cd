//! The demo on the real components: A and B on PostgreSQL (two databases),
//! the relay publishing A's outbox to NATS JetStream, B consuming from it.

use std::time::Duration;

use custody::nats::StreamSpec;
use custody::postgres::PgOutbox;
use custody::{Message, MessageKind};
use custody_scenario::pg_nats::{observe, processed, setup};
use custody_scenario::process::redact;
use custody_scenario::producer::produce_pg;
use custody_scenario::report::Report;
use custody_scenario::services::{delete_stream, run_tag, Databases};
use custody_scenario::{Run, Worker, Workload};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::DemoArgs;

/// Run the demo on PostgreSQL + NATS JetStream; the report and what to
/// print after it. The run's databases and stream are removed at the end,
/// whatever happened, unless `--keep` says otherwise.
pub async fn run(
    args: &DemoArgs,
    seed: u64,
    pg: &str,
    nats: &str,
) -> anyhow::Result<(Report, String)> {
    let tag = run_tag();
    let names = [
        format!("custody_demo_a_{tag}"),
        format!("custody_demo_b_{tag}"),
    ];
    let stream = format!("CUSTODY_DEMO_{tag}");
    let prefix = format!("custody_demo_{tag}");
    let dbs = Databases::create(pg, &names).await?;
    let urls = dbs.urls();
    let result = run_inner(args, seed, nats, &names, &urls, &stream, &prefix).await;
    let report = match result {
        Ok(report) if args.keep => report,
        other => {
            // failed runs are cleaned up too: their error says what went wrong
            dbs.drop_all().await;
            delete_stream(nats, &stream).await;
            let removed = format!(
                "the databases {} and {} and the NATS stream {stream}",
                names[0], names[1]
            );
            return Ok((other?, crate::epilogue(None, &removed)));
        }
    };
    let (a, b) = (redact(&urls[0]), redact(&urls[1]));
    let kept = crate::Kept {
        places: vec![
            ("A (orders)", a.clone()),
            ("B (billing)", b.clone()),
            (
                "NATS stream",
                format!("{stream} (subjects {prefix}.>) on {}", redact(nats)),
            ),
        ],
        password_left_out: a != urls[0],
        a,
        b,
        example_id: report.dead_lettered.iter().find_map(|d| d.message_id),
        cleanup: vec![
            format!(
                "psql {} -c 'DROP DATABASE {}' -c 'DROP DATABASE {}'",
                redact(pg),
                names[0],
                names[1]
            ),
            format!("nats --server {} stream rm -f {stream}", redact(nats)),
        ],
    };
    Ok((report, crate::epilogue(Some(kept), "")))
}

async fn run_inner(
    args: &DemoArgs,
    seed: u64,
    nats: &str,
    names: &[String; 2],
    urls: &[String],
    stream: &str,
    prefix: &str,
) -> anyhow::Result<Report> {
    let [a_name, b_name] = names;
    let (a_url, b_url) = (&urls[0], &urls[1]);
    let (a, b) = setup(a_url, b_url).await?;
    let client = custody::nats::connect(nats).await?;
    let spec = StreamSpec::new(stream, prefix);
    custody::nats::ensure_stream(&client, &spec).await?;
    let outbox = PgOutbox::new(a.clone());

    eprintln!(
        "custody demo: service A (PostgreSQL {a_name}) → relay → NATS JetStream {stream} → service B (PostgreSQL {b_name}); {} orders over {} customers, seed {seed}",
        args.messages, args.customers
    );
    let common = |role: &str| {
        vec![
            "--role".to_owned(),
            role.to_owned(),
            "--a".to_owned(),
            a_url.to_owned(),
            "--b".to_owned(),
            b_url.to_owned(),
            "--nats".to_owned(),
            nats.to_owned(),
            "--stream".to_owned(),
            stream.to_owned(),
            "--subject-prefix".to_owned(),
            prefix.to_owned(),
        ]
    };
    let mut relay = Worker::spawn(common("relay-pg"))?;
    let mut consumer = Worker::spawn(common("consume-pg"))?;
    let mut run = Run::new(args.messages);
    let mut workload = Workload::new(seed, args.messages, args.customers);
    let mut rolled_back = Vec::new();

    for i in 0..args.messages {
        if i == args.messages / 5 {
            consumer.kill9().await?;
            run.fault("service B down: consumer killed with SIGKILL, kept down 2s while A keeps committing".into());
            tokio::time::sleep(Duration::from_secs(2)).await;
            consumer.restart()?;
        }
        if i == args.messages * 2 / 5 {
            relay.kill9().await?;
            run.fault(
                "relay killed with SIGKILL mid-batch (published, not yet marked) and restarted"
                    .into(),
            );
            relay.restart()?;
        }
        if i == args.messages * 3 / 5 {
            let n = republish_recent(&a, &client, &spec, 30).await?;
            run.fault(format!(
                "{n} already-delivered messages published to JetStream again under new broker ids (they are delivered twice)"
            ));
        }
        if i == args.messages * 3 / 4 {
            relay.kill9().await?;
            consumer.kill9().await?;
            run.fault("relay and consumer both killed with SIGKILL; restarted after 1s".into());
            tokio::time::sleep(Duration::from_secs(1)).await;
            relay.restart()?;
            consumer.restart()?;
        }
        produce_pg(&a, &outbox, &workload.step(i)?, |id| {
            rolled_back.push(id);
            Ok(())
        })
        .await?;
        if i % 50 == 0 {
            relay.check_alive()?;
            consumer.check_alive()?;
            run.bar.set_position(processed(&b).await.unwrap_or(0));
        }
    }
    let expected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE topic = 'orders'")
            .fetch_one(&a)
            .await?;
    let elapsed = run
        .drain(
            &mut [&mut relay, &mut consumer],
            expected as u64,
            args.timeout,
            || processed(&b),
        )
        .await?;
    let obs = observe(&a, &b).await?;
    a.close().await;
    b.close().await;
    Ok(Report::compute(
        "PostgreSQL + NATS JetStream, relay and consumer as separate processes".into(),
        seed,
        run.faults,
        &rolled_back,
        &obs,
        elapsed,
    ))
}

/// Publish the `n` most recently published messages again with fresh
/// `Nats-Msg-Id`s, so JetStream stores and delivers them a second time.
async fn republish_recent(
    a: &PgPool,
    client: &async_nats::Client,
    spec: &StreamSpec,
    n: i64,
) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT id, kind, topic, msg_key, message_type, content_type, headers, payload, created_at
         FROM custody_outbox WHERE status = 1 AND topic = 'orders' ORDER BY position DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(a)
    .await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut count = 0;
    for r in rows.iter().rev() {
        let kind: String = r.try_get("kind")?;
        let headers: String = r.try_get("headers")?;
        let msg = Message {
            id: r.try_get("id")?,
            kind: kind.parse::<MessageKind>()?,
            topic: r.try_get("topic")?,
            key: r.try_get("msg_key")?,
            message_type: r.try_get("message_type")?,
            content_type: r.try_get("content_type")?,
            payload: r.try_get("payload")?,
            headers: serde_json::from_str(&headers)?,
            created_at: r.try_get("created_at")?,
        };
        let mut h = custody::nats::encode_headers(&msg);
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("redelivery-{}", Uuid::now_v7()).as_str(),
        );
        js.publish_with_headers(
            format!("{}.{}", spec.subject_prefix, msg.topic),
            h,
            msg.payload.clone().into(),
        )
        .await?
        .await?;
        count += 1;
    }
    Ok(count)
}
