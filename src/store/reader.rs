//! Reading the stored log: the head at open (with the tail check), events by seq range,
//! the seq at a recorded time, and the rebuild of the dedup index.
//!
//! Readers only ever look at segments up to a committed head they were given: the writer
//! inserts a group's segments before its flush, and those must stay invisible until then.
//!
//! Size: about 600 lines: the head at open, range reads and `seq_at` share the segment
//! walk and its checks; the dedup rebuild reads the same way.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use prost::Message;

use super::chain::{self, GENESIS_HASH, Hash};
use super::dedup::DedupIndex;
use super::segment::{Segment, describe_key, key_seq, segment_key};
use super::{LogHead, StoreError, StoredEvent};
use crate::domain::Event;
use crate::proto::{self, from_proto};

/// A segment value from sled, parsed and checked against its key.
pub struct LoadedSegment {
    /// The bytes the segment's record ranges point into: the sled value itself, or its
    /// decompressed records.
    pub value: Bytes,
    pub segment: Segment,
}

impl LoadedSegment {
    /// Parses `value`, stored under `key`.
    pub fn load(key: &[u8], value: sled::IVec) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::CorruptSegment {
            key: describe_key(key),
            reason,
        };
        let (segment, decompressed) =
            Segment::parse(&value).map_err(|error| corrupt(error.to_string()))?;
        let value = match decompressed {
            Some(bytes) => Bytes::from(bytes),
            None => Bytes::from_owner(value),
        };
        if key_seq(key) != Some(segment.first_seq) {
            return Err(corrupt(format!(
                "the segment says its first seq is {}",
                segment.first_seq
            )));
        }
        Ok(Self { value, segment })
    }

    /// The records with their seqs, in order.
    pub fn records(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.segment.seq_records(&self.value)
    }

    /// The chain hash after each record, recomputed from the segment's prev_hash.
    pub fn hashes(&self) -> Vec<Hash> {
        let mut hash = self.segment.prev_hash;
        self.records()
            .map(|(seq, record)| {
                hash = chain::next_hash(&hash, seq, record);
                hash
            })
            .collect()
    }

    /// Seq of the first record.
    pub fn first_seq(&self) -> u64 {
        self.segment.first_seq
    }

    /// Seq of the last record.
    pub fn last_seq(&self) -> u64 {
        self.segment.last_seq()
    }

    /// When the first record was recorded.
    fn first_recorded_at(&self) -> Result<DateTime<Utc>, StoreError> {
        let (seq, record) = self
            .records()
            .next()
            .unwrap_or_else(|| unreachable!("a parsed segment has a record"));
        Ok(decode_header(seq, record)?.0)
    }
}

/// Decodes a stored record into its recorded_at and event; failure means corruption.
pub fn decode_record(seq: u64, record: &[u8]) -> Result<(DateTime<Utc>, Event), StoreError> {
    let message = proto::EventRecord::decode(record).map_err(|error| StoreError::Corrupt {
        seq,
        reason: format!("the record does not decode: {error}"),
    })?;
    from_proto::event_record(message).map_err(|rejection| StoreError::Corrupt {
        seq,
        reason: format!("the record is not a valid event: {rejection}"),
    })
}

/// The fields of a stored `EventRecord` that the open path and the time searches need.
/// Decoding only these skips building the whole event (strings, label maps), which makes
/// the dedup rebuild at open several times faster. Field numbers are those of
/// `proto/kpi/v1/events.proto`; protobuf skips the fields not listed.
#[derive(Clone, PartialEq, prost::Message)]
struct RecordHeader {
    /// `EventRecord.recorded_at`.
    #[prost(message, optional, tag = "1")]
    recorded_at: Option<prost_types::Timestamp>,
    /// `EventRecord.measurement_recorded` (a oneof member is a plain field on the wire).
    #[prost(message, optional, tag = "15")]
    measurement_recorded: Option<MeasurementRecordedId>,
}

/// `MeasurementRecorded` with only its measurement's event_id.
#[derive(Clone, PartialEq, prost::Message)]
struct MeasurementRecordedId {
    #[prost(message, optional, tag = "1")]
    measurement: Option<MeasurementId>,
}

