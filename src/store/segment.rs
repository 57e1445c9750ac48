//! The binary format of one segment: the records of consecutive events committed
//! together, stored as one sled value keyed by the segment's first seq.
//!
//! ```text
//! offset  size  field
//!      0     1  format version: 1 (records as they are) or 2 (records compressed)
//!      1     8  first_seq, u64 big-endian; equals the sled key
//!      9    32  prev_hash: the chain hash before the first event
//!     41    32  head_hash: the chain hash after the last event
//!     73     4  count of records, u32 big-endian, at least 1
//!     77     …  the records area:
//!               format 1: count times: record length as an unsigned LEB128 varint
//!               (prost's, the protobuf wire encoding),
//!                         record bytes
//!               format 2: the format 1 area compressed as one LZ4 block, preceded by
//!                         its uncompressed length as a u32 little-endian
//! ```
//!
//! This build writes format 2 and reads both (directories written before it hold format
//! 1). LZ4 makes the records about 2.8 times smaller on the benchmark's workload, and sled
//! writes every byte of a segment more than once, so this is where the disk footprint is
//! won. The chain hashes the records themselves, not their stored form.
//!
//! Nothing may follow the last record. Per-event hashes are not stored (they would more
//! than double the size of a small measurement); readers recompute them from prev_hash.
//! Parsing checks every length against the bytes that are there, so damaged input gives
//! a [`SegmentError`], never a panic or a huge allocation.

use std::ops::Range;

use super::chain::{self, Hash};

/// Segments whose records are stored as they are (written by older builds).
pub const SEGMENT_FORMAT_RAW: u8 = 1;
/// Segments whose records area is one LZ4 block: what this build writes.
pub const SEGMENT_FORMAT_LZ4: u8 = 2;

/// Largest uncompressed records area a format 2 segment may claim: far above any segment
/// the writer builds, so that a damaged length is refused instead of allocated.
const MAX_RECORDS_BYTES: usize = 64 * 1024 * 1024;

/// Bytes before the first record.
pub const HEADER_LEN: usize = 1 + 8 + 32 + 32 + 4;

const FIRST_SEQ_AT: usize = 1;
const PREV_HASH_AT: usize = 9;
const HEAD_HASH_AT: usize = 41;
const COUNT_AT: usize = 73;

/// The sled key of the segment whose first event has `first_seq`: 8 bytes big-endian,
/// so that sled's byte order is seq order.
pub fn segment_key(first_seq: u64) -> [u8; 8] {
    first_seq.to_be_bytes()
}

