//! Live gap detection by sequence numbers (`custody reconcile --live`).
//!
//! Where [`crate::reconcile::reconcile`] compares id digests per time
//! window, this reads the consumer's per-partition floors (see
//! [`custody_core::sequence`]): a gap is a number below the highest one the
//! consumer recorded that it has not recorded. With the producer's database
//! too, it also sees the *tail*: numbers the producer gave after the highest
//! one the consumer has, published long enough ago that they should have
//! arrived. Each missing number is resolved to its message id, so `--repair`
//! can republish it.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{PartitionProgress, ProcessedHistory, Result, SentHistory};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::metric_definitions as m;

/// Most numbers read above a floor, and most missing numbers listed, per
/// partition (a partition further behind than this is reported by its
/// counts; the listing resumes after the first ones are repaired).
pub const LIST_LIMIT: usize = 10_000;

/// One producer partition as the consumer sees it, with the producer's head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivePartition {
    /// The consumer's floor, highest number and holes.
    #[serde(flatten)]
    pub progress: PartitionProgress,
    /// The last number the producer gave (with `--producer`).
    pub producer_head: Option<u64>,
    /// Numbers given after the consumer's highest (in flight or lost).
    pub behind: u64,
}

/// A number that should have arrived and has not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingNumber {
    /// Producer id.
    pub producer: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The number.
    pub seq: u64,
    /// `hole` (a later number was recorded more than the grace ago) or
    /// `tail` (published more than the grace ago, nothing later arrived).
    pub kind: String,
    /// The message, when the producer's database was given and still has it.
    pub id: Option<Uuid>,
    /// Its outbox status (`published`, `pending`, `dead`), when known.
    pub outbox_status: Option<String>,
}

/// The result of a live check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveReport {
    /// Consumer.
    pub consumer: String,
    /// The producer whose heads were compared, if one was given.
    pub producer: Option<String>,
    /// When the check ran.
    pub checked_at: DateTime<Utc>,
    /// Gaps younger than this count as in flight.
    pub grace_secs: f64,
    /// Every numbered partition the consumer has seen (and, with a
    /// producer, every partition of the topics it has seen).
    pub partitions: Vec<LivePartition>,
    /// Missing numbers (older than the grace), in order.
    pub missing: Vec<MissingNumber>,
    /// Holes and tail numbers younger than the grace.
    pub in_flight: u64,
}

impl LiveReport {
    /// Nothing missing.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
    }

    /// Whether the consumer has recorded number `m` (certainly: at or below
    /// its floor, or at or below its highest with no hole left). A repair
    /// is done when every repaired number is recorded, not when the
    /// republished rows merely went back to pending (which reads as in
    /// flight).
    pub fn has_recorded(&self, m: &MissingNumber) -> bool {
        self.partitions.iter().any(|p| {
            let g = &p.progress;
            g.producer == m.producer
                && g.topic == m.topic
                && g.partition == m.partition
                && (m.seq <= g.floor || (m.seq <= g.high && g.holes == 0))
        })
    }

    /// Ids of the missing numbers the producer still has, published (what
    /// `--repair` republishes).
    pub fn republishable(&self) -> Vec<Uuid> {
        self.missing
            .iter()
            .filter(|m| m.outbox_status.as_deref() == Some("published"))
            .filter_map(|m| m.id)
            .collect()
    }
}

