//! The history index: each KPI's measurements in seq order, and every event that is not a
//! measurement, in a sled database beside the log (`<data-dir>/history/`). An as-of
//! question, the catalog as of a seq, and the refold of a KPI whose kind or timezone
//! changed read only the events they need through it, instead of the log from seq 1: at
//! 50 M events over 1,000 KPIs, one KPI's history is 1/1,000 of the log.
//!
//! # Layout
//!
//! The blocks are pages of their own append-only files (`blocks/` in the index's
//! directory, [`PageStore`]: rotated at 64 MiB, a CRC-32 per page, read with `pread`
//! through the operating system's page cache); sled holds only one small entry per part
//! (a *part*: the events between two flushes). So the index's memory does not grow with
//! its blocks: sled keeps a page-table entry and, for a while, the bytes of every tree
//! node it reads (its cache accounts for reads in batches of 64 per shard of 256, so a
//! scan keeps up to 16,384 nodes beyond its capacity), and a thousand blocks per part in
//! the tree made that grow with the history. One tree, `history`:
//! - `p` ‖ first seq of the part (u64 BE) → the part's directory page, then, when the
//!   part has events that are not measurements, their block's page (20 bytes each,
//!   `PageRef::to_bytes`); written for every part, so these keys list the parts (held in
//!   memory, one per 100,000 events);
//! - `covered` → the format byte, a seq (u64 LE) and the log's chain hash after it: the
//!   tree holds every event up to that seq, and nothing after it.
//!
//! A part's *directory* lists the KPIs measured in it, sorted by id, each with its
//! block's page; a reader finds one by binary search (`blocks::find_in_directory`). A
//! block of the other events (definitions, targets, retractions, lost events) holds all
//! KPIs' together, since there are few.
//!
//! The same database holds the as-of checkpoints (tree `checkpoints`, their pages in
//! `checkpoints/` beside sled's files), which [`crate::projection::as_of`] reads and its
//! thread writes through [`History::checkpoint`] and [`History::put_checkpoint`]; they
//! name the chain hash they follow, so an index discarded and rebuilt keeps them.
//!
//! A KPI's stored measurements are read with two page reads per part (its directory,
//! then its block; the parts' entries are in memory).
//!
//! A block is a format byte, the count (u32 LE), the first and last seq (u64 LE each),
//! then its body compressed as one LZ4 block with the size prepended, then a CRC-32 (LE)
//! of everything before it; it is stored as it is (`PageStore::write_as_is`). The body is
//! a table
//! of series (their count, then per series its label count and each label's key and value,
//! each a length and the bytes; empty in blocks of other events), then the entries. Every
//! entry starts with the distance of its seq from the previous entry's (the first: from 0).
//! Then, for another event, the record's length and the record: the bytes the log stores.
//! For a measurement, only what a fold reads of it, with no allocation to decode: its
//! series' index in the table, the value (f64 LE), occurred_at's seconds as the zigzag
//! distance from the previous entry's and its nanoseconds, and the subject (its length plus
//! one, 0 for none, then the bytes). Integers are LEB128 varints.
//!
//! # Writing
//!
//! The index listens to the log (on the publisher thread, before the aggregates, so a
//! refold finds its own group's events): it copies each record into memory, per KPI for
//! measurements. Every `flush_every_events` events (or 32 MiB of records) the open part
//! is frozen and handed to the `kpi-history` thread, which writes its blocks and directory,
//! syncs them, then lists the part in one batch with the new `covered` (so the tree names
//! only durable pages; a crash in between leaves pages nothing names); nothing on the
//! commit path waits for it. Reads see the stored blocks up
//! to `covered`, then the frozen parts, then the open one. Like the log's other derived
//! writers, the thread writes only while twice the free-space minimum stays free (sled
//! does not recover from a failed write); until then the parts stay in memory.
//!
//! # Recovery
//!
//! The index is derived from the log. At open the log after `covered` is read again
//! (`projection::open` does it in the same pass as the read models' tail); an index the
//! log does not continue (the log ends before `covered`, or its hash there differs, as
//! after `kpi-server recover`), one that names a block file that is missing, one of
//! another format, or one sled cannot open (an error, or
//! a panic of sled's recovery after a power cut, which `store::open_sled` catches) is removed
//! and rebuilt from the log. The index is opened only by a server that holds the data
//! directory's lock (the log's `store::DirLock`); sled's own lock on the index still held
//! after a few seconds (a handle of this process that did not close, `store::open_sled`)
//! is not damage: the open fails with `StoreError::AlreadyInUse`.
//!
//! Size: this file is the layout, `History`'s open, its listener and its reads (about 780
//! lines, a long layout doc among them); the block format is `blocks.rs`, the reading
//! cursor `cursor.rs`, the writer thread `writer.rs`.

