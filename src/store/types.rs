//! The log's public types: its options, its head, an append request and its outcomes,
//! the committed events its listeners hear of, a stored event as reads return it, and the
//! write side's counters.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use super::chain::{GENESIS_HASH, Hash};
use crate::domain::Event;

/// Bytes the in-memory part of the dedup index is kept to by default (see
/// [`StoreOptions::dedup_memory_bytes`]).
pub const DEFAULT_DEDUP_MEMORY_BYTES: usize = 16 * 1024 * 1024;

/// Name of the sled tree that holds the segments.
pub const SEGMENTS_TREE: &str = "segments";
/// Name of the sled tree that holds the storage format version.
pub const META_TREE: &str = "meta";
/// Key of the storage format version in [`META_TREE`].
pub const FORMAT_KEY: &[u8] = b"format";
/// The storage format this build reads and writes.
pub const FORMAT_VERSION: u8 = 1;

/// The source of `recorded_at`: the server clock, or a fake one in tests.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Bytes the log keeps free on its file system by default: room for sled's own background
/// writes, a read-model snapshot of a small device and the operator.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// How the log behaves.
#[derive(Clone)]
pub struct StoreOptions {
    /// How long (in recorded time) a measurement's event_id is remembered: a measurement
    /// whose event_id was recorded at most this long before is a duplicate. Default 24 h.
    pub dedup_window: TimeDelta,
    /// The clock that stamps `recorded_at` (forced non-decreasing). Default `Utc::now`.
    pub clock: Clock,
    /// Writes are refused ([`StoreError::DiskFull`](super::StoreError::DiskFull)) while the log's file system has less
    /// than this available, and the log does not open. Default
    /// [`DEFAULT_MIN_FREE_BYTES`].
    pub min_free_bytes: u64,
    /// Write segments as builds before format 2 did: records uncompressed (format 1),
    /// up to 120 KiB a segment, which sled stores in blob files. Only for tests of the
    /// directories those builds wrote; see `writer.rs` for why segments are small now.
    pub legacy_layout: bool,
    /// Bytes of memory for the newest event ids of the dedup index (with their bytes);
    /// older ids are spilled to run files under `<log>/dedup/`, of which about one byte per
    /// id stays in memory. Default [`DEFAULT_DEDUP_MEMORY_BYTES`].
    pub dedup_memory_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            dedup_window: TimeDelta::hours(24),
            clock: Arc::new(Utc::now),
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            legacy_layout: false,
            dedup_memory_bytes: DEFAULT_DEDUP_MEMORY_BYTES,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("dedup_window", &self.dedup_window)
            .field("min_free_bytes", &self.min_free_bytes)
            .field("legacy_layout", &self.legacy_layout)
            .field("dedup_memory_bytes", &self.dedup_memory_bytes)
            .finish_non_exhaustive()
    }
}

/// The committed end of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHead {
    /// Seq of the last durable event; 0 for an empty log.
    pub seq: u64,
    /// Chain hash after that event ([`GENESIS_HASH`] for an empty log).
    pub hash: Hash,
    /// When that event was recorded; `None` for an empty log.
    pub recorded_at: Option<DateTime<Utc>>,
}

impl LogHead {
    pub(super) const EMPTY: Self = Self {
        seq: 0,
        hash: GENESIS_HASH,
        recorded_at: None,
    };
}

/// Events to append atomically: all of them are decided in one group, contiguously, or
/// the request is refused as a whole.
#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    /// The events, in order. Measurements with an event_id already in the log within the
    /// dedup window (or earlier in this request or group) are not appended again.
    pub events: Vec<Event>,
    /// Optimistic concurrency for validation done outside the writer: the head seq (or
    /// any seq) at which the caller read the state it validated against. If the writer
    /// has appended, since it opened, an event that affects validation (any but a
    /// measurement, `Event::affects_validation`) at a higher seq, the request is refused
    /// with [`AppendError::ValidationStale`](super::AppendError::ValidationStale).
    /// `None` appends unconditionally.
    pub validation_unchanged_since: Option<u64>,
    /// Who makes the request: stored as `EventRecord.actor` of each of its events (the
    /// principal's name, `api::auth`); `None` (or empty) stores none.
    pub actor: Option<Arc<str>>,
}

/// What happened to one event of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Appended at this seq.
    Appended {
        /// The new event's seq.
        seq: u64,
    },
    /// Not appended: a measurement with the same event_id is at this seq.
    Duplicate {
        /// Seq of the original measurement.
        seq: u64,
    },
}

impl Outcome {
    /// The seq of the event or of its original.
    pub fn seq(self) -> u64 {
        match self {
            Self::Appended { seq } | Self::Duplicate { seq } => seq,
        }
    }
}

/// A newly appended event, as commit listeners see it.
#[derive(Debug, Clone, Copy)]
pub struct Committed<'a> {
    /// Its seq.
    pub seq: u64,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// The event.
    pub event: &'a Event,
}

/// Told about every group of events once it is durable, before any of its callers hears
/// back, in seq order.
///
/// Called on the log's publisher thread, so it must be quick and must not append (that
/// would wait for itself forever): fold the events into memory or hand them to another
/// task. While it runs, no append is acknowledged.
pub trait CommitListener: Send + Sync {
    /// The newly appended events of one group, in seq order (duplicates excluded).
    fn committed(&self, events: &[Committed<'_>]);
}

/// One stored event with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Its seq.
    pub seq: u64,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Chain hash before it (`hash_{seq-1}`).
    pub prev_hash: Hash,
    /// Its chain hash (`hash_seq`).
    pub hash: Hash,
    /// The stored `EventRecord` bytes, verbatim: what the hash covers.
    pub record: bytes::Bytes,
    /// The decoded event.
    pub event: Event,
}

/// Counters of the write side since open, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Flushes (fsyncs) that made appended events durable; one may cover several groups.
    pub flushes: u64,
    /// Segments written.
    pub segments: u64,
    /// Events appended.
    pub events: u64,
    /// Append requests answered (each a batch of events).
    pub requests: u64,
    /// Groups committed: the requests the writer took at once.
    pub groups: u64,
    /// How long each flush took to make its groups durable (the fsyncs and the
    /// acknowledgement record), counted per bucket of [`SYNC_BUCKETS_MICROS`].
    pub sync: DurationCounts,
}

/// Upper bounds of the buckets of [`StoreStats::sync`], in microseconds; the last is
/// unbounded.
pub const SYNC_BUCKETS_MICROS: [u64; 12] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    1_000_000,
    u64::MAX,
];

/// Durations counted in buckets (not cumulative) with their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurationCounts {
    /// How many fell in each bucket of [`SYNC_BUCKETS_MICROS`].
    pub buckets: [u64; 12],
    /// Their sum, in microseconds.
    pub sum_micros: u64,
}
