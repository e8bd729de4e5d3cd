//! The event store scenarios: every [`EventStore`] backend runs each of
//! these through [`crate::eventstore_conformance!`] with its
//! [`EventStoreFixture`] (a fresh, isolated store per test).
//!
//! ```ignore
//! // crates/<backend>/tests/eventstore.rs
//! struct Fixture { /* the fresh database, its store */ }
//! impl custody_testkit::conformance::eventstore::EventStoreFixture for Fixture { /* … */ }
//! custody_testkit::eventstore_conformance!(Fixture);
//! ```

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use custody_core::event::{
    AppendCondition, AppendOutcome, Appended, DeleteMode, Direction, EventData, EventStore,
    ExpectedVersion, LogFilter, Query, QueryItem, RecordedEvent, Snapshot, StreamMetadata,
};
use custody_core::Error;
use uuid::Uuid;

/// An event store backend under test.
pub trait EventStoreFixture: Sized + Send + Sync + 'static {
    /// The backend's store.
    type Store: EventStore;

    /// A fresh, migrated, isolated store; `Ok(None)` when the service is
    /// unreachable and [`crate::require_services`] allows a skip.
    fn fresh() -> impl Future<Output = anyhow::Result<Option<Self>>> + Send;

    /// The store (a clone of one handle: its state is shared).
    fn store(&self) -> Self::Store;
}

/// Run every event store scenario on `$fixture` (an [`EventStoreFixture`]):
/// one `#[tokio::test]` per scenario, in the invoking test crate.
#[macro_export]
macro_rules! eventstore_conformance {
    ($fixture:ty) => {
        $crate::eventstore_conformance!(@tests $fixture;
            append_and_read_stream_test,
            expected_version_cases_test,
            idempotent_reappend_test,
            id_reused_elsewhere_test,
            empty_append_test,
            concurrent_exact_appenders_test,
            concurrent_appenders_on_different_streams_test,
            read_all_order_and_filters_test,
            head_and_wait_for_head_test,
            truncate_before_and_max_age_test,
            soft_delete_and_tombstone_test,
            streams_listing_test,
            snapshots_test,
            append_condition_test,
            concurrent_conditional_appends_test,
            large_payload_test,
            invalid_input_test,
            hundred_thousand_events_in_order_test,
        );
    };
    (@tests $fixture:ty; $($name:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let Some(fixture) =
                    <$fixture as $crate::conformance::eventstore::EventStoreFixture>::fresh().await?
                else {
                    return Ok(());
                };
                $crate::conformance::eventstore::$name(fixture).await
            }
        )*
    };
}

/// A JSON event `n` of type `event_type`.
pub fn event(event_type: &str, n: u64) -> anyhow::Result<EventData> {
    Ok(EventData::json(event_type, &serde_json::json!({ "n": n }))?)
}

fn events(event_type: &str, range: std::ops::Range<u64>) -> anyhow::Result<Vec<EventData>> {
    range.map(|n| event(event_type, n)).collect()
}

fn n_of(e: &RecordedEvent) -> Option<u64> {
    e.decode_json::<serde_json::Value>().ok()?["n"].as_u64()
}

fn appended(outcome: &AppendOutcome) -> anyhow::Result<Appended> {
    outcome
        .appended()
        .with_context(|| format!("expected an append, got {outcome:?}"))
}