/// `Measurement` with only its event_id.
#[derive(Clone, PartialEq, prost::Message)]
struct MeasurementId {
    #[prost(string, tag = "6")]
    event_id: String,
}

/// A record's recorded_at and, for a measurement with one, its event_id.
fn decode_header(seq: u64, record: &[u8]) -> Result<(DateTime<Utc>, Option<String>), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { seq, reason };
    let header = RecordHeader::decode(record)
        .map_err(|error| corrupt(format!("the record does not decode: {error}")))?;
    let recorded_at = from_proto::required_timestamp(header.recorded_at.as_ref(), "recorded_at")
        .map_err(|rejection| corrupt(format!("the record is not valid: {rejection}")))?;
    let event_id = header
        .measurement_recorded
        .and_then(|recorded| recorded.measurement)
        .map(|measurement| measurement.event_id)
        .filter(|event_id| !event_id.is_empty());
    Ok((recorded_at, event_id))
}

/// The head of the log in `tree`, after checking its tail: the last segment must parse,
/// hash to its stored head hash, hold only records that decode, and link to the segment
/// before it. The writer chains onto the tail, so a damaged tail fails the open.
pub fn load_head(tree: &sled::Tree) -> Result<LogHead, StoreError> {
    let Some((key, value)) = tree.last()? else {
        return Ok(LogHead::EMPTY);
    };
    let tail = LoadedSegment::load(&key, value)?;
    let (first, last) = (tail.first_seq(), tail.last_seq());
    let recomputed = *tail
        .hashes()
        .last()
        .unwrap_or_else(|| unreachable!("a parsed segment has a record"));
    if recomputed != tail.segment.head_hash {
        return Err(StoreError::Corrupt {
            seq: first,
            reason: format!(
                "the last segment (seqs {first}..={last}) does not hash to its stored head \
                 hash, so the log cannot be continued; run a verification and restore the \
                 data directory from a backup"
            ),
        });
    }
    let mut recorded_at = None;
    for (seq, record) in tail.records() {
        let (at, _) = decode_record(seq, record)?;
        if recorded_at.is_some_and(|previous| at < previous) {
            return Err(StoreError::Corrupt {
                seq,
                reason: "recorded_at is before that of the previous event".into(),
            });
        }
        recorded_at = Some(at);
    }
    match tree.range(..key).next_back().transpose()? {
        Some((previous_key, previous_value)) => {
            let previous = LoadedSegment::load(&previous_key, previous_value)?;
            if previous.last_seq().checked_add(1) != Some(first) {
                return Err(StoreError::Corrupt {
                    seq: first,
                    reason: format!(
                        "the last segment starts at seq {first} but the one before it ends at \
                         seq {}",
                        previous.last_seq()
                    ),
                });
            }
            if previous.segment.head_hash != tail.segment.prev_hash {
                return Err(StoreError::Corrupt {
                    seq: first,
                    reason: "the last segment does not link to the head hash of the one before it"
                        .into(),
                });
            }
        }
        None if first != 1 || tail.segment.prev_hash != GENESIS_HASH => {
            return Err(StoreError::Corrupt {
                seq: first,
                reason: "the only segment does not start the chain at seq 1 from the zero hash"
                    .into(),
            });
        }
        None => {}
    }
    Ok(LogHead {
        seq: last,
        hash: recomputed,
        recorded_at,
    })
}

/// The segment holding `seq`, if any (the last segment starting at or before it).
fn segment_containing(tree: &sled::Tree, seq: u64) -> Result<LoadedSegment, StoreError> {
    let missing = || StoreError::Corrupt {
        seq,
        reason: "no segment holds this seq".into(),
    };
    let (key, value) = tree
        .range(..=segment_key(seq))
        .next_back()
        .transpose()?
        .ok_or_else(missing)?;
    let segment = LoadedSegment::load(&key, value)?;
    if segment.last_seq() < seq {
        return Err(missing());
    }
    Ok(segment)
}

