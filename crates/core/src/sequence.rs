//! Live gap detection: the `(producer, partition, sequence)` stamp.
//!
//! The relay that holds a partition's lease is the single writer of that
//! partition's numbering: it numbers the messages of each topic in the
//! partition 1, 2, 3, … in the order it takes them (stored in the outbox row
//! before the first publish, so a republish keeps its number) and stamps each
//! with [`Sequence`] headers. Numbering is per topic so that a consumer of
//! some of a producer's topics sees every number of what it subscribes to.
//! A consumer keeps, per `(producer, topic, partition)`, a *floor* — every
//! number up to it was processed or dead-lettered — and the inbox rows above
//! it. Then:
//!
//! - a **gap** is a sequence above the floor and below the highest one seen
//!   that has no inbox row ([`PartitionProgress::holes`]): visible as soon as
//!   a later message arrives, without comparing id lists;
//! - inbox rows at or below the floor are redundant for dedupe (the floor
//!   says "seen") and are **compacted** into it ([`advance_floor`]), which
//!   bounds the inbox without a guessed retention window.
//!
//! A message the relay dead-letters keeps its number: the relay publishes a
//! small skip marker ([`SKIP_TYPE`]) with the same stamp in its place, and the
//! consumer records the number as accounted for without running a handler.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Message;

/// Header: the producer's id (one per outbox database, made at migration).
pub const PRODUCER_HEADER: &str = "custodyproducer";
/// Header: the producer's partition of the message key.
pub const PARTITION_HEADER: &str = "custodypartition";
/// Header: the message's number in its partition, from 1.
pub const SEQUENCE_HEADER: &str = "custodyseq";
/// Header of a skip marker: the id of the message it stands in for.
pub const SKIPPED_HEADER: &str = "custodyskipped";
/// Type of a skip marker: the relay dead-lettered the message that had this
/// sequence number; consumers account for the number and run no handler.
pub const SKIP_TYPE: &str = "custody.skipped";

/// Where a message sits in its producer's numbering of its topic and
/// partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sequence {
    /// The producer's id (see [`PRODUCER_HEADER`]).
    pub producer: String,
    /// The message's topic (not a header: the envelope has it).
    pub topic: String,
    /// The producer's partition.
    pub partition: u32,
    /// The number, from 1.
    pub seq: u64,
}

impl Sequence {
    /// Write the stamp into `message`'s headers (the topic is the message's own).
    pub fn stamp(&self, message: &mut Message) {
        let h = &mut message.headers;
        h.insert(PRODUCER_HEADER.to_owned(), self.producer.clone());
        h.insert(PARTITION_HEADER.to_owned(), self.partition.to_string());
        h.insert(SEQUENCE_HEADER.to_owned(), self.seq.to_string());
    }

    /// The stamp of `message`, if it has a complete and readable one.
    /// Sequence 0 is not a valid number and reads as no stamp.
    pub fn of(message: &Message) -> Option<Sequence> {
        let h = &message.headers;
        let producer = h.get(PRODUCER_HEADER)?;
        let partition = h.get(PARTITION_HEADER)?.parse().ok()?;
        let seq = h.get(SEQUENCE_HEADER)?.parse().ok().filter(|s| *s > 0)?;
        if producer.is_empty() {
            return None;
        }
        Some(Sequence {
            producer: producer.clone(),
            topic: message.topic.clone(),
            partition,
            seq,
        })
    }

    /// Remove the stamp (a redriven message is processed outside the
    /// numbering: its number is already accounted for by its dead letter).
    pub fn unstamp(message: &mut Message) {
        for h in [PRODUCER_HEADER, PARTITION_HEADER, SEQUENCE_HEADER] {
            message.headers.remove(h);
        }
    }
}

/// The dead-letter reason for a numbered message at or below the
/// consumer's floor whose id the inbox never recorded: its number is
/// already accounted for by another message or by an accepted gap, so it is
/// not a duplicate, and applying it silently could break the partition's
/// order. Says what happened and what to do.
pub fn unseen_number_reason(message: &Message) -> String {
    let stamp = Sequence::of(message).map_or_else(
        || "its number".to_owned(),
        |s| {
            format!(
                "number {} of producer {} (topic {:?}, partition {})",
                s.seq, s.producer, s.topic, s.partition
            )
        },
    );
    format!(
        "{stamp} is already accounted for by this consumer (at or below its floor), but message {} was never recorded: the producer's history forked and reused the number (a restore, a failover or a database clone: docs/OPERATIONS.md \"After a restore\"), or it arrived after its number was accepted as lost. Check it, then `custody dlq redrive` it to apply it, or purge it",
        message.id
    )
}