/// The position of the last event of the log (0: none). Positions need not
/// be dense (a backend may burn some on refused appends), so the scenarios
/// compare heads with positions they read, never with counts.
async fn last_position<S: EventStore>(store: &S) -> anyhow::Result<u64> {
    let mut after = 0;
    let mut last = 0;
    loop {
        let slice = store.read_all(after, &LogFilter::all(), 10_000).await?;
        if let Some(e) = slice.events.last() {
            last = e.position;
        }
        if slice.scanned_to >= slice.head {
            return Ok(last);
        }
        ensure!(
            slice.scanned_to > after,
            "read_all after {after} did not advance (scanned_to {}, head {})",
            slice.scanned_to,
            slice.head
        );
        after = slice.scanned_to;
    }
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

/// Append, read forwards and backwards from a version; what was appended
/// comes back (ids, types, payloads, headers, tags, schema versions).
pub async fn append_and_read_stream_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let mut batch = events("Numbered", 1..6)?;
    batch[0] = batch[0]
        .clone()
        .schema_version(3)
        .tag("account:1")
        .header(custody_core::headers::CORRELATION_ID, "req-1")?;
    let out = store
        .append("order-1", ExpectedVersion::NoStream, batch.clone())
        .await?;
    let a = appended(&out)?;
    ensure!(
        (a.first_version, a.version, a.idempotent) == (1, 5, false),
        "{a:?}"
    );
    let read = store
        .read_stream("order-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(read.version == Some(5), "version {:?}", read.version);
    ensure!(!read.tombstoned);
    ensure!(versions(&read.events) == vec![1, 2, 3, 4, 5]);
    for (got, sent) in read.events.iter().zip(&batch) {
        ensure!(got.id == sent.id, "id {} vs {}", got.id, sent.id);
        ensure!(got.stream == "order-1");
        ensure!(got.event_type == sent.event_type);
        ensure!(got.schema_version == sent.schema_version);
        ensure!(got.content_type == sent.content_type);
        ensure!(got.payload == sent.payload);
        ensure!(got.headers == sent.headers, "{:?}", got.headers);
        ensure!(got.tags == sent.tags, "{:?}", got.tags);
        ensure!(got.position > 0);
    }
    let positions: Vec<u64> = read.events.iter().map(|e| e.position).collect();
    ensure!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions {positions:?}"
    );
    let from3 = store
        .read_stream("order-1", Direction::Forward, 3, 2)
        .await?;
    ensure!(
        versions(&from3.events) == vec![3, 4],
        "{:?}",
        versions(&from3.events)
    );
    let back = store
        .read_stream("order-1", Direction::Backward, 4, 3)
        .await?;
    ensure!(
        versions(&back.events) == vec![4, 3, 2],
        "{:?}",
        versions(&back.events)
    );
    let back_end = store
        .read_stream("order-1", Direction::Backward, u64::MAX, 2)
        .await?;
    ensure!(versions(&back_end.events) == vec![5, 4]);
    let missing = store
        .read_stream("order-2", Direction::Forward, 1, 10)
        .await?;
    ensure!(missing.version.is_none() && missing.events.is_empty());
    Ok(())
}

/// Every [`ExpectedVersion`] case, the conflicts typed with the actual
/// version.
pub async fn expected_version_cases_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let s = "acct-7";
    let wrong = store
        .append(s, ExpectedVersion::StreamExists, vec![event("E", 0)?])
        .await?;
    ensure!(
        wrong
            == AppendOutcome::WrongVersion {
                expected: ExpectedVersion::StreamExists,
                actual: None
            },
        "{wrong:?}"
    );
    let wrong = store
        .append(s, ExpectedVersion::Exact(1), vec![event("E", 0)?])
        .await?;
    ensure!(
        matches!(wrong, AppendOutcome::WrongVersion { actual: None, .. }),
        "{wrong:?}"
    );
    appended(
        &store
            .append(s, ExpectedVersion::Exact(0), vec![event("E", 1)?])
            .await?,
    )?;
    let wrong = store
        .append(s, ExpectedVersion::NoStream, vec![event("E", 0)?])
        .await?;
    ensure!(
        wrong
            == AppendOutcome::WrongVersion {
                expected: ExpectedVersion::NoStream,
                actual: Some(1)
            },
        "{wrong:?}"
    );
    let a = appended(
        &store
            .append(s, ExpectedVersion::StreamExists, vec![event("E", 2)?])
            .await?,
    )?;
    ensure!(a.version == 2, "{a:?}");
    let a = appended(
        &store
            .append(s, ExpectedVersion::Any, events("E", 3..5)?)
            .await?,
    )?;
    ensure!((a.first_version, a.version) == (3, 4), "{a:?}");
    let wrong = store
        .append(s, ExpectedVersion::Exact(2), vec![event("E", 0)?])
        .await?;
    ensure!(
        wrong
            == AppendOutcome::WrongVersion {
                expected: ExpectedVersion::Exact(2),
                actual: Some(4)
            },
        "{wrong:?}"
    );
    let a = appended(
        &store
            .append(s, ExpectedVersion::Exact(4), vec![event("E", 5)?])
            .await?,
    )?;
    ensure!(a.version == 5);
    let read = store.read_stream(s, Direction::Forward, 1, 100).await?;
    let ns: Vec<u64> = read.events.iter().filter_map(n_of).collect();
    ensure!(
        ns == vec![1, 2, 3, 4, 5],
        "refused appends left events: {ns:?}"
    );
    Ok(())
}