/// The last segment, among those holding seqs 1..=head_seq, whose first record's
/// recorded_at satisfies `before`. recorded_at never decreases with seq, so `before` must
/// hold for a prefix of the log only: a binary search over seqs, one sled lookup per step.
fn last_segment_where(
    tree: &sled::Tree,
    head_seq: u64,
    before: impl Fn(DateTime<Utc>) -> bool,
) -> Result<Option<LoadedSegment>, StoreError> {
    let (mut low, mut high) = (1, head_seq);
    let mut best = None;
    while low <= high {
        let middle = low + (high - low) / 2;
        let segment = segment_containing(tree, middle)?;
        if before(segment.first_recorded_at()?) {
            low = segment.last_seq() + 1;
            best = Some(segment);
        } else if segment.first_seq() <= 1 {
            break;
        } else {
            high = segment.first_seq() - 1;
        }
    }
    Ok(best)
}

/// The last seq up to `head_seq` recorded at or before `at`; 0 if none.
pub fn seq_at(tree: &sled::Tree, head_seq: u64, at: DateTime<Utc>) -> Result<u64, StoreError> {
    let Some(segment) = last_segment_where(tree, head_seq, |first| first <= at)? else {
        return Ok(0);
    };
    let mut found = segment.first_seq();
    for (seq, record) in segment.records().take_while(|(seq, _)| *seq <= head_seq) {
        if decode_header(seq, record)?.0 > at {
            break;
        }
        found = seq;
    }
    Ok(found)
}

/// The chain hash after `seq` (which must be at most the head), recomputed from its
/// segment.
pub fn hash_at(tree: &sled::Tree, seq: u64) -> Result<Hash, StoreError> {
    if seq == 0 {
        return Ok(GENESIS_HASH);
    }
    let segment = segment_containing(tree, seq)?;
    let index = usize::try_from(seq - segment.first_seq())
        .unwrap_or_else(|_| unreachable!("a segment holds fewer than usize::MAX records"));
    segment
        .hashes()
        .get(index)
        .copied()
        .ok_or_else(|| StoreError::Corrupt {
            seq,
            reason: "no segment holds this seq".into(),
        })
}

/// A record's recorded_at and, for a measurement with one, its event_id.
pub type IdAt = (DateTime<Utc>, Option<String>);

/// The recorded_at and event_id (for a measurement with one) of the event at `seq`;
/// `None` when the log has no such seq. Reads one segment without checking its hashes: a
/// dedup candidate is confirmed by comparing ids, and damage makes it no duplicate.
pub fn event_id_at(tree: &sled::Tree, seq: u64) -> Result<Option<IdAt>, StoreError> {
    let Some((key, value)) = tree.range(..=segment_key(seq)).next_back().transpose()? else {
        return Ok(None);
    };
    let segment = LoadedSegment::load(&key, value)?;
    match segment.records().find(|(at, _)| *at == seq) {
        Some((seq, record)) => decode_header(seq, record).map(Some),
        None => Ok(None),
    }
}

/// The first segment that can hold events recorded at or after `cutoff` (1 when unknown).
fn window_start(
    tree: &sled::Tree,
    head_seq: u64,
    cutoff: Option<DateTime<Utc>>,
) -> Result<u64, StoreError> {
    Ok(match cutoff {
        Some(cutoff) => match last_segment_where(tree, head_seq, |first| first < cutoff) {
            Ok(segment) => segment.map_or(1, |segment| segment.first_seq()),
            Err(error @ StoreError::Sled(_)) => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "damaged log while looking for the dedup window; scanning all of it");
                1
            }
        },
        None => 1,
    })
}

