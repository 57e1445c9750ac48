//! The index's background work: the spill thread writes frozen parts as run files (then
//! the manifest, once the log is durable up to its seq), the merge thread merges runs and
//! drops the expired ones. Neither blocks the writer.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta};

use super::manifest::MANIFEST_FILE;
use super::mem::MemIndex;
use super::run::{self, Run, RunError, merged};
use super::{DedupIndex, RETRY_EVERY, RunSet};
use crate::store::chain::Hash;
use crate::store::{Shared, durability, lock, read, reader, space};

/// Merges `inputs` (runs of `runs`) into one, leaving out entries at or below
/// `drop_through`, and records it; the inputs' files are deleted. Gives up when `stop` is
/// set.
pub(super) fn merge(
    runs: &mut RunSet,
    inputs: &[Arc<Run>],
    drop_through: u64,
    stop: &AtomicBool,
) -> Result<(), RunError> {
    let number = runs.manifest.next_run;
    runs.manifest.next_run += 1;
    let merged = write_merged(&runs.dir, number, inputs, drop_through, stop, runs.min_free)?;
    install_merged(runs, inputs, merged)
}

fn write_merged(
    dir: &Path,
    number: u64,
    inputs: &[Arc<Run>],
    drop_through: u64,
    stop: &AtomicBool,
    min_free: u64,
) -> Result<Run, RunError> {
    let entries: u64 = inputs.iter().map(|run| run.entries).sum();
    let bytes: u64 = inputs.iter().map(|run| run.file_len).sum();
    if !space::room_beside_guard(dir, min_free, bytes) {
        return Err(RunError::Io(std::io::Error::other(
            "not enough free space beside the log's minimum to merge dedup runs",
        )));
    }
    let newest = inputs
        .iter()
        .map(|run| run.newest)
        .max()
        .unwrap_or(DateTime::UNIX_EPOCH);
    let stopped = || RunError::Io(std::io::Error::other("the log is closing"));
    let source = merged(inputs, drop_through).enumerate().map(|(i, entry)| {
        if i % 65_536 == 0 && stop.load(Ordering::Acquire) {
            return Err(stopped());
        }
        entry
    });
    run::write(dir, number, entries, newest, source)
}

fn install_merged(runs: &mut RunSet, inputs: &[Arc<Run>], merged: Run) -> Result<(), RunError> {
    if runs.abandoned {
        let _ = std::fs::remove_file(merged.path());
        return Ok(());
    }
    let merged = Arc::new(merged);
    let mut kept: Vec<Arc<Run>> = runs
        .runs
        .iter()
        .filter(|run| !inputs.iter().any(|input| input.number == run.number))
        .cloned()
        .collect();
    if merged.entries > 0 {
        kept.push(Arc::clone(&merged));
    }
    let mut manifest = runs.manifest.clone();
    manifest.runs = kept.iter().map(|run| (run.number, run.file_len)).collect();
    if let Err(error) = runs.store_manifest(manifest) {
        let _ = std::fs::remove_file(merged.path());
        return Err(error);
    }
    if merged.entries == 0 {
        let _ = std::fs::remove_file(merged.path());
    }
    runs.runs = kept;
    for input in inputs {
        let _ = std::fs::remove_file(input.path());
    }
    Ok(())
}

/// A frozen part for the spill thread, with the log position it covers.
pub struct SpillJob {
    part: Arc<MemIndex>,
    covered: (u64, Hash),
}

impl DedupIndex {
    /// Freezes the active part as of the writer's head `covered` for the spill thread.
    pub fn freeze_for_spill(&mut self, covered: (u64, Hash)) -> SpillJob {
        SpillJob {
            part: self.freeze(),
            covered,
        }
    }
}

/// The spill and merge threads of one log.
pub struct Background {
    runs: Arc<Mutex<RunSet>>,
    shared: Arc<Shared>,
    /// Set by `close`: a merge in progress gives up.
    pub stop: Arc<AtomicBool>,
}