/// Re-appending the same ids at the same versions is idempotent: the
/// original outcome, nothing written twice.
pub async fn idempotent_reappend_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let batch = events("E", 1..4)?;
    let first = appended(
        &store
            .append("cart-1", ExpectedVersion::NoStream, batch.clone())
            .await?,
    )?;
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Any,
    ] {
        let again = appended(&store.append("cart-1", expected, batch.clone()).await?)?;
        ensure!(again.idempotent, "{expected}: {again:?}");
        ensure!(
            (again.first_version, again.version) == (first.first_version, first.version),
            "{expected}: {again:?} vs {first:?}"
        );
    }
    let more = event("E", 4)?;
    appended(
        &store
            .append("cart-1", ExpectedVersion::Exact(3), vec![more.clone()])
            .await?,
    )?;
    // a retry of the second append after the stream moved on
    let again = appended(
        &store
            .append("cart-1", ExpectedVersion::Exact(3), vec![more])
            .await?,
    )?;
    ensure!(again.idempotent && again.version == 4, "{again:?}");
    let read = store
        .read_stream("cart-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(read.events.len() == 4 && read.version == Some(4));
    let head = store.head().await?;
    ensure!(head == last_position(&store).await?, "head {head}");
    ensure!(
        store
            .read_all(0, &LogFilter::all(), 100)
            .await?
            .events
            .len()
            == 4
    );
    Ok(())
}

/// An id already in the stream at another place is a conflict, not an
/// idempotent append; nothing of the append is written.
pub async fn id_reused_elsewhere_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let batch = events("E", 1..4)?;
    appended(
        &store
            .append("cart-2", ExpectedVersion::NoStream, batch.clone())
            .await?,
    )?;
    // the same ids at versions 2.. (shifted): not where they are
    let out = store
        .append("cart-2", ExpectedVersion::Exact(1), batch[..2].to_vec())
        .await?;
    ensure!(
        matches!(
            out,
            AppendOutcome::WrongVersion {
                actual: Some(3),
                ..
            }
        ),
        "{out:?}"
    );
    // a fresh event plus one stored id, with a matching expected version
    let mixed = vec![event("E", 9)?, batch[1].clone()];
    let out = store
        .append("cart-2", ExpectedVersion::Exact(3), mixed)
        .await?;
    ensure!(
        matches!(
            out,
            AppendOutcome::WrongVersion {
                actual: Some(3),
                ..
            }
        ),
        "{out:?}"
    );
    let read = store
        .read_stream("cart-2", Direction::Forward, 1, 100)
        .await?;
    ensure!(read.events.len() == 3, "{} events", read.events.len());
    Ok(())
}

/// An empty append checks the version and writes nothing.
pub async fn empty_append_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let a = appended(
        &store
            .append("e-1", ExpectedVersion::NoStream, vec![])
            .await?,
    )?;
    ensure!((a.first_version, a.version) == (1, 0), "{a:?}");
    ensure!(store.head().await? == 0);
    appended(
        &store
            .append("e-1", ExpectedVersion::Any, events("E", 0..2)?)
            .await?,
    )?;
    let a = appended(
        &store
            .append("e-1", ExpectedVersion::Exact(2), vec![])
            .await?,
    )?;
    ensure!((a.first_version, a.version) == (3, 2), "{a:?}");
    let head = store.head().await?;
    let out = store
        .append("e-1", ExpectedVersion::Exact(1), vec![])
        .await?;
    ensure!(
        matches!(
            out,
            AppendOutcome::WrongVersion {
                actual: Some(2),
                ..
            }
        ),
        "{out:?}"
    );
    ensure!(store.head().await? == head && head == last_position(&store).await?);
    Ok(())
}

