//! [`BucketMap`]: the buckets of one series at one grain, ordered by key, stored in sorted
//! chunks of at most [`CHUNK`] entries.
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

use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::aggregate::BucketState;
use crate::domain::calendar::BucketKey;
use crate::projection::pages::{PageRef, PageStore};

/// Most entries of one chunk: an insert into a chunk moves at most this many 24-byte
/// entries (6 KiB), and the chunk directory of two years of hours has about 10 entries.
pub const CHUNK: usize = 256;

/// Most entries of the owned tail before they move into the chunks: a clone copies at most
/// this many per map, and a measurement of "now" finds its bucket one memory access away.
pub const TAIL: usize = 32;

/// One bucket: its key and state.
type Entry = (BucketKey, BucketState);

/// Bytes one entry takes in a chunk's or the tail's vector.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// A chunk of buckets: in memory, or stored as a page.
#[derive(Debug, Clone)]
enum Chunk {
    Resident(Arc<Vec<Entry>>),
    Stored(Stored),
}

/// A chunk that left memory: its page and what it holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Stored {
    first: BucketKey,
    last: BucketKey,
    len: u32,
    /// Bytes it held in memory ([`BucketMap::bytes`]), counted again when it is read back.
    bytes: u64,
    page: PageRef,
}

impl Chunk {
    fn first(&self) -> Option<BucketKey> {
        match self {
            Self::Resident(entries) => entries.first().map(|(key, _)| *key),
            Self::Stored(stored) => Some(stored.first),
        }
    }

    fn last(&self) -> Option<BucketKey> {
        match self {
            Self::Resident(entries) => entries.last().map(|(key, _)| *key),
            Self::Stored(stored) => Some(stored.last),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Resident(entries) => entries.len(),
            Self::Stored(stored) => stored.len as usize,
        }
    }
}

/// Where stored chunks are read from and written to, and what reading them back added to
/// memory.
#[derive(Debug, Default)]
pub struct PageIo<'a> {
    /// The page store; `None` for a model that never stores chunks (an as-of fold).
    pub store: Option<&'a PageStore>,
    /// Bytes of the chunks read back into memory.
    pub paged_in: usize,
}

impl<'a> PageIo<'a> {
    /// Page I/O through `store`.
    pub fn new(store: Option<&'a PageStore>) -> Self {
        Self { store, paged_in: 0 }
    }
}

/// The buckets of one series at one grain, ordered by key.
///
/// The newest buckets lie in an owned tail, the older ones in chunks, which are shared in
/// memory or stored as pages. A measurement close to now (most of them) touches only the
/// tail, whose buffer the map points to directly; a late one goes to its chunk, which is
/// read back into memory first when it was stored.
///
/// Architecture invariant: every chunk is non-empty and sorted, holds at most [`CHUNK`]
/// entries, and every key of a chunk is below every key of the next one; `sealed_last` is
/// the last chunk's last key; the tail is sorted, holds at most [`TAIL`] entries, and
/// every tail key is above `sealed_last`.
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

/// The entries of a stored page.
fn decode_page(store: Option<&PageStore>, stored: &Stored) -> io::Result<Vec<Entry>> {
    let store = store.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "a stored chunk without a page store",
        )
    })?;
    let bytes = store.read(stored.page)?;
    let (entries, _): (Vec<Entry>, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
    let sorted = entries.windows(2).all(|pair| pair[0].0 < pair[1].0);
    if entries.len() != stored.len as usize
        || !sorted
        || entries.first().map(|(key, _)| *key) != Some(stored.first)
        || entries.last().map(|(key, _)| *key) != Some(stored.last)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a stored chunk holds other buckets than its reference says",
        ));
    }
    Ok(entries)
}

/// Bytes `entries` hold: the vector's capacity and the states' heap.
fn entries_bytes(entries: &Vec<Entry>) -> usize {
    entries.capacity() * ENTRY_BYTES
        + entries
            .iter()
            .map(|(_, state)| state.heap_bytes())
            .sum::<usize>()
}

