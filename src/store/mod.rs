//! The event log: an append-only, hash-chained sequence of events in sled, with group
//! commit, deduplication of measurement ids and reads by seq or recorded time.
//!
//! # Storage layout
//!
//! The data directory is one sled database with two trees:
//!
//! - `segments`: key = the first seq of a segment as 8 bytes big-endian (so sled's byte
//!   order is seq order), value = one segment: the records of consecutive events
//!   committed together, in the format documented in `segment.rs` (a version byte,
//!   first_seq, prev_hash, head_hash, the record count, then each record with a varint
//!   length). Segments are written once and never changed.
//! - `meta`: key `format`, value one byte, the storage format version (1). A directory
//!   with another version is refused at open.
//!
//! Beside sled's files the log directory holds `acknowledged` (`checkpoint.rs`) and
//! `dedup/` (the dedup index's run files and manifest, derived from the log).
//!
//! Each record is the exact protobuf encoding of `kpi.v1.EventRecord` (recorded_at and
//! payload), and the chain is `hash_n = SHA-256(hash_{n-1} || seq_n BE || record_n)` with
//! `hash_0` all zeros (see `chain.rs`). Per-event hashes are recomputed on read.
//!
//! # Writing
//!
//! Callers encode their records' payloads and hash their event ids on their own threads,
//! then queue an [`AppendRequest`]. The *writer* thread takes every request queued at
//! that moment (a *group*), decides each in order (validation guard, duplicates, seqs),
//! builds the group's segments (hashing the chain) and writes them in one atomic sled
//! batch, then hands the group to the *flusher* thread and goes on with the next group.
//! The flusher takes every group handed to it and calls sled's `flush` once for all of
//! them; the *syncer* makes them durable against a power cut (see `durability.rs` and
//! `checkpoint.rs`) and publishes the new head; the *publisher* tells the
//! [`CommitListener`]s, and only then are the requests answered. So concurrent appends
//! share one fsync, the next group is built and flushed while the disk syncs, nobody is
//! acknowledged before the fsync that covers their events, and a crash never keeps half of
//! a request (a sled batch is atomic).
//!
//! # Deduplication
//!
//! A `MeasurementRecorded` whose event_id was recorded at most
//! [`StoreOptions::dedup_window`] earlier (in recorded time; default 24 h) is not
//! appended again: its outcome is [`Outcome::Duplicate`] with the original seq, also when
//! the original is earlier in the same request or group. The newest ids are in memory
//! (up to [`StoreOptions::dedup_memory_bytes`]); older ones are spilled to run files
//! under `<log>/dedup/` with a filter in memory (see `dedup/mod.rs`). On open the runs
//! named by their manifest are checked and only the log after the seq they cover is read;
//! without usable runs the index is rebuilt from the segments inside the window before the
//! head (found by binary search, since recorded_at never decreases with seq). An id older
//! than the window is appended again.
//!
//! # Opening
//!
//! One open log per directory: before anything in it changes, the log takes an exclusive
//! `flock` on `<dir>/lock` ([`DirLock`], `dir_lock.rs`) and holds it until it is closed or
//! dropped; another holder makes the open fail with [`StoreError::AlreadyInUse`]. The
//! read models' files beside the log (history index, pages, snapshot) are opened only
//! after the log and written only while it is open, so the lock covers the whole data
//! directory. sled's own lock on its data file is released by its background threads
//! only shortly after the last handle is dropped: [`open_sled`] (also used by the history
//! index) waits for it, for a patience the caller picks.
//!
//! # Failure policy
//!
//! A failed write or flush stops the writer for good: that group and every later append
//! get [`StoreError::WriterFailed`], never a partial acknowledgement. On open the tail
//! segment is checked (its hashes, its link to the segment before it); a damaged tail
//! fails the open with [`StoreError::Corrupt`] naming the seq, because the next append
//! would chain onto it. Damage further back does not stop the service:
//! [`EventLog::verify`] reports it, and reads that reach it return an error.
//!
//! Architecture invariant: this module knows the stored protobuf records but no tonic and
//! no service logic; validation against the catalog happens before `append`, guarded by
//! `validation_unchanged_since`.
//!
//! Size: about 640 lines, 80 of them this storage and durability doc; the rest is
//! `EventLog` itself (its threads' start, append, reads, close). Its types are in
//! `types.rs`, its open in `open.rs`.

