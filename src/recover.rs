//! `kpi-server recover`: what an operator runs, on purpose, when the server refuses to start
//! because its log ends before events that were acknowledged (`StoreError::MissingEvents`).
//!
//! The events are gone from the log (sled's recovery stopped at damage, or an older `log/`
//! was put back), and the server will not guess. Recovery records the loss instead of
//! hiding it: one `EventsLost` event stands in each lost seq, so no acknowledged seq is
//! ever given to another event, replays show the range, and the chain continues from the
//! last seq the log still holds. A damaged tail segment is moved aside into
//! `<data-dir>/recovered/` first (its seqs count as lost). The read-model snapshot, which
//! still reflects the lost events, is removed, so the next start rebuilds the models from
//! the log. The acknowledged head and its chain hash are kept in the `EventsLost` events
//! for auditors.
//!
//! A log whose chain hash differs from the acknowledged one at the same seq is another
//! history, not a shorter one: recovery refuses it unless told to accept it
//! (`--accept-other-history`), which then only forgets the old evidence.

use std::path::Path;

use crate::domain::{Event, rfc3339};
use crate::projection::snapshot;
use crate::store::{AppendRequest, EventLog, StoreError, StoreOptions};
use crate::{Config, LOG_DIR, SNAPSHOT_DIR};

/// Where a damaged tail segment is moved, inside the data directory.
pub const SET_ASIDE_DIR: &str = "recovered";
/// Most `EventsLost` events appended in one request.
const LOST_PER_APPEND: u64 = 10_000;

/// What recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The last seq the log held when it was opened (after moving a damaged tail aside).
    pub log_head: u64,
    /// The last acknowledged seq, from the evidence.
    pub acknowledged: u64,
    /// The seqs recorded as lost, if any.
    pub lost: Option<(u64, u64)>,
    /// Whether a differing history was accepted.
    pub accepted_other_history: bool,
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.lost {
            Some((first, last)) => write!(
                f,
                "recorded seqs {first}..={last} as lost (the log held up to seq {}, seq {} was acknowledged); the next start rebuilds the read models from the log",
                self.log_head, self.acknowledged
            ),
            None if self.accepted_other_history => write!(
                f,
                "accepted the log as it is (head seq {}); the acknowledged history up to seq {} is forgotten",
                self.log_head, self.acknowledged
            ),
            None => write!(
                f,
                "nothing to recover: the log holds every acknowledged event (head seq {}, acknowledged {})",
                self.log_head, self.acknowledged
            ),
        }
    }
}

/// Why recovery stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The log could not be opened, read or appended to.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log is another history than the acknowledged one.
    #[error(
        "the log's chain hash at seq {seq} is not the acknowledged one: this is another history, not a shorter one. Restore the right data directory, or run recover with --accept-other-history to continue with this log"
    )]
    OtherHistory {
        /// The seq compared.
        seq: u64,
    },
}

/// Recovers the data directory of `config` (the server must not be running on it).
pub fn recover(config: &Config, accept_other_history: bool) -> Result<Recovery, RecoverError> {
    let data_dir = &config.data_dir;
    let snapshot_dir = data_dir.join(SNAPSHOT_DIR);
    let options = StoreOptions {
        min_free_bytes: config.min_free_bytes(),
        ..StoreOptions::default()
    };
    let snapshot_evidence = match snapshot::load_undecoded(&snapshot_dir) {
        Ok(Some(undecoded)) => Some((undecoded.snapshot.seq, Some(undecoded.snapshot.hash))),
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%error, "the read-model snapshot is unreadable; only the log's own record counts");
            None
        }
    };
    let (log, recorded) = EventLog::open_for_recovery(
        &data_dir.join(LOG_DIR),
        options,
        &data_dir.join(SET_ASIDE_DIR),
    )?;
    let (acknowledged, acknowledged_hash) = [Some(recorded), snapshot_evidence]
        .into_iter()
        .flatten()
        .max_by_key(|(seq, _)| *seq)
        .unwrap_or(recorded);
    let head = log.head();
    let mut recovery = Recovery {
        log_head: head.seq,
        acknowledged,
        lost: None,
        accepted_other_history: false,
    };
    if acknowledged > head.seq {
        let (first, last) = (head.seq + 1, acknowledged);
        let reason = format!(
            "lost after an acknowledgement: the readable log ended at seq {} but seq {last} was acknowledged; recorded by kpi-server recover at {}",
            head.seq,
            rfc3339(chrono::Utc::now())
        );
        let mut next = first;
        while next <= last {
            let end = last.min(next + LOST_PER_APPEND - 1);
            let events = (next..=end)
                .map(|_| Event::EventsLost {
                    first_seq: first,
                    last_seq: last,
                    reason: reason.clone(),
                    acknowledged_hash,
                })
                .collect();
            log.append_blocking(AppendRequest {
                events,
                validation_unchanged_since: None,
                ..Default::default()
            })
            .map_err(|error| match error {
                crate::store::AppendError::Store(store) => store,
                other => StoreError::Io {
                    path: data_dir.clone(),
                    source: std::io::Error::other(other.to_string()),
                },
            })?;
            next = end + 1;
        }
        recovery.lost = Some((first, last));
    } else if let Some(hash) = acknowledged_hash
        && log.hash_at(acknowledged)? != hash
    {
        if !accept_other_history {
            return Err(RecoverError::OtherHistory { seq: acknowledged });
        }
        log.forget_acknowledged()?;
        recovery.accepted_other_history = true;
    }
    log.close()?;
    if recovery.lost.is_some() || recovery.accepted_other_history {
        remove_snapshot(&snapshot_dir)?;
    }
    Ok(recovery)
}

/// Removes the read-model snapshot, durably.
fn remove_snapshot(dir: &Path) -> Result<(), StoreError> {
    snapshot::remove(dir).map_err(|source| StoreError::Io {
        path: dir.to_owned(),
        source,
    })
}