impl BucketMap {
    /// Number of buckets, stored ones included.
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
            Chunk::Stored(_) => Place::Stored(index),
        }
    }

    /// Where `key` is or would be, with its chunk in memory.
    fn locate_resident(&mut self, key: BucketKey, io: &mut PageIo<'_>) -> io::Result<Place> {
        let place = self.locate(key);
        if let Place::Stored(index) = place {
            self.page_in(index, io)?;
            return Ok(self.locate(key));
        }
        Ok(place)
    }

    /// Reads stored chunk `index` back into memory.
    fn page_in(&mut self, index: usize, io: &mut PageIo<'_>) -> io::Result<()> {
        if let Chunk::Stored(stored) = &self.chunks[index] {
            let entries = decode_page(io.store, stored)?;
            io.paged_in += entries_bytes(&entries);
            self.chunks[index] = Chunk::Resident(Arc::new(entries));
        }
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
    pub fn get_mut(
        &mut self,
        key: &BucketKey,
        io: &mut PageIo<'_>,
    ) -> io::Result<Option<&mut BucketState>> {
        Ok(match self.locate_resident(*key, io)? {
            Place::Tail(Ok(position)) => Some(&mut self.tail[position].1),
            Place::Chunk(index, Ok(position)) => Some(&mut self.resident_mut(index)[position].1),
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) | Place::Stored(_) => None,
        })
    }

    /// Chunk `index`, in memory, to change it.
    fn resident_mut(&mut self, index: usize) -> &mut Vec<Entry> {
        match &mut self.chunks[index] {
            Chunk::Resident(entries) => Arc::make_mut(entries),
            Chunk::Stored(_) => unreachable!("the chunk was read back before it is changed"),
        }
    }

    /// The state of bucket `key`, inserted from `new` when the bucket is not held yet.
    pub fn get_or_insert_with(
        &mut self,
        key: BucketKey,
        io: &mut PageIo<'_>,
        new: impl FnOnce() -> BucketState,
    ) -> io::Result<&mut BucketState> {
        let mut place = self.locate_resident(key, io)?;
        if matches!(place, Place::Tail(Err(_))) && self.tail.len() == TAIL {
            self.seal_tail();
            place = self.locate_resident(key, io)?;
        }
        let place = match place {
            Place::Tail(Err(position)) => {
                self.tail.insert(position, (key, new()));
                Place::Tail(Ok(position))
            }
            Place::Chunk(index, Err(position)) => {
                let (index, position) = self.insert_at(index, position, (key, new()));
                Place::Chunk(index, Ok(position))
            }
            found => found,
        };
        Ok(match place {
            Place::Tail(Ok(position)) => &mut self.tail[position].1,
            Place::Chunk(index, Ok(position)) => &mut self.resident_mut(index)[position].1,
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) | Place::Stored(_) => {
                unreachable!("the bucket was inserted above")
            }
        })
    }

    /// Moves the tail's entries to the end of the chunks: the last chunk is filled up when
    /// it is in memory, the rest starts a new one.
    fn seal_tail(&mut self) {
        let Some((last_key, _)) = self.tail.last() else {
            return;
        };
        self.sealed_last = Some(*last_key);
        let mut entries = std::mem::take(&mut self.tail).into_iter();
        if let Some(Chunk::Resident(last)) = self.chunks.last_mut()
            && last.len() < CHUNK
        {
            let room = CHUNK - last.len();
            Arc::make_mut(last).extend(entries.by_ref().take(room));
        }
        let rest: Vec<Entry> = entries.collect();
        if !rest.is_empty() {
            self.chunks.push(Chunk::Resident(Arc::new(rest)));
        }
        self.tail = Vec::with_capacity(TAIL);
    }

    /// Inserts `entry` at `position` of resident chunk `index`, splitting a full chunk;
    /// returns where the entry ended up.
    fn insert_at(&mut self, index: usize, position: usize, entry: Entry) -> (usize, usize) {
        if self.chunks[index].len() < CHUNK {
            self.resident_mut(index).insert(position, entry);
            return (index, position);
        }
        let upper = self.resident_mut(index).split_off(CHUNK / 2);
        self.chunks
            .insert(index + 1, Chunk::Resident(Arc::new(upper)));
        let (index, position) = if position <= CHUNK / 2 {
            (index, position)
        } else {
            (index + 1, position - CHUNK / 2)
        };
        self.resident_mut(index).insert(position, entry);
        (index, position)
    }

    /// Takes bucket `key` out.
    pub fn remove(
        &mut self,
        key: &BucketKey,
        io: &mut PageIo<'_>,
    ) -> io::Result<Option<BucketState>> {
        Ok(match self.locate_resident(*key, io)? {
            Place::Tail(Ok(position)) => Some(self.tail.remove(position).1),
            Place::Chunk(index, Ok(position)) => {
                let (_, state) = self.resident_mut(index).remove(position);
                if self.chunks[index].len() == 0 {
                    self.chunks.remove(index);
                }
                self.sealed_last = self.chunks.last().and_then(Chunk::last);
                Some(state)
            }
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) | Place::Stored(_) => None,
        })
    }

    /// Calls `visit` with the buckets from key `first` on, in key order, until it breaks.
    /// Stored chunks in the way are read, not kept.
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
                Chunk::Stored(stored) => {
                    read = decode_page(store, stored)?;
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
                Chunk::Stored(_) => None,
            })
            .flatten()
            .chain(&self.tail)
    }

    /// The pages of the stored chunks.
    pub fn pages(&self) -> impl Iterator<Item = PageRef> + '_ {
        self.chunks.iter().filter_map(|chunk| match chunk {
            Chunk::Stored(stored) => Some(stored.page),
            Chunk::Resident(_) => None,
        })
    }

    /// Bytes the map holds in memory: its entries (the chunks' and the tail's capacity)
    /// and what their states hold on the heap.
    pub fn bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|chunk| match chunk {
                Chunk::Resident(entries) => entries_bytes(entries),
                Chunk::Stored(_) => 0,
            })
            .sum::<usize>()
            + entries_bytes(&self.tail)
    }

    /// Calls `visit` with the key and bytes of every bucket in memory, as
    /// [`BucketMap::evict_below`] would free them.
    pub fn visit_resident(&self, mut visit: impl FnMut(BucketKey, usize)) {
        for (key, state) in self.resident() {
            visit(*key, ENTRY_BYTES + state.heap_bytes());
        }
    }

    /// Stores the buckets in memory whose key is below `cutoff`: the chunks below it as
    /// they are, and the part of the tail below it as a chunk of its own. Returns the bytes
    /// that left memory.
    pub fn evict_below(&mut self, cutoff: BucketKey, store: &PageStore) -> io::Result<usize> {
        let old_tail = self.tail.partition_point(|(key, _)| *key < cutoff);
        if old_tail > 0 {
            let rest = self.tail.split_off(old_tail);
            let sealed = std::mem::replace(&mut self.tail, rest);
            self.sealed_last = sealed.last().map(|(key, _)| *key);
            self.chunks.push(Chunk::Resident(Arc::new(sealed)));
        }
        let mut freed = 0;
        for chunk in &mut self.chunks {
            let Chunk::Resident(entries) = chunk else {
                continue;
            };
            let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
                continue;
            };
            if *last >= cutoff {
                break;
            }
            let bytes = bincode::serde::encode_to_vec(&**entries, bincode::config::standard())
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
            let held = entries_bytes(entries);
            let stored = Stored {
                first: *first,
                last: *last,
                len: u32::try_from(entries.len()).unwrap_or(u32::MAX),
                bytes: u64::try_from(held).unwrap_or(u64::MAX),
                page: store.write(&bytes)?,
            };
            freed += held;
            *chunk = Chunk::Stored(stored);
        }
        Ok(freed)
    }
}