/// Whether `message` is a relay's skip marker ([`SKIP_TYPE`]).
pub fn is_skip_marker(message: &Message) -> bool {
    message.message_type == SKIP_TYPE && message.headers.contains_key(SKIPPED_HEADER)
}

/// The highest floor reachable from `floor` given the recorded sequences
/// `above` (any order, duplicates allowed): `floor` plus the length of the
/// run `floor + 1, floor + 2, …` present in `above`.
pub fn advance_floor(floor: u64, above: impl IntoIterator<Item = u64>) -> u64 {
    let mut seqs: Vec<u64> = above.into_iter().filter(|s| *s > floor).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut next = floor;
    for s in seqs {
        if s != next + 1 {
            break;
        }
        next = s;
    }
    next
}

/// A consumer's progress through one producer's numbering of one topic and
/// partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    /// The producer's id.
    pub producer: String,
    /// The topic.
    pub topic: String,
    /// The producer's partition.
    pub partition: u32,
    /// Every sequence up to here is processed or accounted for.
    pub floor: u64,
    /// Highest sequence recorded (at least `floor`).
    pub high: u64,
    /// Sequences recorded above `floor` (inbox rows not yet compacted).
    pub above_floor: u64,
    /// Sequences in `floor + 1 ..= high` with no record: gaps.
    pub holes: u64,
    /// When there are holes: the number the floor waits for (`floor + 1`).
    /// After a compaction round it is the lowest missing number; before,
    /// it may already be recorded (the floor moves at the next round).
    pub first_hole: Option<u64>,
    /// Since when the first hole has been open: when the earliest sequence
    /// above it was recorded. A hole older than the transport's redelivery
    /// horizon is a message that is not coming by itself.
    pub gap_since: Option<DateTime<Utc>>,
    /// Inbox rows folded into the floor so far.
    pub compacted: u64,
}

impl PartitionProgress {
    /// Progress from the stored floor and the sequences recorded above it.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        producer: String,
        topic: String,
        partition: u32,
        floor: u64,
        max_above: Option<u64>,
        above_floor: u64,
        earliest_above: Option<DateTime<Utc>>,
        compacted: u64,
    ) -> Self {
        let high = max_above.unwrap_or(floor).max(floor);
        let holes = (high - floor).saturating_sub(above_floor);
        PartitionProgress {
            producer,
            topic,
            partition,
            floor,
            high,
            above_floor,
            holes,
            first_hole: (holes > 0).then_some(floor + 1),
            gap_since: if holes > 0 { earliest_above } else { None },
            compacted,
        }
    }

    /// Whether the first hole has been open longer than `grace` at `now`.
    pub fn gap_older_than(&self, grace: std::time::Duration, now: DateTime<Utc>) -> bool {
        match (self.holes, self.gap_since) {
            (0, _) | (_, None) => false,
            (_, Some(since)) => (now - since).to_std().unwrap_or_default() >= grace,
        }
    }
}

/// What one compaction round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Partitions whose floor moved up.
    pub advanced: u64,
    /// Inbox rows deleted (now covered by a floor).
    pub deleted: u64,
}

/// Which numbers an operator (or the consumer) accepts as never coming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GapRange {
    /// `first..=last`: every number missing in `floor + 1 ..= last` must lie
    /// in it (an acceptance names its gap; it never swallows another).
    Numbers {
        /// First number accepted.
        first: u64,
        /// Last number accepted: the floor moves here.
        last: u64,
    },
    /// The numbers below the lowest one recorded, for a partition with no
    /// history (floor 0, nothing compacted, nothing accepted): the stream
    /// this consumer reads did not begin at 1 (JetStream `max_age`, a
    /// consumer added later, a stream created after the producer started).
    StreamStart,
    /// The first run of missing numbers: from `floor + 1` up to the lowest
    /// number recorded above the floor (the consumer's own bound on how
    /// long a gap may pin its inbox: `consumer.gap-accept-after`).
    FirstHole,
}

/// A request to raise a floor past numbers that will never arrive, with
/// who asks and why (kept as an audit record, `custody_gap_accepted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapAcceptance {
    /// The producer's id.
    pub producer: String,
    /// The topic.
    pub topic: String,
    /// The producer's partition.
    pub partition: u32,
    /// The numbers.
    pub range: GapRange,
    /// Who accepts (an operator's name, or `consumer:<name>`).
    pub by: String,
    /// Why (e.g. "stream max_age dropped it; order re-entered by hand").
    pub reason: String,
}

