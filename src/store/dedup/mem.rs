//! The in-memory part of the dedup index: the newest ids with their bytes, up to a byte
//! bound (`StoreOptions::dedup_memory_bytes`); older ones are spilled to run files.
//!
//! It keeps no allocation per id: the ids' bytes lie back to back in one buffer in commit
//! order, each id is 16 bytes (seq, end of its bytes) in a queue in the same order, a hash
//! table holds only the ids' numbers, and recorded times are kept once per run of ids
//! recorded together (a committed group shares one). About 30 bytes plus the id's length
//! per id.

use std::collections::VecDeque;

use chrono::{DateTime, TimeDelta, Utc};

use super::{EventIdHasher, EventIdKey};

/// Ids by seq, with their recorded_at in commit order for eviction (see the module doc).
#[derive(Debug)]
pub struct MemIndex {
    /// How long (in recorded time) an id is remembered after it was recorded.
    window: TimeDelta,
    hasher: EventIdHasher,
    /// The bytes of the ids, back to back in commit order, from the first remembered one
    /// on (after some already forgotten, dropped from the front now and then).
    bytes: Vec<u8>,
    /// Position in the stream of all id bytes ever added of `bytes[0]`.
    bytes_dropped: u64,
    /// Position of the first remembered id's first byte in that stream.
    first_start: u64,
    /// The remembered ids in commit order; `ids[i]` is id number `first + i`.
    ids: VecDeque<Id>,
    /// Number of the first remembered id (ids forgotten so far).
    first: u64,
    /// (recorded_at, number of the first id recorded then), in commit order.
    times: VecDeque<(DateTime<Utc>, u64)>,
    /// Id numbers, found by the ids' hashes.
    table: hashbrown::HashTable<u64>,
}

/// One remembered id.
#[derive(Debug, Clone, Copy)]
struct Id {
    seq: u64,
    /// Position just past its last byte in the stream of all id bytes.
    end: u64,
}

impl MemIndex {
    /// An empty index that remembers ids for `window` of recorded time, hashed by
    /// `hasher`.
    pub fn new(window: TimeDelta, hasher: EventIdHasher) -> Self {
        Self {
            window,
            hasher,
            bytes: Vec::new(),
            bytes_dropped: 0,
            first_start: 0,
            ids: VecDeque::new(),
            first: 0,
            times: VecDeque::new(),
            table: hashbrown::HashTable::new(),
        }
    }

    /// The hasher whose keys this index takes.
    #[cfg(test)]
    pub fn hasher(&self) -> &EventIdHasher {
        &self.hasher
    }

