#![allow(missing_docs)]
mod common;
use custody_core::event::{EventData, EventStore, ExpectedVersion};
use custody_postgres::PgEventStore;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let total = 100_000u64;
    let batch = 1000u64;
    let mk = |n: u64| {
        EventData::json(
            "Deposited",
            &serde_json::json!({"n": n, "account": "acc-1", "cents": 500}),
        )
        .unwrap()
    };
    // warm
    store
        .append("warm-1", ExpectedVersion::Any, (0..10).map(mk).collect())
        .await?;
    let t = Instant::now();
    for b in 0..total / batch {
        let evs: Vec<EventData> = (0..batch).map(|i| mk(b * batch + i)).collect();
        store
            .append(&format!("acc-{}", b % 100), ExpectedVersion::Any, evs)
            .await?;
    }
    let el = t.elapsed().as_secs_f64();
    println!("append: {:.0} ev/s", total as f64 / el);
    // COPY into the same table
    let mut conn = pool.acquire().await?;
    let t = Instant::now();
    for b in 0..total / batch {
        let mut data = String::new();
        for i in 0..batch {
            let e = mk(b * batch + i);
            let payload: String = e.payload.iter().map(|x| format!("{x:02x}")).collect();
            data.push_str(&format!("{}\t{}\tcopy-{}\t{}\t{}\tDeposited\t1\tapplication/json\t\\\\x{}\t{{}}\t{{}}\t2024-01-01 00:00:00+00\n", 1_000_000 + b, i, b, i + 1 + b * batch, e.id, payload));
        }
        let mut copy = conn.copy_in_raw("COPY custody_events (tx, ordinal, stream, version, id, event_type, schema_version, content_type, payload, headers, tags, recorded_at) FROM STDIN").await?;
        copy.send(data.into_bytes()).await?;
        copy.finish().await?;
    }
    let el = t.elapsed().as_secs_f64();
    println!("copy: {:.0} ev/s", total as f64 / el);
    let t = Instant::now();
    store.head().await?;
    println!("first head {:?}", t.elapsed());
    let t = Instant::now();
    store.read_all(0, &Default::default(), 1000).await?;
    println!("first read {:?}", t.elapsed());
    let t = Instant::now();
    store.read_all(50000, &Default::default(), 1000).await?;
    println!("second read {:?}", t.elapsed());
    sqlx::query("ANALYZE").execute(&pool).await?;
    let t = Instant::now();
    store.read_all(60000, &Default::default(), 1000).await?;
    println!("read after analyze {:?}", t.elapsed());
    let t = Instant::now();
    let mut after = 0;
    let mut n = 0;
    loop {
        let s = store.read_all(after, &Default::default(), 1000).await?;
        if s.events.is_empty() {
            break;
        }
        n += s.events.len();
        after = s.scanned_to;
    }
    println!(
        "read_all: {n} in {:.2}s = {:.0} ev/s",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    // single appends, 1 writer vs 8 writers
    let t = Instant::now();
    for i in 0..500u64 {
        store
            .append(
                &format!("one-{}", i % 50),
                ExpectedVersion::Any,
                vec![mk(i)],
            )
            .await?;
    }
    let one = 500.0 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut hs = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        hs.push(tokio::spawn(async move {
            for i in 0..250u64 {
                store
                    .append(
                        &format!("w{w}-{}", i % 10),
                        ExpectedVersion::Any,
                        vec![mk(i)],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for h in hs {
        h.await?;
    }
    let eight = 2000.0 / t.elapsed().as_secs_f64();
    println!(
        "single: {one:.0}/s, 8 writers: {eight:.0}/s = {:.1}x, stats {:?}",
        eight / one,
        store.write_stats()
    );
    Ok(())
}