/// The seq of the measurement with `event_id` recorded at or after `cutoff`, found by
/// reading the log's window (every segment written, committed or not): the dedup index's
/// fallback when a run file it needs is damaged.
pub fn find_event_id(
    tree: &sled::Tree,
    cutoff: Option<DateTime<Utc>>,
    event_id: &str,
) -> Result<Option<u64>, StoreError> {
    let head_seq = match tree.last()? {
        Some((key, _)) => key_seq(&key).unwrap_or(u64::MAX),
        None => return Ok(None),
    };
    let start = window_start(tree, head_seq, cutoff)?;
    for item in tree.range(segment_key(start)..) {
        let (key, value) = item?;
        let Ok(segment) = LoadedSegment::load(&key, value) else {
            continue;
        };
        for (seq, record) in segment.records() {
            if let Ok((at, Some(id))) = decode_header(seq, record)
                && id == event_id
                && cutoff.is_none_or(|cutoff| at >= cutoff)
            {
                return Ok(Some(seq));
            }
        }
    }
    Ok(None)
}

/// Fills `dedup` with the event_ids recorded within its window before the head's
/// recorded_at and after `after_seq` (the ids up to it are in the index's run files),
/// scanning only the segments that can hold such events. After each segment,
/// `after_segment` gets the index, the segment's last seq and head hash, and the number of
/// events read from it (so the index can spill).
///
/// A damaged record or segment is skipped with a warning instead of failing the open:
/// damage behind the tail is for `verify` to report, and the service stays available.
pub fn rebuild_dedup(
    tree: &sled::Tree,
    head: &LogHead,
    dedup: &mut DedupIndex,
    after_seq: u64,
    mut after_segment: impl FnMut(&mut DedupIndex, u64, Hash, u64) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let Some(head_recorded_at) = head.recorded_at else {
        return Ok(());
    };
    if after_seq >= head.seq {
        return Ok(());
    }
    let cutoff = dedup.cutoff(head_recorded_at);
    dedup.expire(head_recorded_at);
    let window_start = window_start(tree, head.seq, cutoff)?;
    let start = if after_seq >= window_start {
        match segment_containing(tree, after_seq + 1) {
            Ok(segment) => segment.first_seq(),
            Err(error @ StoreError::Sled(_)) => return Err(error),
            Err(_) => window_start,
        }
    } else {
        window_start
    };
    for item in tree.range(segment_key(start)..) {
        let (key, value) = item?;
        if key_seq(&key).is_some_and(|seq| seq > head.seq) {
            break;
        }
        let segment = match LoadedSegment::load(&key, value) {
            Ok(segment) => segment,
            Err(error) => {
                tracing::warn!(%error, "skipping a damaged segment while rebuilding the dedup index");
                continue;
            }
        };
        let mut events = 0;
        for (seq, record) in segment.records().filter(|(seq, _)| *seq > after_seq) {
            events += 1;
            match decode_header(seq, record) {
                Ok((at, Some(event_id))) if cutoff.is_none_or(|cutoff| at >= cutoff) => {
                    let key = dedup.hasher().key(&event_id);
                    dedup.insert(key, seq, at);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "skipping a damaged record while rebuilding the dedup index");
                }
            }
        }
        let last = segment.last_seq().min(head.seq);
        if events > 0 && last == segment.last_seq() {
            after_segment(dedup, last, segment.segment.head_hash, events)?;
        }
    }
    Ok(())
}

/// The events of a seq range, read segment by segment; returned by `EventLog::read`.
///
/// Every segment's hashes are recomputed and compared with its stored head hash, and its
/// link to the segment before it is checked, before any of its events is yielded. The
/// first error ends the iteration.
pub struct ReadEvents {
    state: ReadState,
}

enum ReadState {
    Reading(Box<Cursor>),
    Failed(StoreError),
    Done,
}

struct Cursor {
    tree: sled::Tree,
    /// Segments from the one holding the first wanted seq; opened on the first `next`.
    segments: Option<sled::Iter>,
    next_seq: u64,
    to_seq: u64,
    /// The segment being read, with its recomputed hashes.
    current: Option<Current>,
}

struct Current {
    value: Bytes,
    segment: Segment,
    hashes: Vec<Hash>,
}

impl ReadEvents {
    /// Events `from_seq..=to_seq` of `tree`; `to_seq` must not pass the committed head.
    pub fn new(tree: sled::Tree, from_seq: u64, to_seq: u64) -> Self {
        let from_seq = from_seq.max(1);
        if from_seq > to_seq {
            return Self {
                state: ReadState::Done,
            };
        }
        Self {
            state: ReadState::Reading(Box::new(Cursor {
                tree,
                segments: None,
                next_seq: from_seq,
                to_seq,
                current: None,
            })),
        }
    }

