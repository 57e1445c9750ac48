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

use std::fmt;
use std::sync::Arc;

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::aggregate::BucketState;
use crate::domain::calendar::BucketKey;

/// Most entries of one chunk: an insert into a chunk moves at most this many 24-byte
/// entries (6 KiB), and the chunk directory of two years of hours has about 10 entries.
pub const CHUNK: usize = 256;

/// Most entries of the owned tail before they move into the chunks: a clone copies at most
/// this many per map, and a measurement of "now" finds its bucket one memory access away.
pub const TAIL: usize = 32;

/// One bucket: its key and state.
type Entry = (BucketKey, BucketState);

/// The buckets of one series at one grain, ordered by key.
///
/// The newest buckets lie in an owned tail, the older ones in shared chunks. A measurement
/// close to now (most of them) touches only the tail, whose buffer the map points to
/// directly; a late one goes to its chunk.
///
/// Architecture invariant: every chunk is non-empty and sorted, holds at most [`CHUNK`]
/// entries, and every key of a chunk is below every key of the next one; `sealed_last` is
/// the last chunk's last key; the tail is sorted, holds at most [`TAIL`] entries, and
/// every tail key is above `sealed_last`.
#[derive(Debug, Clone, Default)]
pub struct BucketMap {
    chunks: Vec<Arc<Vec<Entry>>>,
    /// The largest key in `chunks`, kept here so that finding a tail bucket reads no chunk.
    sealed_last: Option<BucketKey>,
    tail: Vec<Entry>,
}

/// Where a key is or would be inserted (`Err`: not present, the insert position).
#[derive(Debug, Clone, Copy)]
enum Place {
    Tail(Result<usize, usize>),
    Chunk(usize, Result<usize, usize>),
}

