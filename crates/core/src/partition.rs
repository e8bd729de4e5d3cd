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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
