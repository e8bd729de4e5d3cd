/// The outbox partition of a message key: FNV-1a (32 bit) of the key's UTF-8
/// bytes modulo `partitions`.
///
/// All messages of one key land in one partition, and one relay holds a
/// partition's lease at a time, which is what keeps per-key order with several
/// relays. The function is fixed and documented so that producers written in
/// other languages compute the same partition.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let mut hash = OFFSET;
    for b in key.as_bytes() {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(PRIME);
    }
    hash % partitions.max(1)
}

/// A relay's fair share of the partitions: `ceil(partitions / live_relays)`
/// (at least one live relay: the one asking).
///
/// Every relay takes up to this many, so the live relays together can hold
/// every partition; with `partitions` not a multiple of `live_relays` the
/// last relays to claim hold fewer (10 partitions over 4 relays: 3, 3, 3, 1).
pub fn fair_share(partitions: u32, live_relays: u64) -> u32 {
    let live = u32::try_from(live_relays.max(1)).unwrap_or(u32::MAX);
    partitions.div_ceil(live)
}

/// What a relay does with its partition leases on one heartbeat
/// ([`crate::OutboxStore::acquire_leases`]), decided by [`plan_leases`]. The
/// store applies it with its own SQL and locking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePlan {
    /// Leases the relay holds and keeps (renews), sorted.
    pub keep: Vec<u32>,
    /// Leases above its fair share that it gives back (the highest ones),
    /// sorted.
    pub release: Vec<u32>,
    /// How many free (never taken, released or expired) partitions it may
    /// claim, lowest first: its share minus what it keeps.
    pub claim: usize,
}

impl LeasePlan {
    /// The partitions to claim out of `free` (sorted or not): the lowest
    /// [`LeasePlan::claim`] of them, sorted.
    pub fn claims(&self, free: &[u32]) -> Vec<u32> {
        let mut free = free.to_vec();
        free.sort_unstable();
        free.dedup();
        free.truncate(self.claim);
        free
    }

    /// What the relay holds once it claimed `claimed`: [`LeasePlan::keep`]
    /// and `claimed`, sorted.
    pub fn held_after(&self, claimed: &[u32]) -> Vec<u32> {
        let mut held: Vec<u32> = self.keep.iter().chain(claimed).copied().collect();
        held.sort_unstable();
        held.dedup();
        held
    }
}