mod blocks;
mod cursor;
mod writer;

use blocks::{Area, Blocks, KpiArea, StoredRef};
pub use cursor::Visited;
use cursor::{Cursor, merge};
use writer::Writer;

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use foldhash::HashMap;

use crate::domain::{Catalog, Event};
use crate::projection::pages::{PageRef, PageStore};
use crate::store::{
    self, CommitListener, Committed, EventLog, GENESIS_HASH, Hash, OpenSledError, StoreError,
};

/// Events between two writes of the index by default: at most this many events of the log
/// are read again at a start after a crash.
pub const DEFAULT_FLUSH_EVERY_EVENTS: u64 = 100_000;
/// Bytes of records after which the open part is frozen whatever its count.
const MAX_PART_BYTES: usize = 32 * 1024 * 1024;
/// Largest entries area a stored block may claim (a part is frozen at 32 MiB): a damaged
/// size never makes a read allocate more.
const MAX_AREA_BYTES: usize = 2 * MAX_PART_BYTES;
/// The format of `covered`, of the parts' entries and of the blocks, and of the
/// checkpoints' page references (`crate::encoding`). Format 5: blocks in page files, where
/// 4 kept them in sled (and 3 wrote the page references with bincode). An index of another
/// format, or with entries but no format (no `covered`), is removed with its checkpoints
/// and rebuilt from the log.
const FORMAT: u8 = 5;
/// The tree of the index.
const TREE: &str = "history";
/// The tree of the as-of checkpoints (see [`crate::projection::as_of`]): where each is.
const CHECKPOINTS_TREE: &str = "checkpoints";
/// The directory, in the index's, of the checkpoints' page files.
const CHECKPOINTS_DIR: &str = "checkpoints";
/// Checkpoints tried, newest first, before a fold starts without one.
const CHECKPOINT_TRIES: usize = 4;
/// Measurements of a KPI between two of its as-of checkpoints by default.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 4096;
/// By default checkpoints add at most half to the index: one is stored only when the
/// measurements it follows take twice its bytes.
pub const DEFAULT_CHECKPOINT_SPAN_PER_BYTE: u64 = 2;
/// The directory, in the index's, of the blocks' page files.
const BLOCKS_DIR: &str = "blocks";
/// The key of the covered seq.
const COVERED_KEY: &[u8] = b"covered";
/// First byte of the parts' keys.
const PARTS: u8 = b'p';
/// sled's cache for the index: its tree holds one small entry per part.
const SLED_CACHE_BYTES: u64 = 1024 * 1024;
/// How long opening waits for the directory lock of an index closing in this process.
const LOCK_PATIENCE: Duration = Duration::from_secs(5);
/// How long the writer waits before asking again for room on a nearly full disk.
const ROOM_RETRY: Duration = Duration::from_secs(1);