/// 8 appenders race with `Exact` on one stream: per version exactly one
/// wins, the others get the conflict with the actual version, and the
/// stream's versions are gap-free.
pub async fn concurrent_exact_appenders_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    const WRITERS: u64 = 8;
    const TARGET: u64 = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let store = f.store();
        tasks.spawn(async move {
            let mut wins = Vec::new();
            let mut conflicts = 0u64;
            loop {
                let read = store
                    .read_stream("race-1", Direction::Backward, u64::MAX, 1)
                    .await?;
                let v = read.version.unwrap_or(0);
                if v >= TARGET {
                    return anyhow::Ok((wins, conflicts));
                }
                let out = store
                    .append(
                        "race-1",
                        ExpectedVersion::Exact(v),
                        vec![event("Raced", w)?],
                    )
                    .await?;
                match out {
                    AppendOutcome::Appended(a) => {
                        ensure!(a.first_version == v + 1 && !a.idempotent, "{a:?}");
                        wins.push(a.version);
                    }
                    AppendOutcome::WrongVersion { actual, .. } => {
                        ensure!(
                            actual.unwrap_or(0) > v,
                            "conflict at {v} reports actual {actual:?}"
                        );
                        conflicts += 1;
                    }
                    other => bail!("unexpected {other:?}"),
                }
            }
        });
    }
    let mut won = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (wins, _) = r??;
        won.extend(wins);
    }
    won.sort_unstable();
    let last = *won.last().unwrap_or(&0);
    ensure!(
        won == (1..=last).collect::<Vec<_>>(),
        "each version must be won exactly once: {won:?}"
    );
    ensure!(last >= TARGET, "stopped at {last}");
    let read = f
        .store()
        .read_stream("race-1", Direction::Forward, 1, 1000)
        .await?;
    ensure!(
        versions(&read.events) == (1..=last).collect::<Vec<_>>(),
        "stored versions have gaps"
    );
    Ok(())
}

