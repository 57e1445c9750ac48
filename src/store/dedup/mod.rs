//! The deduplication index: event_id -> seq for the measurements recorded within the
//! deduplication window, in bounded memory.
//!
//! The ids live in the log itself, so the index is derived state. It has three parts:
//!
//! - the *active* in-memory part (`mem.rs`): the newest ids with their bytes, which the
//!   writer adds as it decides each group;
//! - *frozen* in-memory parts: an active part that reached half of
//!   [`StoreOptions::dedup_memory_bytes`](super::StoreOptions) (or that many events were
//!   appended since the last freeze), handed to the spill thread and still consulted until
//!   its run file is installed;
//! - *run files* under `<log>/dedup/` (`run.rs`): immutable, sorted (keyed 64-bit hash,
//!   seq) pairs, each with a Bloom filter and fences in memory (about 1 byte per id), listed
//!   by a manifest (`manifest.rs`) that names the seq they cover and the chain hash there.
//!
//! A lookup asks the active part, the frozen parts, then each run whose newest id is
//! inside the window: its filter rejects most new ids without I/O; a filter hit reads one
//! page, and a hash found there is only a candidate: the event at its seq is read from the
//! log and must carry the same id, recorded inside the window. So a hash collision never
//! makes two ids duplicates, and ids outside the window are forgotten even while their run
//! file still holds them.
//!
//! A spill thread (`background.rs`) writes frozen parts as runs (temporary file, fsync,
//! rename, directory fsync), then the manifest, once the log is durable up to the seq it names; a merge
//! thread merges runs so that there are few, leaving out ids older than the window, and
//! deletes runs whose newest id left the window. Neither blocks the writer; a spill that
//! fails (a full disk) keeps its part in memory and is retried.
//!
//! At open (`open.rs`) the manifest and its runs are checked (checksums, the chain hash at the covered
//! seq, the window they were kept for) and the log after the covered seq is read into the
//! active part; anything missing or damaged discards them all and the index is rebuilt
//! from the segments inside the window, spilling as it goes; so does a damaged page that a
//! merge during that read meets. A run page found damaged later (by a lookup or a merge)
//! makes the lookups that need it scan the log's window instead, and the merge thread
//! removes the manifest so that the next open rebuilds; until then parts are still
//! spilled as runs, which only the running index knows.
//!
//! Callers hash and copy their ids ([`EventIdKey`]) on their own threads, so the single
//! writer only probes and moves.

mod background;
mod manifest;
mod mem;
mod open;
mod run;

use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::chain::{GENESIS_HASH, Hash};
use super::{reader, space};

pub use background::{Background, SpillJob};
use manifest::Manifest;
use mem::MemIndex;
pub use open::open;
use run::Run;
pub use run::RunError;

/// The directory of the run files and their manifest, inside the log directory.
pub const DEDUP_DIR: &str = "dedup";

/// Bytes a run file takes per id at most (hash, seq, filter and fence share), and its
/// fixed part, for the free-space check before a spill.
const RUN_BYTES_PER_ID: u64 = 18;
const RUN_BYTES_FIXED: u64 = 4096;

/// An active part is frozen and spilled at the latest after this many appended events,
/// ids or not: the log a restart reads after the manifest's seq stays short.
const FREEZE_EVENTS: u64 = 500_000;

/// Runs that could still take the smallest one without passing [`MAX_RUN_ENTRIES`] are
/// merged until there are at most this many ([`merge_pick`]).
const MERGEABLE_RUNS: usize = 5;

/// Largest merged run: a merge holds the new run's filter beside its inputs' (about
/// 7/8 byte per entry), so a cap bounds that extra memory (14 MiB at 16 M entries).
const MAX_RUN_ENTRIES: u64 = 16_000_000;