/// How the index writes.
#[derive(Debug, Clone, Copy)]
pub struct HistoryOptions {
    /// Events between two writes (see [`DEFAULT_FLUSH_EVERY_EVENTS`]).
    pub flush_every_events: u64,
    /// The log's free-space minimum: the index writes only while twice this stays free.
    pub min_free_bytes: u64,
    /// Measurements of a KPI after which it gets its next as-of checkpoint (see
    /// [`DEFAULT_CHECKPOINT_EVERY`]); 0: none.
    pub checkpoint_every: u64,
    /// A checkpoint is stored only when the measurements since the KPI's last one take at
    /// least this many times its bytes in the index (before compression); 0: always.
    pub checkpoint_span_per_byte: u64,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        Self {
            flush_every_events: DEFAULT_FLUSH_EVERY_EVENTS,
            min_free_bytes: store::DEFAULT_MIN_FREE_BYTES,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            checkpoint_span_per_byte: DEFAULT_CHECKPOINT_SPAN_PER_BYTE,
        }
    }
}

/// A part the writer has stored: what the as-of checkpoints follow.
#[derive(Debug, Clone)]
pub struct StoredPart {
    /// Its last seq: the index holds every event up to it.
    pub last_seq: u64,
    /// The KPIs measured in it, with their measurement counts and the bytes of those
    /// in the index (before compression).
    pub measured: Vec<(String, u64, u64)>,
}

/// Who hears of stored parts; emptied when the writer stops, which ends their loops.
type StoredListeners = Arc<Mutex<Vec<Sender<StoredPart>>>>;

/// The history index of one data directory.
pub struct History {
    /// The blocks and directories of the stored parts.
    pages: Arc<PageStore>,
    checkpoints: sled::Tree,
    checkpoint_pages: PageStore,
    db: sled::Db,
    dir: PathBuf,
    checkpoint_every: u64,
    checkpoint_span_per_byte: u64,
    stored_listeners: StoredListeners,
    state: Arc<Mutex<State>>,
    to_writer: Mutex<Option<Sender<Arc<Part>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Set when closing: a writer waiting for room gives up (the next start reads the log
    /// after the last stored seq again).
    stopping: Arc<AtomicBool>,
    flush_every_events: u64,
}

/// What is in memory.
#[derive(Default)]
struct State {
    /// The tree holds every event up to this seq.
    stored: u64,
    /// The parts stored, ascending.
    parts: Vec<StoredRef>,
    /// Parts handed to the writer, oldest first, not yet stored.
    frozen: VecDeque<Arc<Part>>,
    /// The part being filled.
    open: Part,
    /// Reused to encode a record.
    scratch: Vec<u8>,
}

/// Consecutive events of the log, after the stored ones.
#[derive(Default)]
struct Part {
    /// The first seq in the part (0 while empty).
    first_seq: u64,
    /// The last seq in the part (or before it, when empty).
    last_seq: u64,
    events: u64,
    bytes: usize,
    measurements: HashMap<String, KpiArea>,
    others: Area,
}

impl History {
    /// Opens (or creates) the index in `dir` for `log`, removing one the log does not
    /// continue. Returns it with the seq it covers: the caller feeds it the log after that
    /// seq ([`History::fold_in`]) before registering it as a listener.
    pub fn open(dir: &Path, log: &EventLog, options: HistoryOptions) -> Result<Self, StoreError> {
        let db = match open_db(dir) {
            Ok(db) => db,
            Err(OpenSledError::Locked) => {
                return Err(StoreError::AlreadyInUse {
                    path: dir.to_owned(),
                });
            }
            Err(OpenSledError::Sled(error)) => {
                tracing::warn!(%error, dir = %dir.display(), "history index unreadable; rebuilding it from the log");
                std::fs::remove_dir_all(dir).map_err(|source| StoreError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
                open_db(dir).map_err(sled::Error::from)?
            }
        };
        let db = match other_format(&db)? {
            None => db,
            Some(found) => {
                tracing::warn!(
                    found,
                    format = FORMAT,
                    dir = %dir.display(),
                    "history index of another format; rebuilding it from the log"
                );
                remove_and_reopen(dir, db)?
            }
        };
        let tree = db.open_tree(TREE)?;
        let checkpoints = db.open_tree(CHECKPOINTS_TREE)?;
        let checkpoints_dir = dir.join(CHECKPOINTS_DIR);
        let checkpoint_pages =
            PageStore::open(&checkpoints_dir, options.min_free_bytes).map_err(|source| {
                StoreError::Io {
                    path: checkpoints_dir,
                    source,
                }
            })?;
        let blocks_dir = dir.join(BLOCKS_DIR);
        let pages = PageStore::open(&blocks_dir, options.min_free_bytes).map_err(|source| {
            StoreError::Io {
                path: blocks_dir.clone(),
                source,
            }
        })?;
        let covered = match tree.get(COVERED_KEY)? {
            None => 0,
            Some(value) => match check_covered(&value, log) {
                Ok(seq) => seq,
                Err(reason) => {
                    tracing::warn!(
                        reason,
                        "history index discarded; rebuilding it from the log"
                    );
                    discard(&tree, &pages, &blocks_dir)?;
                    0
                }
            },
        };
        let (covered, parts) = match stored_parts(&tree, covered, &pages.files()) {
            // Every stored part lists itself in the batch that moves `covered`.
            Some(parts) if covered == 0 || !parts.is_empty() => (covered, parts),
            _ => {
                tracing::warn!(
                    "history index has damaged keys or misses a block file; rebuilding it from the log"
                );
                discard(&tree, &pages, &blocks_dir)?;
                (0, Vec::new())
            }
        };
        let pages = Arc::new(pages);
        let state = Arc::new(Mutex::new(State {
            stored: covered,
            parts,
            open: Part {
                last_seq: covered,
                ..Part::default()
            },
            ..State::default()
        }));
        let (to_writer, parts) = std::sync::mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let stored_listeners = StoredListeners::default();
        let writer = Writer {
            stopping: stopping.clone(),
            listeners: stored_listeners.clone(),
            tree,
            pages: pages.clone(),
            state: state.clone(),
            log: log.reader(),
            dir: dir.to_owned(),
            min_free: options.min_free_bytes,
        };
        let writer = std::thread::Builder::new()
            .name("kpi-history".into())
            .spawn(move || writer.run(&parts))
            .map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            pages,
            checkpoints,
            checkpoint_pages,
            db,
            dir: dir.to_owned(),
            checkpoint_span_per_byte: options.checkpoint_span_per_byte,
            checkpoint_every: options.checkpoint_every,
            stored_listeners,
            state,
            to_writer: Mutex::new(Some(to_writer)),
            writer: Mutex::new(Some(writer)),
            stopping,
            flush_every_events: options.flush_every_events.max(1),
        })
    }