/// The lease fair-share decision every outbox store makes on a relay's
/// heartbeat: with `partitions` partitions and `live_relays` relays
/// heartbeating (counting the caller), a relay that holds `held` keeps the
/// lowest [`fair_share`] of them, releases the rest, and may claim free
/// partitions up to its share.
///
/// Partitions at or beyond `partitions` (the count was lowered) are
/// released. Pure, so the three stores (PostgreSQL, SQLite, the memory model)
/// share one algorithm and it is tested on its own (below).
pub fn plan_leases(partitions: u32, live_relays: u64, held: &[u32]) -> LeasePlan {
    let share = fair_share(partitions, live_relays) as usize;
    let mut keep = held.to_vec();
    keep.sort_unstable();
    keep.dedup();
    let mut release: Vec<u32> = keep.iter().copied().filter(|p| *p >= partitions).collect();
    keep.retain(|p| *p < partitions);
    if keep.len() > share {
        release.extend(keep.split_off(share));
    }
    release.sort_unstable();
    LeasePlan {
        claim: share - keep.len(),
        keep,
        release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(10, 4), 3);
        assert_eq!(fair_share(8, 4), 2);
        assert_eq!(fair_share(8, 0), 8);
        assert_eq!(fair_share(3, 5), 1);
        assert_eq!(fair_share(0, 2), 0);
    }

    #[test]
    fn plan_keeps_the_lowest_share_and_releases_the_rest() {
        let plan = plan_leases(8, 4, &[7, 1, 3, 5]);
        assert_eq!(plan.keep, vec![1, 3]);
        assert_eq!(plan.release, vec![5, 7]);
        assert_eq!(plan.claim, 0);
        assert_eq!(plan.held_after(&plan.claims(&[0, 2])), vec![1, 3]);
    }

    #[test]
    fn plan_claims_the_lowest_free_up_to_the_share() {
        let plan = plan_leases(8, 2, &[6]);
        assert_eq!(plan.keep, vec![6]);
        assert!(plan.release.is_empty());
        assert_eq!(plan.claim, 3);
        let claimed = plan.claims(&[5, 0, 2, 4, 1]);
        assert_eq!(claimed, vec![0, 1, 2]);
        assert_eq!(plan.held_after(&claimed), vec![0, 1, 2, 6]);
    }

    #[test]
    fn plan_releases_partitions_beyond_the_count() {
        let plan = plan_leases(4, 1, &[2, 9, 5]);
        assert_eq!(plan.keep, vec![2]);
        assert_eq!(plan.release, vec![5, 9]);
        assert_eq!(plan.claim, 3);
    }

    /// The lease table as the stores keep it, without expiry: partition →
    /// holder. A heartbeat of `relay` with `live` relays applies
    /// [`plan_leases`] as every store does.
    fn heartbeat(table: &mut BTreeMap<u32, usize>, partitions: u32, live: &[usize], relay: usize) {
        let held: Vec<u32> = table
            .iter()
            .filter(|(_, r)| **r == relay)
            .map(|(p, _)| *p)
            .collect();
        let plan = plan_leases(partitions, live.len() as u64, &held);
        for p in &plan.release {
            table.remove(p);
        }
        // a dead relay's leases expire: they count as free
        let free: Vec<u32> = (0..partitions)
            .filter(|p| table.get(p).is_none_or(|r| !live.contains(r)))
            .collect();
        for p in plan.claims(&free) {
            table.insert(p, relay);
        }
    }

    proptest! {
        /// Relays join and die in any order; once membership holds still
        /// for two rounds of heartbeats, every partition is held by exactly
        /// one live relay and none holds more than its fair share. (The
        /// shares are ceil-based: they can differ by more than one, e.g.
        /// 3, 3, 3, 1 for 10 partitions over 4 relays.)
        #[test]
        fn every_partition_ends_held_by_one_live_relay_within_its_share(
            partitions in 1u32..40,
            changes in proptest::collection::vec((0usize..6, any::<bool>()), 1..12),
            order in proptest::collection::vec(0usize..6, 0..30),
        ) {
            let mut table = BTreeMap::new();
            let mut live: Vec<usize> = vec![0];
            for (relay, joins) in changes {
                if joins {
                    if !live.contains(&relay) { live.push(relay); }
                } else if live.len() > 1 {
                    live.retain(|r| *r != relay);
                }
                // some heartbeats in between, in any order
                for r in &order {
                    if live.contains(r) { heartbeat(&mut table, partitions, &live, *r); }
                }
            }
            for _ in 0..2 {
                for r in live.clone() { heartbeat(&mut table, partitions, &live, r); }
            }
            let share = fair_share(partitions, live.len() as u64) as usize;
            for p in 0..partitions {
                let holder = table.get(&p);
                prop_assert!(holder.is_some_and(|r| live.contains(r)), "partition {} held by {:?}", p, holder);
            }
            for r in &live {
                let n = table.values().filter(|h| *h == r).count();
                prop_assert!(n <= share, "relay {} holds {} > share {}", r, n, share);
            }
        }
    }

    #[test]
    fn known_vectors() {
        // FNV-1a 32-bit reference values.
        assert_eq!(partition_for("", u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_for("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_for("foobar", u32::MAX), 0xbf9c_f968);
    }

    proptest! {
        #[test]
        fn in_range_and_stable(key in ".*", n in 1u32..1024) {
            let p = partition_for(&key, n);
            prop_assert!(p < n);
            prop_assert_eq!(p, partition_for(&key, n));
        }
    }
}