/// Which two of runs of `sizes` entries to merge next, if any: the two smallest, when
/// they fit [`MAX_RUN_ENTRIES`] together and the smallest is at least half the other,
/// or when more than [`MERGEABLE_RUNS`] runs could still take the smallest.
///
/// Runs at the cap stay as they are, so they do not count: with a limit on all runs, the
/// one run left below the cap took every spill (a rewrite of up to 16 M entries every
/// second), and the last 10 M ids of 50 M were written 16 times each where the first
/// were written 8 times (`tests::merges_write_each_id_a_bounded_number_of_times`).
fn merge_pick(sizes: &[u64]) -> Option<(usize, usize)> {
    let mut by_size: Vec<usize> = (0..sizes.len()).collect();
    by_size.sort_by_key(|&run| sizes[run]);
    let (&a, &b) = (by_size.first()?, by_size.get(1)?);
    let fits = sizes[a] + sizes[b] <= MAX_RUN_ENTRIES;
    let mergeable = sizes
        .iter()
        .filter(|&&size| size + sizes[a] <= MAX_RUN_ENTRIES)
        .count();
    let wanted = mergeable > MERGEABLE_RUNS || sizes[a].saturating_mul(2) >= sizes[b];
    (fits && wanted).then_some((a, b))
}

/// How often the threads retry a failed spill and look for expired runs.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// Hashes event ids with a secret 128-bit key (SipHash-1-3, so clients cannot choose
/// colliding ids), stable across restarts: the manifest keeps the key the runs were
/// written with. Cheap to clone; all clones hash alike.
#[derive(Debug, Clone)]
pub struct EventIdHasher {
    key: (u64, u64),
}

impl Default for EventIdHasher {
    /// A hasher with a fresh random key.
    fn default() -> Self {
        let mut bytes = [0u8; 16];
        let from_os = std::fs::File::open("/dev/urandom")
            .and_then(|mut file| file.read_exact(&mut bytes))
            .is_ok();
        if !from_os {
            use std::hash::BuildHasher;
            let state = std::collections::hash_map::RandomState::new();
            let nanos = Utc::now().timestamp_nanos_opt().unwrap_or(0);
            bytes[..8].copy_from_slice(&state.hash_one(nanos).to_le_bytes());
            bytes[8..].copy_from_slice(&state.hash_one(!nanos).to_le_bytes());
        }
        let (low, high) = bytes.split_at(8);
        Self {
            key: (
                u64::from_le_bytes(low.try_into().unwrap_or_default()),
                u64::from_le_bytes(high.try_into().unwrap_or_default()),
            ),
        }
    }
}

impl EventIdHasher {
    fn with_key(key: (u64, u64)) -> Self {
        Self { key }
    }

    /// The key of `event_id`: its hash and a shared copy.
    pub fn key(&self, event_id: &str) -> EventIdKey {
        EventIdKey {
            hash: self.hash_bytes(event_id.as_bytes()),
            event_id: Arc::from(event_id),
        }
    }

    /// The hash of an id's bytes; the same as the hash of its [`EventIdHasher::key`].
    fn hash_bytes(&self, event_id: &[u8]) -> u64 {
        let mut hasher = siphasher::sip::SipHasher13::new_with_keys(self.key.0, self.key.1);
        hasher.write(event_id);
        hasher.finish()
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

/// Sizes of the index, for logs, tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Ids in the in-memory parts.
    pub memory_ids: u64,
    /// Entries in run files (ids already outside the window included until a merge).
    pub spilled_ids: u64,
    /// Run files.
    pub runs: u64,
    /// Bytes of memory the index holds: its in-memory parts, and the runs' filters and
    /// fences.
    pub memory_bytes: u64,
}

/// Bytes of memory the dedup index's run files hold (their filters and fences), shared
/// with whoever keeps a memory budget beside it: the read models' buckets give way to it.
/// Set whenever the runs the index consults change.
#[derive(Debug, Clone, Default)]
pub struct RunMemory(Arc<AtomicUsize>);

impl RunMemory {
    /// The bytes as last set.
    pub fn bytes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, runs: &[Arc<Run>]) {
        let bytes = runs.iter().map(|run| run.memory_bytes()).sum();
        self.0.store(bytes, Ordering::Relaxed);
    }
}

