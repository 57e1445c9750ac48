//! The hash chain over the stored records: the one formula every reader, writer and
//! auditor shares.
//!
//! ```text
//! hash_0 = 32 zero bytes
//! hash_n = SHA-256(hash_{n-1} || seq_n as 8 bytes big-endian || record_n)
//! ```
//!
//! `record_n` is the exact stored protobuf encoding of the event's `EventRecord` (its
//! recorded_at and payload), as ReplayEvents delivers it. Per-event hashes are not stored:
//! a segment keeps the hash before its first event and the hash after its last one, and
//! everything in between is recomputed from the records.

use sha2::{Digest, Sha256};

/// A SHA-256 digest in the chain.
pub type Hash = [u8; 32];

/// The hash before the first event (`hash_0`): 32 zero bytes.
pub const GENESIS_HASH: Hash = [0; 32];

/// `hash_n = SHA-256(hash_{n-1} || seq_n as 8 bytes big-endian || record_n)`.
pub fn next_hash(prev_hash: &Hash, seq: u64, record: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(seq.to_be_bytes());
    hasher.update(record);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_hash_is_sha256_of_zeros_seq_and_record() {
        // SHA-256 of 32 zero bytes, then 00..01, then "abc": computed once with a
        // byte buffer here so the streaming updates above are checked against a one-shot
        // digest of the same bytes.
        let mut input = vec![0_u8; 32];
        input.extend_from_slice(&1_u64.to_be_bytes());
        input.extend_from_slice(b"abc");
        let expected: Hash = Sha256::digest(&input).into();
        assert_eq!(next_hash(&GENESIS_HASH, 1, b"abc"), expected);
        assert_ne!(next_hash(&GENESIS_HASH, 2, b"abc"), expected);
    }
}
