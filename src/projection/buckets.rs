//! [`BucketMap`]: the buckets of one series at one grain, ordered by key, stored in sorted
//! chunks of at most [`CHUNK`] entries in memory (and at most [`STORED_CHUNK`] once
//! stored as a page).
//!
//! The aggregates hold one such map per series and grain, so a store of ten million
//! measurements spread over two years is about 13 million buckets, most of them HOUR
//! buckets holding one measurement. A `BTreeMap` spends about 48 bytes per entry on them
//! (measured with heaptrack: 615 MB of leaf nodes for 12.7 M buckets, nodes half full after
//! time-ordered inserts) and one allocation per node to decode. Here an entry is its
//! 24 bytes in a sorted vector, chunks fill completely when buckets arrive in time order
//! (a full last chunk is followed by a new one instead of being split), and a late bucket
//! moves at most one chunk's entries.
//!
//! Chunks are shared (`Arc`) and copied on write: cloning a map (a snapshot clones the whole
//! read model under its lock) copies only the chunk pointers, and a chunk is copied when it
//! is next changed while a clone still holds it, so writers are never held up by a copy of
//! everything.
//!
//! A chunk that left memory (a page, `projection::pages`) is not read back for a late
//! measurement to one of its buckets: the measurement is kept beside the chunk's page, and
//! recorded onto the chunk's buckets whenever the chunk is read. Those are the same
//! `record` calls in the same (seq) order as if the chunk had stayed in memory, so every
//! answer is bit-identical to a fold that never stored a chunk. A chunk's late
//! measurements in memory are bounded by a quarter of the bytes the chunk held: past that
//! it is read back into memory. [`BucketMap::flush_late`] writes them out: into the
//! chunk's *late page* (all its late measurements written so far, in arrival order, read
//! after its page) while that stays under half the chunk's page, otherwise into the chunk
//! rewritten with all of them recorded. Late measurements reach thousands of chunks a
//! little each; rewriting the chunk (and encoding its states, sketches included) at every
//! write of them took a third of the fold's time at 50 M measurements.
//!
//! [`BucketMap::bytes`] counts what a map holds on the heap (vector capacities, the chunk
//! directory, states' heap, late measurements), and every change reports its effect on
//! that count exactly through [`PageIo::delta`], so the read model's memory budget is
//! kept against what is really allocated.
//!
//! Size: one type whose invariants (chunks sorted and within their bounds, the counted
//! bytes exact after every change, a stored chunk's late measurements replayed in order)
//! every method keeps, so it stays in one file (about 1,000 lines; its tests are in
//! `buckets/tests.rs`).

use std::io;
use std::mem::size_of;
use std::ops::{ControlFlow, Range};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::aggregate::{BucketState, Observation};
use crate::domain::calendar::BucketKey;
use crate::projection::pages::{PageRef, PageStore};

/// Most entries of one chunk: an insert into a chunk moves at most this many 24-byte
/// entries (6 KiB), and the chunk directory of two years of hours has about 70 entries.
pub const CHUNK: usize = 256;

/// Most entries of a stored chunk. Evictions store a few buckets of a map at a time, and
/// every stored chunk keeps a 64-byte entry in the chunk directory (its page and late page
/// references take 16 bytes each), in memory however old it is: at 50 M measurements 665,170 stored chunks of about 100 buckets held 48 MB of
/// directory (BENCHMARKS.md). Adjacent stored chunks are merged up to this many buckets
/// ([`BucketMap::merge_stored`]). A chunk read back into memory is split into resident
/// chunks of [`CHUNK`].
pub const STORED_CHUNK: usize = 4096;

/// The size class of a stored chunk of `len` buckets for [`BucketMap::merge_stored`]:
/// 0 for 1 to 3 buckets, 1 for 4 to 15, and so on by fourfold steps.
fn level(len: u32) -> u32 {
    len.max(1).ilog2() / 2
}

/// Most entries of the owned tail before they move into the chunks: a clone copies at most
/// this many per map, and a measurement of "now" finds its bucket one memory access away.
pub const TAIL: usize = 32;

/// One bucket: its key and state.
type Entry = (BucketKey, BucketState);

/// Bytes one entry takes in a chunk's or the tail's vector.
pub const ENTRY_BYTES: usize = size_of::<Entry>();

/// Bytes of the allocation that shares a resident chunk: the `Arc`'s two counts and the
/// vector's pointer, capacity and length.
const SHARED_BYTES: usize = 2 * size_of::<usize>() + size_of::<Vec<Entry>>();

/// A chunk of buckets: in memory, or stored as a page with the late measurements to it
/// that arrived since.
#[derive(Debug, Clone)]
enum Chunk {
    Resident(Arc<Vec<Entry>>),
    Stored(Stored, Option<Box<Late>>),
}

/// A chunk that left memory: its page and what it holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Stored {
    /// The smallest and the largest key of its buckets and of its late page's
    /// measurements.
    first: BucketKey,
    last: BucketKey,
    page: PageRef,
    /// Its late page: the late measurements to it written out since the page was, in
    /// arrival order.
    late: Option<PageRef>,
    /// Buckets in its page.
    len: u32,
    /// Bytes it held in memory ([`BucketMap::bytes`]), counted again when it is read back.
    bytes: u32,
}

