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
