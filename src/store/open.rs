//! Opening the log: the free-space check, the directory's lock, sled's open (waiting for a
//! closing handle's lock, catching sled's panics on damaged files), the format check, the
//! tail check and the acknowledgement record's evidence, before the log's threads start.

use std::path::Path;

use super::chain::Hash;
use super::checkpoint::Acknowledged;
use super::{
    DirLock, FORMAT_KEY, FORMAT_VERSION, LogHead, META_TREE, SEGMENTS_TREE, StoreError,
    StoreOptions,
};
use super::{checkpoint, dir_lock, durability, reader, segment, space};

/// A head recorded as acknowledged outside the log, for [`EventLog::open_checked`](super::EventLog::open_checked).
#[derive(Debug, Clone)]
pub struct AcknowledgedHead {
    /// The log must reach this seq...
    pub seq: u64,
    /// ...with this chain hash there.
    pub hash: Hash,
    /// What recorded it, for the error (e.g. "the read-model snapshot").
    pub evidence: String,
}

/// Refuses the log in `tree` when it ends before `seq` or holds another chain hash than
/// `hash` there.
pub(super) fn check_acknowledged(
    tree: &sled::Tree,
    head: &LogHead,
    seq: u64,
    hash: Option<Hash>,
    evidence: String,
) -> Result<(), StoreError> {
    if seq > head.seq {
        return Err(StoreError::MissingEvents {
            log_head: head.seq,
            acknowledged: seq,
            evidence,
        });
    }
    if let Some(hash) = hash
        && reader::hash_at(tree, seq)? != hash
    {
        return Err(StoreError::Diverged { seq, evidence });
    }
    Ok(())
}

/// A sled directory opened, synced and checked up to its tail, before the log's threads
/// start.
pub(super) struct Opened {
    pub(super) db: sled::Db,
    pub(super) segments: sled::Tree,
    pub(super) head: LogHead,
    pub(super) disk: durability::DiskSync,
    pub(super) checkpoint: checkpoint::Checkpoint,
    /// What the acknowledgement record held at open.
    pub(super) evidence: checkpoint::Evidence,
    /// The directory's lock, held from before sled was opened.
    pub(super) dir_lock: DirLock,
}

/// How long opening waits for sled's own lock after taking the directory's [`DirLock`].
/// sled's background threads release it shortly after the last handle of a database is
/// dropped, so a reopen in the same process right after a close can see it held for a
/// moment; longer, it is held by a handle still open (or a program that opened the sled
/// files directly) and reported after this wait.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// sled's own cache of tree pages. Its default (1 GiB) filled with the segments a long
/// ingest had written, which nothing reads again soon: the read models answer queries, and
/// followers far behind read through the operating system's page cache. What it holds
/// counts against the memory budget (`--memory-budget`), so it is small.
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Opens sled in `dir` (whose [`DirLock`] the caller holds), telling a held lock apart
/// from other I/O errors.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    // No periodic flusher: it would make sled's file durable without the directory
    // (see `durability.rs`); the flusher and syncer make every group durable instead.
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(SLED_CACHE_BYTES)
        .flush_every_ms(None);
    match open_sled(dir, &config, LOCK_PATIENCE) {
        Ok(db) => Ok(db),
        Err(OpenSledError::Locked) => Err(StoreError::AlreadyInUse {
            path: dir.to_owned(),
        }),
        Err(OpenSledError::Sled(sled::Error::Corruption { .. })) => Err(StoreError::Corrupt {
            seq: 0,
            reason: format!(
                "sled cannot read its log in {}: a file of it is damaged; restore the data directory from a backup",
                dir.display()
            ),
        }),
        Err(OpenSledError::Sled(other)) => Err(StoreError::Sled(other)),
    }
}

/// Why [`open_sled`] failed.
#[derive(Debug)]
pub(crate) enum OpenSledError {
    /// sled's lock on its data file was still held when the patience ran out: a handle of
    /// this process that is not closed (or a program that opened the sled files directly)
    /// has the database open.
    Locked,
    /// Any other error of sled's open (I/O, a damaged file, an unsupported setting).
    Sled(sled::Error),
}

/// Opens the sled database `config` names in `dir` (its cache size and other settings
/// are the caller's). The caller holds the data directory's [`DirLock`], so no other
/// server has the database open; a handle of this process that is closing may still hold
/// sled's own lock for a moment, so this first waits up to `patience` for it
/// ([`dir_lock::wait_for_sled`]) and reports [`OpenSledError::Locked`] if it stays held.
/// Every other error is returned at once as [`OpenSledError::Sled`]. Shared by the log
/// ([`open_db`]) and the history index (`projection::history`).
///
/// sled 0.34 panics on some damaged files instead of returning an error (a power cut
/// that leaves an empty `conf` and no snapshot beside the data file makes its recovery
/// panic with "tried to serialize Uninitialized"). The panic is caught and returned as
/// [`OpenSledError::Sled`] (a `ReportableBug` with the panic's message), so the history
/// index is rebuilt and a damaged log fails its open with an error, not a crash.
pub(crate) fn open_sled(
    dir: &Path,
    config: &sled::Config,
    patience: std::time::Duration,
) -> Result<sled::Db, OpenSledError> {
    match dir_lock::wait_for_sled(dir, patience) {
        Ok(true) => {}
        Ok(false) => return Err(OpenSledError::Locked),
        Err(io) => return Err(OpenSledError::Sled(sled::Error::Io(io))),
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(sled::Error::ReportableBug(format!(
                "sled panicked while opening the database: {message}"
            )))
        })
        .map_err(OpenSledError::Sled)
}