/// The first seq a segment key stands for; `None` if the key is not 8 bytes.
pub fn key_seq(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// A key as a person reads it in an error: the seq, or hex when it is not 8 bytes.
pub fn describe_key(key: &[u8]) -> String {
    match key_seq(key) {
        Some(seq) => seq.to_string(),
        None => {
            let hex: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

/// Why a segment value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SegmentError(String);

impl SegmentError {
    fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// Writes one segment: the header first (count and head hash patched in by
/// [`SegmentBuilder::finish`]), then each record with its length, hashing as it goes.
#[derive(Debug)]
pub struct SegmentBuilder {
    buf: Vec<u8>,
    first_seq: u64,
    count: u32,
    hash: Hash,
}

impl SegmentBuilder {
    /// An empty segment whose first event will get `first_seq`, chained after `prev_hash`.
    /// `capacity` is a guess of the final size in bytes.
    pub fn new(first_seq: u64, prev_hash: Hash, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN));
        buf.push(SEGMENT_FORMAT_RAW);
        buf.extend_from_slice(&first_seq.to_be_bytes());
        buf.extend_from_slice(&prev_hash);
        buf.extend_from_slice(&[0; 32]);
        buf.extend_from_slice(&[0; 4]);
        Self {
            buf,
            first_seq,
            count: 0,
            hash: prev_hash,
        }
    }

    /// Appends the record that is the concatenation of `parts` as the next event, and
    /// returns its chain hash.
    pub fn push(&mut self, parts: &[&[u8]]) -> Hash {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        write_varint(&mut self.buf, widen(len));
        let start = self.buf.len();
        for part in parts {
            self.buf.extend_from_slice(part);
        }
        let seq = self.next_seq();
        self.hash = chain::next_hash(&self.hash, seq, &self.buf[start..]);
        self.count += 1;
        self.hash
    }

    /// The seq of the first record.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The seq the next pushed record gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }

    /// Records pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes written so far, header included.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The chain hash after the last pushed record.
    pub fn head_hash(&self) -> Hash {
        self.hash
    }

    /// The finished segment value, in format 2 (records compressed). The builder must hold
    /// at least one record.
    pub fn finish(self) -> Vec<u8> {
        let raw = self.finish_raw();
        let mut value = Vec::with_capacity(HEADER_LEN + raw.len() / 2);
        value.extend_from_slice(&raw[..HEADER_LEN]);
        value[0] = SEGMENT_FORMAT_LZ4;
        value.extend_from_slice(&lz4_flex::block::compress_prepend_size(&raw[HEADER_LEN..]));
        value
    }

    /// The finished segment value in format 1, as builds before format 2 wrote it.
    pub fn finish_raw(mut self) -> Vec<u8> {
        debug_assert!(self.count > 0, "a segment holds at least one record");
        self.buf[HEAD_HASH_AT..COUNT_AT].copy_from_slice(&self.hash);
        self.buf[COUNT_AT..HEADER_LEN].copy_from_slice(&self.count.to_be_bytes());
        self.buf
    }
}

/// A parsed segment value: its header and where each record lies in its records' bytes
/// (the value itself for format 1, the decompressed area for format 2; see
/// [`Segment::parse`]).
#[derive(Debug, Clone)]
pub struct Segment {
    /// Seq of the first record.
    pub first_seq: u64,
    /// Chain hash before the first record.
    pub prev_hash: Hash,
    /// Chain hash after the last record, as stored.
    pub head_hash: Hash,
    /// Byte ranges of the records within the records' bytes, in seq order; never empty.
    pub records: Vec<Range<usize>>,
}

impl Segment {
    /// Parses a segment value, checking the version, the framing of every record and
    /// that nothing trails the last record. It does not check hashes or decode records.
    /// Returns the segment and, for format 2, the decompressed records' bytes its ranges
    /// point into (for format 1 they point into `value`).
    pub fn parse(value: &[u8]) -> Result<(Self, Option<Vec<u8>>), SegmentError> {
        let version = *value
            .first()
            .ok_or_else(|| SegmentError::new("empty value"))?;
        if version != SEGMENT_FORMAT_RAW && version != SEGMENT_FORMAT_LZ4 {
            return Err(SegmentError::new(format!(
                "unknown segment format version {version} (this build reads versions \
                 {SEGMENT_FORMAT_RAW} and {SEGMENT_FORMAT_LZ4})"
            )));
        }
        let header = value.get(..HEADER_LEN).ok_or_else(|| {
            SegmentError::new(format!(
                "truncated header: {} of {HEADER_LEN} bytes",
                value.len()
            ))
        })?;
        let first_seq = u64::from_be_bytes(array(&header[FIRST_SEQ_AT..PREV_HASH_AT]));
        let prev_hash: Hash = array(&header[PREV_HASH_AT..HEAD_HASH_AT]);
        let head_hash: Hash = array(&header[HEAD_HASH_AT..COUNT_AT]);
        let count = u32::from_be_bytes(array(&header[COUNT_AT..HEADER_LEN]));
        if first_seq == 0 {
            return Err(SegmentError::new("first seq is 0"));
        }
        if count == 0 {
            return Err(SegmentError::new("record count is 0"));
        }
        if first_seq.checked_add(u64::from(count) - 1).is_none() {
            return Err(SegmentError::new(format!(
                "{count} records from seq {first_seq} overflow u64"
            )));
        }
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let segment = |records| Self {
            first_seq,
            prev_hash,
            head_hash,
            records,
        };
        if version == SEGMENT_FORMAT_RAW {
            return Ok((segment(frame_records(value, HEADER_LEN, count)?), None));
        }
        let area = &value[HEADER_LEN..];
        let size = area
            .get(..4)
            .map(|prefix| u32::from_le_bytes(array(prefix)))
            .and_then(|size| usize::try_from(size).ok())
            .filter(|size| *size <= MAX_RECORDS_BYTES)
            .ok_or_else(|| {
                SegmentError::new("the compressed records' length is missing or too large")
            })?;
        let bytes = lz4_flex::block::decompress(&area[4..], size).map_err(|error| {
            SegmentError::new(format!("the records do not decompress: {error}"))
        })?;
        let records = frame_records(&bytes, 0, count)?;
        Ok((segment(records), Some(bytes)))
    }

    /// Seq of the last record.
    pub fn last_seq(&self) -> u64 {
        // `parse` checked that this does not overflow and that records is not empty.
        self.first_seq + (widen(self.records.len()) - 1)
    }

    /// The records with their seqs, in order.
    pub fn seq_records<'a>(
        &'a self,
        value: &'a [u8],
    ) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        (self.first_seq..).zip(self.records.iter().map(|range| &value[range.clone()]))
    }
}

/// Where each of `count` length-prefixed records lies in `bytes` from `start`, which must
/// end exactly after the last one.
fn frame_records(
    bytes: &[u8],
    start: usize,
    count: usize,
) -> Result<Vec<Range<usize>>, SegmentError> {
    // Every record takes at least one byte of length, so a damaged count cannot make this
    // allocation larger than the bytes.
    let mut records = Vec::with_capacity(count.min(bytes.len().saturating_sub(start)));
    let mut at = start;
    for index in 0..count {
        let (len, varint_len) =
            read_varint(bytes.get(at..).unwrap_or_default()).ok_or_else(|| {
                SegmentError::new(format!(
                    "record {index} of {count}: length is missing or malformed at byte {at}"
                ))
            })?;
        let record_start = at + varint_len;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| record_start.checked_add(len))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| {
                SegmentError::new(format!(
                    "record {index} of {count}: length {len} at byte {at} runs past the end \
                     of the {} bytes",
                    bytes.len()
                ))
            })?;
        records.push(record_start..end);
        at = end;
    }
    if at != bytes.len() {
        return Err(SegmentError::new(format!(
            "{} bytes follow the last of {count} records",
            bytes.len() - at
        )));
    }
    Ok(records)
}

/// A length as a u64; usize is at most 64 bits on every target sled supports.
pub fn widen(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// The first N bytes of a slice that is known to be N bytes long.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    out
}

/// Appends `value` as an unsigned LEB128 varint: prost's encoding, the protobuf wire
/// format's, so a length here is the bytes a length-delimited protobuf field holds.
pub fn write_varint(buf: &mut Vec<u8>, value: u64) {
    prost::encoding::encode_varint(value, buf);
}

/// Reads an unsigned LEB128 varint from the start of `bytes` with prost's decoder: the
/// value and its length. `None` when the bytes end first or the varint is longer than a
/// u64 allows (prost reads at most 10 bytes, the tenth carrying only the top bit); it
/// never reads past `bytes` and allocates nothing.
pub fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut rest = bytes;
    let value = prost::encoding::decode_varint(&mut rest).ok()?;
    Some((value, bytes.len() - rest.len()))
}

#[cfg(test)]
mod tests;