/// The index the writer and `find_event_id` ask (see the module doc).
#[derive(Debug)]
pub struct DedupIndex {
    window: TimeDelta,
    hasher: EventIdHasher,
    /// The in-memory parts together are kept to about this many bytes.
    memory_bytes: usize,
    active: MemIndex,
    /// Frozen parts waiting for their run file, oldest first.
    frozen: Vec<Arc<MemIndex>>,
    /// The runs the manifest lists.
    runs: Vec<Arc<Run>>,
    /// What `runs` hold in memory.
    run_memory: RunMemory,
    /// The oldest recorded_at inside the window at the last `expire`.
    cutoff: Option<DateTime<Utc>>,
    /// Events appended since the last freeze.
    events_since_freeze: u64,
    /// Set when a run page was found damaged: the merge thread then removes the manifest
    /// so that the next open rebuilds.
    damage_seen: Arc<AtomicBool>,
}

impl DedupIndex {
    fn new(window: TimeDelta, hasher: EventIdHasher, memory_bytes: usize) -> Self {
        Self {
            window,
            active: MemIndex::new(window, hasher.clone()),
            hasher,
            memory_bytes,
            frozen: Vec::new(),
            runs: Vec::new(),
            run_memory: RunMemory::default(),
            cutoff: None,
            events_since_freeze: 0,
            damage_seen: Arc::new(AtomicBool::new(false)),
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

    fn inside(&self, at: DateTime<Utc>) -> bool {
        self.cutoff.is_none_or(|cutoff| at >= cutoff)
    }

    /// Forgets every id recorded before `now - window`: an id recorded at `t` is a
    /// duplicate at `now` exactly when `now - t <= window`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        self.active.expire(now);
        self.cutoff = self.cutoff(now);
    }

    /// The seq of the measurement recorded with this id, if it is inside the window.
    /// `segments` is the log, read to confirm a candidate found in a run.
    pub fn get(&self, key: &EventIdKey, segments: &sled::Tree) -> Option<u64> {
        if let Some(seq) = self.active.get(key) {
            return Some(seq);
        }
        for part in self.frozen.iter().rev() {
            if let Some((seq, at)) = part.get_at(key)
                && self.inside(at)
            {
                return Some(seq);
            }
        }
        for run in self.runs.iter().rev() {
            if !self.inside(run.newest) || !run.may_contain(key.hash) {
                continue;
            }
            match run.seqs_of(key.hash) {
                Ok(seqs) => {
                    for seq in seqs.into_iter().rev() {
                        if self.confirm(segments, seq, key) {
                            return Some(seq);
                        }
                    }
                }
                Err(error) => {
                    self.damage_seen.store(true, Ordering::Release);
                    tracing::error!(%error, run = %run.path().display(), "a dedup run is damaged; scanning the log's window for this id, and the next start rebuilds the index");
                    return self.scan_log(key, segments);
                }
            }
        }
        None
    }

    /// Whether the event at `seq` is a measurement with `key`'s id recorded inside the
    /// window.
    fn confirm(&self, segments: &sled::Tree, seq: u64, key: &EventIdKey) -> bool {
        match reader::event_id_at(segments, seq) {
            Ok(Some((at, Some(event_id)))) => *event_id == *key.event_id && self.inside(at),
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, seq, "cannot read an event to confirm a duplicate; taken as no duplicate");
                false
            }
        }
    }

    /// The id looked up in the log's window itself (a run it may be in is damaged).
    fn scan_log(&self, key: &EventIdKey, segments: &sled::Tree) -> Option<u64> {
        match reader::find_event_id(segments, self.cutoff, &key.event_id) {
            Ok(found) => found,
            Err(error) => {
                tracing::error!(%error, "scanning the log for an event id failed; taken as no duplicate");
                None
            }
        }
    }

    /// [`DedupIndex::get`] for an id that has no key yet.
    pub fn get_id(&self, event_id: &str, segments: &sled::Tree) -> Option<u64> {
        self.get(&self.hasher.key(event_id), segments)
    }

    /// Remembers the id as recorded at `seq`; the caller found it absent. The key must come
    /// from [`DedupIndex::hasher`].
    pub fn insert(&mut self, key: EventIdKey, seq: u64, recorded_at: DateTime<Utc>) {
        self.active.insert(key, seq, recorded_at);
    }

    /// Counts appended events towards the next freeze.
    pub fn note_appended(&mut self, events: u64) {
        self.events_since_freeze += events;
    }

    /// Whether the active part should be frozen and spilled now.
    pub fn should_freeze(&self) -> bool {
        self.active.approx_bytes() >= self.memory_bytes / 2
            || self.events_since_freeze >= FREEZE_EVENTS
    }

    /// Freezes the active part (it stays consulted until its run is installed) and starts
    /// an empty one.
    pub fn freeze(&mut self) -> Arc<MemIndex> {
        let fresh = MemIndex::new(self.window, self.hasher.clone());
        let frozen = Arc::new(std::mem::replace(&mut self.active, fresh));
        if !frozen.is_empty() {
            self.frozen.push(Arc::clone(&frozen));
        }
        self.events_since_freeze = 0;
        frozen
    }

    /// Takes the runs the manifest now lists; `spilled` (frozen part now in a run) is no
    /// longer consulted.
    fn install(&mut self, runs: Vec<Arc<Run>>, spilled: Option<&Arc<MemIndex>>) {
        self.run_memory.set(&runs);
        self.runs = runs;
        if let Some(spilled) = spilled {
            self.frozen.retain(|part| !Arc::ptr_eq(part, spilled));
        }
    }

    /// What its run files hold in memory, as it changes.
    pub fn run_memory(&self) -> RunMemory {
        self.run_memory.clone()
    }

    /// The index's sizes.
    pub fn stats(&self) -> DedupStats {
        let widen = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let memory_ids =
            self.active.len() + self.frozen.iter().map(|part| part.len()).sum::<usize>();
        let memory_bytes = self.active.approx_bytes()
            + self.frozen.iter().map(|p| p.approx_bytes()).sum::<usize>()
            + self
                .runs
                .iter()
                .map(|run| run.memory_bytes())
                .sum::<usize>();
        DedupStats {
            memory_ids: widen(memory_ids),
            spilled_ids: self.runs.iter().map(|run| run.entries).sum(),
            runs: widen(self.runs.len()),
            memory_bytes: widen(memory_bytes),
        }
    }
}