/// What an acceptance did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedGap {
    /// The floor before.
    pub old_floor: u64,
    /// The floor after (the last number accepted).
    pub new_floor: u64,
    /// The missing numbers accepted, as inclusive runs.
    pub missing: Vec<(u64, u64)>,
}

impl AcceptedGap {
    /// How many numbers were accepted.
    pub fn count(&self) -> u64 {
        self.missing.iter().map(|(a, b)| b - a + 1).sum()
    }
}

/// The runs of numbers in `floor + 1 ..= last` absent from `present`
/// (ascending; numbers outside the range are ignored). Work is bounded by
/// `present.len()`, whatever the numbers.
pub fn missing_runs(floor: u64, last: u64, present: &[u64]) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut next = floor.saturating_add(1);
    for &p in present {
        if p < next {
            continue;
        }
        if p > last {
            break;
        }
        if p > next {
            runs.push((next, p - 1));
        }
        next = p.saturating_add(1);
    }
    if next <= last {
        runs.push((next, last));
    }
    runs
}

/// Check `gap` against the numbers missing in `floor + 1 ..= its last`
/// (`present`: the numbers recorded above the floor, ascending) and return
/// what accepting it does. Refused: a floor already at or past the range,
/// nothing missing, or a missing number outside the named range (name it
/// too, or wait for it). `has_history` (for [`GapRange::StreamStart`]): whether
/// the partition has history (a floor, compacted rows or an acceptance).
pub fn plan_acceptance(
    gap: &GapAcceptance,
    floor: u64,
    has_history: bool,
    present: &[u64],
) -> std::result::Result<AcceptedGap, String> {
    let what = format!(
        "producer {} topic {:?} partition {}",
        gap.producer, gap.topic, gap.partition
    );
    if gap.reason.trim().is_empty() || gap.by.trim().is_empty() {
        return Err(format!(
            "accepting a gap of {what} needs who accepts it and why (--reason): they are kept as the audit record"
        ));
    }
    let (first, last) = match gap.range {
        GapRange::Numbers { first, last } => (first, last),
        GapRange::FirstHole => match present.iter().copied().find(|s| *s > floor) {
            Some(lowest) if lowest > floor + 1 => (floor + 1, lowest - 1),
            _ => return Err(format!("{what}: no hole above the floor {floor}")),
        },
        GapRange::StreamStart => {
            if has_history {
                return Err(format!(
                    "{what} has history (floor {floor}): its missing numbers are gaps, not the start of the stream; accept them by number"
                ));
            }
            match present.iter().copied().find(|s| *s > floor) {
                Some(lowest) if lowest > 1 => (1, lowest - 1),
                _ => {
                    return Err(format!(
                    "{what}: the stream starts at 1 or nothing is recorded yet; nothing to accept"
                ))
                }
            }
        }
    };
    if first == 0 || first > last {
        return Err(format!(
            "{what}: {first}-{last} is not a range of sequence numbers (they start at 1; first <= last)"
        ));
    }
    if last <= floor {
        return Err(format!(
            "{what}: the floor is already {floor}, at or past {last}: nothing to accept"
        ));
    }
    let missing = missing_runs(floor, last, present);
    if missing.is_empty() {
        return Err(format!(
            "{what}: every number from {} to {last} is recorded: nothing is missing there",
            floor + 1
        ));
    }
    // (runs end at `last` at most: only their parts below `first` are outside)
    let outside: Vec<(u64, u64)> = missing
        .iter()
        .filter(|(a, _)| *a < first)
        .map(|(a, b)| (*a, (*b).min(first - 1)))
        .collect();
    if !outside.is_empty() {
        return Err(format!(
            "{what}: raising the floor from {floor} to {last} would also accept missing numbers {} outside {first}-{last}; name them in the range too (or wait for them: `custody reconcile --live` shows each)",
            runs_text(&outside)
        ));
    }
    Ok(AcceptedGap {
        old_floor: floor,
        new_floor: last,
        missing,
    })
}

