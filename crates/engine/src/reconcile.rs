//! Balancing controls: compare what a producer's outbox sent with what a
//! consumer's inbox recorded, per time window, cheaply when they agree.
//!
//! Both sides are read in slices of the id range (an index range on either
//! side) sized to about [`SLICE_TARGET`] ids, so memory stays bounded
//! whatever the volume and no statement runs long. Each page is folded into per-window
//! [`IdDigest`]s; windows whose digests are equal are done. Only the
//! windows that differ are read again, id by id, to name the missing and
//! unexpected ids.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
pub use custody_core::history::*;
use custody_core::{Error, Result};
use tracing::warn;
use uuid::Uuid;

use crate::metric_definitions as m;

/// Ids a slice aims at: slices of the id range (i.e. of time) are halved
/// when they return more than twice this, doubled below half of it.
pub const SLICE_TARGET: usize = 20_000;
/// First slice length.
const FIRST_SLICE_MS: i64 = 60_000;
/// Longest slice (sparse ranges grow to this).
const MAX_SLICE_MS: i64 = 30 * 24 * 3_600_000;
/// How far after `to` sent messages are counted as left out of a check
/// (ids are UUIDv7 from producers' clocks: a day covers any clock skew).
const LEFT_OUT_HORIZON: chrono::Duration = chrono::Duration::days(1);

/// Progress of a reconciliation, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// `sent`, `processed` (digests) or `detail` (mismatching windows).
    pub phase: &'static str,
    /// Ids read so far in this phase.
    pub rows: u64,
    /// How far through the range this phase is, 0.0 to 1.0.
    pub fraction: f64,
}

/// Read every id of `range` in time slices sized to about
/// [`SLICE_TARGET`] ids each, handing each slice to `each`. Memory is
/// bounded by the densest slice, and no statement sorts or runs long.
async fn scan<F, Fut>(
    range: IdRange,
    phase: &'static str,
    progress: &(dyn Fn(Progress) + Send + Sync),
    mut fetch: F,
    mut each: impl FnMut(Vec<Uuid>),
) -> Result<()>
where
    F: FnMut(IdRange) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Uuid>>>,
{
    let start = id_millis(&range.from);
    let end_id = range.to;
    let span = (id_millis(&end_id) - start).max(1) as f64;
    let mut lo = range.from;
    let mut step = FIRST_SLICE_MS;
    let mut rows = 0u64;
    while lo < end_id {
        let hi_ms = id_millis(&lo).saturating_add(step);
        let hi = id_at(at_ms(hi_ms)).min(end_id);
        let hi = if hi <= lo { end_id } else { hi };
        let ids = fetch(IdRange { from: lo, to: hi }).await?;
        let n = ids.len();
        rows += n as u64;
        each(ids);
        progress(Progress {
            phase,
            rows,
            fraction: ((id_millis(&hi) - start) as f64 / span).clamp(0.0, 1.0),
        });
        if n > SLICE_TARGET * 2 {
            step = (step / 2).max(1);
        } else if n < SLICE_TARGET / 2 {
            step = step.saturating_mul(2).min(MAX_SLICE_MS);
        }
        lo = hi;
    }
    Ok(())
}

async fn digest_side<F, Fut>(
    range: IdRange,
    window_ms: i64,
    phase: &'static str,
    progress: &(dyn Fn(Progress) + Send + Sync),
    fetch: F,
) -> Result<BTreeMap<i64, IdDigest>>
where
    F: FnMut(IdRange) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Uuid>>>,
{
    let mut out = BTreeMap::new();
    scan(range, phase, progress, fetch, |ids| {
        digests_by_window(&ids, window_ms, &mut out)
    })
    .await?;
    Ok(out)
}

async fn all_ids<F, Fut>(range: IdRange, fetch: F) -> Result<BTreeSet<Uuid>>
where
    F: FnMut(IdRange) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Uuid>>>,
{
    let mut out = BTreeSet::new();
    scan(range, "detail", &|_| {}, fetch, |ids| out.extend(ids)).await?;
    Ok(out)
}

fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Reconcile `query.topic` between a producer's history and consumer
/// `query.consumer`'s inbox over `[query.from, query.to)`.
///
/// Sent = outbox rows of the topic in the range, every status but dead.
/// Processed = the consumer's inbox rows of the topic in the range (applied
/// or dead-lettered by it). Missing = sent, not processed, not in the
/// consumer's redrive queue. Unexpected = processed, not in this producer's
/// history (another producer, or pruned: keep the range within both
/// retentions). Left out = sent at or after `to` (up to a day later), not
/// checked: a report that [compared nothing](ReconcileReport::compared_nothing)
/// can say why.
pub async fn reconcile<S: SentHistory + ?Sized, P: ProcessedHistory + ?Sized>(
    sent: &S,
    processed: &P,
    query: &ReconcileQuery,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<ReconcileReport> {
    if query.to <= query.from {
        return Err(Error::Config(format!(
            "reconcile range is empty: from {} is not before to {}; give --from earlier than --to",
            query.from, query.to
        )));
    }
    let window_ms = i64::try_from(query.window.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    let range = IdRange::between(query.from, query.to);
    let topic = query.topic.as_str();
    let consumer = query.consumer.as_str();

    let sent_d = digest_side(range, window_ms, "sent", progress, |r| {
        sent.sent_ids(topic, r)
    })
    .await?;
    let proc_d = digest_side(range, window_ms, "processed", progress, |r| {
        processed.processed_ids(consumer, topic, r)
    })
    .await?;

    let starts: BTreeSet<i64> = sent_d.keys().chain(proc_d.keys()).copied().collect();
    let mut windows = Vec::with_capacity(starts.len());
    let mut sent_not_processed = BTreeSet::new();
    let mut unexpected = Vec::new();
    let mut detail_rows = 0u64;
    for start in starts {
        let s = sent_d.get(&start).copied().unwrap_or_default();
        let p = proc_d.get(&start).copied().unwrap_or_default();
        let matching = s == p;
        windows.push(WindowReport {
            start: at_ms(start),
            end: at_ms(start.saturating_add(window_ms)),
            sent: s.count,
            processed: p.count,
            matching,
        });
        if matching {
            continue;
        }
        let w = IdRange {
            from: id_at(at_ms(start)).max(range.from),
            to: id_at(at_ms(start.saturating_add(window_ms))).min(range.to),
        };
        let s_ids = all_ids(w, |r| sent.sent_ids(topic, r)).await?;
        let p_ids = all_ids(w, |r| processed.processed_ids(consumer, topic, r)).await?;
        detail_rows += (s_ids.len() + p_ids.len()) as u64;
        progress(Progress {
            phase: "detail",
            rows: detail_rows,
            fraction: 1.0,
        });
        sent_not_processed.extend(s_ids.difference(&p_ids).copied());
        unexpected.extend(p_ids.difference(&s_ids).copied());
    }

    let redriving = processed.redriving(consumer, topic, range).await?;
    let redriving_set: BTreeSet<Uuid> = redriving.iter().copied().collect();
    let mut dead_lettered: Vec<DeadId> = sent
        .sent_dead(topic, range)
        .await?
        .into_iter()
        .map(|(id, error)| DeadId {
            id,
            side: "producer".into(),
            error,
        })
        .collect();
    dead_lettered.extend(
        processed
            .processed_dead(consumer, topic, range)
            .await?
            .into_iter()
            .map(|(id, error)| DeadId {
                id,
                side: "consumer".into(),
                error,
            }),
    );
    dead_lettered.sort_by_key(|d| d.id);
    let missing: Vec<Uuid> = sent_not_processed
        .into_iter()
        .filter(|id| !redriving_set.contains(id))
        .collect();

    let mut left_out = 0u64;
    let after = IdRange::between(query.to, query.to + LEFT_OUT_HORIZON);
    scan(
        after,
        "left out",
        progress,
        |r| sent.sent_ids(topic, r),
        |ids| left_out += ids.len() as u64,
    )
    .await?;

    let matching = windows.iter().filter(|w| w.matching).count() as u64;
    Ok(ReconcileReport {
        topic: query.topic.clone(),
        consumer: query.consumer.clone(),
        from: query.from,
        to: query.to,
        window_secs: query.window.as_secs(),
        windows_checked: windows.len() as u64,
        matching,
        mismatching: windows.len() as u64 - matching,
        sent: sent_d.values().map(|d| d.count).sum(),
        processed: proc_d.values().map(|d| d.count).sum(),
        missing,
        unexpected,
        dead_lettered,
        redriving,
        windows,
        left_out,
    })
}

/// Export a report as gauges ([`m::RECONCILE_GAPS`], [`m::RECONCILE_WINDOWS`])
/// and log one warning per missing or unexpected id.
pub fn export_report(report: &ReconcileReport) {
    let labels = |kind: &'static str| {
        [
            ("topic", report.topic.clone()),
            ("consumer", report.consumer.clone()),
            ("kind", kind.to_owned()),
        ]
    };
    metrics::gauge!(m::RECONCILE_GAPS, &labels("missing")).set(report.missing.len() as f64);
    metrics::gauge!(m::RECONCILE_GAPS, &labels("unexpected")).set(report.unexpected.len() as f64);
    metrics::gauge!(m::RECONCILE_GAPS, &labels("dead_lettered"))
        .set(report.dead_lettered.len() as f64);
    let w = |result: &'static str| {
        [
            ("topic", report.topic.clone()),
            ("consumer", report.consumer.clone()),
            ("result", result.to_owned()),
        ]
    };
    metrics::gauge!(m::RECONCILE_WINDOWS, &w("matching")).set(report.matching as f64);
    metrics::gauge!(m::RECONCILE_WINDOWS, &w("mismatching")).set(report.mismatching as f64);
    for id in &report.missing {
        warn!(message_id = %id, topic = %report.topic, consumer = %report.consumer,
            "reconcile: sent by the producer, never processed by the consumer");
    }
    for id in &report.unexpected {
        warn!(message_id = %id, topic = %report.topic, consumer = %report.consumer,
            "reconcile: processed by the consumer, not in the producer's history");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use custody_core::{ProcessedHistory, ReconcileQuery, SentHistory};
    use proptest::prelude::*;

    struct Sent(BTreeSet<Uuid>);
    struct Processed(BTreeSet<Uuid>);

    fn in_range(set: &BTreeSet<Uuid>, r: IdRange) -> Vec<Uuid> {
        set.range(r.from..r.to).copied().collect()
    }

    impl SentHistory for Sent {
        async fn sent_ids(&self, _topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
            Ok(in_range(&self.0, range))
        }
        async fn sent_dead(&self, _topic: &str, _range: IdRange) -> Result<Vec<(Uuid, String)>> {
            Ok(Vec::new())
        }
        async fn republish(&self, _ids: &[Uuid]) -> Result<u64> {
            Ok(0)
        }
        async fn sequence_heads(&self) -> Result<Option<(String, Vec<SequenceHead>)>> {
            Ok(None)
        }
        async fn numbered(&self, _t: &str, _p: u32, _seqs: &[u64]) -> Result<Vec<NumberedRow>> {
            Ok(Vec::new())
        }
    }

    impl ProcessedHistory for Processed {
        async fn processed_ids(&self, _c: &str, _t: &str, range: IdRange) -> Result<Vec<Uuid>> {
            Ok(in_range(&self.0, range))
        }
        async fn processed_dead(
            &self,
            _c: &str,
            _t: &str,
            _range: IdRange,
        ) -> Result<Vec<(Uuid, String)>> {
            Ok(Vec::new())
        }
        async fn redriving(&self, _c: &str, _t: &str, _range: IdRange) -> Result<Vec<Uuid>> {
            Ok(Vec::new())
        }
        async fn sequence_progress(
            &self,
            _c: &str,
        ) -> Result<Vec<custody_core::PartitionProgress>> {
            Ok(Vec::new())
        }
        async fn numbers_above_floor(
            &self,
            _c: &str,
            _p: &custody_core::PartitionProgress,
            _limit: usize,
        ) -> Result<Vec<(u64, DateTime<Utc>)>> {
            Ok(Vec::new())
        }
    }

    const BASE_MS: u128 = 1_700_000_000_000;

    fn id(ms_offset: u32, tail: u64) -> Uuid {
        Uuid::from_u128(((BASE_MS + u128::from(ms_offset)) << 80) | u128::from(tail))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Whatever the density (bursts in one millisecond, days apart), the
        /// report names exactly the ids removed from and added to the consumer side.
        #[test]
        fn names_exactly_the_difference(
            sent in proptest::collection::btree_set((0u32..400_000_000, any::<u64>()), 0..3000),
            burst in 0usize..50_000,
            drop_every in 2usize..500,
            extra in proptest::collection::btree_set((0u32..400_000_000, any::<u64>()), 0..5),
        ) {
            let mut s: BTreeSet<Uuid> = sent.iter().map(|(m, t)| id(*m, *t)).collect();
            // a burst in one millisecond: slices cannot shrink below 1 ms
            s.extend((0..burst as u64).map(|t| id(123_456, t)));
            let mut p = s.clone();
            let dropped: BTreeSet<Uuid> = s.iter().step_by(drop_every).copied().collect();
            for d in &dropped {
                p.remove(d);
            }
            let added: BTreeSet<Uuid> = extra.iter().map(|(m, t)| id(*m, t | 1 << 63)).filter(|u| !s.contains(u)).collect();
            p.extend(added.iter().copied());
            let from = chrono::DateTime::from_timestamp_millis(BASE_MS as i64).unwrap_or_default();
            let q = ReconcileQuery {
                topic: "t".into(),
                consumer: "c".into(),
                from,
                to: from + chrono::Duration::days(5),
                window: std::time::Duration::from_secs(3600),
            };
            let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let r = rt.block_on(reconcile(&Sent(s.clone()), &Processed(p.clone()), &q, &|_| {})).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(r.missing.iter().copied().collect::<BTreeSet<_>>(), dropped);
            prop_assert_eq!(r.unexpected.iter().copied().collect::<BTreeSet<_>>(), added);
            prop_assert_eq!(r.sent, s.len() as u64);
            prop_assert_eq!(r.processed, p.len() as u64);
            prop_assert_eq!(r.windows.iter().map(|w| w.sent).sum::<u64>(), s.len() as u64);
            prop_assert_eq!(r.left_out, 0);
        }
    }

    /// Messages sent at or after `to` are counted as left out, not checked;
    /// a range with none of the topic's messages compared nothing.
    #[tokio::test]
    async fn counts_what_the_range_leaves_out() -> anyhow::Result<()> {
        let from = chrono::DateTime::from_timestamp_millis(BASE_MS as i64).unwrap_or_default();
        let to = from + chrono::Duration::hours(1);
        let late: BTreeSet<Uuid> = (0..7)
            .map(|t| id(3_600_000 + 1_000 * t, t.into()))
            .collect();
        let q = ReconcileQuery {
            topic: "t".into(),
            consumer: "c".into(),
            from,
            to,
            window: std::time::Duration::from_secs(600),
        };
        let r = reconcile(
            &Sent(late.clone()),
            &Processed(BTreeSet::new()),
            &q,
            &|_| {},
        )
        .await?;
        assert_eq!((r.sent, r.processed, r.left_out), (0, 0, 7), "{r:?}");
        assert!(r.compared_nothing() && r.is_clean());
        let mut both = late;
        both.insert(id(10, 1));
        let r = reconcile(&Sent(both), &Processed(BTreeSet::new()), &q, &|_| {}).await?;
        assert_eq!((r.sent, r.missing.len(), r.left_out), (1, 1, 7), "{r:?}");
        assert!(!r.compared_nothing());
        Ok(())
    }
}