/// Measurements to the buckets of a stored chunk that arrived after it was stored, in
/// arrival order.
#[derive(Debug, Clone)]
struct Late {
    /// The smallest and the largest of their keys.
    first: BucketKey,
    last: BucketKey,
    observations: Vec<LateObservation>,
}

/// One late measurement: its bucket and what the bucket records of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LateObservation {
    key: BucketKey,
    value: f64,
    occurred_at: DateTime<Utc>,
    seq: u64,
    subject: Option<Box<str>>,
}

impl LateObservation {
    fn new(key: BucketKey, observation: Observation<'_>) -> Self {
        Self {
            key,
            value: observation.value,
            occurred_at: observation.occurred_at,
            seq: observation.seq,
            subject: observation.subject.map(Box::from),
        }
    }

    fn observation(&self) -> Observation<'_> {
        Observation {
            value: self.value,
            occurred_at: self.occurred_at,
            seq: self.seq,
            subject: self.subject.as_deref(),
        }
    }
}

impl Late {
    fn of(observations: Vec<LateObservation>) -> Option<Self> {
        let first = observations.iter().map(|late| late.key).min()?;
        let last = observations.iter().map(|late| late.key).max()?;
        Some(Self {
            first,
            last,
            observations,
        })
    }

    /// Bytes it holds on the heap, its box included.
    fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.observations.capacity() * size_of::<LateObservation>()
            + self
                .observations
                .iter()
                .map(|late| late.subject.as_ref().map_or(0, |subject| subject.len()))
                .sum::<usize>()
    }

    /// Records the observations onto `entries` (a stored chunk's buckets), adding the
    /// buckets that are new.
    fn record_onto(&self, entries: &mut Vec<Entry>) -> io::Result<()> {
        record_late(&self.observations, entries)
    }
}

/// Records late measurements onto `entries` (a stored chunk's buckets) in their order,
/// adding the buckets that are new.
fn record_late(observations: &[LateObservation], entries: &mut Vec<Entry>) -> io::Result<()> {
    let empty = entries
        .first()
        .and_then(|(_, state)| BucketState::new(state.kind()))
        .ok_or_else(|| damaged("late measurements to a chunk without buckets"))?;
    for late in observations {
        let position = match entries.binary_search_by_key(&late.key, |(key, _)| *key) {
            Ok(position) => position,
            Err(position) => {
                entries.insert(position, (late.key, empty.clone()));
                position
            }
        };
        // As a measurement to a bucket in memory (`BucketMap::record`).
        let _ = entries[position].1.record(late.observation());
    }
    Ok(())
}

impl Chunk {
    fn first(&self) -> Option<BucketKey> {
        match self {
            Self::Resident(entries) => entries.first().map(|(key, _)| *key),
            Self::Stored(stored, late) => Some(
                late.as_ref()
                    .map_or(stored.first, |late| late.first.min(stored.first)),
            ),
        }
    }

    fn last(&self) -> Option<BucketKey> {
        match self {
            Self::Resident(entries) => entries.last().map(|(key, _)| *key),
            Self::Stored(stored, late) => Some(
                late.as_ref()
                    .map_or(stored.last, |late| late.last.max(stored.last)),
            ),
        }
    }

    /// Buckets it holds; for a stored chunk, those of its page (a late measurement may
    /// add one more when it is read).
    fn len(&self) -> usize {
        match self {
            Self::Resident(entries) => entries.len(),
            Self::Stored(stored, _) => stored.len as usize,
        }
    }

    /// Bytes it holds on the heap but for its states' own heap: a resident chunk's shared
    /// vector, a stored chunk's late measurements.
    fn fixed_bytes(&self) -> usize {
        match self {
            Self::Resident(entries) => SHARED_BYTES + entries.capacity() * ENTRY_BYTES,
            Self::Stored(_, late) => late.as_deref().map_or(0, Late::bytes),
        }
    }

    /// Bytes of its late measurements.
    fn late_bytes(&self) -> usize {
        match self {
            Self::Stored(_, Some(late)) => late.bytes(),
            Self::Stored(_, None) | Self::Resident(_) => 0,
        }
    }
}

/// Where stored chunks are read from and written to, and how the calls made with it
/// changed the maps' [`BucketMap::bytes`].
#[derive(Debug, Default)]
pub struct PageIo<'a> {
    /// The page store; `None` for a model that never stores chunks (an as-of fold).
    pub store: Option<&'a PageStore>,
    /// Bytes the maps hold now less those they held before.
    pub delta: isize,
}

impl<'a> PageIo<'a> {
    /// Page I/O through `store`.
    pub fn new(store: Option<&'a PageStore>) -> Self {
        Self { store, delta: 0 }
    }

    /// Runs `change` on `state`, counting the change of its heap.
    pub fn counted<T>(
        &mut self,
        state: &mut BucketState,
        change: impl FnOnce(&mut BucketState) -> T,
    ) -> T {
        let before = state.heap_bytes();
        let result = change(state);
        self.count(before, state.heap_bytes());
        result
    }