    /// The oldest recorded_at still inside the window at `now`; `None` when the window
    /// reaches before the earliest time chrono can represent.
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        now.checked_sub_signed(self.window)
    }

    /// The bytes of id number `number` (which must be remembered).
    /// The table of id numbers, and the hash of an id by its number, which the table needs
    /// when it grows.
    fn table_and_rehash(&mut self) -> (&mut hashbrown::HashTable<u64>, impl Fn(&u64) -> u64) {
        let Self {
            table,
            bytes,
            ids,
            first,
            first_start,
            bytes_dropped,
            hasher,
            ..
        } = self;
        let (bytes, ids, hasher) = (&*bytes, &*ids, &*hasher);
        let (first, first_start, bytes_dropped) = (*first, *first_start, *bytes_dropped);
        let rehash = move |&n: &u64| {
            hasher.hash_bytes(id_bytes(bytes, ids, first, first_start, bytes_dropped, n))
        };
        (table, rehash)
    }

    fn id_bytes(&self, number: u64) -> &[u8] {
        id_bytes(
            &self.bytes,
            &self.ids,
            self.first,
            self.first_start,
            self.bytes_dropped,
            number,
        )
    }

    /// The number of the remembered id `event_id`, whose hash is `hash`.
    fn find(&self, hash: u64, event_id: &str) -> Option<u64> {
        self.table
            .find(hash, |&number| self.id_bytes(number) == event_id.as_bytes())
            .copied()
    }

    /// The seq of the measurement recorded with this id, if it is inside the window.
    pub fn get(&self, key: &EventIdKey) -> Option<u64> {
        let number = self.find(key.hash, &key.event_id)?;
        self.ids.get(self.index(number)).map(|id| id.seq)
    }

    /// [`MemIndex::get`] for an id that has no key yet.
    #[cfg(test)]
    pub fn get_id(&self, event_id: &str) -> Option<u64> {
        self.get(&self.hasher.key(event_id))
    }

    /// Position of id number `number` in `ids`.
    fn index(&self, number: u64) -> usize {
        usize::try_from(number - self.first)
            .unwrap_or_else(|_| unreachable!("fewer than usize::MAX ids are remembered"))
    }

    /// Remembers the id as recorded at `seq`. An id already present keeps its first
    /// (original) seq. The key must come from [`MemIndex::hasher`].
    pub fn insert(&mut self, key: EventIdKey, seq: u64, recorded_at: DateTime<Utc>) {
        self.insert_hashed(key.hash, &key.event_id, seq, recorded_at);
    }

    /// [`MemIndex::insert`] of an id hashed with [`MemIndex::hasher`].
    fn insert_hashed(&mut self, hash: u64, event_id: &str, seq: u64, recorded_at: DateTime<Utc>) {
        if self.find(hash, event_id).is_none() {
            self.insert_new(hash, event_id, seq, recorded_at);
        }
    }

    /// Remembers an id known not to be remembered yet.
    fn insert_new(&mut self, hash: u64, event_id: &str, seq: u64, recorded_at: DateTime<Utc>) {
        let number = self.first + widen(self.ids.len());
        if self.times.back().is_none_or(|(at, _)| *at != recorded_at) {
            self.times.push_back((recorded_at, number));
        }
        self.bytes.extend_from_slice(event_id.as_bytes());
        let end = self.bytes_dropped + widen(self.bytes.len());
        self.ids.push_back(Id { seq, end });
        let (table, rehash) = self.table_and_rehash();
        table.insert_unique(hash, number, rehash);
    }

    /// Forgets every id recorded before `now - window`: an id recorded at `t` is a
    /// duplicate at `now` exactly when `now - t <= window`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let Some(cutoff) = self.cutoff(now) else {
            return;
        };
        while let Some(&(at, _)) = self.times.front() {
            if at >= cutoff {
                break;
            }
            self.times.pop_front();
            let keep_from = self
                .times
                .front()
                .map_or(self.first + widen(self.ids.len()), |(_, number)| *number);
            while self.first < keep_from {
                let number = self.first;
                let hash = self.hasher.hash_bytes(self.id_bytes(number));
                if let Ok(entry) = self.table.find_entry(hash, |&n| n == number) {
                    entry.remove();
                }
                if let Some(id) = self.ids.pop_front() {
                    self.first_start = id.end;
                }
                self.first += 1;
            }
        }
        // Drop the forgotten bytes once they are most of the buffer: amortised O(1).
        let dead = usize::try_from(self.first_start - self.bytes_dropped).unwrap_or(usize::MAX);
        if dead > 0 && dead >= self.bytes.len() / 2 {
            self.bytes.drain(..dead.min(self.bytes.len()));
            self.bytes_dropped = self.first_start;
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// About how many bytes of memory the index holds.
    pub fn approx_bytes(&self) -> usize {
        self.bytes.capacity()
            + self.ids.capacity() * std::mem::size_of::<Id>()
            + self.times.capacity() * std::mem::size_of::<(DateTime<Utc>, u64)>()
            // hashbrown: the u64 per bucket and one control byte.
            + self.table.capacity() * 9
    }

    /// The seq and recorded_at of the remembered id `key`.
    pub fn get_at(&self, key: &EventIdKey) -> Option<(u64, DateTime<Utc>)> {
        let number = self.find(key.hash, &key.event_id)?;
        let seq = self.ids.get(self.index(number))?.seq;
        let run = self.times.partition_point(|(_, first)| *first <= number);
        let at = self.times.get(run.checked_sub(1)?)?.0;
        Some((seq, at))
    }

    /// The latest recorded_at of a remembered id.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.times.back().map(|(at, _)| *at)
    }

    /// (hash, seq) of every remembered id, sorted: what a run file stores.
    pub fn sorted_entries(&self) -> Vec<(u64, u64)> {
        let mut entries: Vec<(u64, u64)> = (0..self.ids.len())
            .map(|index| {
                let number = self.first + widen(index);
                (
                    self.hasher.hash_bytes(self.id_bytes(number)),
                    self.ids[index].seq,
                )
            })
            .collect();
        entries.sort_unstable();
        entries
    }
}

