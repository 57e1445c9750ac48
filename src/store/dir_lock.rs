//! The log directory's lock: one open log per directory, across processes and within one.
//!
//! An exclusive, non-blocking advisory lock (`flock`) on `<log-dir>/lock`, taken before
//! anything in the directory is changed or sled is opened, and held by the open log until
//! it is closed or dropped. A second server on the same data directory is refused at once
//! with [`StoreError::AlreadyInUse`] (a typed `EWOULDBLOCK`, not an error message's text).
//! The lock file is created once and never removed: removing it could let two openers
//! lock two different files of the same name.
//!
//! sled keeps a lock of its own on its `db` file, which its background threads release a
//! moment after the last handle of a database is dropped. With this lock held, that lock
//! can only be held by a handle of this process that is closing (or by a program that
//! opened the sled files directly), so [`wait_for_sled`] waits for it, also by `flock`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};
use rustix::io::Errno;

use super::StoreError;

/// Name of the lock file inside the log directory.
pub const LOCK_FILE: &str = "lock";

/// sled 0.34's data file, which sled locks with `flock` while a database is open.
const SLED_DATA_FILE: &str = "db";

/// How often a wait for sled's lock tries again.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// The held lock of a log directory; released when dropped (the file is closed).
#[derive(Debug)]
pub struct DirLock {
    /// Open for as long as the lock is held: closing the file releases the `flock`.
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist), creating its lock file if needed.
    /// [`StoreError::AlreadyInUse`] when another open log (in any process) holds it.
    pub fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(Errno::WOULDBLOCK) => Err(StoreError::AlreadyInUse {
                path: dir.to_owned(),
            }),
            Err(errno) => Err(StoreError::Io {
                path,
                source: errno.into(),
            }),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Waits up to `patience` until no handle holds sled's own lock on the database in
/// `sled_dir` (a new directory has none); whether it is free. Call it with the
/// directory's [`DirLock`] held, so that only a closing handle can hold sled's lock.
pub fn wait_for_sled(sled_dir: &Path, patience: Duration) -> std::io::Result<bool> {
    let file = match File::open(sled_dir.join(SLED_DATA_FILE)) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(error) => return Err(error),
    };
    let deadline = Instant::now() + patience;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            // Free: closing `file` releases this probe's lock before sled takes its own.
            Ok(()) => return Ok(true),
            Err(Errno::WOULDBLOCK) if Instant::now() < deadline => std::thread::sleep(RETRY_EVERY),
            Err(Errno::WOULDBLOCK) => return Ok(false),
            Err(errno) => return Err(errno.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_of_a_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert!(first.path().ends_with(LOCK_FILE));
        let error = DirLock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(&error, StoreError::AlreadyInUse { path } if path == dir.path()),
            "{error:?}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn sled_lock_is_waited_for_until_its_handle_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        assert!(wait_for_sled(dir.path(), Duration::ZERO).unwrap());
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .unwrap();
        assert!(!wait_for_sled(dir.path(), Duration::from_millis(50)).unwrap());
        drop(db);
        assert!(wait_for_sled(dir.path(), Duration::from_secs(10)).unwrap());
    }
}
