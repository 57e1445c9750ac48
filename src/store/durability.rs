//! What the log adds to sled so that an acknowledged event survives a power cut, not only a
//! killed process.
//!
//! sled 0.34's `flush` writes its buffers and calls `sync_file_range`, which neither
//! flushes the disk's write cache nor the file's metadata (sled issues #1452, #1351); it
//! never fsyncs its blob files or any directory. So after sled's flush and before any
//! caller hears back, [`DiskSync::sync`] makes durable, in this order:
//!
//! 1. every blob file sled created since the last sync, then the `blobs/` directory (the log
//!    keeps its segments small enough that sled writes no blobs, but a directory written by
//!    an older build has leaves of large segments, and sled rewrites those as blobs until
//!    they split);
//! 2. the log directory itself, when a name in it changed since the last sync (inotify
//!    says): sled's snapshot files (`snap.*`, written, fsynced, renamed and replaced by
//!    sled) and its other files;
//! 3. the `db` file (fdatasync): sled's log, where every segment lives.
//!
//! The directory comes before the file: whenever sled's log is durable, the snapshot
//! names sled wrote before it are too. sled's own periodic flusher is switched off (see
//! `open_db`) for the same reason: it would make the file durable without the directory.
//!
//! At open, before sled reads the directory, [`remove_unfinished_snapshots`] deletes sled
//! snapshot files that never finished (`snap.*.generating`): sled renames one only after
//! fsyncing it, but it lists the unfinished ones among its snapshots, and one cut short
//! (a full disk, a power cut) made every later open fail with "Read corrupted data".

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::OwnedFd;
use rustix::fs::inotify;

/// sled's data file inside the log directory.
pub const DB_FILE: &str = "db";
/// sled's directory of blob files inside the log directory.
const BLOBS_DIR: &str = "blobs";
/// Suffix of a sled snapshot file that was not finished.
const UNFINISHED_SNAPSHOT: &str = ".generating";

/// Deletes the sled snapshot files in `log_dir` that were never finished; returns how many.
/// Run before sled opens the directory.
pub fn remove_unfinished_snapshots(log_dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(log_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let name = entry?.file_name();
        let text = name.to_string_lossy();
        if text.starts_with("snap.") && text.ends_with(UNFINISHED_SNAPSHOT) {
            std::fs::remove_file(log_dir.join(&name))?;
            tracing::warn!(file = %text, "removed an unfinished sled snapshot");
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(log_dir)?;
    }
    Ok(removed)
}

/// fsyncs a directory, so that the names created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, and makes each new name durable in its parent.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(error) => return Err(error),
    }
    sync_dir(dir)?;
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// The files of an open sled directory that must be synced before an acknowledgement.
pub struct DiskSync {
    db: File,
    /// The log directory: fsynced when a name in it changed (sled's snapshots).
    log_dir: DirWatch,
    /// The blob directory: new files fsynced, then the directory.
    blobs: DirWatch,
}

impl DiskSync {
    /// After sled opened `log_dir`: makes what is already there durable once (sled's
    /// `conf`, its `db`, every blob file, the blob and log directories and the log
    /// directory's name in its parent), and from then on watches for new blob files.
    pub fn open(log_dir: &Path) -> io::Result<Self> {
        let blobs = DirWatch::open(&log_dir.join(BLOBS_DIR), true)?;
        let log_dir_watch = DirWatch::open(log_dir, false)?;
        for entry in std::fs::read_dir(log_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        if let Some(parent) = log_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(Self {
            db: File::open(log_dir.join(DB_FILE))?,
            log_dir: log_dir_watch,
            blobs,
        })
    }

    /// Makes everything sled wrote so far durable: new blob files and their directory, the
    /// log directory, then sled's `db` file. Call after sled's flush, before answering.
    pub fn sync(&self) -> io::Result<()> {
        self.blobs.sync_changes()?;
        self.log_dir.sync_changes()?;
        self.db.sync_data()
    }
}

/// A directory and the names changed in it since its last sync, from inotify: a
/// directory that did not change is not fsynced again.
struct DirWatch {
    dir: PathBuf,
    /// Directory handle, fsynced after its new files.
    handle: File,
    inotify: OwnedFd,
    /// Whether new files are fsynced too (blobs, which sled never syncs), or only the
    /// directory (sled fsyncs its snapshot files itself).
    sync_files: bool,
}

impl DirWatch {
    /// Starts watching `dir` (created if missing), then fsyncs it (and, with `sync_files`,
    /// every file in it): a change between the two is both seen and synced, never neither.
    fn open(dir: &Path, sync_files: bool) -> io::Result<Self> {
        create_dir_durably(dir)?;
        let inotify =
            inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &inotify,
            dir,
            inotify::WatchFlags::CREATE
                | inotify::WatchFlags::CLOSE_WRITE
                | inotify::WatchFlags::MOVED_TO
                | inotify::WatchFlags::MOVED_FROM
                | inotify::WatchFlags::DELETE,
        )?;
        let watch = Self {
            dir: dir.to_owned(),
            handle: File::open(dir)?,
            inotify,
            sync_files,
        };
        if sync_files {
            watch.sync_all_files()?;
        } else {
            watch.handle.sync_all()?;
        }
        Ok(watch)
    }

    /// fsyncs what changed since the last call: the files named (when `sync_files`; one
    /// already deleted again needs nothing), then the directory.
    fn sync_changes(&self) -> io::Result<()> {
        let mut names: HashSet<OsString> = HashSet::new();
        let mut overflowed = false;
        let mut buffer = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.inotify, &mut buffer);
        loop {
            match reader.next() {
                Ok(event) => {
                    if event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW) {
                        overflowed = true;
                    } else if let Some(name) = event.file_name() {
                        names.insert(OsStr::from_bytes(name.to_bytes()).to_owned());
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(error) => return Err(error.into()),
            }
        }
        if overflowed && self.sync_files {
            // More events than the kernel queues: sync them all instead.
            self.sync_all_files()?;
        } else if overflowed || !names.is_empty() {
            if self.sync_files {
                for name in &names {
                    match File::open(self.dir.join(name)) {
                        Ok(file) => file.sync_all()?,
                        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                        Err(error) => return Err(error),
                    }
                }
            }
            self.handle.sync_all()?;
        }
        Ok(())
    }

    /// fsyncs every file in the directory, then the directory.
    fn sync_all_files(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            match File::open(entry.path()) {
                Ok(file) => file.sync_all()?,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        self.handle.sync_all()
    }
}