    /// The seq up to which the index has every event (stored or in memory).
    pub fn seq(&self) -> u64 {
        lock(&self.state).open.last_seq
    }

    /// Adds one event of the log; events at or before [`History::seq`] are ignored.
    pub fn fold_in(&self, seq: u64, recorded_at: DateTime<Utc>, event: &Event) {
        let mut state = lock(&self.state);
        self.add(&mut state, seq, recorded_at, event);
        self.freeze_if_full(&mut state);
    }

    fn add(&self, state: &mut State, seq: u64, recorded_at: DateTime<Utc>, event: &Event) {
        if seq <= state.open.last_seq {
            return;
        }
        let part = &mut state.open;
        match event {
            Event::MeasurementRecorded(measurement) => {
                let kpi = match part.measurements.get_mut(&measurement.kpi_id) {
                    Some(kpi) => kpi,
                    None => part
                        .measurements
                        .entry(measurement.kpi_id.clone())
                        .or_default(),
                };
                let before = kpi.area.bytes.len();
                kpi.push(seq, measurement);
                part.bytes += kpi.area.bytes.len() - before;
            }
            _ => {
                let mut record = std::mem::take(&mut state.scratch);
                record.clear();
                record.extend_from_slice(&store::recorded_at_field(recorded_at));
                store::encode_payload(event, &mut record);
                let part = &mut state.open;
                part.others.push_record(seq, &record);
                part.bytes += record.len();
                state.scratch = record;
            }
        }
        let part = &mut state.open;
        if part.events == 0 {
            part.first_seq = seq;
        }
        part.last_seq = seq;
        part.events += 1;
    }