/// How a map is stored in a snapshot: its chunks in order, each its entries or its page,
/// then the tail.
#[derive(Serialize)]
enum PartOut<'a> {
    Entries(&'a [Entry]),
    Stored(Stored),
    Tail(&'a [Entry]),
}

/// [`PartOut`] as read back.
#[derive(Deserialize)]
enum PartIn {
    Entries(Vec<Entry>),
    Stored(Stored),
    Tail(Vec<Entry>),
}

impl Serialize for BucketMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let parts: Vec<PartOut<'_>> = self
            .chunks
            .iter()
            .map(|chunk| match chunk {
                Chunk::Resident(entries) => PartOut::Entries(entries),
                Chunk::Stored(stored) => PartOut::Stored(*stored),
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
                        return Err(D::Error::custom(
                            "bucket keys are not above the ones before",
                        ));
                    }
                    map.chunks.push(Chunk::Resident(Arc::new(entries)));
                }
                PartIn::Stored(stored) => {
                    if stored.len == 0
                        || stored.len as usize > CHUNK
                        || !in_order(stored.first, stored.last)
                    {
                        return Err(D::Error::custom(
                            "bucket keys are not above the ones before",
                        ));
                    }
                    map.chunks.push(Chunk::Stored(stored));
                }
                PartIn::Tail(entries) => {
                    tail_seen = true;
                    if entries.len() > TAIL || !sorted(&entries) {
                        return Err(D::Error::custom(
                            "bucket keys are not above the ones before",
                        ));
                    }
                    if let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last())
                        && !in_order(*first, *last)
                    {
                        return Err(D::Error::custom(
                            "bucket keys are not above the ones before",
                        ));
                    }
                    map.tail = entries;
                }
            }
        }
        map.sealed_last = map.chunks.last().and_then(Chunk::last);
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::KpiKind;
    use crate::domain::aggregate::Observation;

    /// A COUNT state holding `n` measurements: states compare by their count.
    fn state(n: u64) -> BucketState {
        let mut state = BucketState::new(KpiKind::Count).expect("COUNT has buckets");
        for _ in 0..n {
            state
                .record(Observation {
                    value: 1.0,
                    occurred_at: chrono::DateTime::UNIX_EPOCH,
                    seq: 1,
                    subject: None,
                })
                .expect("COUNT takes any value");
        }
        state
    }

    fn key(k: i64) -> BucketKey {
        BucketKey::from_unix_seconds(k)
    }

    /// The entries of every chunk, stored ones read back.
    fn chunk_entries(map: &BucketMap, store: Option<&PageStore>) -> Vec<Vec<Entry>> {
        map.chunks
            .iter()
            .map(|chunk| match chunk {
                Chunk::Resident(entries) => entries.to_vec(),
                Chunk::Stored(stored) => decode_page(store, stored).expect("page reads"),
            })
            .collect()
    }

    fn insert(map: &mut BucketMap, k: i64, n: u64) {
        *map.get_or_insert_with(key(k), &mut PageIo::default(), || state(0))
            .expect("no pages") = state(n);
    }

    fn count(map: &BucketMap, k: i64, store: Option<&PageStore>) -> Option<u64> {
        map.get(&key(k), store)
            .expect("page reads")
            .map(|s| s.count())
    }

    fn from(map: &BucketMap, k: i64, store: Option<&PageStore>) -> Vec<(i64, u64)> {
        let mut got = Vec::new();
        map.visit_from(key(k), store, |k, s| {
            got.push((k.unix_seconds(), s.count()));
            ControlFlow::Continue(())
        })
        .expect("page reads");
        got
    }

    /// The map's invariant: non-empty sorted chunks of at most CHUNK, ordered, len right.
    fn check_invariant(map: &BucketMap, store: Option<&PageStore>) {
        let mut previous = None;
        let mut len = 0;
        for chunk in chunk_entries(map, store) {
            assert!(!chunk.is_empty() && chunk.len() <= CHUNK);
            for (k, _) in chunk.iter() {
                assert!(previous < Some(*k), "keys in order");
                previous = Some(*k);
            }
            len += chunk.len();
        }
        assert_eq!(
            previous, map.sealed_last,
            "sealed_last is the last chunk key"
        );
        assert!(map.tail.len() <= TAIL);
        for (k, _) in &map.tail {
            assert!(previous < Some(*k), "tail keys in order, above the chunks");
            previous = Some(*k);
        }
        len += map.tail.len();
        assert_eq!(len, map.len());
    }

    fn contents(map: &BucketMap) -> Vec<(i64, u64)> {
        map.resident()
            .map(|(k, s)| (k.unix_seconds(), s.count()))
            .collect()
    }

    #[test]
    fn buckets_arriving_in_order_fill_chunks_completely() {
        let mut map = BucketMap::default();
        for k in 0..10 * CHUNK as i64 {
            insert(&mut map, k, 1);
        }
        check_invariant(&map, None);
        // The last TAIL buckets are in the tail; the chunks before the last one are full.
        assert_eq!(map.tail.len(), TAIL);
        assert_eq!(map.chunks.len(), 10);
        let (last, full) = map.chunks.split_last().expect("chunks");
        assert!(full.iter().all(|chunk| chunk.len() == CHUNK));
        let last = last.len();
        assert_eq!(last, CHUNK - TAIL);
    }

    #[test]
    fn a_late_bucket_splits_only_its_chunk() {
        let mut map = BucketMap::default();
        for k in 0..2 * CHUNK as i64 {
            insert(&mut map, 2 * k, 1);
        }
        insert(&mut map, 1, 2);
        check_invariant(&map, None);
        assert_eq!(map.chunks.len(), 3);
        assert_eq!(count(&map, 1, None), Some(2));
        assert_eq!(from(&map, 1, None).first(), Some(&(1, 2)));
    }

    #[test]
    fn a_damaged_order_is_refused_when_decoding() {
        // A BucketMap is stored as its chunks and tail in order; these keys are not.
        let swapped: Vec<Entry> = vec![(key(7), state(1)), (key(5), state(1))];
        let parts = vec![PartOut::Entries(&swapped), PartOut::Tail(&[])];
        let bytes =
            bincode::serde::encode_to_vec(&parts, bincode::config::standard()).expect("encodes");
        let decoded: Result<(BucketMap, usize), _> =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard());
        let error = decoded.expect_err("keys out of order").to_string();
        assert!(error.contains("not above"), "{error}");
    }

    #[test]
    fn a_clone_keeps_its_buckets_while_the_original_changes() {
        let mut map = BucketMap::default();
        for k in 0..3 * CHUNK as i64 {
            insert(&mut map, k, 1);
        }
        let before = contents(&map);
        let clone = map.clone();
        let mut io = PageIo::default();
        *map.get_mut(&key(5), &mut io)
            .expect("no pages")
            .expect("held") = state(7);
        insert(&mut map, -1, 2);
        map.remove(&key(CHUNK as i64 + 3), &mut io)
            .expect("no pages");
        assert_eq!(contents(&clone), before);
        // Only the chunks that changed were copied.
        let (Chunk::Resident(ours), Chunk::Resident(theirs)) =
            (&map.chunks[map.chunks.len() - 1], &clone.chunks[2])
        else {
            panic!("resident chunks");
        };
        assert!(Arc::ptr_eq(ours, theirs));
        assert_eq!(count(&map, 5, None), Some(7));
    }

    /// One operation of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(i64, u64),
        Remove(i64),
        Range(i64),
        RoundTrip,
        /// Store the buckets below this key.
        Evict(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Keys from a small range so inserts hit existing buckets and removes find them.
        let k = 0i64..3000;
        prop_oneof![
            6 => (k.clone(), 1u64..4).prop_map(|(k, n)| Op::Insert(k, n)),
            2 => k.clone().prop_map(Op::Remove),
            1 => k.clone().prop_map(Op::Range),
            1 => Just(Op::RoundTrip),
            1 => k.prop_map(Op::Evict),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a BTreeMap: every operation gives the same answers, with chunks stored
        /// and read back, and the invariant holds after each.
        #[test]
        fn behaves_like_an_ordered_map(
            ops in prop::collection::vec(op(), 1..600),
            ascending in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().expect("temporary directory");
            let store = PageStore::open(dir.path(), 0).expect("page store");
            let pages = Some(&store);
            let mut map = BucketMap::default();
            let mut model: BTreeMap<i64, u64> = BTreeMap::new();
            if ascending {
                // A run of in-order buckets first, as a time-ordered ingest makes.
                for k in (0..3000).step_by(3) {
                    insert(&mut map, k, 1);
                    model.insert(k, 1);
                }
            }
            for op in ops {
                let mut io = PageIo::new(pages);
                match op {
                    Op::Insert(k, n) => {
                        let entry = map
                            .get_or_insert_with(key(k), &mut io, || state(0))
                            .expect("page reads");
                        *entry = state(entry.count() + n);
                        *model.entry(k).or_default() += n;
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(
                            map.remove(&key(k), &mut io).expect("page reads").map(|s| s.count()),
                            model.remove(&k)
                        );
                    }
                    Op::Range(k) => {
                        let want: Vec<(i64, u64)> =
                            model.range(k..).map(|(k, n)| (*k, *n)).collect();
                        prop_assert_eq!(from(&map, k, pages), want);
                    }
                    Op::RoundTrip => {
                        let bytes = bincode::serde::encode_to_vec(&map, bincode::config::standard())
                            .expect("encodes");
                        let (decoded, _): (BucketMap, usize) =
                            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                                .expect("decodes");
                        prop_assert_eq!(from(&decoded, i64::MIN, pages), from(&map, i64::MIN, pages));
                        map = decoded;
                    }
                    Op::Evict(k) => {
                        let before = map.bytes();
                        let freed = map.evict_below(key(k), &store).expect("pages write");
                        prop_assert!(map.bytes() <= before, "eviction frees memory");
                        prop_assert!(freed > 0 || before == map.bytes());
                        prop_assert!(map.tail.iter().all(|(key, _)| key.unix_seconds() >= k));
                        let below = map.resident().filter(|(key, _)| key.unix_seconds() < k);
                        // Only a chunk that also holds newer buckets stays in memory.
                        for (old, _) in below {
                            prop_assert!(map.chunks.iter().any(|chunk| matches!(chunk,
                                Chunk::Resident(e) if e.iter().any(|(x, _)| x == old)
                                    && e.last().is_some_and(|(last, _)| last.unix_seconds() >= k))));
                        }
                    }
                }
                check_invariant(&map, pages);
                prop_assert_eq!(map.len(), model.len());
                for probe in [0, 1, 1500, 2999] {
                    prop_assert_eq!(count(&map, probe, pages), model.get(&probe).copied());
                }
            }
            let all: Vec<(i64, u64)> = model.into_iter().collect();
            prop_assert_eq!(from(&map, i64::MIN, pages), all);
        }
    }
}