    /// An iterator that yields `error` and ends.
    pub fn failed(error: StoreError) -> Self {
        Self {
            state: ReadState::Failed(error),
        }
    }
}

impl Iterator for ReadEvents {
    type Item = Result<StoredEvent, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match std::mem::replace(&mut self.state, ReadState::Done) {
            ReadState::Done => None,
            ReadState::Failed(error) => Some(Err(error)),
            ReadState::Reading(mut cursor) => match cursor.next_event() {
                Ok(Some(event)) => {
                    self.state = ReadState::Reading(cursor);
                    Some(Ok(event))
                }
                Ok(None) => None,
                Err(error) => Some(Err(error)),
            },
        }
    }
}

impl std::iter::FusedIterator for ReadEvents {}

impl Cursor {
    fn next_event(&mut self) -> Result<Option<StoredEvent>, StoreError> {
        let seq = self.next_seq;
        if seq > self.to_seq {
            return Ok(None);
        }
        let needs_segment = self
            .current
            .as_ref()
            .is_none_or(|current| current.segment.last_seq() < seq);
        if needs_segment {
            self.current = Some(self.load_next_segment()?);
        }
        let current = self
            .current
            .as_ref()
            .unwrap_or_else(|| unreachable!("loaded above"));
        let index = usize::try_from(seq - current.segment.first_seq)
            .unwrap_or_else(|_| unreachable!("a segment holds fewer than usize::MAX records"));
        let range = current.segment.records[index].clone();
        let record = current.value.slice(range);
        let (recorded_at, event) = decode_record(seq, &record)?;
        let prev_hash = match index {
            0 => current.segment.prev_hash,
            _ => current.hashes[index - 1],
        };
        self.next_seq += 1;
        Ok(Some(StoredEvent {
            seq,
            recorded_at,
            prev_hash,
            hash: current.hashes[index],
            record,
            event,
        }))
    }

    /// Loads the segment holding `next_seq` and checks it: its key, its hashes and, after
    /// the first one, its link to the segment read before it.
    fn load_next_segment(&mut self) -> Result<Current, StoreError> {
        let seq = self.next_seq;
        let missing = || StoreError::Corrupt {
            seq,
            reason: "no segment holds this seq".into(),
        };
        let previous = self.current.take();
        let segments = match &mut self.segments {
            Some(segments) => segments,
            None => {
                let start = self
                    .tree
                    .range(..=segment_key(seq))
                    .next_back()
                    .transpose()?
                    .ok_or_else(missing)?
                    .0;
                self.segments.insert(self.tree.range(start..))
            }
        };
        let (key, value) = segments.next().transpose()?.ok_or_else(missing)?;
        let loaded = LoadedSegment::load(&key, value)?;
        let (first, last) = (loaded.first_seq(), loaded.last_seq());
        match &previous {
            Some(previous) if first != seq => {
                return Err(StoreError::Corrupt {
                    seq,
                    reason: format!(
                        "the segment after seq {} starts at seq {first}",
                        previous.segment.last_seq()
                    ),
                });
            }
            Some(previous) if previous.segment.head_hash != loaded.segment.prev_hash => {
                return Err(StoreError::Corrupt {
                    seq,
                    reason: "the segment does not link to the head hash of the one before it"
                        .into(),
                });
            }
            None if !(first..=last).contains(&seq) => return Err(missing()),
            _ => {}
        }
        let hashes = loaded.hashes();
        if hashes.last() != Some(&loaded.segment.head_hash) {
            return Err(StoreError::Corrupt {
                seq: first,
                reason: format!(
                    "the segment of seqs {first}..={last} does not hash to its stored head hash"
                ),
            });
        }
        Ok(Current {
            value: loaded.value,
            segment: loaded.segment,
            hashes,
        })
    }
}

#[cfg(test)]
mod tests;