mod chain;
mod checkpoint;
mod commit;
mod dedup;
mod dir_lock;
mod durability;
mod error;
mod import;
mod open;
mod reader;
mod record;
mod segment;
mod space;
mod types;
mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

pub use crate::domain::query::{ChainBreak, Verification};
pub use chain::{GENESIS_HASH, Hash, next_hash};
pub use dedup::{DedupStats, RunMemory};
pub use dir_lock::wait_for_sled;
pub use dir_lock::{DirLock, LOCK_FILE};
pub use durability::{create_dir_durably, sync_dir};
pub use error::{AppendError, StoreError};
pub use import::{ImportedEvent, import};
pub use open::AcknowledgedHead;
pub(crate) use open::{OpenSledError, open_sled};
use open::{Opened, check_acknowledged};
pub use reader::{ReadEvents, decode_record};
pub use record::{encode_payload, recorded_at_field};
pub use segment::{read_varint, write_varint};
pub use space::{room_above_guard, room_beside_guard};
pub use types::{
    AppendRequest, Clock, CommitListener, Committed, DEFAULT_DEDUP_MEMORY_BYTES,
    DEFAULT_MIN_FREE_BYTES, DurationCounts, FORMAT_KEY, FORMAT_VERSION, LogHead, META_TREE,
    Outcome, SEGMENTS_TREE, SYNC_BUCKETS_MICROS, StoreOptions, StoreStats, StoredEvent,
};

use commit::{Flusher, Publisher, Syncer};
use dedup::{DedupIndex, EventIdHasher};
use writer::{PreparedEvents, Reply, WriteRequest, Writer};

/// Requests waiting for the writer. Bounded so that callers feel back-pressure instead of
/// the queue growing without limit while a slow disk flushes.
const QUEUE_CAPACITY: usize = 1024;

/// Applied groups waiting for the flusher, and flushed ones for the syncer. Small: groups
/// waiting here are written but not durable, and while it is full the stage before lets
/// requests gather into larger groups.
const PIPELINE_DEPTH: usize = 2;

/// Batches of durable groups waiting for the publisher (the read models). Small: their
/// callers wait, and while it is full the syncer lets groups gather into larger fsyncs.
const PUBLISH_DEPTH: usize = 2;

/// Requests of at most this many events are prepared (encoded) on the calling async task;
/// larger ones on the blocking pool, so an async task never spends more than about 50 µs
/// here.
const INLINE_PREPARE_EVENTS: usize = 64;

/// The event log. Cheap to clone; all clones share one writer.
///
/// Reads, `head`, `seq_at` and `verify` may run on any thread while appends continue;
/// they see only committed (flushed) events.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

/// State shared by the handles and the writer thread.
struct Shared {
    dir: PathBuf,
    /// The tree for readers; `None` once closed, so that closing releases the directory
    /// as soon as live iterators are gone.
    segments: RwLock<Option<sled::Tree>>,
    /// The committed head; the writer moves it after each flush.
    head: RwLock<LogHead>,
    /// The ids within the window. The writer adds a group's ids when it decides it, so
    /// entries beyond the committed head are not durable yet: lookups skip them.
    dedup: Mutex<DedupIndex>,
    /// The dedup index's hasher, for callers to key their ids without the lock.
    id_hasher: EventIdHasher,
    listeners: RwLock<Vec<Arc<dyn CommitListener>>>,
    /// Set when a write or flush failed; from then on every append fails.
    failed: AtomicBool,
    flushes: AtomicU64,
    segments_written: AtomicU64,
    events_written: AtomicU64,
    requests_answered: AtomicU64,
    groups_committed: AtomicU64,
    /// Flushes' durations per bucket of [`SYNC_BUCKETS_MICROS`], and their sum.
    sync_buckets: [AtomicU64; SYNC_BUCKETS_MICROS.len()],
    sync_micros: AtomicU64,
}

