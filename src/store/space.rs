//! Disk space: a full disk refuses writes with an error the client can read, and never
//! wedges the log.
//!
//! sled 0.34 does not recover from a failed write: after one `ENOSPC` every later write of
//! that database fails, and a flush waiting on it could hang. So sled must never run out of
//! space. Before each group the writer asks [`DiskSpace::admit`], which
//!
//! - refuses the group ([`StoreError::DiskFull`]) while the file system has less than
//!   `min_free` bytes available: that room is kept for sled's own background writes, the
//!   read-model snapshot and the operator;
//! - keeps sled's `db` file preallocated (`fallocate` with `KEEP_SIZE`: blocks reserved
//!   beyond the end of the file, its size unchanged) well past what the group can add, so
//!   that another process filling the disk between the check and sled's write cannot make
//!   that write fail.
//!
//! Both are checked per group, so writes are accepted again as soon as space returns.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use super::StoreError;

/// How much sled writes, at most, per byte of segment: its log copies a leaf when it
/// rewrites it, and the rightmost leaf is rewritten as segments are appended.
const SLED_WRITE_FACTOR: u64 = 4;
/// Reserved beyond the end of sled's file beyond what the group needs; also the step by
/// which the reservation grows, so that it is not extended for every group.
const RESERVE_STEP: u64 = 16 * 1024 * 1024;

/// The free-space guard of one log directory.
pub struct DiskSpace {
    dir: PathBuf,
    /// sled's data file.
    db: File,
    min_free: u64,
    /// The end of the reservation past the end of sled's file (0 before the first).
    reserved_to: u64,
}

impl DiskSpace {
    /// The guard of the open sled directory `dir`, keeping `min_free` bytes available.
    pub fn open(dir: &Path, min_free: u64) -> Result<Self, StoreError> {
        let path = dir.join(super::durability::DB_FILE);
        // Written to only by sled; this handle reserves blocks (fallocate needs write access).
        let db = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path, source })?;
        Ok(Self {
            dir: dir.to_owned(),
            db,
            min_free,
            reserved_to: 0,
        })
    }

    /// Whether a group of about `bytes` of segments may be written; the refusal is an
    /// error for each of the group's requests.
    pub fn admit(&mut self, bytes: u64) -> Result<(), impl Fn() -> StoreError + use<>> {
        self.check(bytes).map_err(|refusal| {
            let (path, reason) = (self.dir.clone(), refusal.to_string());
            move || match &refusal {
                StoreError::DiskFull {
                    available,
                    min_free,
                    ..
                } => StoreError::DiskFull {
                    path: path.clone(),
                    available: *available,
                    min_free: *min_free,
                },
                _ => StoreError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(reason.clone()),
                },
            }
        })
    }

    fn check(&mut self, bytes: u64) -> Result<(), StoreError> {
        let db = &self.db;
        let available = available_bytes(db).map_err(|source| self.io_error(source))?;
        if available < self.min_free {
            return Err(self.full(available));
        }
        let end = db.metadata().map_err(|source| self.io_error(source))?.len();
        let needed = end
            .saturating_add(bytes.saturating_mul(SLED_WRITE_FACTOR))
            .saturating_add(RESERVE_STEP / 2);
        if needed > self.reserved_to {
            let from = self.reserved_to.max(end);
            let to = needed.saturating_add(RESERVE_STEP);
            match rustix::fs::fallocate(db, FallocateFlags::KEEP_SIZE, from, to - from) {
                Ok(()) => self.reserved_to = to,
                Err(rustix::io::Errno::NOSPC) => return Err(self.full(available)),
                // A file system without fallocate (some FUSE and network ones): the
                // available-space check above is all there is.
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                    self.reserved_to = to;
                }
                Err(error) => return Err(self.io_error(error.into())),
            }
        }
        Ok(())
    }

    fn full(&self, available: u64) -> StoreError {
        StoreError::DiskFull {
            path: self.dir.clone(),
            available,
            min_free: self.min_free,
        }
    }

    fn io_error(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.dir.clone(),
            source,
        }
    }
}

/// Bytes available to this process on the file system holding `file`.
fn available_bytes(file: &File) -> std::io::Result<u64> {
    let stats = rustix::fs::fstatvfs(file)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Refuses to open a log in `dir` while its file system has less than `min_free` bytes
/// available: opening writes (sled's recovery, a snapshot of its own) and a start that
/// fails half way on a full disk must not change the directory.
pub fn check_before_open(dir: &Path, min_free: u64) -> Result<(), StoreError> {
    // The directory may not exist yet: ask about the nearest one that does.
    let existing = dir
        .ancestors()
        .find(|candidate| candidate.is_dir())
        .unwrap_or(Path::new("."));
    let stats = rustix::fs::statvfs(existing).map_err(|error| StoreError::Io {
        path: existing.to_owned(),
        source: error.into(),
    })?;
    let available = stats.f_bavail.saturating_mul(stats.f_frsize);
    if available < min_free {
        return Err(StoreError::DiskFull {
            path: dir.to_owned(),
            available,
            min_free,
        });
    }
    Ok(())
}

/// Whether the file system of `dir` has room for `bytes` more of a derived file (the
/// dedup index's runs, the history index) beside the log's free-space minimum `min_free`
/// (see [`room_for`]); no room when its free space cannot be read.
pub fn room_beside_guard(dir: &Path, min_free: u64, bytes: u64) -> bool {
    available_in(dir).is_some_and(|available| room_for(available, min_free, bytes))
}

/// Bytes the file system of `dir` has free beyond twice the log's free-space minimum
/// `min_free`: what derived files may still write (see [`room_for`]); none when its free
/// space cannot be read.
pub fn room_above_guard(dir: &Path, min_free: u64) -> u64 {
    available_in(dir)
        .and_then(|available| room_above(available, min_free))
        .unwrap_or(0)
}

/// Bytes available to this process on the file system of `dir`; `None` when they cannot
/// be read.
fn available_in(dir: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(dir).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Whether `available` bytes leave room for `bytes` more while keeping twice the log's
/// free-space minimum free: `available >= 2 * min_free + bytes`. The writer's guard
/// refuses groups below the minimum; derived files stop well before it, so that the log
/// filling up to its guard never leaves less than the minimum free once the log stops,
/// and a restart is possible as soon as the space the log did not use is back. Until there
/// is room, their writers keep what they would write in memory.
fn room_for(available: u64, min_free: u64, bytes: u64) -> bool {
    room_above(available, min_free).is_some_and(|room| room >= bytes)
}

/// What `available` bytes leave beyond twice the log's free-space minimum; `None` when
/// they do not reach it.
fn room_above(available: u64, min_free: u64) -> Option<u64> {
    available.checked_sub(min_free.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_files_need_twice_the_minimum_free_beside_their_bytes() {
        let min_free = 64 * 1024 * 1024;
        assert!(room_for(2 * min_free + 4096, min_free, 4096));
        assert!(!room_for(2 * min_free + 4095, min_free, 4096));
        // Enough for the log's own guard, and for the bytes beside it, but not twice.
        assert!(!room_for(min_free + 4096, min_free, 4096));
        assert!(!room_for(2 * min_free - 1, min_free, 0));
        assert!(room_for(0, 0, 0));
        // Twice a huge minimum saturates instead of wrapping round to a small figure.
        assert!(!room_for(u64::MAX - 1, u64::MAX / 2 + 1, 0));
    }
}