/// Check `consumer`'s numbered progress, and with `sent` its producer's heads.
pub async fn reconcile_live<S, P>(
    sent: Option<&S>,
    processed: &P,
    consumer: &str,
    grace: Duration,
    now: DateTime<Utc>,
) -> Result<LiveReport>
where
    S: SentHistory + ?Sized,
    P: ProcessedHistory + ?Sized,
{
    let stale_before = crate::before(now, grace).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut progress = processed.sequence_progress(consumer).await?;
    let heads = match sent {
        Some(s) => s.sequence_heads().await?,
        None => None,
    };
    let producer = heads.as_ref().map(|(p, _)| p.clone());
    // partitions of the consumer's topics it has no record of yet
    if let Some((pid, heads)) = &heads {
        let topics: BTreeSet<&str> = progress
            .iter()
            .filter(|p| &p.producer == pid)
            .map(|p| p.topic.as_str())
            .collect();
        let mut extra = Vec::new();
        for h in heads.iter().filter(|h| topics.contains(h.topic.as_str())) {
            if !progress
                .iter()
                .any(|p| &p.producer == pid && p.topic == h.topic && p.partition == h.partition)
            {
                extra.push(PartitionProgress::from_parts(
                    pid.clone(),
                    h.topic.clone(),
                    h.partition,
                    0,
                    None,
                    0,
                    None,
                    0,
                ));
            }
        }
        progress.extend(extra);
    }

    let mut partitions = Vec::with_capacity(progress.len());
    let mut missing = Vec::new();
    let mut in_flight = 0u64;
    for p in progress {
        let head = heads
            .as_ref()
            .filter(|(pid, _)| pid == &p.producer)
            .and_then(|(_, hs)| {
                hs.iter()
                    .find(|h| h.topic == p.topic && h.partition == p.partition)
            })
            .map(|h| h.last);
        let mut found: Vec<MissingNumber> = Vec::new();
        // holes: a number absent while a later one was recorded before the grace
        if p.holes > 0 {
            let present = processed
                .numbers_above_floor(consumer, &p, LIST_LIMIT)
                .await?;
            // the highest number recorded before the grace: holes below it are missing
            let latest_stale_present = present
                .iter()
                .rev()
                .find(|(_, at)| *at < stale_before)
                .map(|(seq, _)| *seq);
            // Walk the stored numbers, not the number line: the runs between
            // consecutive recorded numbers are counted by arithmetic and only
            // their first LIST_LIMIT numbers listed, so the work is bounded
            // by what is stored (LIST_LIMIT rows) whatever the numbers say
            // (a forged `custodyseq` of 2^62 is one row, not 2^62 steps).
            let mut prev = p.floor;
            for &(next, _) in &present {
                if next <= prev {
                    continue; // (sorted and distinct; a bad backend is tolerated)
                }
                let (lo, hi) = (prev + 1, next); // missing: lo..hi
                                                 // numbers below the highest stale recorded one are holes
                let stale_end = latest_stale_present.map_or(lo, |l| l.clamp(lo, hi));
                let room = LIST_LIMIT.saturating_sub(found.len());
                found.extend(
                    (lo..stale_end)
                        .take(room)
                        .map(|seq| missing_number(&p, seq, "hole")),
                );
                in_flight = in_flight.saturating_add(hi - stale_end);
                prev = next;
            }
        }
        // tail: numbers after the consumer's highest, published before the grace
        let behind = head.map_or(0, |h| h.saturating_sub(p.high));
        let tail: Vec<u64> = (p.high + 1..=p.high + behind).take(LIST_LIMIT).collect();
        // only the given producer's outbox can resolve this partition's numbers
        let same_producer = producer.as_ref().is_some_and(|pid| pid == &p.producer);
        if let Some(s) = sent.filter(|_| same_producer) {
            let wanted: Vec<u64> = found
                .iter()
                .map(|m| m.seq)
                .chain(tail.iter().copied())
                .collect();
            if !wanted.is_empty() {
                let rows = s.numbered(&p.topic, p.partition, &wanted).await?;
                // the row that accounts for a number: a skip marker (pending
                // or published) over the dead original
                let row_for = |seq: u64| {
                    rows.iter()
                        .filter(|r| r.seq == seq)
                        .min_by_key(|r| r.status == "dead")
                };
                for m in &mut found {
                    if let Some(r) = row_for(m.seq) {
                        m.id = Some(r.id);
                        m.outbox_status = Some(r.status.clone());
                    }
                }
                for seq in tail {
                    match row_for(seq) {
                        Some(r)
                            if r.status == "published"
                                && r.published_at.is_some_and(|t| t < stale_before) =>
                        {
                            let mut m = missing_number(&p, seq, "tail");
                            m.id = Some(r.id);
                            m.outbox_status = Some(r.status.clone());
                            found.push(m);
                        }
                        // pending (the relay's backlog), just published, or
                        // pruned from the producer's history: not the
                        // consumer's gap (yet)
                        _ => in_flight += 1,
                    }
                }
            }
        }
        missing.extend(found);
        partitions.push(LivePartition {
            progress: p,
            producer_head: head,
            behind,
        });
    }
    Ok(LiveReport {
        consumer: consumer.to_owned(),
        producer,
        checked_at: now,
        grace_secs: grace.as_secs_f64(),
        partitions,
        missing,
        in_flight,
    })
}

fn missing_number(p: &PartitionProgress, seq: u64, kind: &str) -> MissingNumber {
    MissingNumber {
        producer: p.producer.clone(),
        topic: p.topic.clone(),
        partition: p.partition,
        seq,
        kind: kind.to_owned(),
        id: None,
        outbox_status: None,
    }
}

/// Export a live report as gauges ([`m::RECONCILE_LIVE_MISSING`] by kind)
/// and log one warning per missing number.
pub fn export_live(r: &LiveReport) {
    for kind in ["hole", "tail"] {
        let n = r.missing.iter().filter(|m| m.kind == kind).count();
        metrics::gauge!(m::RECONCILE_LIVE_MISSING, "consumer" => r.consumer.clone(), "kind" => kind)
            .set(n as f64);
    }
    for x in &r.missing {
        tracing::warn!(
            consumer = %r.consumer, producer = %x.producer, topic = %x.topic,
            partition = x.partition, seq = x.seq, kind = %x.kind, id = ?x.id,
            "missing message: its number is below ones already processed, or it was published and never arrived"
        );
    }
}