impl Background {
    /// The threads' shared state.
    pub fn new(runs: RunSet, shared: Arc<Shared>) -> Self {
        Self {
            runs: Arc::new(Mutex::new(runs)),
            shared,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs the spill thread: writes each job's run, retrying failed ones, until the
    /// writer is gone and the jobs are done (or failed once more). Tells `merges` after
    /// each spill.
    pub fn run_spills(&self, jobs: &Receiver<SpillJob>, merges: &SyncSender<()>) {
        let mut pending: VecDeque<SpillJob> = VecDeque::new();
        let mut closing = false;
        while !closing || !pending.is_empty() {
            if !closing {
                match jobs.recv_timeout(RETRY_EVERY) {
                    Ok(job) => pending.push_back(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => closing = true,
                }
                pending.extend(jobs.try_iter());
            }
            let mut failed = false;
            while let Some(job) = pending.front() {
                if !self.wait_durable(job.covered.0) {
                    // The writer failed: what it froze may not be in the log.
                    pending.clear();
                    break;
                }
                let mut runs = lock(&self.runs);
                match runs.spill(&job.part, job.covered) {
                    Ok(()) => {
                        let installed = runs.runs.clone();
                        lock(&self.shared.dedup).install(installed, Some(&job.part));
                        drop(runs);
                        pending.pop_front();
                        let _ = merges.try_send(());
                    }
                    Err(error) => {
                        tracing::warn!(%error, "spilling dedup ids to disk failed; they stay in memory and the spill is retried");
                        failed = true;
                        break;
                    }
                }
            }
            if failed && closing {
                break;
            }
        }
    }

    /// Whether the log became durable up to `seq` (false when the writer failed first).
    fn wait_durable(&self, seq: u64) -> bool {
        loop {
            if read(&self.shared.head).seq >= seq {
                return true;
            }
            if self.shared.failed.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Runs the merge thread until the spill thread is gone: drops expired runs and merges
    /// while the policy asks for it.
    pub fn run_merges(&self, wake: &Receiver<()>, segments: &sled::Tree) {
        loop {
            match wake.recv_timeout(RETRY_EVERY) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Err(error) = self.maintain(segments) {
                tracing::warn!(%error, "maintaining the dedup runs failed; retried later");
            }
        }
    }

    fn maintain(&self, segments: &sled::Tree) -> Result<(), RunError> {
        let (damage_seen, window) = {
            let index = lock(&self.shared.dedup);
            (Arc::clone(&index.damage_seen), index.window)
        };
        if damage_seen.load(Ordering::Acquire) {
            let mut runs = lock(&self.runs);
            if !runs.abandoned {
                runs.abandoned = true;
                let path = runs.dir.join(MANIFEST_FILE);
                std::fs::remove_file(&path).and_then(|()| durability::sync_dir(&runs.dir))?;
                tracing::warn!(manifest = %path.display(), "removed the dedup manifest after damage: the next start rebuilds the index");
            }
            return Ok(());
        }
        let head = *read(&self.shared.head);
        let cutoff = head
            .recorded_at
            .and_then(|at| at.checked_sub_signed(window));
        if let Some(cutoff) = cutoff {
            let mut runs = lock(&self.runs);
            if runs.drop_expired(cutoff)? {
                let installed = runs.runs.clone();
                lock(&self.shared.dedup).install(installed, None);
            }
        }
        // Everything recorded before the cutoff is left out of a merge.
        let drop_through =
            match cutoff.and_then(|cutoff| cutoff.checked_sub_signed(TimeDelta::nanoseconds(1))) {
                Some(before) => reader::seq_at(segments, head.seq, before).unwrap_or(0),
                None => 0,
            };
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let (inputs, number, dir, min_free) = {
                let mut runs = lock(&self.runs);
                let Some(inputs) = runs.pick_merge() else {
                    return Ok(());
                };
                let number = runs.manifest.next_run;
                runs.manifest.next_run += 1;
                (inputs, number, runs.dir.clone(), runs.min_free)
            };
            let merged = write_merged(&dir, number, &inputs, drop_through, &self.stop, min_free)
                .inspect_err(|error| {
                    if matches!(error, RunError::Damaged(_)) {
                        damage_seen.store(true, Ordering::Release);
                    }
                })?;
            let mut runs = lock(&self.runs);
            install_merged(&mut runs, &inputs, merged)?;
            let installed = runs.runs.clone();
            lock(&self.shared.dedup).install(installed, None);
        }
    }
}
