//! The failures of the event log: one `thiserror` enum for the store, one for appends.

use std::path::PathBuf;

/// A failure of the event log itself (I/O, damaged data, lifecycle), as opposed to an
/// expected outcome such as a duplicate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory is locked by another open log (another process, or another
    /// `EventLog` in this one).
    #[error("another kpi-server is already using the data directory {}", path.display())]
    AlreadyInUse {
        /// The data directory.
        path: PathBuf,
    },
    /// sled reported an I/O or internal error.
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// The data directory was written by a build with another storage format.
    #[error("data directory {} has store format {found}, this build reads format {supported}", path.display())]
    UnsupportedFormat {
        /// The data directory.
        path: PathBuf,
        /// The format found, as stored.
        found: String,
        /// The format this build reads and writes.
        supported: u8,
    },
    /// A segment value cannot be parsed, or does not match its key.
    #[error("corrupt segment {key}: {reason}")]
    CorruptSegment {
        /// The segment's key: its first seq, or hex if the key itself is damaged.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The log is damaged at an event: a record that does not decode, a broken hash
    /// link or a gap.
    #[error("corrupt log at seq {seq}: {reason}")]
    Corrupt {
        /// The first seq found damaged (for a hash mismatch, the first seq of its segment).
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file system holding the log has less space available than the log keeps free:
    /// nothing of the request was stored, and writes are accepted again once space returns.
    #[error(
        "no space left on device: {available} bytes available for {}, and the log keeps {min_free} free",
        path.display()
    )]
    DiskFull {
        /// The log directory.
        path: PathBuf,
        /// Bytes available on its file system.
        available: u64,
        /// Bytes the log keeps free (`StoreOptions::min_free_bytes`).
        min_free: u64,
    },
    /// A file of the log could not be read, written or synced.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The readable log ends before events that were acknowledged: sled's recovery stopped
    /// at damage (a changed byte, a lost or cut blob file) or an older log was put back.
    /// The log is not opened, so no seq is ever given out twice.
    #[error(
        "the log ends at seq {log_head}, but events up to seq {acknowledged} were acknowledged ({evidence}): seqs {}..={acknowledged} are missing. Restore the data directory from a backup, or run `kpi-server recover` to record them as lost and continue",
        log_head + 1
    )]
    MissingEvents {
        /// The last seq the log holds.
        log_head: u64,
        /// The last seq that was acknowledged.
        acknowledged: u64,
        /// What says so.
        evidence: String,
    },
    /// The log holds other events than those acknowledged: its chain hash at `seq` is not
    /// the acknowledged one.
    #[error(
        "the log's chain hash at seq {seq} is not the acknowledged one ({evidence}): this is not the log that was acknowledged. Restore the right data directory"
    )]
    Diverged {
        /// The seq compared.
        seq: u64,
        /// What says so.
        evidence: String,
    },
    /// An earlier write or flush failed; nothing is appended any more, so no caller is
    /// ever told that a partially written group is stored.
    #[error("log writer stopped after an I/O error; restart the service")]
    WriterFailed,
    /// The writer or committer thread could not be started.
    #[error("could not start the log writer thread: {0}")]
    Spawn(std::io::Error),
    /// The writer thread ended without replying (it panicked).
    #[error("log writer thread stopped unexpectedly; restart the service")]
    WriterStopped,
    /// `close` was called: no appends are accepted any more.
    #[error("the event log is closed")]
    Closed,
}

/// Why an append was refused or failed. Duplicates are not errors: they are outcomes.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An event that affects validation (a definition, target, retirement or retraction)
    /// was appended after the seq the request was validated at
    /// (`AppendRequest::validation_unchanged_since`); nothing of the request is stored.
    /// Validate again against the current state and retry.
    #[error("a definition, target or retraction was stored after the request was validated")]
    ValidationStale {
        /// The request's events, handed back so the caller can validate them again
        /// without having kept a copy.
        events: Vec<crate::domain::Event>,
    },
    /// The log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
