//! The one serde format of the read models' stored bytes: snapshots, pages of buckets,
//! as-of checkpoints and the page references in the history index are all encoded here,
//! with postcard (compact: varint integers and lengths, no field names, not
//! self-describing).
//!
//! Changing the format changes the bytes of everything above, so each of them carries a
//! format number of its own that must be raised with it (`projection::snapshot`,
//! `projection::history`, `projection::as_of`); a build reads only its own and rebuilds
//! the rest from the log. Decoding damaged bytes returns an error, never panics, and
//! allocates no more than serde's cautious size hints allow (a claimed length is not
//! reserved beyond about 1 MiB before its elements are read).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes could not be encoded or decoded (postcard's error, as text).
pub type EncodingError = String;

/// `value` in the stored format.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodingError> {
    postcard::to_allocvec(value).map_err(|error| error.to_string())
}

/// The value `bytes` hold in the stored format; bytes left after it are an error (a
/// value is always stored alone).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, EncodingError> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} bytes follow the encoded value", rest.len())),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_damage_is_an_error() {
        let value: Vec<(String, u64, f64)> = vec![("a".into(), 1, 0.5), ("bc".into(), 300, -2.0)];
        let bytes = encode(&value).unwrap();
        assert_eq!(decode::<Vec<(String, u64, f64)>>(&bytes).unwrap(), value);
        for cut in 0..bytes.len() {
            assert!(
                decode::<Vec<(String, u64, f64)>>(&bytes[..cut]).is_err(),
                "{cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode::<Vec<(String, u64, f64)>>(&longer).is_err());
        // A length claiming far more elements than there are bytes.
        let claims = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode::<Vec<u64>>(&claims).is_err());
    }
}