    fn freeze_if_full(&self, state: &mut State) {
        if state.open.events >= self.flush_every_events || state.open.bytes >= MAX_PART_BYTES {
            self.freeze(state);
        }
    }

    /// Hands the open part to the writer.
    fn freeze(&self, state: &mut State) {
        if state.open.events == 0 {
            return;
        }
        let last_seq = state.open.last_seq;
        let part = Arc::new(std::mem::replace(
            &mut state.open,
            Part {
                last_seq,
                ..Part::default()
            },
        ));
        state.frozen.push_back(part.clone());
        let sender = self
            .to_writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = sender.as_ref()
            && sender.send(part).is_err()
        {
            tracing::error!("the history index writer is gone; the index stays in memory");
        }
    }

    /// Writes everything held in memory and closes the index: a graceful stop, after which
    /// a start reads no log for it. Blocking.
    pub fn close(&self) -> Result<(), StoreError> {
        {
            let mut state = lock(&self.state);
            self.freeze(&mut state);
        }
        self.stop_writer();
        self.db.flush()?;
        Ok(())
    }

    /// Ends the writer once it has stored what it was handed (unless it waits for room),
    /// and waits for it.
    fn stop_writer(&self) {
        drop(
            self.to_writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        self.stopping.store(true, Ordering::Relaxed);
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("the history index writer panicked");
        }
        // Their loops end.
        self.stored_listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Waits until every part in memory but the open one is stored, up to `patience`;
    /// whether it is (false while the writer waits for room or has failed).
    pub fn wait_stored(&self, patience: Duration) -> bool {
        wait_until(patience, || lock(&self.state).frozen.is_empty())
    }

    /// Hands every part stored from now on (its last seq and measured KPIs) to the
    /// returned receiver, until the writer stops.
    pub fn subscribe_stored(&self) -> Receiver<StoredPart> {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.stored_listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender);
        receiver
    }

