//! The in-memory deduplication index: event_id -> seq for the measurements recorded
//! within the deduplication window.
//!
//! The ids live in the log itself, so the index is derived state: the writer adds the ids
//! of every committed group, and `open` rebuilds it from the segments inside the window.
//! Writing one sled key per id would cut durable ingest by about twenty times (SPEC,
//! Durability and consistency), so there is none.
//!
//! A projection snapshot keeps the index's entries up to its seq ([`DedupEntries`]), so a
//! restart inserts those and reads only the log's tail instead of the whole window.
//!
//! Callers hash and copy their ids ([`EventIdKey`]) on their own threads, so the single
//! writer only probes and moves. Memory grows with the number of ids recorded within the
//! window (about 30 bytes plus the id per id, see [`DedupIndex`]), the price of answering
//! a retry with the original seq.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// Hashes event ids with one per-process random key (SipHash, so clients cannot choose
/// colliding ids). Cheap to clone; all clones hash alike.
#[derive(Debug, Clone, Default)]
pub struct EventIdHasher(RandomState);

impl EventIdHasher {
    /// The key of `event_id`: its hash and a shared copy.
    pub fn key(&self, event_id: &str) -> EventIdKey {
        EventIdKey {
            hash: self.hash_bytes(event_id.as_bytes()),
            event_id: Arc::from(event_id),
        }
    }

    /// The hash of an id's bytes; the same as the hash of its [`EventIdHasher::key`].
    fn hash_bytes(&self, event_id: &[u8]) -> u64 {
        self.0.hash_one(event_id)
    }
}

/// An event id with its precomputed hash. Equality compares the ids themselves, so a
/// hash collision never makes two different ids duplicates.
#[derive(Debug, Clone)]
pub struct EventIdKey {
    hash: u64,
    event_id: Arc<str>,
}

impl PartialEq for EventIdKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.event_id == other.event_id
    }
}

impl Eq for EventIdKey {}