/// Writes the format version into a new database, or checks the one that is there.
fn check_format(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(FORMAT_KEY)? {
        Some(version) if version.as_ref() == [FORMAT_VERSION] => Ok(()),
        Some(version) => Err(StoreError::UnsupportedFormat {
            path: dir.to_owned(),
            found: format!("{:?}", version.as_ref()),
            supported: FORMAT_VERSION,
        }),
        None if db.open_tree(SEGMENTS_TREE)?.is_empty() => {
            meta.insert(FORMAT_KEY, &[FORMAT_VERSION])?;
            db.flush()?;
            Ok(())
        }
        None => Err(StoreError::UnsupportedFormat {
            path: dir.to_owned(),
            found: "none (segments without a format version)".into(),
            supported: FORMAT_VERSION,
        }),
    }
}

/// The start of a panic's message: sled's can run to megabytes (a key dump).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    match text.char_indices().nth(PANIC_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// How much of a panic's message an error repeats.
const PANIC_MESSAGE_CHARS: usize = 80;

impl Opened {
    pub(super) fn open(dir: &Path, options: &StoreOptions) -> Result<Self, StoreError> {
        Self::open_with(dir, options, reader::load_head)
    }

    /// As `open`, but a tail segment that fails its check is moved aside into
    /// `set_aside` (as a file named after its seqs) and the one before it becomes the tail.
    pub(super) fn open_repairing_tail(
        dir: &Path,
        options: &StoreOptions,
        set_aside: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, options, |tree| {
            loop {
                match reader::load_head(tree) {
                    Ok(head) => return Ok(head),
                    Err(StoreError::Corrupt { .. } | StoreError::CorruptSegment { .. }) => {
                        let Some((key, value)) = tree.last()? else {
                            return Ok(LogHead::EMPTY);
                        };
                        durability::create_dir_durably(set_aside).map_err(|source| {
                            StoreError::Io {
                                path: set_aside.to_owned(),
                                source,
                            }
                        })?;
                        let file =
                            set_aside.join(format!("segment-{}.bin", segment::describe_key(&key)));
                        std::fs::write(&file, &value)
                            .and_then(|()| std::fs::File::open(&file)?.sync_all())
                            .and_then(|()| durability::sync_dir(set_aside))
                            .map_err(|source| StoreError::Io {
                                path: file.clone(),
                                source,
                            })?;
                        tracing::warn!(
                            segment = %segment::describe_key(&key),
                            file = %file.display(),
                            "moved a damaged tail segment aside"
                        );
                        tree.remove(&key)?;
                    }
                    Err(other) => return Err(other),
                }
            }
        })
    }

    /// Opens and checks the directory. sled 0.34 panics instead of returning an error when
    /// its own pages are gone (a deleted blob file of an older directory): that is damage
    /// too, reported as such instead of a crash.
    pub(super) fn open_with(
        dir: &Path,
        options: &StoreOptions,
        head_of: impl FnOnce(&sled::Tree) -> Result<LogHead, StoreError>,
    ) -> Result<Self, StoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open_unguarded(dir, options, head_of)
        }))
        .unwrap_or_else(|panic| {
            Err(StoreError::Corrupt {
                seq: 0,
                reason: format!(
                    "sled cannot read its own pages in {} ({}): a file of the log is missing or damaged; restore the data directory from a backup",
                    dir.display(),
                    panic_message(panic.as_ref())
                ),
            })
        })
    }

    pub(super) fn open_unguarded(
        dir: &Path,
        options: &StoreOptions,
        head_of: impl FnOnce(&sled::Tree) -> Result<LogHead, StoreError>,
    ) -> Result<Self, StoreError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        space::check_before_open(dir, options.min_free_bytes)?;
        durability::create_dir_durably(dir).map_err(io_error(dir))?;
        // Before anything else changes: another server may be using the directory.
        let dir_lock = DirLock::acquire(dir)?;
        durability::remove_unfinished_snapshots(dir).map_err(io_error(dir))?;
        let db = open_db(dir)?;
        check_format(&db, dir)?;
        let segments = db.open_tree(SEGMENTS_TREE)?;
        let head = head_of(&segments)?;
        // Whatever the head check changed (a tail moved aside) is made durable with the rest.
        db.flush()?;
        let disk = durability::DiskSync::open(dir).map_err(io_error(dir))?;
        let (checkpoint, evidence) = checkpoint::Checkpoint::open(
            dir,
            Acknowledged {
                seq: head.seq,
                hash: head.hash,
            },
        )
        .map_err(|error| match error {
            checkpoint::CheckpointError::Io(source) => StoreError::Io {
                path: dir.join(checkpoint::CHECKPOINT_FILE),
                source,
            },
            checkpoint::CheckpointError::Damaged => StoreError::Corrupt {
                seq: 0,
                reason: format!(
                    "the acknowledgement record {} is damaged, so the log cannot be checked against it; run `kpi-server recover`",
                    dir.join(checkpoint::CHECKPOINT_FILE).display()
                ),
            },
        })?;
        Ok(Self {
            db,
            segments,
            head,
            disk,
            checkpoint,
            evidence,
            dir_lock,
        })
    }
}

impl From<OpenSledError> for sled::Error {
    fn from(error: OpenSledError) -> Self {
        match error {
            OpenSledError::Locked => sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the database is still open",
            )),
            OpenSledError::Sled(error) => error,
        }
    }
}