/// The run files of a log: what the manifest says, with the runs open.
pub struct RunSet {
    dir: PathBuf,
    manifest: Manifest,
    runs: Vec<Arc<Run>>,
    min_free: u64,
    /// The manifest was removed after damage was seen: nothing is recorded any more, the
    /// next open rebuilds.
    abandoned: bool,
}

impl RunSet {
    fn fresh(dir: &Path, hasher: &EventIdHasher, window: TimeDelta, min_free: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            manifest: Manifest {
                key: hasher.key,
                window_seconds: window.num_seconds(),
                covered_seq: 0,
                covered_hash: GENESIS_HASH,
                next_run: 1,
                runs: Vec::new(),
            },
            runs: Vec::new(),
            min_free,
            abandoned: false,
        }
    }

    fn store_manifest(&mut self, manifest: Manifest) -> Result<(), RunError> {
        manifest.store(&self.dir)?;
        self.manifest = manifest;
        Ok(())
    }

    /// Writes `part` as a run (when it has ids) and records that the runs cover the log up
    /// to `covered`.
    /// After damage was seen (the manifest is gone), the run is written all the same and
    /// serves lookups until the next open, which rebuilds: the part's ids must not leave
    /// memory without a run to find them in.
    fn spill(&mut self, part: &MemIndex, covered: (u64, Hash)) -> Result<(), RunError> {
        let entries = part.sorted_entries();
        let count = u64::try_from(entries.len()).unwrap_or(u64::MAX);
        let bytes = count
            .saturating_mul(RUN_BYTES_PER_ID)
            .saturating_add(RUN_BYTES_FIXED);
        if !space::room_beside_guard(&self.dir, self.min_free, bytes) {
            return Err(RunError::Io(std::io::Error::other(
                "not enough free space beside the log's minimum to spill the dedup index",
            )));
        }
        let mut manifest = self.manifest.clone();
        let mut new_run = None;
        if let (Some(newest), false) = (part.newest(), entries.is_empty()) {
            let number = manifest.next_run;
            let run = run::write(
                &self.dir,
                number,
                count,
                newest,
                entries.into_iter().map(Ok),
            )?;
            manifest.next_run += 1;
            manifest.runs.push((number, run.file_len));
            new_run = Some(Arc::new(run));
        }
        (manifest.covered_seq, manifest.covered_hash) = covered;
        if self.abandoned {
            self.manifest = manifest;
        } else if let Err(error) = self.store_manifest(manifest) {
            if let Some(run) = new_run {
                let _ = std::fs::remove_file(run.path());
            }
            return Err(error);
        }
        self.runs.extend(new_run);
        Ok(())
    }

    /// The runs to merge next, if any ([`merge_pick`]).
    fn pick_merge(&self) -> Option<Vec<Arc<Run>>> {
        let sizes: Vec<u64> = self.runs.iter().map(|run| run.entries).collect();
        let (a, b) = merge_pick(&sizes)?;
        Some(vec![Arc::clone(&self.runs[a]), Arc::clone(&self.runs[b])])
    }

    /// Removes the runs whose newest id is before `cutoff`.
    fn drop_expired(&mut self, cutoff: DateTime<Utc>) -> Result<bool, RunError> {
        let (expired, kept): (Vec<_>, Vec<_>) = self
            .runs
            .iter()
            .cloned()
            .partition(|run| run.newest < cutoff);
        if expired.is_empty() || self.abandoned {
            return Ok(false);
        }
        let mut manifest = self.manifest.clone();
        manifest.runs = kept.iter().map(|run| (run.number, run.file_len)).collect();
        self.store_manifest(manifest)?;
        self.runs = kept;
        for run in expired {
            let _ = std::fs::remove_file(run.path());
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spills of 170,000 ids (about a second of ingest) up to 50 M ids: the runs stay
    /// few, and merging writes each id about as often late as early.
    #[test]
    fn merges_write_each_id_a_bounded_number_of_times() {
        const SPILL: u64 = 170_000;
        const FIFTH: u64 = 10_000_000;
        let mut runs: Vec<u64> = Vec::new();
        let mut written = [0u64; 5];
        let mut spilled = 0;
        while spilled < 5 * FIFTH {
            let fifth = usize::try_from(spilled / FIFTH).expect("small");
            runs.push(SPILL);
            spilled += SPILL;
            written[fifth] += SPILL;
            while let Some((a, b)) = merge_pick(&runs) {
                let merged = runs[a] + runs[b];
                let (high, low) = (a.max(b), a.min(b));
                runs.swap_remove(high);
                runs.swap_remove(low);
                runs.push(merged);
                written[fifth] += merged;
            }
            assert!(runs.len() <= MERGEABLE_RUNS + 1, "{runs:?}");
            assert!(runs.iter().all(|&run| run <= MAX_RUN_ENTRIES));
        }
        let per_id = written.map(|bytes| bytes / FIFTH);
        assert!(per_id.iter().all(|&times| times <= 10), "{per_id:?}");
        assert!(per_id[4] <= per_id[0] + per_id[0] / 2, "{per_id:?}");
    }
}
