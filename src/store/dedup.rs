//! The in-memory deduplication index: event_id -> seq for the measurements recorded
//! within the deduplication window.
//!
//! The ids live in the log itself, so the index is derived state: the writer adds the ids
//! of every committed group, and `open` rebuilds it from the segments inside the window.
//! Writing one sled key per id would cut durable ingest by about twenty times (SPEC,
//! Durability and consistency), so there is none.
//!
//! Memory grows with the number of ids recorded within the window (roughly 100 bytes per
//! id), which is the price of answering a retry with the original seq.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

/// Ids by seq, with their recorded_at in commit order for eviction.
#[derive(Debug)]
pub struct DedupIndex {
    /// How long (in recorded time) an id is remembered after it was recorded.
    window: TimeDelta,
    by_id: HashMap<Arc<str>, u64>,
    /// Entries in commit order, so recorded_at is non-decreasing and eviction pops the
    /// front.
    by_time: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    recorded_at: DateTime<Utc>,
    seq: u64,
    event_id: Arc<str>,
}

impl DedupIndex {
    /// An empty index that remembers ids for `window` of recorded time.
    pub fn new(window: TimeDelta) -> Self {
        Self {
            window,
            by_id: HashMap::new(),
            by_time: VecDeque::new(),
        }
    }

    /// The oldest recorded_at still inside the window at `now`; `None` when the window
    /// reaches before the earliest time chrono can represent.
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        now.checked_sub_signed(self.window)
    }

    /// The seq of the measurement recorded with `event_id`, if it is inside the window.
    pub fn get(&self, event_id: &str) -> Option<u64> {
        self.by_id.get(event_id).copied()
    }

    /// Remembers `event_id` as recorded at `seq`. An id already present keeps its first
    /// (original) seq.
    pub fn insert(&mut self, event_id: &str, seq: u64, recorded_at: DateTime<Utc>) {
        if self.by_id.contains_key(event_id) {
            return;
        }
        let event_id: Arc<str> = Arc::from(event_id);
        self.by_id.insert(Arc::clone(&event_id), seq);
        self.by_time.push_back(Entry {
            recorded_at,
            seq,
            event_id,
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
            if self.by_id.get(&entry.event_id) == Some(&entry.seq) {
                self.by_id.remove(&entry.event_id);
            }
            self.by_time.pop_front();
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
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
        index.insert("a", 1, start);
        index.insert("b", 2, start + TimeDelta::hours(1));
        index.insert("a", 3, start + TimeDelta::hours(2));
        assert_eq!(index.get("a"), Some(1), "the original seq wins");

        index.expire(start + TimeDelta::hours(24));
        assert_eq!(
            index.get("a"),
            Some(1),
            "exactly the window is still inside"
        );
        index.expire(start + TimeDelta::hours(24) + TimeDelta::nanoseconds(1));
        assert_eq!(index.get("a"), None);
        assert_eq!(index.get("b"), Some(2));
        assert_eq!(index.len(), 1);
    }
}