    /// The index's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the index is closing (or closed): background work on it should stop.
    pub fn closing(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Measurements of a KPI after which it gets its next as-of checkpoint (0: none), and
    /// how many times its bytes they must take (see [`HistoryOptions`]).
    pub fn checkpoint_cadence(&self) -> (u64, u64) {
        (self.checkpoint_every, self.checkpoint_span_per_byte)
    }

    /// The seq up to which parts are stored.
    pub fn stored_seq(&self) -> u64 {
        lock(&self.state).stored
    }

    /// The latest checkpoint of `kpi_id` at or before `seq` that `usable` accepts (its
    /// seq and bytes), trying at most four, newest first: a crash can lose the newest
    /// pages while their keys survive.
    pub fn checkpoint(
        &self,
        kpi_id: &str,
        seq: u64,
        mut usable: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let range = checkpoint_key(kpi_id, 0)..=checkpoint_key(kpi_id, seq);
        for found in self.checkpoints.range(range).rev().take(CHECKPOINT_TRIES) {
            let (key, value) = found?;
            let at = key
                .len()
                .checked_sub(8)
                .and_then(|start| key.get(start..))
                .and_then(|bytes| bytes.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let read = crate::encoding::decode::<PageRef>(&value)
                .and_then(|page| {
                    self.checkpoint_pages
                        .read(page)
                        .map_err(|error| error.to_string())
                })
                .and_then(|bytes| usable(at, &bytes).map(|()| bytes));
            match read {
                Ok(bytes) if at > 0 => return Ok(Some((at, bytes))),
                Ok(_) => {}
                Err(reason) => {
                    tracing::warn!(kpi_id, at, reason, "as-of checkpoint not used");
                }
            }
        }
        Ok(None)
    }

    /// Stores `bytes` as the checkpoint of `kpi_id` at `seq` (a page of the checkpoint
    /// files, not synced: a crash may lose it, see [`History::checkpoint`]); the bytes
    /// it takes on disk.
    pub fn put_checkpoint(&self, kpi_id: &str, seq: u64, bytes: &[u8]) -> Result<u64, StoreError> {
        let io = |source| StoreError::Io {
            path: self.dir.join(CHECKPOINTS_DIR),
            source,
        };
        let page = self.checkpoint_pages.write(bytes).map_err(io)?;
        let value =
            crate::encoding::encode(&page).map_err(|error| io(std::io::Error::other(error)))?;
        self.checkpoints
            .insert(checkpoint_key(kpi_id, seq), value)?;
        Ok(u64::from(page.stored_bytes()))
    }

    /// Calls `visit` for every event in `from..=to_seq` that is not a measurement, and
    /// every measurement of each of `kpis` from its own first seq up to `to_seq`, in seq
    /// order.
    pub fn visit(
        &self,
        from: u64,
        kpis: &[(&str, u64)],
        to_seq: u64,
        visit: impl FnMut(u64, Visited<'_>),
    ) -> Result<(), StoreError> {
        let mut cursors = Vec::with_capacity(kpis.len() + 1);
        cursors.push(self.cursor(Blocks::Others, from, to_seq));
        for (kpi_id, from) in kpis {
            cursors.push(self.cursor(Blocks::Measurements((*kpi_id).to_owned()), *from, to_seq));
        }
        merge(cursors, visit)
    }

    /// Calls `visit` for every measurement of `kpi_id` up to `to_seq`, in seq order.
    pub fn visit_measurements(
        &self,
        kpi_id: &str,
        to_seq: u64,
        visit: impl FnMut(u64, Visited<'_>),
    ) -> Result<(), StoreError> {
        let cursor = self.cursor(Blocks::Measurements(kpi_id.to_owned()), 1, to_seq);
        merge(vec![cursor], visit)
    }

    /// The catalog (KPIs and targets) as known at `seq`.
    pub fn catalog_as_of(&self, seq: u64) -> Result<Catalog, StoreError> {
        let mut catalog = Catalog::default();
        let cursor = self.cursor(Blocks::Others, 1, seq);
        merge(vec![cursor], |seq, visited| {
            if let Visited::Event(recorded_at, event) = visited {
                catalog.apply(seq, recorded_at, &event);
            }
        })?;
        catalog.advance_to(seq);
        Ok(catalog)
    }

    /// The entries of `blocks` in `from..=to_seq`: those of the stored parts, then copies
    /// of the areas of the parts in memory, taken at one moment.
    fn cursor(&self, blocks: Blocks, from: u64, to_seq: u64) -> Cursor {
        let state = lock(&self.state);
        let memory = state
            .frozen
            .iter()
            .map(|part| &**part)
            .chain(std::iter::once(&state.open))
            .filter_map(|part| blocks.of(part))
            .filter(|area| area.count > 0 && area.first_seq <= to_seq && area.last_seq >= from)
            .cloned()
            .collect();
        // The part holding `from` is the last one starting at or before it.
        let first = state
            .parts
            .partition_point(|part| part.first_seq <= from)
            .saturating_sub(1);
        let others = matches!(blocks, Blocks::Others);
        let stored = state.parts[first..]
            .iter()
            .take_while(|part| part.first_seq <= to_seq)
            .filter(|part| part.others.is_some() || !others)
            .copied()
            .collect();
        let stored_to = state.stored;
        drop(state);
        Cursor {
            pages: self.pages.clone(),
            blocks,
            stored,
            stored_to,
            memory,
            area: Area::default(),
            from,
            from_tree: false,
            pos: 0,
            prev: 0,
            prev_seconds: 0,
            to_seq,
        }
    }
}

impl CommitListener for History {
    fn committed(&self, events: &[Committed<'_>]) {
        let mut state = lock(&self.state);
        for committed in events {
            self.add(
                &mut state,
                committed.seq,
                committed.recorded_at,
                committed.event,
            );
        }
        self.freeze_if_full(&mut state);
    }
}

impl Drop for History {
    fn drop(&mut self) {
        // Without a close, parts not yet handed over are dropped, as in a crash: the next
        // start reads them from the log again. The writer finishes what it has.
        self.stop_writer();
    }
}

/// Opens sled in `dir` with the index's cache, waiting up to [`LOCK_PATIENCE`] for a lock a
/// closing index still holds (see [`store::open_sled`]).
fn open_db(dir: &Path) -> Result<sled::Db, OpenSledError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(SLED_CACHE_BYTES);
    store::open_sled(dir, &config, LOCK_PATIENCE)
}

/// What the index in `db` says of its format when it is not this build's: the format
/// byte of its `covered` record, or "none" for entries without one (an index written
/// before the format was recorded). `None` for this build's format or an empty index.
fn other_format(db: &sled::Db) -> Result<Option<String>, StoreError> {
    let tree = db.open_tree(TREE)?;
    match tree.get(COVERED_KEY)? {
        Some(value) => Ok(match value.first() {
            Some(&format) if format == FORMAT => None,
            Some(format) => Some(format.to_string()),
            None => Some("empty".to_owned()),
        }),
        None if tree.is_empty() && db.open_tree(CHECKPOINTS_TREE)?.is_empty() => Ok(None),
        None => Ok(Some("none".to_owned())),
    }
}

/// Closes `db`, removes the index directory `dir` (its checkpoint pages too) and opens
/// an empty index there.
fn remove_and_reopen(dir: &Path, db: sled::Db) -> Result<sled::Db, StoreError> {
    drop(db);
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    // sled's threads let go of the files a moment after the last handle is dropped.
    if !store::wait_for_sled(dir, LOCK_PATIENCE).map_err(io)? {
        return Err(StoreError::AlreadyInUse {
            path: dir.to_owned(),
        });
    }
    std::fs::remove_dir_all(dir).map_err(io)?;
    Ok(open_db(dir).map_err(sled::Error::from)?)
}

/// The seq a stored `covered` names, if the log continues it.
fn check_covered(value: &[u8], log: &EventLog) -> Result<u64, String> {
    let (&format, rest) = value.split_first().ok_or("empty covered record")?;
    if format != FORMAT {
        return Err(format!("format {format}, this build reads {FORMAT}"));
    }
    let seq = rest
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or("short covered record")?;
    let hash: Hash = rest
        .get(8..40)
        .and_then(|b| b.try_into().ok())
        .ok_or("short covered record")?;
    let head = log.head().seq;
    if seq > head {
        return Err(format!("it covers seq {seq}, the log ends at {head}"));
    }
    let found = if seq == 0 {
        GENESIS_HASH
    } else {
        log.hash_at(seq).map_err(|error| error.to_string())?
    };
    if found != hash {
        return Err(format!("the log has another hash at seq {seq}"));
    }
    Ok(seq)
}

/// Polls `done` every millisecond for up to `patience`; whether it became true.
pub(crate) fn wait_until(patience: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every change leaves the state whole, so a poisoned lock still holds a usable index.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A checkpoint's key: the KPI id, a 0 byte (ids are slugs), the seq (u64 BE).
fn checkpoint_key(kpi_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(kpi_id.len() + 9);
    key.extend_from_slice(kpi_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The parts the tree holds, up to `covered`; `None` when a key or entry is damaged or
/// names a block file that is not in `files`.
fn stored_parts(tree: &sled::Tree, covered: u64, files: &HashSet<u32>) -> Option<Vec<StoredRef>> {
    let mut parts = Vec::new();
    for entry in tree.scan_prefix([PARTS]) {
        let (key, value) = entry.ok()?;
        let part = StoredRef::decode(&key, &value)?;
        let pages = std::iter::once(part.directory).chain(part.others);
        if part.first_seq > covered || pages.into_iter().any(|page| !files.contains(&page.file())) {
            return None;
        }
        parts.push(part);
    }
    Some(parts)
}

/// Empties the index: its tree and its block files (the checkpoints stay: they name the
/// chain hash they follow).
fn discard(tree: &sled::Tree, pages: &PageStore, blocks_dir: &Path) -> Result<(), StoreError> {
    tree.clear()?;
    pages
        .retain(&HashSet::new(), u32::MAX)
        .map_err(|source| StoreError::Io {
            path: blocks_dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;
