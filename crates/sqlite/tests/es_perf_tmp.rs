use custody_core::event::{EventData, EventStore, ExpectedVersion, LogFilter};
use custody_sqlite::SqliteEventStore;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = custody_sqlite::connect(&dir.path().join("p.db").to_string_lossy()).await?;
    custody_sqlite::migrate(&pool).await?;
    let store = SqliteEventStore::new(pool.clone());
    let payload = br#"{"amount":1234,"currency":"EUR","note":"hello world"}"#.to_vec();
    let total = 200_000u64;
    let t = Instant::now();
    for b in 0..(total / 1000) {
        let evs: Vec<EventData> = (0..1000)
            .map(|_| EventData::new("Deposited", "application/json", payload.clone()))
            .collect();
        store
            .append(&format!("acct-{}", b % 100), ExpectedVersion::Any, evs)
            .await?;
    }
    let el = t.elapsed();
    eprintln!(
        "append batched: {:.0} ev/s",
        total as f64 / el.as_secs_f64()
    );
    let t = Instant::now();
    let mut after = 0;
    let mut n = 0;
    loop {
        let p = store.read_all(after, &LogFilter::all(), 10_000).await?;
        n += p.events.len();
        if p.events.is_empty() {
            break;
        }
        after = p.scanned_to;
    }
    eprintln!(
        "read_all: {:.0} ev/s ({n})",
        n as f64 / t.elapsed().as_secs_f64()
    );
    // single-event appends, 8 writers
    for combine in [true, false] {
        let s = SqliteEventStore::new(pool.clone()).with_write_combining(combine);
        let t = Instant::now();
        let mut js = tokio::task::JoinSet::new();
        for w in 0..8 {
            let s = s.clone();
            let payload = payload.clone();
            js.spawn(async move {
                for i in 0..250u64 {
                    s.append(
                        &format!("w{combine}-{w}"),
                        ExpectedVersion::Exact(i),
                        vec![EventData::new("D", "application/json", payload.clone())],
                    )
                    .await
                    .unwrap();
                }
            });
        }
        while let Some(r) = js.join_next().await {
            r?;
        }
        eprintln!(
            "8 writers single events combine={combine}: {:.0} ev/s {:?}",
            2000.0 / t.elapsed().as_secs_f64(),
            s.write_stats()
        );
    }
    let s = SqliteEventStore::new(pool.clone());
    let t = Instant::now();
    for i in 0..500u64 {
        s.append(
            "single-1",
            ExpectedVersion::Exact(i),
            vec![EventData::new("D", "application/json", payload.clone())],
        )
        .await?;
    }
    eprintln!(
        "1 writer single events: {:.0} ev/s",
        500.0 / t.elapsed().as_secs_f64()
    );
    Ok(())
}
