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
//! window (roughly 100 bytes per id), the price of answering a retry with the original seq.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
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
            hash: self.0.hash_one(event_id),
            event_id: Arc::from(event_id),
        }
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

/// Hands the precomputed hash of an [`EventIdKey`] (or of a reference to one) to the
/// table unchanged.
#[derive(Debug, Default)]
pub struct PrecomputedHash(u64);

impl Hasher for PrecomputedHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `EventIdKey`; mix anything else in, to stay correct.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// A hash map keyed by precomputed hashes.
pub type PrecomputedMap<K, V> = HashMap<K, V, BuildHasherDefault<PrecomputedHash>>;

/// Ids by seq, with their recorded_at in commit order for eviction.
#[derive(Debug)]
pub struct DedupIndex {
    /// How long (in recorded time) an id is remembered after it was recorded.
    window: TimeDelta,
    hasher: EventIdHasher,
    by_id: PrecomputedMap<EventIdKey, u64>,
    /// Entries in commit order, so recorded_at is non-decreasing and eviction pops the
    /// front.
    by_time: VecDeque<Entry>,
}

/// The entries of a [`DedupIndex`] up to a seq, as a snapshot stores them: per recorded
/// time (Unix seconds and nanoseconds; a committed group shares one), the ids and their
/// seqs in commit order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntries {
    /// The window of the index they come from, in seconds: they hold every id recorded
    /// within it, so they can seed an index with this window or a shorter one only.
    window_seconds: i64,
    groups: Vec<(RecordedAt, Vec<(String, u64)>)>,
}

/// A recorded time as Unix seconds and nanoseconds.
type RecordedAt = (i64, u32);

impl DedupEntries {
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|group| group.1.len()).sum()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether they hold every id an index with `window` needs.
    pub fn cover(&self, window: TimeDelta) -> bool {
        window.num_seconds() <= self.window_seconds
    }
}

#[derive(Debug)]
struct Entry {
    recorded_at: DateTime<Utc>,
    seq: u64,
    key: EventIdKey,
}

impl DedupIndex {
    /// An empty index that remembers ids for `window` of recorded time.
    pub fn new(window: TimeDelta) -> Self {
        Self {
            window,
            hasher: EventIdHasher::default(),
            by_id: PrecomputedMap::default(),
            by_time: VecDeque::new(),
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

    /// The seq of the measurement recorded with this id, if it is inside the window.
    pub fn get(&self, key: &EventIdKey) -> Option<u64> {
        self.by_id.get(key).copied()
    }

    /// [`DedupIndex::get`] for an id that has no key yet.
    pub fn get_id(&self, event_id: &str) -> Option<u64> {
        self.get(&self.hasher.key(event_id))
    }

    /// Remembers the id as recorded at `seq`. An id already present keeps its first
    /// (original) seq. The key must come from [`DedupIndex::hasher`].
    pub fn insert(&mut self, key: EventIdKey, seq: u64, recorded_at: DateTime<Utc>) {
        if self.by_id.contains_key(&key) {
            return;
        }
        self.by_id.insert(key.clone(), seq);
        self.by_time.push_back(Entry {
            recorded_at,
            seq,
            key,
        });
    }

    /// Forgets every id recorded before `now - window`: an id recorded at `t` is a
    /// duplicate at `now` exactly when `now - t <= window`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let Some(cutoff) = self.cutoff(now) else {
            return;
        };
        while let Some(entry) = self.by_time.front() {
            if entry.recorded_at >= cutoff {
                break;
            }
            if self.by_id.get(&entry.key) == Some(&entry.seq) {
                self.by_id.remove(&entry.key);
            }
            self.by_time.pop_front();
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The remembered ids recorded at or before `seq`, in commit order.
    pub fn entries_up_to(&self, seq: u64) -> DedupEntries {
        let mut entries = DedupEntries {
            window_seconds: self.window.num_seconds(),
            groups: Vec::new(),
        };
        for entry in self.by_time.iter().take_while(|entry| entry.seq <= seq) {
            let at = (
                entry.recorded_at.timestamp(),
                entry.recorded_at.timestamp_subsec_nanos(),
            );
            if entries.groups.last().is_none_or(|group| group.0 != at) {
                entries.groups.push((at, Vec::new()));
            }
            if let Some(group) = entries.groups.last_mut() {
                group.1.push((entry.key.event_id.to_string(), entry.seq));
            }
        }
        entries
    }

    /// Inserts entries taken by [`DedupIndex::entries_up_to`] (before anything newer),
    /// leaving out those recorded before `cutoff`.
    pub fn insert_entries(&mut self, entries: DedupEntries, cutoff: Option<DateTime<Utc>>) {
        let count = entries.groups.iter().map(|group| group.1.len()).sum();
        self.by_id.reserve(count);
        self.by_time.reserve(count);
        for ((seconds, nanos), ids) in entries.groups {
            let Some(recorded_at) = DateTime::from_timestamp(seconds, nanos) else {
                continue;
            };
            if cutoff.is_some_and(|cutoff| recorded_at < cutoff) {
                continue;
            }
            for (event_id, seq) in ids {
                let key = self.hasher.key(&event_id);
                self.insert(key, seq, recorded_at);
            }
        }
    }
}

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
        let forged = |id: &str| EventIdKey {
            hash: 42,
            event_id: Arc::from(id),
        };
        let mut map: PrecomputedMap<EventIdKey, u64> = PrecomputedMap::default();
        map.insert(forged("x"), 1);
        map.insert(forged("y"), 2);
        assert_eq!(map.get(&forged("x")), Some(&1));
        assert_eq!(map.get(&forged("y")), Some(&2));
        assert_eq!(map.get(&forged("z")), None);
    }
}