impl BucketMap {
    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.len()).sum::<usize>() + self.tail.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }

    /// The chunk that holds `key` if any chunk does: the last one whose first key is at
    /// most `key` (the first chunk for keys below all).
    fn chunk_of(&self, key: BucketKey) -> usize {
        self.chunks
            .partition_point(|chunk| chunk.first().is_some_and(|(first, _)| *first <= key))
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
        let position = self.chunks[index].binary_search_by_key(&key, |(k, _)| *k);
        Place::Chunk(index, position)
    }

    /// The state of bucket `key`.
    pub fn get(&self, key: &BucketKey) -> Option<&BucketState> {
        match self.locate(*key) {
            Place::Tail(Ok(position)) => Some(&self.tail[position].1),
            Place::Chunk(index, Ok(position)) => Some(&self.chunks[index][position].1),
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) => None,
        }
    }

    /// The state of bucket `key`, to change it.
    pub fn get_mut(&mut self, key: &BucketKey) -> Option<&mut BucketState> {
        match self.locate(*key) {
            Place::Tail(Ok(position)) => Some(&mut self.tail[position].1),
            Place::Chunk(index, Ok(position)) => {
                Some(&mut Arc::make_mut(&mut self.chunks[index])[position].1)
            }
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) => None,
        }
    }

    /// The state of bucket `key`, inserted from `new` when the bucket is not held yet.
    pub fn get_or_insert_with(
        &mut self,
        key: BucketKey,
        new: impl FnOnce() -> BucketState,
    ) -> &mut BucketState {
        let mut place = self.locate(key);
        if matches!(place, Place::Tail(Err(_))) && self.tail.len() == TAIL {
            self.seal_tail();
            place = self.locate(key);
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
        match place {
            Place::Tail(Ok(position)) => &mut self.tail[position].1,
            Place::Chunk(index, Ok(position)) => {
                &mut Arc::make_mut(&mut self.chunks[index])[position].1
            }
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) => {
                unreachable!("the bucket was inserted above")
            }
        }
    }

    /// Moves the tail's entries to the end of the chunks: the last chunk is filled up,
    /// the rest starts a new one.
    fn seal_tail(&mut self) {
        let Some((last_key, _)) = self.tail.last() else {
            return;
        };
        self.sealed_last = Some(*last_key);
        let mut entries = std::mem::take(&mut self.tail).into_iter();
        if let Some(last) = self.chunks.last_mut()
            && last.len() < CHUNK
        {
            let room = CHUNK - last.len();
            Arc::make_mut(last).extend(entries.by_ref().take(room));
        }
        let rest: Vec<Entry> = entries.collect();
        if !rest.is_empty() {
            self.chunks.push(Arc::new(rest));
        }
        self.tail = Vec::with_capacity(TAIL);
    }

    /// Inserts `entry` at `position` of chunk `index`, splitting a full chunk; returns
    /// where the entry ended up.
    fn insert_at(&mut self, index: usize, position: usize, entry: Entry) -> (usize, usize) {
        if self.chunks[index].len() < CHUNK {
            Arc::make_mut(&mut self.chunks[index]).insert(position, entry);
            return (index, position);
        }
        let upper = Arc::make_mut(&mut self.chunks[index]).split_off(CHUNK / 2);
        self.chunks.insert(index + 1, Arc::new(upper));
        let (index, position) = if position <= CHUNK / 2 {
            (index, position)
        } else {
            (index + 1, position - CHUNK / 2)
        };
        Arc::make_mut(&mut self.chunks[index]).insert(position, entry);
        (index, position)
    }

    /// Takes bucket `key` out.
    pub fn remove(&mut self, key: &BucketKey) -> Option<BucketState> {
        match self.locate(*key) {
            Place::Tail(Ok(position)) => Some(self.tail.remove(position).1),
            Place::Chunk(index, Ok(position)) => {
                let (_, state) = Arc::make_mut(&mut self.chunks[index]).remove(position);
                if self.chunks[index].is_empty() {
                    self.chunks.remove(index);
                }
                self.sealed_last = self
                    .chunks
                    .last()
                    .and_then(|chunk| chunk.last())
                    .map(|(key, _)| *key);
                Some(state)
            }
            Place::Tail(Err(_)) | Place::Chunk(_, Err(_)) => None,
        }
    }

    /// The buckets from key `first` on, in key order.
    pub fn range_from(&self, first: BucketKey) -> impl Iterator<Item = &Entry> {
        let index = self.chunk_of(first);
        let skip = self
            .chunks
            .get(index)
            .map_or(0, |chunk| chunk.partition_point(|(key, _)| *key < first));
        let tail_skip = self.tail.partition_point(|(key, _)| *key < first);
        self.chunks
            .get(index..)
            .unwrap_or_default()
            .iter()
            .flat_map(|chunk| chunk.iter())
            .skip(skip)
            .chain(&self.tail[tail_skip..])
    }

    /// Every bucket, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.iter())
            .chain(&self.tail)
    }

    /// Bytes the map holds: its entries (the chunks' and the tail's capacity) and what
    /// their states hold on the heap.
    pub fn bytes(&self) -> usize {
        let entries = self
            .chunks
            .iter()
            .map(|chunk| chunk.capacity())
            .sum::<usize>()
            + self.tail.capacity();
        entries * std::mem::size_of::<Entry>()
            + self
                .iter()
                .map(|(_, state)| state.heap_bytes())
                .sum::<usize>()
    }

    /// Appends a bucket whose key is above every key held (decoding a stored map), with
    /// `coming` more (this one included) expected: a new chunk is sized for them.
    fn push_last(&mut self, entry: Entry, coming: usize) -> Result<(), BucketKey> {
        if self.sealed_last.is_some_and(|last| last >= entry.0) {
            return Err(entry.0);
        }
        self.sealed_last = Some(entry.0);
        if let Some(last) = self.chunks.last_mut()
            && last.len() < CHUNK
        {
            Arc::make_mut(last).push(entry);
            return Ok(());
        }
        let mut chunk = Vec::with_capacity(coming.clamp(1, CHUNK));
        chunk.push(entry);
        self.chunks.push(Arc::new(chunk));
        Ok(())
    }
}

/// Stored as the sequence of (key, state) in key order.
impl Serialize for BucketMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        for entry in self.iter() {
            seq.serialize_element(entry)?;
        }
        seq.end()
    }
}