/// `runs` as text: `5, 7-9`.
pub fn runs_text(runs: &[(u64, u64)]) -> String {
    runs.iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg() -> Message {
        Message::builder("orders", "k", "T")
            .json(&serde_json::json!({}))
            .unwrap()
            .build()
            .unwrap()
    }

    #[test]
    fn stamp_round_trips_and_unstamps() {
        let mut m = msg();
        assert_eq!(Sequence::of(&m), None);
        let s = Sequence {
            producer: "p1".into(),
            topic: "orders".into(),
            partition: 7,
            seq: 42,
        };
        s.stamp(&mut m);
        m.validate().unwrap();
        assert_eq!(Sequence::of(&m), Some(s));
        Sequence::unstamp(&mut m);
        assert_eq!(Sequence::of(&m), None);
    }

    #[test]
    fn unreadable_stamps_read_as_none() {
        let mut m = msg();
        for (p, part, seq) in [
            ("p", "x", "1"),
            ("p", "1", "0"),
            ("", "1", "1"),
            ("p", "1", "-3"),
        ] {
            m.headers.insert(PRODUCER_HEADER.into(), p.into());
            m.headers.insert(PARTITION_HEADER.into(), part.into());
            m.headers.insert(SEQUENCE_HEADER.into(), seq.into());
            assert_eq!(Sequence::of(&m), None, "{p} {part} {seq}");
        }
    }

    #[test]
    fn missing_runs_are_bounded_by_what_is_present() {
        assert_eq!(missing_runs(0, 5, &[1, 2, 4]), vec![(3, 3), (5, 5)]);
        assert_eq!(missing_runs(2, 2, &[]), vec![]);
        assert_eq!(missing_runs(0, 1 << 62, &[1]), vec![(2, 1 << 62)]);
        assert_eq!(missing_runs(3, 9, &[1, 3, 9, 12]), vec![(4, 8)]);
    }

    #[test]
    fn an_acceptance_names_its_gap() {
        let gap = |range| GapAcceptance {
            producer: "p".into(),
            topic: "t".into(),
            partition: 0,
            range,
            by: "ops".into(),
            reason: "lost to max_age".into(),
        };
        let n = |first, last| gap(GapRange::Numbers { first, last });
        let ok = plan_acceptance(&n(3, 4), 2, true, &[5, 6]).unwrap();
        assert_eq!((ok.old_floor, ok.new_floor, ok.count()), (2, 4, 2));
        // 3 is missing too: not named
        assert!(plan_acceptance(&n(4, 4), 2, true, &[5]).is_err());
        // nothing missing, or already below the floor
        assert!(plan_acceptance(&n(3, 3), 2, true, &[3]).is_err());
        assert!(plan_acceptance(&n(1, 2), 2, true, &[]).is_err());
        // a floor may be raised past recorded numbers inside the range
        assert_eq!(
            plan_acceptance(&n(1, 5), 0, true, &[2, 4, 7])
                .unwrap()
                .missing,
            vec![(1, 1), (3, 3), (5, 5)]
        );
        let first = plan_acceptance(&gap(GapRange::FirstHole), 2, true, &[5, 7]).unwrap();
        assert_eq!(first.missing, vec![(3, 4)]);
        assert!(plan_acceptance(&gap(GapRange::FirstHole), 2, true, &[3, 5]).is_err());
        let start = gap(GapRange::StreamStart);
        let s = plan_acceptance(&start, 0, false, &[41, 43]).unwrap();
        assert_eq!((s.new_floor, s.missing.clone()), (40, vec![(1, 40)]));
        assert!(plan_acceptance(&start, 0, true, &[41]).is_err());
        assert!(plan_acceptance(&start, 0, false, &[1, 3]).is_err());
        let mut why_not = n(3, 4);
        why_not.reason = " ".into();
        assert!(plan_acceptance(&why_not, 2, true, &[5]).is_err());
    }

    #[test]
    fn floor_stops_at_the_first_hole() {
        assert_eq!(advance_floor(0, [1, 2, 4]), 2);
        assert_eq!(advance_floor(0, [2, 3]), 0);
        assert_eq!(advance_floor(5, [3, 6, 6, 7, 9]), 7);
        assert_eq!(advance_floor(5, []), 5);
    }

    proptest! {
        /// The floor is the largest f with every 1..=f recorded, whatever the
        /// order the sequences arrive in and however often compaction runs.
        #[test]
        fn floor_is_the_largest_hole_free_prefix(
            arrivals in proptest::collection::vec(1u64..60, 0..120),
            compact_every in 1usize..10,
        ) {
            let mut floor = 0u64;
            let mut above: Vec<u64> = Vec::new();
            for (i, s) in arrivals.iter().enumerate() {
                if *s > floor { above.push(*s); }
                if i % compact_every == 0 {
                    floor = advance_floor(floor, above.iter().copied());
                    above.retain(|x| *x > floor);
                }
            }
            floor = advance_floor(floor, above.iter().copied());
            let seen: std::collections::BTreeSet<u64> = arrivals.iter().copied().collect();
            let expected = (1..).take_while(|n| seen.contains(n)).last().unwrap_or(0);
            prop_assert_eq!(floor, expected);
        }
    }
}