/// 8 appenders on 8 streams all succeed.
pub async fn concurrent_appenders_on_different_streams_test<F: EventStoreFixture>(
    f: F,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let store = f.store();
        tasks.spawn(async move {
            let stream = format!("par-{w}");
            for n in 0..20u64 {
                let out = store
                    .append(&stream, ExpectedVersion::Exact(n), vec![event("P", n)?])
                    .await?;
                ensure!(appended(&out)?.version == n + 1, "{stream}: {out:?}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let store = f.store();
    let all = store.read_all(0, &LogFilter::all(), 1000).await?;
    ensure!(all.events.len() == 160, "{} events", all.events.len());
    let head = store.head().await?;
    ensure!(
        all.events.last().map(|e| e.position) == Some(head),
        "head {head}"
    );
    Ok(())
}

/// The global log in commit order, positions increasing; category and type
/// filters with `scanned_to` past what they skip.
pub async fn read_all_order_and_filters_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let plan = [
        ("order-1", "Placed"),
        ("payment-1", "Paid"),
        ("order-2", "Placed"),
        ("order-1", "Shipped"),
        ("payment-2", "Paid"),
        ("order-2", "Shipped"),
    ];
    let mut ids = Vec::new();
    for (n, (stream, ty)) in plan.iter().enumerate() {
        let e = event(ty, n as u64)?;
        ids.push(e.id);
        appended(&store.append(stream, ExpectedVersion::Any, vec![e]).await?)?;
    }
    let all = store.read_all(0, &LogFilter::all(), 100).await?;
    ensure!(all.events.len() == 6, "{} events", all.events.len());
    let end = all.events[5].position;
    ensure!(
        all.head == end && all.scanned_to == end,
        "{} {}",
        all.head,
        all.scanned_to
    );
    let got: Vec<Uuid> = all.events.iter().map(|e| e.id).collect();
    ensure!(got == ids, "log order is not commit order");
    let pos: Vec<u64> = all.events.iter().map(|e| e.position).collect();
    ensure!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
    // pages
    let p1 = store.read_all(0, &LogFilter::all(), 4).await?;
    ensure!(p1.events.len() == 4 && p1.scanned_to == pos[3]);
    let p2 = store.read_all(p1.scanned_to, &LogFilter::all(), 4).await?;
    ensure!(p2.events.len() == 2 && p2.events[0].position == pos[4]);
    // category
    let orders = LogFilter {
        categories: vec!["order".into()],
        types: vec![],
    };
    let o = store.read_all(0, &orders, 100).await?;
    let streams: Vec<&str> = o.events.iter().map(|e| e.stream.as_str()).collect();
    ensure!(
        streams == vec!["order-1", "order-2", "order-1", "order-2"],
        "{streams:?}"
    );
    ensure!(o.scanned_to == end, "scanned_to {}", o.scanned_to);
    // a filtered page stops at its last match
    let o1 = store.read_all(0, &orders, 1).await?;
    ensure!(o1.events.len() == 1 && o1.scanned_to == o1.events[0].position);
    // type, and category AND type
    let shipped = LogFilter {
        categories: vec![],
        types: vec!["Shipped".into()],
    };
    let s = store.read_all(0, &shipped, 100).await?;
    ensure!(s.events.len() == 2 && s.events.iter().all(|e| e.event_type == "Shipped"));
    let none = LogFilter {
        categories: vec!["payment".into()],
        types: vec!["Shipped".into()],
    };
    let n = store.read_all(0, &none, 100).await?;
    ensure!(n.events.is_empty() && n.scanned_to == end, "{n:?}");
    let after_all = store.read_all(end, &LogFilter::all(), 100).await?;
    ensure!(after_all.events.is_empty() && after_all.scanned_to == end);
    Ok(())
}

/// `head` follows appends; `wait_for_head` returns at once when the head is
/// already past, wakes on an append, and times out otherwise.
pub async fn head_and_wait_for_head_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    ensure!(store.head().await? == 0);
    let h = store.wait_for_head(0, Duration::from_millis(50)).await?;
    ensure!(h == 0, "timed-out wait returned {h}");
    appended(
        &store
            .append("w-1", ExpectedVersion::Any, events("E", 0..3)?)
            .await?,
    )?;
    let h3 = last_position(&store).await?;
    ensure!(h3 > 0 && store.head().await? == h3);
    ensure!(store.wait_for_head(h3 - 1, Duration::from_secs(5)).await? == h3);
    let waiter = {
        let store = f.store();
        tokio::spawn(async move { store.wait_for_head(h3, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    appended(
        &store
            .append("w-1", ExpectedVersion::Any, vec![event("E", 3)?])
            .await?,
    )?;
    let woke = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .context("wait_for_head did not return")???;
    let h4 = last_position(&store).await?;
    ensure!(
        h4 > h3 && woke == h4,
        "woke with head {woke}, last event at {h4}"
    );
    Ok(())
}

/// `truncate_before` and `max_age` hide events from `read_stream`, not
/// from `read_all`.
pub async fn truncate_before_and_max_age_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    appended(
        &store
            .append("meta-1", ExpectedVersion::NoStream, events("E", 1..6)?)
            .await?,
    )?;
    let meta = StreamMetadata {
        truncate_before: Some(3),
        max_age: None,
        custom: Some(serde_json::json!({ "owner": "billing" })),
    };
    store.set_metadata("meta-1", &meta).await?;
    let info = store
        .stream_info("meta-1")
        .await?
        .context("stream_info of an existing stream")?;
    ensure!(info.metadata == meta && info.version == 5, "{info:?}");
    let read = store
        .read_stream("meta-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(
        versions(&read.events) == vec![3, 4, 5],
        "{:?}",
        versions(&read.events)
    );
    let back = store
        .read_stream("meta-1", Direction::Backward, u64::MAX, 100)
        .await?;
    ensure!(versions(&back.events) == vec![5, 4, 3]);
    let all = store.read_all(0, &LogFilter::all(), 100).await?;
    ensure!(all.events.len() == 5, "read_all must not honour metadata");
    // metadata on a stream with no events: a record at version 0
    store
        .set_metadata("meta-2", &StreamMetadata::default())
        .await?;
    let info2 = store
        .stream_info("meta-2")
        .await?
        .context("metadata creates the stream's record")?;
    ensure!(info2.version == 0 && !info2.tombstoned);
    appended(
        &store
            .append("meta-2", ExpectedVersion::NoStream, vec![event("E", 1)?])
            .await?,
    )?;
    // max age: the events are at least 1.2 s old when read
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store
        .set_metadata(
            "meta-1",
            &StreamMetadata {
                max_age: Some(Duration::from_secs(3600)),
                ..StreamMetadata::default()
            },
        )
        .await?;
    let fresh = store
        .read_stream("meta-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(fresh.events.len() == 5, "max age of an hour hides nothing");
    store
        .set_metadata(
            "meta-1",
            &StreamMetadata {
                max_age: Some(Duration::from_secs(1)),
                ..StreamMetadata::default()
            },
        )
        .await?;
    let old = store
        .read_stream("meta-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(
        old.events.is_empty(),
        "{} old events read",
        old.events.len()
    );
    ensure!(old.version == Some(5));
    let all = store.read_all(0, &LogFilter::all(), 100).await?;
    ensure!(all.events.len() == 6);
    Ok(())
}

/// Soft delete hides the events and the stream continues; a tombstone also
/// refuses every later append.
pub async fn soft_delete_and_tombstone_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    appended(
        &store
            .append("del-1", ExpectedVersion::NoStream, events("E", 1..4)?)
            .await?,
    )?;
    let wrong = store
        .delete_stream("del-1", ExpectedVersion::Exact(2), DeleteMode::Soft)
        .await?;
    ensure!(
        matches!(
            wrong,
            AppendOutcome::WrongVersion {
                actual: Some(3),
                ..
            }
        ),
        "{wrong:?}"
    );
    appended(
        &store
            .delete_stream("del-1", ExpectedVersion::Exact(3), DeleteMode::Soft)
            .await?,
    )?;
    let read = store
        .read_stream("del-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(
        read.events.is_empty() && read.version == Some(3),
        "{read:?}"
    );
    let a = appended(
        &store
            .append("del-1", ExpectedVersion::Exact(3), vec![event("E", 4)?])
            .await?,
    )?;
    ensure!(a.version == 4);
    let read = store
        .read_stream("del-1", Direction::Forward, 1, 100)
        .await?;
    ensure!(
        versions(&read.events) == vec![4],
        "{:?}",
        versions(&read.events)
    );

    appended(
        &store
            .append("del-2", ExpectedVersion::NoStream, events("E", 1..3)?)
            .await?,
    )?;
    appended(
        &store
            .delete_stream("del-2", ExpectedVersion::Any, DeleteMode::Tombstone)
            .await?,
    )?;
    let out = store
        .append("del-2", ExpectedVersion::Any, vec![event("E", 9)?])
        .await?;
    ensure!(out == AppendOutcome::Tombstoned, "{out:?}");
    let read = store
        .read_stream("del-2", Direction::Forward, 1, 100)
        .await?;
    ensure!(read.tombstoned && read.events.is_empty(), "{read:?}");
    let info = store.stream_info("del-2").await?.context("info")?;
    ensure!(info.tombstoned && info.version == 2);
    let again = store
        .delete_stream("del-2", ExpectedVersion::Any, DeleteMode::Soft)
        .await?;
    ensure!(again == AppendOutcome::Tombstoned, "{again:?}");
    let all = store.read_all(0, &LogFilter::all(), 100).await?;
    ensure!(
        all.events.len() == 6,
        "deletes must not hide events from read_all"
    );
    Ok(())
}

/// `streams` by prefix, in name order, paged with `after`.
pub async fn streams_listing_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    for s in [
        "order-3",
        "order-1",
        "orders-x",
        "order-2",
        "payment-1",
        "order",
    ] {
        appended(
            &store
                .append(s, ExpectedVersion::Any, vec![event("E", 0)?])
                .await?,
        )?;
    }
    let names = |v: Vec<custody_core::event::StreamInfo>| {
        v.into_iter().map(|i| i.stream).collect::<Vec<_>>()
    };
    let all = names(store.streams("order-", None, 100).await?);
    ensure!(all == vec!["order-1", "order-2", "order-3"], "{all:?}");
    let page1 = names(store.streams("order-", None, 2).await?);
    ensure!(page1 == vec!["order-1", "order-2"], "{page1:?}");
    let page2 = names(store.streams("order-", Some("order-2"), 2).await?);
    ensure!(page2 == vec!["order-3"], "{page2:?}");
    let every = names(store.streams("", None, 100).await?);
    ensure!(every.len() == 6, "{every:?}");
    let info = store.streams("payment", None, 10).await?;
    ensure!(info.len() == 1 && info[0].version == 1 && !info[0].tombstoned);
    Ok(())
}

/// Snapshots: save, replace, load per (stream, aggregate).
pub async fn snapshots_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    ensure!(store.load_snapshot("snap-1", "Order").await?.is_none());
    let taken_at = chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis())
        .context("now")?;
    let mut s = Snapshot {
        stream: "snap-1".into(),
        aggregate: "Order".into(),
        schema_version: 1,
        version: 10,
        state: b"{\"total\":10}".to_vec(),
        taken_at,
    };
    store.save_snapshot(&s).await?;
    let other = Snapshot {
        aggregate: "Audit".into(),
        state: b"other".to_vec(),
        ..s.clone()
    };
    store.save_snapshot(&other).await?;
    ensure!(store.load_snapshot("snap-1", "Order").await? == Some(s.clone()));
    s.version = 20;
    s.schema_version = 2;
    s.state = b"{\"total\":20}".to_vec();
    store.save_snapshot(&s).await?;
    ensure!(store.load_snapshot("snap-1", "Order").await? == Some(s.clone()));
    ensure!(store.load_snapshot("snap-1", "Audit").await? == Some(other));
    Ok(())
}

fn course_query(course: &str) -> Query {
    Query {
        items: vec![QueryItem {
            types: vec!["Enrolled".into()],
            tags: vec![format!("course:{course}")],
        }],
    }
}

fn enrolled(course: &str, student: &str) -> anyhow::Result<EventData> {
    Ok(event("Enrolled", 0)?
        .tag(format!("course:{course}"))
        .tag(format!("student:{student}")))
}

/// DCB: `append_if` passes when nothing matching was appended after the
/// decision's position, and fails (naming the position) when something was.
pub async fn append_condition_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    // unrelated events do not matter
    appended(
        &store
            .append(
                "other-1",
                ExpectedVersion::Any,
                vec![event("Noise", 0)?.tag("course:9")],
            )
            .await?,
    )?;
    let q = course_query("1");
    let decision = store.read_query(&q, 0, 100).await?;
    let noise = last_position(&store).await?;
    ensure!(decision.events.is_empty() && decision.head == noise);
    let cond = AppendCondition {
        query: q.clone(),
        after: decision.head,
    };
    appended(
        &store
            .append_if("student-a", &cond, vec![enrolled("1", "a")?])
            .await?,
    )?;
    // the same decision again: the event just appended matches
    let enrolled_a = last_position(&store).await?;
    let out = store
        .append_if("student-b", &cond, vec![enrolled("1", "b")?])
        .await?;
    ensure!(
        out == AppendOutcome::ConditionFailed {
            position: enrolled_a
        },
        "{out:?}"
    );
    ensure!(store
        .read_stream("student-b", Direction::Forward, 1, 10)
        .await?
        .version
        .is_none());
    // a fresh decision passes
    let d2 = store.read_query(&q, 0, 100).await?;
    ensure!(d2.events.len() == 1 && d2.events[0].stream == "student-a");
    let out = store
        .append_if(
            "student-b",
            &AppendCondition {
                query: q.clone(),
                after: d2.head,
            },
            vec![enrolled("1", "b")?],
        )
        .await?;
    appended(&out)?;
    // queries: tags AND within an item, items OR; type-only items
    let both = Query {
        items: vec![QueryItem {
            types: vec![],
            tags: vec!["course:1".into(), "student:b".into()],
        }],
    };
    let r = store.read_query(&both, 0, 100).await?;
    ensure!(r.events.len() == 1 && r.events[0].stream == "student-b");
    let either = Query {
        items: vec![
            QueryItem {
                types: vec!["Noise".into()],
                tags: vec![],
            },
            QueryItem {
                types: vec![],
                tags: vec!["student:a".into()],
            },
        ],
    };
    let r = store.read_query(&either, 0, 100).await?;
    let got: Vec<&str> = r.events.iter().map(|e| e.stream.as_str()).collect();
    ensure!(got == vec!["other-1", "student-a"], "{got:?}");
    let r1 = store.read_query(&either, 0, 1).await?;
    ensure!(r1.events.len() == 1 && r1.scanned_to == noise, "{r1:?}");
    Ok(())
}

/// Two conditional appends decided on the same state with overlapping
/// queries, run concurrently many times: at most one of each pair commits.
pub async fn concurrent_conditional_appends_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    for round in 0..20 {
        let course = format!("c{round}");
        let q = course_query(&course);
        let store = f.store();
        let decision = store.read_query(&q, 0, 10).await?;
        ensure!(decision.events.is_empty());
        let cond = AppendCondition {
            query: q.clone(),
            after: decision.head,
        };
        let mut tasks = tokio::task::JoinSet::new();
        for student in ["x", "y"] {
            let store = f.store();
            let cond = cond.clone();
            let course = course.clone();
            tasks.spawn(async move {
                store
                    .append_if(
                        &format!("student-{student}{course}"),
                        &cond,
                        vec![enrolled(&course, student)?],
                    )
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let mut wins = 0;
        while let Some(r) = tasks.join_next().await {
            match r?? {
                AppendOutcome::Appended(_) => wins += 1,
                AppendOutcome::ConditionFailed { .. } => {}
                other => bail!("unexpected {other:?}"),
            }
        }
        ensure!(
            wins == 1,
            "round {round}: {wins} conditional appends committed"
        );
        let now = store.read_query(&q, 0, 10).await?;
        ensure!(
            now.events.len() == 1,
            "round {round}: {} enrolments",
            now.events.len()
        );
    }
    Ok(())
}

/// A 1 MiB payload is stored and read back intact.
pub async fn large_payload_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let e = EventData::new("Blob", "application/octet-stream", payload.clone());
    appended(
        &store
            .append("blob-1", ExpectedVersion::NoStream, vec![e])
            .await?,
    )?;
    let read = store
        .read_stream("blob-1", Direction::Forward, 1, 1)
        .await?;
    ensure!(read.events.len() == 1);
    ensure!(read.events[0].payload == payload, "payload changed");
    Ok(())
}

fn invalid_message(
    r: custody_core::Result<impl std::fmt::Debug>,
    needle: &str,
) -> anyhow::Result<()> {
    match r {
        Err(Error::InvalidMessage(m)) => {
            ensure!(m.contains(needle), "error {m:?} should mention {needle:?}");
            Ok(())
        }
        other => bail!("expected InvalidMessage mentioning {needle:?}, got {other:?}"),
    }
}

/// Invalid stream names and events are refused with an InvalidMessage that
/// says what to change; nothing is written.
pub async fn invalid_input_test<F: EventStoreFixture>(f: F) -> anyhow::Result<()> {
    let store = f.store();
    invalid_message(
        store
            .append("", ExpectedVersion::Any, vec![event("E", 0)?])
            .await,
        "stream name",
    )?;
    invalid_message(
        store
            .append("a\0b", ExpectedVersion::Any, vec![event("E", 0)?])
            .await,
        "without NUL",
    )?;
    invalid_message(
        store
            .append(&"s".repeat(300), ExpectedVersion::Any, vec![event("E", 0)?])
            .await,
        "1 to 255 bytes",
    )?;
    let bad_type = EventData::new("", "application/json", b"{}".to_vec());
    invalid_message(
        store
            .append("ok-1", ExpectedVersion::Any, vec![event("E", 0)?, bad_type])
            .await,
        "type must be",
    )?;
    invalid_message(
        store
            .append(
                "ok-1",
                ExpectedVersion::Any,
                vec![event("E", 0)?.schema_version(0)],
            )
            .await,
        "schema versions start at 1",
    )?;
    let control = EventData::new("Bad\ntype", "application/json", b"{}".to_vec());
    invalid_message(
        store
            .append("ok-1", ExpectedVersion::Any, vec![control])
            .await,
        "control character",
    )?;
    invalid_message(
        store
            .append("ok-1", ExpectedVersion::Any, vec![event("E", 0)?.tag("")])
            .await,
        "tag",
    )?;
    let e = event("E", 0)?;
    invalid_message(
        store
            .append("ok-1", ExpectedVersion::Any, vec![e.clone(), e])
            .await,
        "appears twice",
    )?;
    ensure!(store.head().await? == 0, "an invalid append wrote events");
    Ok(())
}

/// 100,000 events appended in batches of 1,000 over 10 streams, then read
/// from the global log in pages: every one, in order, no gap, no duplicate.
pub async fn hundred_thousand_events_in_order_test<F: EventStoreFixture>(
    f: F,
) -> anyhow::Result<()> {
    const TOTAL: u64 = 100_000;
    const BATCH: u64 = 1_000;
    let store = f.store();
    let mut sent = Vec::with_capacity(TOTAL as usize);
    for b in 0..TOTAL / BATCH {
        let stream = format!("bulk-{}", b % 10);
        let batch = events("Bulk", b * BATCH..(b + 1) * BATCH)?;
        sent.extend(batch.iter().map(|e| e.id));
        appended(&store.append(&stream, ExpectedVersion::Any, batch).await?)?;
    }
    let mut after = 0;
    let mut got = Vec::with_capacity(TOTAL as usize);
    let mut last_position = 0;
    loop {
        let page = store.read_all(after, &LogFilter::all(), 4_096).await?;
        for e in &page.events {
            ensure!(
                e.position > last_position,
                "position {} after {last_position}",
                e.position
            );
            last_position = e.position;
            got.push(e.id);
        }
        if page.scanned_to == page.head && page.events.len() < 4_096 {
            break;
        }
        ensure!(
            page.scanned_to > after,
            "read_all after {after} did not advance (scanned_to {}, head {})",
            page.scanned_to,
            page.head
        );
        after = page.scanned_to;
    }
    ensure!(
        got.len() == sent.len(),
        "{} of {} events read",
        got.len(),
        sent.len()
    );
    ensure!(got == sent, "events out of order");
    let unique: HashSet<Uuid> = got.iter().copied().collect();
    ensure!(unique.len() == got.len(), "duplicates");
    Ok(())
}