/// Reads what [`BucketMap`]'s `Serialize` wrote into full chunks, refusing keys out of
/// order (a damaged snapshot).
impl<'de> Deserialize<'de> for BucketMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;

        impl<'de> Visitor<'de> for Entries {
            type Value = BucketMap;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of (bucket key, bucket state) in key order")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BucketMap, A::Error> {
                use serde::de::Error as _;
                let mut coming = seq.size_hint().unwrap_or(0);
                let mut map = BucketMap::default();
                while let Some(entry) = seq.next_element::<Entry>()? {
                    map.push_last(entry, coming).map_err(|key| {
                        A::Error::custom(format!(
                            "bucket key {} is not above the one before it",
                            key.unix_seconds()
                        ))
                    })?;
                    coming = coming.saturating_sub(1);
                }
                Ok(map)
            }
        }

        deserializer.deserialize_seq(Entries)
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

    /// The map's invariant: non-empty sorted chunks of at most CHUNK, ordered, len right.
    fn check_invariant(map: &BucketMap) {
        let mut previous = None;
        let mut len = 0;
        for chunk in &map.chunks {
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
        map.iter()
            .map(|(k, s)| (k.unix_seconds(), s.count()))
            .collect()
    }

    #[test]
    fn buckets_arriving_in_order_fill_chunks_completely() {
        let mut map = BucketMap::default();
        for k in 0..10 * CHUNK as i64 {
            *map.get_or_insert_with(key(k), || state(0)) = state(1);
        }
        check_invariant(&map);
        // The last TAIL buckets are in the tail; the chunks before the last one are full.
        assert_eq!(map.tail.len(), TAIL);
        assert_eq!(map.chunks.len(), 10);
        let (last, full) = map.chunks.split_last().expect("chunks");
        assert!(full.iter().all(|chunk| chunk.len() == CHUNK));
        assert_eq!(last.len(), CHUNK - TAIL);
    }

    #[test]
    fn a_late_bucket_splits_only_its_chunk() {
        let mut map = BucketMap::default();
        for k in 0..2 * CHUNK as i64 {
            map.get_or_insert_with(key(2 * k), || state(1));
        }
        map.get_or_insert_with(key(1), || state(2));
        check_invariant(&map);
        assert_eq!(map.chunks.len(), 3);
        assert_eq!(map.get(&key(1)).map(BucketState::count), Some(2));
        assert_eq!(map.range_from(key(1)).next().map(|(k, _)| *k), Some(key(1)));
    }

    #[test]
    fn a_damaged_order_is_refused_when_decoding() {
        // A BucketMap is stored as its entries in order; these are not.
        let swapped: Vec<Entry> = vec![(key(7), state(1)), (key(5), state(1))];
        let bytes =
            bincode::serde::encode_to_vec(&swapped, bincode::config::standard()).expect("encodes");
        let decoded: Result<(BucketMap, usize), _> =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard());
        let error = decoded.expect_err("keys out of order").to_string();
        assert!(error.contains("not above"), "{error}");
    }

    #[test]
    fn a_clone_keeps_its_buckets_while_the_original_changes() {
        let mut map = BucketMap::default();
        for k in 0..3 * CHUNK as i64 {
            map.get_or_insert_with(key(k), || state(1));
        }
        let before = contents(&map);
        let clone = map.clone();
        *map.get_mut(&key(5)).expect("held") = state(7);
        map.get_or_insert_with(key(-1), || state(2));
        map.remove(&key(CHUNK as i64 + 3));
        assert_eq!(contents(&clone), before);
        // Only the chunks that changed were copied.
        assert!(Arc::ptr_eq(
            &map.chunks[map.chunks.len() - 1],
            &clone.chunks[2]
        ));
        assert_eq!(map.get(&key(5)).map(BucketState::count), Some(7));
    }

    /// One operation of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(i64, u64),
        Remove(i64),
        Range(i64),
        RoundTrip,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Keys from a small range so inserts hit existing buckets and removes find them.
        let k = 0i64..3000;
        prop_oneof![
            6 => (k.clone(), 1u64..4).prop_map(|(k, n)| Op::Insert(k, n)),
            2 => k.clone().prop_map(Op::Remove),
            1 => k.prop_map(Op::Range),
            1 => Just(Op::RoundTrip),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a BTreeMap: every operation gives the same answers, and the invariant
        /// holds after each.
        #[test]
        fn behaves_like_an_ordered_map(
            ops in prop::collection::vec(op(), 1..600),
            ascending in any::<bool>(),
        ) {
            let mut map = BucketMap::default();
            let mut model: BTreeMap<i64, u64> = BTreeMap::new();
            if ascending {
                // A run of in-order buckets first, as a time-ordered ingest makes.
                for k in (0..3000).step_by(3) {
                    map.get_or_insert_with(key(k), || state(1));
                    model.insert(k, 1);
                }
            }
            for op in ops {
                match op {
                    Op::Insert(k, n) => {
                        let entry = map.get_or_insert_with(key(k), || state(0));
                        *entry = state(entry.count() + n);
                        *model.entry(k).or_default() += n;
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(
                            map.remove(&key(k)).map(|s| s.count()),
                            model.remove(&k)
                        );
                    }
                    Op::Range(k) => {
                        let got: Vec<(i64, u64)> = map
                            .range_from(key(k))
                            .map(|(k, s)| (k.unix_seconds(), s.count()))
                            .collect();
                        let want: Vec<(i64, u64)> =
                            model.range(k..).map(|(k, n)| (*k, *n)).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::RoundTrip => {
                        let bytes = bincode::serde::encode_to_vec(&map, bincode::config::standard())
                            .expect("encodes");
                        let (decoded, _): (BucketMap, usize) =
                            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                                .expect("decodes");
                        prop_assert_eq!(contents(&decoded), contents(&map));
                        map = decoded;
                    }
                }
                check_invariant(&map);
                prop_assert_eq!(map.len(), model.len());
                for probe in [0, 1, 1500, 2999] {
                    prop_assert_eq!(
                        map.get(&key(probe)).map(BucketState::count),
                        model.get(&probe).copied()
                    );
                }
            }
            let all: Vec<(i64, u64)> = model.into_iter().collect();
            prop_assert_eq!(contents(&map), all);
        }
    }
}