impl Shared {
    /// Notes a flush that took `took` to make its groups durable.
    fn synced(&self, took: std::time::Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = SYNC_BUCKETS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(SYNC_BUCKETS_MICROS.len() - 1);
        self.sync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sync_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` once closed. Appends clone the sender under the lock, so `close` only has to
    /// drop this one: the writer ends when every in-flight append has queued its request.
    sender: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    /// The writer, flusher, syncer, publisher, dedup spill and merge threads, joined by
    /// `close`.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Tells a dedup merge in progress to give up at close.
    stop_merges: Arc<AtomicBool>,
    /// The directory's lock; `None` once closed, released after the threads ended.
    dir_lock: Mutex<Option<DirLock>>,
}

impl EventLog {
    /// Opens the log in `dir`, creating it if needed: checks the format version, the
    /// tail of the chain and that the log reaches what its acknowledgement record says was
    /// acknowledged, opens the dedup index (its run files, or a rebuild from the segments
    /// inside the window), and starts the writer thread.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        Self::open_checked(dir, options, None)
    }

    /// [`EventLog::open`], also refusing a log that ends before, or differs from, a head
    /// that something else recorded as acknowledged (a read-model snapshot's seq and hash):
    /// [`StoreError::MissingEvents`], [`StoreError::Diverged`].
    pub fn open_checked(
        dir: &Path,
        options: StoreOptions,
        acknowledged: Option<AcknowledgedHead>,
    ) -> Result<Self, StoreError> {
        let opened = Opened::open(dir, &options)?;
        let record = opened.evidence;
        let record_source = || "the log's acknowledgement record".to_owned();
        // Acknowledged for sure: the log must reach it.
        check_acknowledged(
            &opened.segments,
            &opened.head,
            record.floor,
            record.floor_hash,
            record_source(),
        )?;
        // Committed last, maybe never acknowledged: only compared when the log reaches it.
        if opened.head.seq >= record.committed.seq {
            check_acknowledged(
                &opened.segments,
                &opened.head,
                record.committed.seq,
                Some(record.committed.hash),
                record_source(),
            )?;
        }
        if let Some(acknowledged) = acknowledged {
            check_acknowledged(
                &opened.segments,
                &opened.head,
                acknowledged.seq,
                Some(acknowledged.hash),
                acknowledged.evidence,
            )?;
        }
        Self::start(dir, opened, options)
    }

    /// Opens the log in `dir` for `kpi-server recover`: without comparing it with what was
    /// acknowledged, and with a damaged tail segment moved aside (into `set_aside`) instead
    /// of failing the open. Returns the log and the head its acknowledgement record holds
    /// as acknowledged for sure (with its hash when known).
    pub fn open_for_recovery(
        dir: &Path,
        options: StoreOptions,
        set_aside: &Path,
    ) -> Result<(Self, (u64, Option<Hash>)), StoreError> {
        let opened = Opened::open_repairing_tail(dir, &options, set_aside)?;
        let acknowledged = (opened.evidence.floor, opened.evidence.floor_hash);
        Ok((Self::start(dir, opened, options)?, acknowledged))
    }

    fn start(dir: &Path, opened: Opened, options: StoreOptions) -> Result<Self, StoreError> {
        let Opened {
            db,
            segments,
            head,
            disk,
            checkpoint,
            evidence: _,
            dir_lock,
        } = opened;
        let checkpoint = checkpoint.spawn().map_err(StoreError::Spawn)?;
        let (dedup, runs) = dedup::open(dir, &segments, &head, &options)?;
        let stats = dedup.stats();
        tracing::info!(
            dir = %dir.display(),
            head_seq = head.seq,
            dedup_ids_in_memory = stats.memory_ids,
            dedup_ids_spilled = stats.spilled_ids,
            dedup_runs = stats.runs,
            "event log opened"
        );

        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            segments: RwLock::new(Some(segments.clone())),
            head: RwLock::new(head),
            id_hasher: dedup.hasher().clone(),
            dedup: Mutex::new(dedup),
            listeners: RwLock::new(Vec::new()),
            failed: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            segments_written: AtomicU64::new(0),
            events_written: AtomicU64::new(0),
            requests_answered: AtomicU64::new(0),
            groups_committed: AtomicU64::new(0),
            sync_buckets: Default::default(),
            sync_micros: AtomicU64::new(0),
        });
        let background = Arc::new(dedup::Background::new(runs, Arc::clone(&shared)));
        let (spill_sender, spill_receiver) = std::sync::mpsc::channel();
        let (merge_sender, merge_receiver) = std::sync::mpsc::sync_channel(1);
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let (applied_sender, applied_receiver) = std::sync::mpsc::sync_channel(PIPELINE_DEPTH);
        let (flushed_sender, flushed_receiver) = std::sync::mpsc::sync_channel(PIPELINE_DEPTH);
        let (durable_sender, durable_receiver) = std::sync::mpsc::sync_channel(PUBLISH_DEPTH);
        let flusher = Flusher::new(db, Arc::clone(&shared), flushed_sender);
        let syncer = Syncer::new(disk, checkpoint, head, Arc::clone(&shared), durable_sender);
        let publisher = Publisher::new(Arc::clone(&shared));
        let writer = Writer::new(
            segments,
            Arc::clone(&shared),
            head,
            writer::Settings {
                clock: options.clock,
                space: space::DiskSpace::open(dir, options.min_free_bytes)?,
                legacy_layout: options.legacy_layout,
            },
            applied_sender,
            spill_sender,
        );
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(StoreError::Spawn)
        };
        let publisher = spawn(
            "kpi-log-publish",
            Box::new(move || publisher.run(durable_receiver)),
        )?;
        // If a later stage cannot start, the earlier ones end when their channels close.
        let syncer = spawn(
            "kpi-log-sync",
            Box::new(move || syncer.run(flushed_receiver)),
        )?;
        let flusher = spawn(
            "kpi-log-flush",
            Box::new(move || flusher.run(applied_receiver)),
        )?;
        let merger = {
            let background = Arc::clone(&background);
            let segments = read(&shared.segments).clone().ok_or(StoreError::Closed)?;
            spawn(
                "kpi-dedup-merge",
                Box::new(move || {
                    crate::priority::lower_this_thread();
                    background.run_merges(&merge_receiver, &segments);
                }),
            )?
        };
        let spiller = {
            let background = Arc::clone(&background);
            spawn(
                "kpi-dedup-spill",
                Box::new(move || background.run_spills(&spill_receiver, &merge_sender)),
            )?
        };
        let writer = spawn("kpi-log-writer", Box::new(move || writer.run(receiver)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                sender: Mutex::new(Some(sender)),
                threads: Mutex::new(vec![writer, flusher, syncer, publisher, spiller, merger]),
                stop_merges: Arc::clone(&background.stop),
                dir_lock: Mutex::new(Some(dir_lock)),
            }),
        })
    }

    /// Registers a listener for committed events. Register before the first append:
    /// a listener added later misses the groups committed before.
    pub fn add_listener(&self, listener: Arc<dyn CommitListener>) {
        write(&self.inner.shared.listeners).push(listener);
    }

    /// Appends the events of `request` atomically and returns one outcome per event, in
    /// order, once they are durable. Encoding runs off the async executor for large
    /// requests; waiting for the group commit does not block it.
    pub async fn append(&self, request: AppendRequest) -> Result<Vec<Outcome>, AppendError> {
        let AppendRequest {
            events,
            validation_unchanged_since: guard,
            actor,
        } = request;
        let hasher = self.inner.shared.id_hasher.clone();
        let (events, prepared) = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if events.len() > INLINE_PREPARE_EVENTS => runtime
                .spawn_blocking(move || {
                    let prepared = PreparedEvents::prepare(&events, actor.as_deref(), &hasher);
                    (events, prepared)
                })
                .await
                .map_err(|_| StoreError::WriterStopped)?,
            _ => {
                let prepared = PreparedEvents::prepare(&events, actor.as_deref(), &hasher);
                (events, prepared)
            }
        };
        let sender = self.sender()?;
        let (reply, replied) = oneshot::channel();
        let request = WriteRequest {
            events,
            prepared,
            guard,
            reply,
        };
        sender.send(request).await.map_err(|_| StoreError::Closed)?;
        drop(sender);
        let reply = replied.await.map_err(|_| StoreError::WriterStopped)?;
        finish(reply)
    }

    /// [`EventLog::append`] for synchronous code (tests, benches, tools). Blocks the
    /// thread until the group commit; must not be called on an async executor thread
    /// (tokio panics if it is).
    pub fn append_blocking(&self, request: AppendRequest) -> Result<Vec<Outcome>, AppendError> {
        let prepared = PreparedEvents::prepare(
            &request.events,
            request.actor.as_deref(),
            &self.inner.shared.id_hasher,
        );
        let sender = self.sender()?;
        let (reply, replied) = oneshot::channel();
        let request = WriteRequest {
            events: request.events,
            prepared,
            guard: request.validation_unchanged_since,
            reply,
        };
        sender
            .blocking_send(request)
            .map_err(|_| StoreError::Closed)?;
        drop(sender);
        let reply = replied
            .blocking_recv()
            .map_err(|_| StoreError::WriterStopped)?;
        finish(reply)
    }

    /// The committed head: the last durable event.
    pub fn head(&self) -> LogHead {
        *read(&self.inner.shared.head)
    }

    /// The committed events with `from_seq <= seq <= to_seq`, in order, as a blocking
    /// iterator (use it from a blocking thread in async code). Events appended after the
    /// call are not included. Each segment's hashes are checked before any of its events
    /// is yielded; damage ends the iteration with an error.
    pub fn read(&self, from_seq: u64, to_seq: u64) -> ReadEvents {
        let head = self.head();
        match self.tree() {
            Ok(tree) => ReadEvents::new(tree, from_seq, to_seq.min(head.seq)),
            Err(error) => ReadEvents::failed(error),
        }
    }

    /// The last seq recorded at or before `recorded_at` (0 if none), for "as of" queries.
    /// Blocking: a binary search over the segments.
    pub fn seq_at(&self, recorded_at: DateTime<Utc>) -> Result<u64, StoreError> {
        let head = self.head();
        reader::seq_at(&self.tree()?, head.seq, recorded_at)
    }

    /// The chain hash after `seq` (at most the committed head). Blocking.
    pub fn hash_at(&self, seq: u64) -> Result<Hash, StoreError> {
        let head = self.head();
        if seq > head.seq {
            return Err(StoreError::Corrupt {
                seq,
                reason: format!("beyond the head seq {}", head.seq),
            });
        }
        reader::hash_at(&self.tree()?, seq)
    }

    /// Forgets the acknowledgement record, so that the next open takes the log as it is
    /// (`kpi-server recover --accept-other-history`).
    pub fn forget_acknowledged(&self) -> Result<(), StoreError> {
        let dir = &self.inner.shared.dir;
        let path = dir.join(checkpoint::CHECKPOINT_FILE);
        std::fs::remove_file(&path)
            .and_then(|()| durability::sync_dir(dir))
            .map_err(|source| StoreError::Io { path, source })
    }

    /// The seq of the committed measurement with `event_id`, if it is inside the dedup
    /// window.
    pub fn find_event_id(&self, event_id: &str) -> Option<u64> {
        let head = self.head().seq;
        let tree = self.tree().ok()?;
        lock(&self.inner.shared.dedup)
            .get_id(event_id, &tree)
            .filter(|seq| *seq <= head)
    }

    /// The sizes of the dedup index (ids in memory and in run files, memory held).
    pub fn dedup_stats(&self) -> DedupStats {
        lock(&self.inner.shared.dedup).stats()
    }

    /// The memory the dedup index's run files hold, kept up to date as runs are written,
    /// merged and dropped (the read models' bucket budget gives way to it).
    pub fn dedup_run_memory(&self) -> RunMemory {
        lock(&self.inner.shared.dedup).run_memory()
    }

    /// Recomputes the whole chain up to the committed head at call time: keys, seq
    /// contiguity, prev_hash links, head hashes, that every record decodes, and that
    /// recorded_at never decreases. Blocking; runs while appends continue. Damage is a
    /// [`ChainBreak`] in the result; `Err` is for I/O failures.
    pub fn verify(&self) -> Result<Verification, StoreError> {
        let head = self.head();
        verify::verify(&self.tree()?, &head)
    }

    /// Counters of the writer since open.
    pub fn stats(&self) -> StoreStats {
        let shared = &self.inner.shared;
        StoreStats {
            flushes: shared.flushes.load(Ordering::Relaxed),
            segments: shared.segments_written.load(Ordering::Relaxed),
            events: shared.events_written.load(Ordering::Relaxed),
            requests: shared.requests_answered.load(Ordering::Relaxed),
            groups: shared.groups_committed.load(Ordering::Relaxed),
            sync: DurationCounts {
                buckets: std::array::from_fn(|bucket| {
                    shared.sync_buckets[bucket].load(Ordering::Relaxed)
                }),
                sum_micros: shared.sync_micros.load(Ordering::Relaxed),
            },
        }
    }

    /// Stops accepting appends, commits what is already queued, stops the writer thread
    /// and releases the data directory (once iterators from `read` are dropped). Later
    /// appends and reads return [`StoreError::Closed`]. Blocks until the writer is done;
    /// call it from a blocking thread in async code. Closing twice is fine.
    ///
    /// Dropping the last handle closes too; acknowledged events are durable either way.
    pub fn close(&self) -> Result<(), StoreError> {
        self.inner.close()
    }

    fn sender(&self) -> Result<mpsc::Sender<WriteRequest>, StoreError> {
        lock(&self.inner.sender).clone().ok_or(StoreError::Closed)
    }

    fn tree(&self) -> Result<sled::Tree, StoreError> {
        read(&self.inner.shared.segments)
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// A read-only handle that does not keep the log open: for commit listeners, which
    /// the log itself holds, so a full handle there would keep the log alive forever.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: Arc::downgrade(&self.inner.shared),
        }
    }
}

/// Reads the log without keeping it open; see [`EventLog::reader`]. Once the log is closed
/// or dropped, reads fail with [`StoreError::Closed`].
#[derive(Clone)]
pub struct LogReader {
    shared: std::sync::Weak<Shared>,
}

impl LogReader {
    /// As [`EventLog::read`].
    pub fn read(&self, from_seq: u64, to_seq: u64) -> ReadEvents {
        let Some(shared) = self.shared.upgrade() else {
            return ReadEvents::failed(StoreError::Closed);
        };
        let head = *read(&shared.head);
        match read(&shared.segments).clone() {
            Some(tree) => ReadEvents::new(tree, from_seq, to_seq.min(head.seq)),
            None => ReadEvents::failed(StoreError::Closed),
        }
    }

    /// As [`EventLog::hash_at`].
    pub fn hash_at(&self, seq: u64) -> Result<Hash, StoreError> {
        let shared = self.shared.upgrade().ok_or(StoreError::Closed)?;
        let head = *read(&shared.head);
        if seq > head.seq {
            return Err(StoreError::Corrupt {
                seq,
                reason: format!("beyond the head seq {}", head.seq),
            });
        }
        let tree = read(&shared.segments).clone().ok_or(StoreError::Closed)?;
        reader::hash_at(&tree, seq)
    }
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("dir", &self.inner.shared.dir)
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn close(&self) -> Result<(), StoreError> {
        // Dropping the last sender lets the writer drain the queue and end; its end lets
        // the flusher finish the groups in flight and end, its end the syncer, and so on.
        drop(lock(&self.sender).take());
        self.stop_merges.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *lock(&self.threads));
        let mut panicked = false;
        for thread in threads {
            panicked |= thread.join().is_err();
        }
        write(&self.shared.segments).take();
        // Nothing of this log writes any more: another open may take the directory.
        drop(lock(&self.dir_lock).take());
        if panicked {
            Err(StoreError::WriterStopped)
        } else if self.shared.failed.load(Ordering::Acquire) {
            Err(StoreError::WriterFailed)
        } else {
            Ok(())
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            tracing::error!(%error, "closing the event log failed");
        }
    }
}

/// The result of a reply; the spent request is freed here, on the caller's thread.
fn finish(reply: Reply) -> Result<Vec<Outcome>, AppendError> {
    let Reply {
        result,
        spent: (events, prepared),
    } = reply;
    drop(prepared);
    match result {
        Err(AppendError::ValidationStale { .. }) => Err(AppendError::ValidationStale { events }),
        other => other,
    }
}

// A panic while a lock is held leaves consistent data here (every critical section is a
// single assignment or a map update), so poisoning is ignored rather than spread.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
