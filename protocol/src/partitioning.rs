//! The partition of a keyed record (PROTOCOL.md §6.38, "The partition of a
//! key"): part of the wire contract, so that a client sending each
//! partition's produces to its leader puts a key where the broker would.
//!
//! Invariant: [`key_hash`] is the broker's key hash (the key index's
//! `dmq_index::key_hash`, a file format) bit for bit; the broker's tests
//! check the two against each other and against PRODUCE_OK's partitions.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over `key`.
pub fn key_hash(key: &[u8]) -> u64 {
    key.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition, of a topic of `partitions` (0 is taken as 1), that a
/// record with `key` and no explicit partition goes to.
pub fn key_partition(key: &[u8], partitions: u32) -> u32 {
    (key_hash(key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_fnv1a_64() {
        // The published FNV-1a 64 test values.
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn key_partition_is_the_hash_modulo_the_partitions() {
        assert_eq!(key_partition(b"a", 1), 0);
        assert_eq!(key_partition(b"a", 0), 0);
        assert_eq!(
            key_partition(b"a", 7),
            (0xaf63_dc4c_8601_ec8c_u64 % 7) as u32
        );
    }
}