/// The bytes of id number `number` in the parts of a [`MemIndex`] (a free function so
/// that the table's rehash can borrow the other fields while the table is borrowed).
fn id_bytes<'a>(
    bytes: &'a [u8],
    ids: &VecDeque<Id>,
    first: u64,
    first_start: u64,
    bytes_dropped: u64,
    number: u64,
) -> &'a [u8] {
    let index = usize::try_from(number - first)
        .unwrap_or_else(|_| unreachable!("fewer than usize::MAX ids are remembered"));
    let start = match index {
        0 => first_start,
        _ => ids[index - 1].end,
    };
    let end = ids[index].end;
    let offset = |position: u64| {
        usize::try_from(position - bytes_dropped)
            .unwrap_or_else(|_| unreachable!("the buffer holds fewer than usize::MAX bytes"))
    };
    &bytes[offset(start)..offset(end)]
}

/// A length as u64 (usize is at most 64 bits on every supported target).
fn widen(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;

    use super::*;

    #[test]
    fn ids_expire_after_the_window_and_not_before() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut index = MemIndex::new(TimeDelta::hours(24), EventIdHasher::default());
        let key = |id: &str| index.hasher().key(id);
        let (a, b, a_again) = (key("a"), key("b"), key("a"));
        index.insert(a, 1, start);
        index.insert(b, 2, start + TimeDelta::hours(1));
        index.insert(a_again, 3, start + TimeDelta::hours(2));
        assert_eq!(index.get_id("a"), Some(1), "the original seq wins");

        index.expire(start + TimeDelta::hours(24));
        assert_eq!(
            index.get_id("a"),
            Some(1),
            "exactly the window is still inside"
        );
        index.expire(start + TimeDelta::hours(24) + TimeDelta::nanoseconds(1));
        assert_eq!(index.get_id("a"), None);
        assert_eq!(index.get_id("b"), Some(2));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn colliding_hashes_do_not_make_duplicates() {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut index = MemIndex::new(TimeDelta::hours(24), EventIdHasher::default());
        let forged = |id: &str| EventIdKey {
            hash: 42,
            event_id: Arc::from(id),
        };
        index.insert(forged("x"), 1, at);
        index.insert(forged("y"), 2, at);
        assert_eq!(index.get(&forged("x")), Some(1));
        assert_eq!(index.get(&forged("y")), Some(2));
        assert_eq!(index.get(&forged("z")), None);
    }

    #[test]
    fn many_ids_expire_in_order() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut index = MemIndex::new(TimeDelta::hours(24), EventIdHasher::default());
        let id = |n: u64| format!("order-{n}-{}", "x".repeat(usize::try_from(n % 7).unwrap()));
        for n in 0..10_000u64 {
            let at = start + TimeDelta::minutes(i64::try_from(n).unwrap());
            let key = index.hasher().key(&id(n));
            index.insert(key, n + 1, at);
            index.expire(at);
        }
        // The last 24 hours (1441 minutes, both ends included) are remembered.
        assert_eq!(index.len(), 1441);
        assert_eq!(index.get_id(&id(9_999 - 1440)), Some(10_000 - 1440));
        assert_eq!(index.get_id(&id(9_999 - 1441)), None);
        let key = index.hasher().key(&id(9_000));
        assert_eq!(
            index.get_at(&key),
            Some((9_001, start + TimeDelta::minutes(9_000)))
        );
        let entries = index.sorted_entries();
        assert_eq!(entries.len(), 1441);
        assert!(entries.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