    /// Counts a change from `before` to `after` bytes.
    fn count(&mut self, before: usize, after: usize) {
        self.delta = self
            .delta
            .saturating_add_unsigned(after)
            .saturating_sub_unsigned(before);
    }
}

/// The buckets of one series at one grain, ordered by key.
///
/// The newest buckets lie in an owned tail, the older ones in chunks, which are shared in
/// memory or stored as pages. A measurement close to now (most of them) touches only the
/// tail, whose buffer the map points to directly; a late one goes to its chunk, or is kept
/// beside it when the chunk is stored.
///
/// Architecture invariant: every chunk is non-empty and sorted, holds at most [`CHUNK`]
/// entries in memory and at most [`STORED_CHUNK`] stored, and every key of a chunk (its late measurements' included) is below every key
/// of the next one; `sealed_last` is the last chunk's last key; the tail is sorted, holds
/// at most [`TAIL`] entries, and every tail key is above `sealed_last`.
#[derive(Debug, Clone, Default)]
pub struct BucketMap {
    chunks: Vec<Chunk>,
    /// The largest key in `chunks`, kept here so that finding a tail bucket reads no chunk.
    sealed_last: Option<BucketKey>,
    tail: Vec<Entry>,
}

/// Where a key is or would be inserted (`Err`: not present, the insert position).
#[derive(Debug, Clone, Copy)]
enum Place {
    Tail(Result<usize, usize>),
    Chunk(usize, Result<usize, usize>),
    /// In the range of a stored chunk, which must be read to know more.
    Stored(usize),
}

fn damaged(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// The buckets of a stored chunk: its page's, with its late measurements recorded.
fn read_stored(
    store: Option<&PageStore>,
    stored: &Stored,
    late: Option<&Late>,
) -> io::Result<Vec<Entry>> {
    let store = store.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "a stored chunk without a page store",
        )
    })?;
    let bytes = store.read(stored.page)?;
    let mut entries: Vec<Entry> = crate::encoding::decode(&bytes)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    let sorted = entries.windows(2).all(|pair| pair[0].0 < pair[1].0);
    let inside = |key: BucketKey| stored.first <= key && key <= stored.last;
    if entries.len() != stored.len as usize
        || !sorted
        || !entries.first().is_some_and(|(key, _)| inside(*key))
        || !entries.last().is_some_and(|(key, _)| inside(*key))
    {
        return Err(damaged(
            "a stored chunk holds other buckets than its reference says",
        ));
    }
    if let Some(page) = stored.late {
        let written = read_late_page(store, page)?;
        if written.is_empty() || !written.iter().all(|late| inside(late.key)) {
            return Err(damaged(
                "a late page holds other buckets than its chunk's reference says",
            ));
        }
        record_late(&written, &mut entries)?;
    }
    if let Some(late) = late {
        late.record_onto(&mut entries)?;
    }
    Ok(entries)
}

/// The late measurements in late page `page`.
fn read_late_page(store: &PageStore, page: PageRef) -> io::Result<Vec<LateObservation>> {
    crate::encoding::decode(&store.read(page)?)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

/// Bytes `entries` hold: the vector's capacity and the states' heap.
fn entries_bytes(entries: &Vec<Entry>) -> usize {
    entries.capacity() * ENTRY_BYTES + heap_bytes(entries)
}

/// Bytes the states of `entries` hold on the heap.
fn heap_bytes(entries: &[Entry]) -> usize {
    entries
        .iter()
        .map(|(_, state)| state.heap_bytes())
        .sum::<usize>()
}

/// `entries` in resident chunks of at most [`CHUNK`] entries, as even as may be.
fn into_chunks(entries: Vec<Entry>) -> Vec<Chunk> {
    into_pieces(entries, CHUNK)
        .into_iter()
        .map(|piece| Chunk::Resident(Arc::new(piece)))
        .collect()
}

/// `entries` in pieces of at most `most` entries, as even as may be.
fn into_pieces(entries: Vec<Entry>, most: usize) -> Vec<Vec<Entry>> {
    if entries.len() <= most {
        return vec![entries];
    }
    let pieces = entries.len().div_ceil(most);
    let size = entries.len().div_ceil(pieces);
    let mut entries = entries.into_iter();
    (0..pieces)
        .map(|_| entries.by_ref().take(size).collect())
        .collect()
}

/// Writes resident `entries` as a page; the stored chunk that refers to it.
fn store_entries(entries: &Vec<Entry>, store: &PageStore) -> io::Result<Stored> {
    let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
        return Err(damaged("an empty chunk"));
    };
    let bytes = crate::encoding::encode(entries)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    Ok(Stored {
        first: *first,
        last: *last,
        len: u32::try_from(entries.len()).unwrap_or(u32::MAX),
        bytes: u32::try_from(SHARED_BYTES + entries_bytes(entries)).unwrap_or(u32::MAX),
        page: store.write(&bytes)?,
        late: None,
    })
}

