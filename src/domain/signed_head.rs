//! Signed heads: the server's Ed25519 signature of "the chain hash after event `seq` was
//! `hash`, at `signed_at`", which an auditor keeps as proof of what the service claimed and
//! checks with the server's public key alone. The signed bytes are the contract of
//! `kpi.v1.SignedHead` (audit.proto); [`SignedHead::message`] is their one definition.

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// What precedes the fields in the signed bytes: the statement's kind, and a zero byte.
const CONTEXT: &[u8] = b"kpi.v1.SignedHead\0";

/// Length of the signed bytes.
pub const MESSAGE_LEN: usize = CONTEXT.len() + 8 + 32 + 8 + 4;

/// A head and the server's signature of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHead {
    /// The seq the statement is about (0: the empty log).
    pub seq: u64,
    /// The chain hash after `seq`.
    pub hash: [u8; 32],
    /// When it was signed.
    pub signed_at: DateTime<Utc>,
    /// The public key of the signer.
    pub public_key: [u8; 32],
    /// The Ed25519 signature of [`SignedHead::message`].
    pub signature: [u8; 64],
}

/// Why a signed head does not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedHeadError {
    /// The head names a public key other than the one the auditor holds.
    #[error("signed by another key than the one given")]
    OtherKey,
    /// The public key is not a valid Ed25519 point.
    #[error("the public key is not a valid Ed25519 key")]
    BadKey,
    /// The signature does not match the fields.
    #[error("the signature does not match seq, hash and signed_at")]
    BadSignature,
}

impl SignedHead {
    /// The bytes that are signed: the context, then seq, hash, and signed_at's seconds and
    /// nanoseconds, integers big-endian (audit.proto spells it out for other languages).
    pub fn message(seq: u64, hash: &[u8; 32], signed_at: DateTime<Utc>) -> [u8; MESSAGE_LEN] {
        let mut message = [0_u8; MESSAGE_LEN];
        let fields = [
            CONTEXT,
            &seq.to_be_bytes(),
            hash,
            &signed_at.timestamp().to_be_bytes(),
            &signed_at.timestamp_subsec_nanos().to_be_bytes(),
        ];
        let mut at = 0;
        for field in fields {
            message[at..at + field.len()].copy_from_slice(field);
            at += field.len();
        }
        message
    }

    /// `key`'s signature of the head `seq`, `hash` at `signed_at`.
    pub fn sign(key: &SigningKey, seq: u64, hash: [u8; 32], signed_at: DateTime<Utc>) -> Self {
        let signature = key.sign(&Self::message(seq, &hash, signed_at));
        Self {
            seq,
            hash,
            signed_at,
            public_key: key.verifying_key().to_bytes(),
            signature: signature.to_bytes(),
        }
    }

    /// Checks the signature against `trusted`, the server's public key as the auditor holds
    /// it (not the key the head names, which anyone could replace).
    pub fn verify(&self, trusted: &VerifyingKey) -> Result<(), SignedHeadError> {
        if self.public_key != trusted.to_bytes() {
            return Err(SignedHeadError::OtherKey);
        }
        trusted
            .verify(
                &Self::message(self.seq, &self.hash, self.signed_at),
                &Signature::from_bytes(&self.signature),
            )
            .map_err(|_| SignedHeadError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signed_head_verifies_with_its_key_and_nothing_else() {
        let at = Utc.timestamp_opt(1_780_000_000, 123_456_789).unwrap();
        let head = SignedHead::sign(&key(1), 42, [7; 32], at);
        assert_eq!(head.verify(&key(1).verifying_key()), Ok(()));
        assert_eq!(
            head.verify(&key(2).verifying_key()),
            Err(SignedHeadError::OtherKey)
        );
        for changed in [
            SignedHead { seq: 43, ..head },
            SignedHead {
                hash: [8; 32],
                ..head
            },
            SignedHead {
                signed_at: at + chrono::TimeDelta::nanoseconds(1),
                ..head
            },
        ] {
            assert_eq!(
                changed.verify(&key(1).verifying_key()),
                Err(SignedHeadError::BadSignature)
            );
        }
    }

    #[test]
    fn the_message_is_laid_out_as_the_contract_says() {
        let at = Utc.timestamp_opt(1, 2).unwrap();
        let message = SignedHead::message(0x0102, &[0xaa; 32], at);
        assert_eq!(MESSAGE_LEN, 70);
        assert_eq!(&message[..18], b"kpi.v1.SignedHead\0");
        assert_eq!(&message[18..26], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&message[26..58], &[0xaa; 32]);
        assert_eq!(&message[58..66], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&message[66..], &[0, 0, 0, 2]);
    }
}
