//! Lock buckets for the append condition (the dynamic consistency
//! boundary, [`custody_core::event::EventStore::append_if`]).
//!
//! A conditional append must not pass while an event that would match its
//! query is being written by a transaction that has not committed yet (the
//! check cannot see it). So every append takes transaction advisory locks
//! in *shared* mode on buckets derived from what it writes, and a
//! conditional append takes them in *exclusive* mode on buckets derived
//! from its query, before checking. The derivation guarantees that an event
//! matching a query item shares a bucket with it:
//!
//! - an event of type T with tags G writes keys (T, -), (*, *), and for each
//!   tag g in G: (T, g) and (*, g);
//! - a query item with types Ts and tags Gs locks, for each t in Ts (or *
//!   when Ts is empty), the key (t, min Gs) (or (t, -) when Gs is empty);
//!   the item with neither locks (*, *).
//!
//! An event matching the item has type t ∈ Ts (or any) and every tag of Gs,
//! so it writes the item's key. Keys are hashed into [`BUCKETS`] buckets:
//! more locks per append would not fit PostgreSQL's lock table for large
//! batches, and a collision only makes two appends wait for each other, it
//! never fails a condition (the check after the lock reads the real events).
//! Locks are taken in bucket order, exclusive where a transaction needs
//! both, and always before stream row locks, so they cannot deadlock.

use std::collections::BTreeMap;

use custody_core::event::{EventData, Query};

/// The number of buckets.
pub(crate) const BUCKETS: u32 = 64;

/// The first key of the two-key advisory lock form (its bytes spell
/// `cust`); the one-key form that migrations use is a different lock space.
pub(crate) const LOCK_CLASS: i32 = 0x6375_7374;

/// Marks "any type / no tag"; event types and tags never contain NUL.
const ANY: &str = "\0any";
const NONE: &str = "\0none";

/// FNV-1a: stable across processes and releases (every custody process
/// must agree on the buckets), unlike std's hasher.
fn bucket(kind: &str, tag: &str) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind.bytes().chain([0xff]).chain(tag.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // < BUCKETS, so it fits
    i32::try_from(h % u64::from(BUCKETS)).unwrap_or(0)
}

/// Buckets to lock, each with whether it must be exclusive, sorted.
#[derive(Debug, Default)]
pub(crate) struct Buckets(BTreeMap<i32, bool>);

impl Buckets {
    /// Shared buckets of events being written.
    pub(crate) fn write(&mut self, events: &[EventData]) {
        for e in events {
            let mut add = |k: &str, t: &str| {
                self.0.entry(bucket(k, t)).or_insert(false);
            };
            add(&e.event_type, NONE);
            add(ANY, ANY);
            for tag in &e.tags {
                add(&e.event_type, tag);
                add(ANY, tag);
            }
        }
    }

    /// Exclusive buckets of a condition's query.
    pub(crate) fn condition(&mut self, query: &Query) {
        for item in &query.items {
            let tag = item.tags.iter().min().map(String::as_str);
            let mut add = |k: &str, t: &str| {
                self.0.insert(bucket(k, t), true);
            };
            match (item.types.is_empty(), tag) {
                (true, None) => add(ANY, ANY),
                (true, Some(tag)) => add(ANY, tag),
                (false, tag) => {
                    for t in &item.types {
                        add(t, tag.unwrap_or(NONE));
                    }
                }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (bucket, exclusive) arrays for [`LOCK`], in bucket order.
    pub(crate) fn arrays(&self) -> (Vec<i32>, Vec<bool>) {
        self.0.iter().map(|(k, x)| (*k, *x)).unzip()
    }
}

/// Take the buckets' locks, in array (= bucket) order, held to commit.
pub(crate) const LOCK: &str = "\
SELECT count(CASE WHEN x THEN pg_advisory_xact_lock($1, k) ELSE pg_advisory_xact_lock_shared($1, k) END)
FROM unnest($2::int4[], $3::bool[]) WITH ORDINALITY AS u(k, x, i)";

#[cfg(test)]
mod tests {
    use super::*;
    use custody_core::event::QueryItem;

    fn ev(t: &str, tags: &[&str]) -> EventData {
        let mut e = EventData::new(t, "application/json", b"{}".to_vec());
        for tag in tags {
            e = e.tag(*tag);
        }
        e
    }

    /// Every event that matches a query shares a bucket with the query's
    /// exclusive set.
    #[test]
    fn a_matching_event_shares_a_bucket() {
        let events = [
            ev("Enrolled", &["course:1", "student:7"]),
            ev("Left", &[]),
            ev("Other", &["student:7"]),
        ];
        let queries = [
            vec![QueryItem {
                types: vec!["Enrolled".into()],
                tags: vec!["student:7".into(), "course:1".into()],
            }],
            vec![QueryItem {
                types: vec![],
                tags: vec!["student:7".into()],
            }],
            vec![QueryItem {
                types: vec!["Left".into(), "X".into()],
                tags: vec![],
            }],
            vec![QueryItem::default()],
        ];
        for items in queries {
            let query = Query { items };
            let mut q = Buckets::default();
            q.condition(&query);
            for e in &events {
                let mut w = Buckets::default();
                w.write(std::slice::from_ref(e));
                let shares = w.0.keys().any(|k| q.0.contains_key(k));
                if query.matches(&e.event_type, &e.tags) {
                    assert!(shares, "{query:?} matches {e:?} but shares no bucket");
                }
            }
        }
    }
}