impl BucketMap {
    /// Number of buckets, stored ones included (a bucket that only a late measurement to
    /// a stored chunk made is counted once the chunk is read back).
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Chunk::len).sum::<usize>() + self.tail.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }

    /// The chunk that holds `key` if any chunk does: the last one whose first key is at
    /// most `key` (the first chunk for keys below all).
    fn chunk_of(&self, key: BucketKey) -> usize {
        self.chunks
            .partition_point(|chunk| chunk.first().is_some_and(|first| first <= key))
            .saturating_sub(1)
    }

    /// Where `key` is or would be.
    fn locate(&self, key: BucketKey) -> Place {
        if self.sealed_last.is_none_or(|sealed| key > sealed) {
            // Most measurements arrive close to now: their bucket is the last one or a new
            // one after it, found without a search.
            let position = match self.tail.last() {
                Some((last, _)) if key > *last => Err(self.tail.len()),
                Some((last, _)) if key == *last => Ok(self.tail.len() - 1),
                _ => self.tail.binary_search_by_key(&key, |(k, _)| *k),
            };
            return Place::Tail(position);
        }
        let index = self.chunk_of(key);
        match &self.chunks[index] {
            Chunk::Resident(entries) => {
                Place::Chunk(index, entries.binary_search_by_key(&key, |(k, _)| *k))
            }
            Chunk::Stored(..) => Place::Stored(index),
        }
    }

    /// Where `key` is or would be, with its chunk in memory.
    fn locate_resident(&mut self, key: BucketKey, io: &mut PageIo<'_>) -> io::Result<Place> {
        let place = self.locate(key);
        self.paged_in(key, place, io)
    }

    /// `place` (where `key` is), with a stored chunk there read back into memory first.
    fn paged_in(&mut self, key: BucketKey, place: Place, io: &mut PageIo<'_>) -> io::Result<Place> {
        if let Place::Stored(index) = place {
            self.page_in(index, io)?;
            return Ok(self.locate(key));
        }
        Ok(place)
    }

    /// Bytes of the chunk directory and of the vectors of chunks `chunks` (and the tail's
    /// when `tail`), without the states' heap: what a change of those chunks changes.
    fn vector_bytes(&self, chunks: Range<usize>, tail: bool) -> usize {
        self.chunks.capacity() * size_of::<Chunk>()
            + self
                .chunks
                .get(chunks)
                .unwrap_or_default()
                .iter()
                .map(Chunk::fixed_bytes)
                .sum::<usize>()
            + if tail {
                self.tail.capacity() * ENTRY_BYTES
            } else {
                0
            }
    }

    /// Makes room in the chunk directory for `more` chunks, growing it by a quarter
    /// rather than doubling it: an entry takes 64 bytes and most maps hold a few chunks.
    fn reserve_chunks(&mut self, more: usize) {
        if self.chunks.len() + more > self.chunks.capacity() {
            self.chunks
                .reserve_exact(more.max(self.chunks.len() / 4 + 1));
        }
    }

    /// Reads stored chunk `index` back into memory, with its late measurements recorded
    /// (as more than one chunk if they made it pass [`CHUNK`] buckets).
    fn page_in(&mut self, index: usize, io: &mut PageIo<'_>) -> io::Result<()> {
        let Chunk::Stored(stored, late) = &self.chunks[index] else {
            return Ok(());
        };
        let entries = read_stored(io.store, stored, late.as_deref())?;
        let heap = heap_bytes(&entries);
        let before = self.vector_bytes(index..index + 1, false);
        let pieces = into_chunks(entries);
        let added = pieces.len();
        self.reserve_chunks(added - 1);
        self.chunks.splice(index..=index, pieces);
        io.count(
            before,
            self.vector_bytes(index..index + added, false) + heap,
        );
        Ok(())
    }

    /// The state of bucket `key`.
    pub fn get(
        &self,
        key: &BucketKey,
        store: Option<&PageStore>,
    ) -> io::Result<Option<BucketState>> {
        let mut found = None;
        self.visit_from(*key, store, |k, state| {
            if k == key {
                found = Some(state.clone());
            }
            ControlFlow::Break(())
        })?;
        Ok(found)
    }

    /// The state of bucket `key`, to change it (read back into memory first if stored).
    /// The caller counts a change of the state's heap in `io`.
    pub fn get_mut(
        &mut self,
        key: &BucketKey,
        io: &mut PageIo<'_>,
    ) -> io::Result<Option<&mut BucketState>> {
        Ok(match self.locate_resident(*key, io)? {
            Place::Tail(Ok(position)) => Some(&mut self.tail[position].1),
            Place::Chunk(index, Ok(position)) => {
                Some(&mut self.resident_mut(index, io)[position].1)
            }
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) | Place::Stored(_) => None,
        })
    }

    /// Chunk `index`, in memory, to change it: copied first if a clone shares it (the
    /// copy's capacity counted in `io`).
    fn resident_mut(&mut self, index: usize, io: &mut PageIo<'_>) -> &mut Vec<Entry> {
        let before = self.chunks[index].fixed_bytes();
        match &mut self.chunks[index] {
            Chunk::Resident(entries) => {
                let entries = Arc::make_mut(entries);
                io.count(before, SHARED_BYTES + entries.capacity() * ENTRY_BYTES);
                entries
            }
            Chunk::Stored(..) => unreachable!("the chunk was read back before it is changed"),
        }
    }

    /// Records `observation` in bucket `key`, made from `empty` when it is new. A
    /// measurement to a stored chunk is kept beside it while the chunk's late measurements
    /// stay within a quarter of the bytes it held; otherwise the chunk is read back first.
    /// A state that refuses the observation stays as it was (see [`BucketState::record`]).
    pub fn record(
        &mut self,
        key: BucketKey,
        observation: Observation<'_>,
        empty: &BucketState,
        io: &mut PageIo<'_>,
    ) -> io::Result<()> {
        let place = self.locate(key);
        if let Place::Stored(index) = place
            && self.keep_late(index, key, observation, io)
        {
            return Ok(());
        }
        let state = self.get_or_insert_at(key, place, io, || empty.clone())?;
        // Stored measurements were validated against this kind; a score outside its range
        // can only come from a definition changed since, which rebuilds.
        io.counted(state, |state| {
            let _ = state.record(observation);
        });
        Ok(())
    }

    /// Keeps `observation` beside stored chunk `index` if its late measurements have room
    /// for it; whether they had.
    fn keep_late(
        &mut self,
        index: usize,
        key: BucketKey,
        observation: Observation<'_>,
        io: &mut PageIo<'_>,
    ) -> bool {
        let Chunk::Stored(stored, late) = &mut self.chunks[index] else {
            return false;
        };
        let room =
            usize::try_from(stored.bytes / 4).unwrap_or(usize::MAX) / size_of::<LateObservation>();
        let held = late.as_ref().map_or(0, |late| late.observations.len());
        if held >= room {
            return false;
        }
        let before = late.as_deref().map_or(0, Late::bytes);
        let observation = LateObservation::new(key, observation);
        match late {
            Some(late) => {
                late.first = late.first.min(key);
                late.last = late.last.max(key);
                late.observations.push(observation);
            }
            None => {
                *late = Late::of(vec![observation]).map(Box::new);
            }
        }
        io.count(before, late.as_deref().map_or(0, Late::bytes));
        true
    }

    /// The state of bucket `key`, which is at `place`, inserted from `new` when the bucket
    /// is not held yet (the vectors that grow counted in `io`, the new state's heap not).
    fn get_or_insert_at(
        &mut self,
        key: BucketKey,
        place: Place,
        io: &mut PageIo<'_>,
        new: impl FnOnce() -> BucketState,
    ) -> io::Result<&mut BucketState> {
        let mut place = self.paged_in(key, place, io)?;
        if matches!(place, Place::Tail(Err(_))) && self.tail.len() == TAIL {
            let last = self.chunks.len().saturating_sub(1);
            let before = self.vector_bytes(last..self.chunks.len(), true);
            self.seal_tail();
            io.count(before, self.vector_bytes(last..self.chunks.len(), true));
            place = self.locate_resident(key, io)?;
        }
        let place = match place {
            Place::Tail(Err(position)) => {
                let before = self.tail.capacity();
                self.tail.insert(position, (key, new()));
                io.count(before * ENTRY_BYTES, self.tail.capacity() * ENTRY_BYTES);
                Place::Tail(Ok(position))
            }
            Place::Chunk(index, Err(position)) => {
                let (index, position) = self.insert_at(index, position, (key, new()), io);
                Place::Chunk(index, Ok(position))
            }
            found => found,
        };
        Ok(match place {
            Place::Tail(Ok(position)) => &mut self.tail[position].1,
            Place::Chunk(index, Ok(position)) => &mut self.resident_mut(index, io)[position].1,
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) | Place::Stored(_) => {
                unreachable!("the bucket was inserted above")
            }
        })
    }

    /// Moves the tail's entries to the end of the chunks: the last chunk is filled up when
    /// it is in memory and not shared, the rest starts a new one.
    fn seal_tail(&mut self) {
        let Some((last_key, _)) = self.tail.last() else {
            return;
        };
        self.sealed_last = Some(*last_key);
        let mut entries = std::mem::take(&mut self.tail).into_iter();
        // A last chunk a snapshot still shares is not copied to be filled up (a copy of
        // every map's last chunk while a snapshot is written): the entries start a chunk
        // of their own.
        if let Some(Chunk::Resident(last)) = self.chunks.last_mut()
            && last.len() < CHUNK
            && let Some(last) = Arc::get_mut(last)
        {
            let room = CHUNK - last.len();
            last.extend(entries.by_ref().take(room));
        }
        let rest: Vec<Entry> = entries.collect();
        if !rest.is_empty() {
            self.reserve_chunks(1);
            self.chunks.push(Chunk::Resident(Arc::new(rest)));
        }
        self.tail = Vec::with_capacity(TAIL);
    }

    /// Inserts `entry` at `position` of resident chunk `index`, splitting a full chunk;
    /// returns where the entry ended up. The vectors that grow are counted in `io`.
    fn insert_at(
        &mut self,
        index: usize,
        position: usize,
        entry: Entry,
        io: &mut PageIo<'_>,
    ) -> (usize, usize) {
        let before = self.vector_bytes(index..index + 1, false);
        let (at, chunks) = (index, self.chunks.len());
        let mut copy = PageIo::default();
        let (index, position) = if self.chunks[index].len() < CHUNK {
            self.resident_mut(index, &mut copy).insert(position, entry);
            (index, position)
        } else {
            let upper = self.resident_mut(index, &mut copy).split_off(CHUNK / 2);
            self.reserve_chunks(1);
            self.chunks
                .insert(index + 1, Chunk::Resident(Arc::new(upper)));
            let (index, position) = if position <= CHUNK / 2 {
                (index, position)
            } else {
                (index + 1, position - CHUNK / 2)
            };
            self.resident_mut(index, &mut copy).insert(position, entry);
            (index, position)
        };
        let changed = at..at + 1 + self.chunks.len() - chunks;
        io.count(before, self.vector_bytes(changed, false));
        (index, position)
    }

    /// Takes bucket `key` out.
    pub fn remove(
        &mut self,
        key: &BucketKey,
        io: &mut PageIo<'_>,
    ) -> io::Result<Option<BucketState>> {
        let removed = match self.locate_resident(*key, io)? {
            Place::Tail(Ok(position)) => Some(self.tail.remove(position).1),
            Place::Chunk(index, Ok(position)) => {
                let before = self.vector_bytes(index..index + 1, false);
                let (_, state) = self
                    .resident_mut(index, &mut PageIo::default())
                    .remove(position);
                let after = if self.chunks[index].len() == 0 {
                    self.chunks.remove(index);
                    self.vector_bytes(0..0, false)
                } else {
                    self.vector_bytes(index..index + 1, false)
                };
                io.count(before, after);
                self.sealed_last = self.chunks.last().and_then(Chunk::last);
                Some(state)
            }
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) | Place::Stored(_) => None,
        };
        if let Some(state) = &removed {
            io.count(state.heap_bytes(), 0);
        }
        Ok(removed)
    }

    /// Calls `visit` with the buckets from key `first` on, in key order, until it breaks.
    /// Stored chunks in the way are read (with their late measurements), not kept.
    pub fn visit_from(
        &self,
        first: BucketKey,
        store: Option<&PageStore>,
        mut visit: impl FnMut(&BucketKey, &BucketState) -> ControlFlow<()>,
    ) -> io::Result<()> {
        let start = self.chunk_of(first);
        for chunk in self.chunks.get(start..).unwrap_or_default() {
            if chunk.last().is_some_and(|last| last < first) {
                continue;
            }
            let read;
            let entries: &[Entry] = match chunk {
                Chunk::Resident(entries) => entries,
                Chunk::Stored(stored, late) => {
                    read = read_stored(store, stored, late.as_deref())?;
                    &read
                }
            };
            let skip = entries.partition_point(|(key, _)| *key < first);
            for (key, state) in &entries[skip..] {
                if visit(key, state).is_break() {
                    return Ok(());
                }
            }
        }
        let skip = self.tail.partition_point(|(key, _)| *key < first);
        for (key, state) in &self.tail[skip..] {
            if visit(key, state).is_break() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The buckets in memory, in key order.
    pub fn resident(&self) -> impl Iterator<Item = &Entry> {
        self.chunks
            .iter()
            .filter_map(|chunk| match chunk {
                Chunk::Resident(entries) => Some(entries.iter()),
                Chunk::Stored(..) => None,
            })
            .flatten()
            .chain(&self.tail)
    }

    /// The pages of the stored chunks and their late pages.
    pub fn pages(&self) -> impl Iterator<Item = PageRef> + '_ {
        self.chunks
            .iter()
            .flat_map(|chunk| match chunk {
                Chunk::Stored(stored, _) => [Some(stored.page), stored.late],
                Chunk::Resident(_) => [None, None],
            })
            .flatten()
    }

    /// Copies the pages of the stored chunks that lie in `files` to the file appended to
    /// (compaction: those files can then be deleted once no snapshot refers to them).
    pub fn move_pages(
        &mut self,
        files: &std::collections::HashSet<u32>,
        store: &PageStore,
    ) -> io::Result<()> {
        for chunk in &mut self.chunks {
            if let Chunk::Stored(stored, _) = chunk {
                for page in std::iter::once(&mut stored.page).chain(stored.late.as_mut()) {
                    if files.contains(&page.file()) {
                        *page = store.copy(*page)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes the map holds on the heap: its chunk directory, its vectors' capacity, what
    /// their states hold, and the late measurements kept beside stored chunks.
    pub fn bytes(&self) -> usize {
        self.vector_bytes(0..self.chunks.len(), true)
            + self
                .resident()
                .map(|(_, state)| state.heap_bytes())
                .sum::<usize>()
    }

    /// How many chunks are stored and how many resident, and the bytes of the chunk
    /// directory (for the eviction's log: what stays in memory however old it is).
    pub fn census(&self) -> (usize, usize, usize) {
        let stored = self
            .chunks
            .iter()
            .filter(|chunk| matches!(chunk, Chunk::Stored(..)))
            .count();
        (
            stored,
            self.chunks.len() - stored,
            self.chunks.capacity() * size_of::<Chunk>(),
        )
    }

    /// Calls `visit` with the key and bytes of every bucket in memory, as
    /// [`BucketMap::evict_below`] would free them.
    pub fn visit_resident(&self, mut visit: impl FnMut(BucketKey, usize)) {
        for (key, state) in self.resident() {
            visit(*key, ENTRY_BYTES + state.heap_bytes());
        }
    }

    /// Calls `visit` with the bytes of the late measurements of every stored chunk that
    /// has some, as [`BucketMap::flush_late`] would free them.
    pub fn visit_late(&self, mut visit: impl FnMut(usize)) {
        for chunk in &self.chunks {
            let bytes = chunk.late_bytes();
            if bytes > 0 {
                visit(bytes);
            }
        }
    }

    /// Stores the buckets in memory whose key is below `cutoff`: the chunks below it as
    /// they are, and the part of the tail below it as a chunk of its own. Returns the bytes
    /// of the buckets that left memory.
    pub fn evict_below(&mut self, cutoff: BucketKey, store: &PageStore) -> io::Result<usize> {
        let old_tail = self.tail.partition_point(|(key, _)| *key < cutoff);
        if old_tail > 0 {
            let rest = self.tail.split_off(old_tail);
            let sealed = std::mem::replace(&mut self.tail, rest);
            self.sealed_last = sealed.last().map(|(key, _)| *key);
            self.reserve_chunks(1);
            self.chunks.push(Chunk::Resident(Arc::new(sealed)));
        }
        let mut freed = 0;
        let mut index = 0;
        while index < self.chunks.len() {
            let Chunk::Resident(entries) = &self.chunks[index] else {
                index += 1;
                continue;
            };
            if entries.last().is_none_or(|(last, _)| *last >= cutoff) {
                break;
            }
            freed += SHARED_BYTES + entries_bytes(entries);
            self.chunks[index] = Chunk::Stored(store_entries(entries, store)?, None);
            index += 1;
        }
        freed += self.merge_stored(store)?;
        Ok(freed)
    }

    /// Merges adjacent stored chunks, with their late measurements recorded, while the
    /// older of two is of no higher [`level`] than the newer one and both fit one page
    /// of [`STORED_CHUNK`] buckets; then gives back a chunk directory less than half
    /// used. Returns the bytes freed (late measurements written, directory given back).
    ///
    /// So the levels of a run of stored chunks fall from the oldest to the newest, and a
    /// map keeps, besides its chunks too big to merge, at most one stored chunk per level
    /// (about six) however its evictions cut it: the fourfold size steps mean a bucket is
    /// rewritten a few times per level. (Merging only runs of four chunks of similar
    /// sizes left a chunk for every few cuts when cuts differ in size, as evictions' do:
    /// 22 stored chunks for a DAY map of two years at 50 M measurements.)
    fn merge_stored(&mut self, store: &PageStore) -> io::Result<usize> {
        let mut freed = 0;
        let mut index = 1;
        while index < self.chunks.len() {
            let (Chunk::Stored(older, _), Chunk::Stored(newer, _)) =
                (&self.chunks[index - 1], &self.chunks[index])
            else {
                index += 1;
                continue;
            };
            if level(older.len) > level(newer.len)
                || (older.len + newer.len) as usize > STORED_CHUNK
            {
                index += 1;
                continue;
            }
            let mut entries = Vec::with_capacity((older.len + newer.len) as usize);
            for chunk in &self.chunks[index - 1..=index] {
                if let Chunk::Stored(stored, late) = chunk {
                    entries.extend(read_stored(Some(store), stored, late.as_deref())?);
                }
            }
            if entries.len() > STORED_CHUNK {
                // Late measurements made new buckets: the two stay as they are.
                index += 1;
                continue;
            }
            freed += self.chunks[index - 1..=index]
                .iter()
                .map(Chunk::late_bytes)
                .sum::<usize>();
            self.chunks[index - 1] = Chunk::Stored(store_entries(&entries, store)?, None);
            self.chunks.remove(index);
            // The merged chunk may now merge with the one before it.
            index = index.saturating_sub(1).max(1);
        }
        if self.chunks.len() < self.chunks.capacity() / 2 {
            let before = self.chunks.capacity();
            self.chunks.shrink_to_fit();
            freed += (before - self.chunks.capacity()) * size_of::<Chunk>();
        }
        Ok(freed)
    }

    /// Writes out the late measurements of the stored chunks that hold at least `least`
    /// bytes of them: into the chunk's late page while that stays under half the chunk's
    /// page, otherwise into the chunk rewritten with every late measurement recorded.
    /// Returns the bytes of late measurements that left memory.
    pub fn flush_late(&mut self, least: usize, store: &PageStore) -> io::Result<usize> {
        let mut freed = 0;
        let mut index = 0;
        while index < self.chunks.len() {
            let chunk = &mut self.chunks[index];
            let bytes = chunk.late_bytes();
            let Chunk::Stored(stored, late) = chunk else {
                index += 1;
                continue;
            };
            if bytes == 0 || bytes < least {
                index += 1;
                continue;
            }
            let written = stored.late.map_or(0, PageRef::stored_bytes);
            if let Some(pending) = late.as_deref()
                && written < stored.page.stored_bytes() / 2
            {
                let mut observations = match stored.late {
                    Some(page) => read_late_page(store, page)?,
                    None => Vec::new(),
                };
                observations.extend_from_slice(&pending.observations);
                let encoded = crate::encoding::encode(&observations)
                    .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
                stored.late = Some(store.write(&encoded)?);
                stored.first = stored.first.min(pending.first);
                stored.last = stored.last.max(pending.last);
                *late = None;
                freed += bytes;
                index += 1;
                continue;
            }
            let entries = read_stored(Some(store), stored, late.as_deref())?;
            // Stored again whole (split only when new buckets made it pass
            // STORED_CHUNK): split, it would be merged again at the next eviction.
            let pieces: Vec<Chunk> = into_pieces(entries, STORED_CHUNK)
                .iter()
                .map(|piece| store_entries(piece, store).map(|stored| Chunk::Stored(stored, None)))
                .collect::<io::Result<_>>()?;
            let added = pieces.len();
            self.reserve_chunks(added - 1);
            self.chunks.splice(index..=index, pieces);
            freed += bytes;
            index += added;
        }
        Ok(freed)
    }
}

/// How a map is stored in a snapshot: its chunks in order, each its entries or its page
/// (with its late measurements), then the tail.
#[derive(Serialize)]
enum PartOut<'a> {
    Entries(&'a [Entry]),
    Stored(Stored),
    Tail(&'a [Entry]),
    StoredLate(Stored, &'a [LateObservation]),
}

/// [`PartOut`] as read back.
#[derive(Deserialize)]
enum PartIn {
    Entries(Vec<Entry>),
    Stored(Stored),
    Tail(Vec<Entry>),
    StoredLate(Stored, Vec<LateObservation>),
}

impl Serialize for BucketMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let parts: Vec<PartOut<'_>> = self
            .chunks
            .iter()
            .map(|chunk| match chunk {
                Chunk::Resident(entries) => PartOut::Entries(entries),
                Chunk::Stored(stored, None) => PartOut::Stored(*stored),
                Chunk::Stored(stored, Some(late)) => {
                    PartOut::StoredLate(*stored, &late.observations)
                }
            })
            .chain(std::iter::once(PartOut::Tail(&self.tail)))
            .collect();
        parts.serialize(serializer)
    }
}

/// Reads what [`BucketMap`]'s `Serialize` wrote, refusing what breaks the map's invariant
/// (a damaged snapshot).
impl<'de> Deserialize<'de> for BucketMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let parts = Vec::<PartIn>::deserialize(deserializer)?;
        let mut map = BucketMap::default();
        let mut previous: Option<BucketKey> = None;
        let mut in_order = |first: BucketKey, last: BucketKey| {
            let ordered = previous.is_none_or(|p| p < first) && first <= last;
            previous = Some(last);
            ordered
        };
        let sorted = |entries: &[Entry]| entries.windows(2).all(|pair| pair[0].0 < pair[1].0);
        let out_of_order = || D::Error::custom("bucket keys are not above the ones before");
        let mut tail_seen = false;
        for part in parts {
            if tail_seen {
                return Err(D::Error::custom("bucket chunks after the tail"));
            }
            match part {
                PartIn::Entries(entries) => {
                    let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last())
                    else {
                        return Err(D::Error::custom("an empty bucket chunk"));
                    };
                    if entries.len() > CHUNK || !sorted(&entries) || !in_order(*first, *last) {
                        return Err(out_of_order());
                    }
                    map.chunks.push(Chunk::Resident(Arc::new(entries)));
                }
                PartIn::Stored(stored) | PartIn::StoredLate(stored, _)
                    if stored.len == 0 || stored.len as usize > STORED_CHUNK =>
                {
                    return Err(out_of_order());
                }
                PartIn::Stored(stored) => {
                    if !in_order(stored.first, stored.last) {
                        return Err(out_of_order());
                    }
                    map.chunks.push(Chunk::Stored(stored, None));
                }
                PartIn::StoredLate(stored, observations) => {
                    let late = Late::of(observations)
                        .ok_or_else(|| D::Error::custom("an empty list of late measurements"))?;
                    let chunk = Chunk::Stored(stored, Some(Box::new(late)));
                    match (chunk.first(), chunk.last()) {
                        (Some(first), Some(last)) if in_order(first, last) => {}
                        _ => return Err(out_of_order()),
                    }
                    map.chunks.push(chunk);
                }
                PartIn::Tail(entries) => {
                    tail_seen = true;
                    if entries.len() > TAIL || !sorted(&entries) {
                        return Err(out_of_order());
                    }
                    if let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last())
                        && !in_order(*first, *last)
                    {
                        return Err(out_of_order());
                    }
                    map.tail = entries;
                }
            }
        }
        map.chunks.shrink_to_fit();
        map.sealed_last = map.chunks.last().and_then(Chunk::last);
        Ok(map)
    }
}

#[cfg(test)]
mod tests;