impl Hash for EventIdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Ids by seq, with their recorded_at in commit order for eviction.
///
/// Millions of ids can be inside the window (every measurement of the last day may carry
/// one), so the index keeps no allocation per id: the ids' bytes lie back to back in one
/// buffer in commit order, each id is 16 bytes (seq, end of its bytes) in a queue in the
/// same order, a hash table holds only the ids' numbers, and recorded times are kept once
/// per run of ids recorded together (a committed group shares one). About 30 bytes plus
/// the id's length per id, instead of about 190 with a map of owned strings.
#[derive(Debug)]
pub struct DedupIndex {
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

impl DedupIndex {
    /// An empty index that remembers ids for `window` of recorded time.
    pub fn new(window: TimeDelta) -> Self {
        Self {
            window,
            hasher: EventIdHasher::default(),
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

    /// [`DedupIndex::get`] for an id that has no key yet.
    pub fn get_id(&self, event_id: &str) -> Option<u64> {
        self.get(&self.hasher.key(event_id))
    }

    /// Position of id number `number` in `ids`.
    fn index(&self, number: u64) -> usize {
        usize::try_from(number - self.first)
            .unwrap_or_else(|_| unreachable!("fewer than usize::MAX ids are remembered"))
    }

    /// Remembers the id as recorded at `seq`. An id already present keeps its first
    /// (original) seq. The key must come from [`DedupIndex::hasher`].
    pub fn insert(&mut self, key: EventIdKey, seq: u64, recorded_at: DateTime<Utc>) {
        self.insert_hashed(key.hash, &key.event_id, seq, recorded_at);
    }

    /// [`DedupIndex::insert`] of an id hashed with [`DedupIndex::hasher`].
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

    /// The remembered ids recorded at or before `seq`, in commit order.
    pub fn entries_up_to(&self, seq: u64) -> DedupEntries {
        let mut entries = DedupEntries {
            window_seconds: self.window.num_seconds(),
            ..DedupEntries::default()
        };
        let end = self.first + widen(self.ids.len());
        'runs: for (run, (recorded_at, from)) in self.times.iter().enumerate() {
            let to = self.times.get(run + 1).map_or(end, |(_, next)| *next);
            let at = (
                recorded_at.timestamp(),
                recorded_at.timestamp_subsec_nanos(),
            );
            for number in *from..to {
                let id = self.ids[self.index(number)];
                if id.seq > seq {
                    break 'runs;
                }
                if number == *from {
                    entries.runs.push((at, 0));
                }
                if let Some(run) = entries.runs.last_mut() {
                    run.1 += 1;
                }
                entries
                    .ids
                    .push_str(&String::from_utf8_lossy(self.id_bytes(number)));
                entries.ends.push(widen(entries.ids.len()));
                entries.seqs.push(id.seq);
            }
        }
        entries
    }

    /// Inserts entries taken by [`DedupIndex::entries_up_to`] (before anything newer),
    /// leaving out those recorded before `cutoff`. Entries that do not fit together are
    /// left out too. They come from an index, so no id is among them twice, and the
    /// snapshot holding them is checksummed: each is inserted without looking it up first
    /// (a restart inserts millions).
    pub fn insert_entries(&mut self, entries: DedupEntries, cutoff: Option<DateTime<Utc>>) {
        let count = entries.len();
        self.ids.reserve(count);
        self.bytes.reserve(entries.ids.len());
        let (table, rehash) = self.table_and_rehash();
        table.reserve(count, rehash);
        let mut next = 0usize;
        let mut start = 0usize;
        for ((seconds, nanos), run) in entries.runs {
            let recorded_at = DateTime::from_timestamp(seconds, nanos);
            let keep = recorded_at.filter(|at| cutoff.is_none_or(|cutoff| *at >= cutoff));
            for _ in 0..run {
                let (Some(&end), Some(&seq)) = (entries.ends.get(next), entries.seqs.get(next))
                else {
                    return;
                };
                next += 1;
                let end = usize::try_from(end).unwrap_or(usize::MAX);
                let Some(event_id) = entries.ids.get(start..end) else {
                    return;
                };
                start = end;
                if let Some(recorded_at) = keep {
                    let hash = self.hasher.hash_bytes(event_id.as_bytes());
                    self.insert_new(hash, event_id, seq, recorded_at);
                }
            }
        }
    }
}

/// The bytes of id number `number` in the parts of a [`DedupIndex`] (a free function so
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

/// The entries of a [`DedupIndex`] up to a seq, as a snapshot stores them: the ids back to
/// back in one string (no allocation per id when it is decoded), the end of each and its
/// seq, and per recorded time (Unix seconds and nanoseconds; a committed group shares one)
/// the number of ids recorded then, all in commit order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntries {
    /// The window of the index they come from, in seconds: they hold every id recorded
    /// within it, so they can seed an index with this window or a shorter one only.
    window_seconds: i64,
    ids: String,
    /// End of each id in `ids`.
    ends: Vec<u64>,
    seqs: Vec<u64>,
    runs: Vec<(RecordedAt, u64)>,
}

impl DedupEntries {
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Whether they hold every id an index with `window` needs.
    pub fn cover(&self, window: TimeDelta) -> bool {
        window.num_seconds() <= self.window_seconds
    }
}

/// A recorded time as Unix seconds and nanoseconds.
type RecordedAt = (i64, u32);

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn ids_expire_after_the_window_and_not_before() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut index = DedupIndex::new(TimeDelta::hours(24));
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
        let mut index = DedupIndex::new(TimeDelta::hours(24));
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
    fn many_ids_expire_in_order_and_survive_a_snapshot() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut index = DedupIndex::new(TimeDelta::hours(24));
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
        let entries = index.entries_up_to(9_000);
        assert_eq!(entries.len(), 9_000 - (10_000 - 1441));
        let mut restored = DedupIndex::new(TimeDelta::hours(24));
        restored.insert_entries(entries, None);
        assert_eq!(restored.get_id(&id(8_999)), Some(9_000));
        assert_eq!(restored.get_id(&id(9_000)), None);
        assert_eq!(restored.get_id(&id(8_559)), Some(8_560));
    }
}
