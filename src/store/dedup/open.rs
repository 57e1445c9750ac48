//! Opening the index: the manifest and its runs checked against the log, the log after
//! what they cover read back into memory, or the whole index rebuilt from the log's
//! window when they cannot be used.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::background::merge;
use super::manifest::{MANIFEST_FILE, Manifest};
use super::run::{self, Run, RunError};
use super::{DEDUP_DIR, DedupIndex, EventIdHasher, FREEZE_EVENTS, RunSet};
use crate::store::chain::Hash;
use crate::store::{LogHead, StoreError, StoreOptions, durability, reader};

/// Opens the dedup index of the log in `log_dir` (whose segments are `tree`, head `head`):
/// takes the runs its manifest lists when they check out and reads the log after them,
/// else rebuilds from the window. A run found damaged while merging during that read
/// discards them all, and the index is rebuilt.
pub fn open(
    log_dir: &Path,
    tree: &sled::Tree,
    head: &LogHead,
    options: &StoreOptions,
) -> Result<(DedupIndex, RunSet), StoreError> {
    let dir = log_dir.join(DEDUP_DIR);
    durability::create_dir_durably(&dir).map_err(|source| StoreError::Io {
        path: dir.clone(),
        source,
    })?;
    match load(
        &dir,
        tree,
        head,
        options,
        usable_runs(&dir, tree, head, options),
    )? {
        Loaded::Ready(loaded) => Ok(*loaded),
        Loaded::Damaged(error) => {
            tracing::warn!(%error, dir = %dir.display(), "a dedup run was found damaged at start; rebuilding the index from the log's window");
            match load(&dir, tree, head, options, Ok(None))? {
                Loaded::Ready(loaded) => Ok(*loaded),
                // Runs written moments ago read back damaged: the disk itself is failing.
                Loaded::Damaged(error) => Err(StoreError::Io {
                    path: dir,
                    source: std::io::Error::other(error.to_string()),
                }),
            }
        }
    }
}

/// What [`load`] ends with.
enum Loaded {
    Ready(Box<(DedupIndex, RunSet)>),
    /// A merge found this damage in a run the manifest lists.
    Damaged(RunError),
}

/// Builds the index from `found` (the manifest and its runs, or why there are none) and
/// the log after what they cover.
fn load(
    dir: &Path,
    tree: &sled::Tree,
    head: &LogHead,
    options: &StoreOptions,
    found: Result<Option<UsableRuns>, String>,
) -> Result<Loaded, StoreError> {
    let memory_bytes = options.dedup_memory_bytes;
    let (mut index, mut runs) = match found {
        Ok(Some((manifest, opened))) => {
            let hasher = EventIdHasher::with_key(manifest.key);
            let mut index = DedupIndex::new(options.dedup_window, hasher, memory_bytes);
            index.install(opened.clone(), None);
            let runs = RunSet {
                dir: dir.to_owned(),
                manifest,
                runs: opened,
                min_free: options.min_free_bytes,
                abandoned: false,
            };
            (index, runs)
        }
        found => {
            if let Err(reason) = found
                && head.seq > 0
            {
                tracing::warn!(%reason, dir = %dir.display(), "the dedup index's run files cannot be used; rebuilding it from the log's window");
            }
            let hasher = EventIdHasher::default();
            let index = DedupIndex::new(options.dedup_window, hasher.clone(), memory_bytes);
            let runs = RunSet::fresh(dir, &hasher, options.dedup_window, options.min_free_bytes);
            (index, runs)
        }
    };
    remove_unlisted(
        dir,
        &runs.manifest,
        !index.runs.is_empty() || runs.manifest.covered_seq > 0,
    )
    .map_err(|source| StoreError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let after_seq = runs.manifest.covered_seq;
    let mut scanned = 0u64;
    // Cleared when a spill fails (no room beside the free-space minimum, say): the rest
    // of the read stays in memory, and the running index spills it later.
    let mut spilling = true;
    let mut damaged = None;
    reader::rebuild_dedup(
        tree,
        head,
        &mut index,
        after_seq,
        |index, last_seq, hash, events| {
            scanned += events;
            index.note_appended(events);
            if spilling && damaged.is_none() && index.should_freeze() {
                match spill_now(index, &mut runs, (last_seq, hash)) {
                    Ok(spilled) => spilling = spilled,
                    Err(error) => damaged = Some(error),
                }
            }
            Ok(())
        },
    )?;
    if let Some(error) = damaged {
        return Ok(Loaded::Damaged(error));
    }
    // A long read (a rebuild, or a log written before the runs existed) is recorded now,
    // so the next start does not read it again.
    if spilling
        && head.seq > runs.manifest.covered_seq
        && scanned >= FREEZE_EVENTS
        && let Err(error) = spill_now(&mut index, &mut runs, (head.seq, head.hash))
    {
        return Ok(Loaded::Damaged(error));
    }
    Ok(Loaded::Ready(Box::new((index, runs))))
}

/// Spills the active part on the opening thread, and merges while the policy asks;
/// whether the part was spilled. A spill that fails (no room for the run beside the log's
/// free-space minimum, say) leaves the ids in the active part, where the running index
/// spills them later: a start that may open the log must not fail for derived files. A
/// merge that fails is left to the merge thread, but one that finds a damaged run is the
/// error: the runs cannot be trusted.
fn spill_now(
    index: &mut DedupIndex,
    runs: &mut RunSet,
    covered: (u64, Hash),
) -> Result<bool, RunError> {
    if let Err(error) = runs.spill(&index.active, covered) {
        tracing::warn!(%error, dir = %runs.dir.display(), "cannot spill the dedup index at start; its ids stay in memory until the running index can");
        return Ok(false);
    }
    let part = index.freeze();
    index.install(runs.runs.clone(), Some(&part));
    while let Some(inputs) = runs.pick_merge() {
        match merge(runs, &inputs, 0, &AtomicBool::new(false)) {
            Ok(()) => index.install(runs.runs.clone(), None),
            Err(error @ RunError::Damaged(_)) => return Err(error),
            Err(error) => {
                tracing::warn!(%error, dir = %runs.dir.display(), "merging dedup runs at start failed; the merge thread retries");
                break;
            }
        }
    }
    Ok(true)
}

/// A manifest with its runs open.
type UsableRuns = (Manifest, Vec<Arc<Run>>);

/// The manifest in `dir` and its runs, open, when they can be used for this log;
/// `Ok(None)` when there is no manifest, `Err` with the reason when there is a bad one.
fn usable_runs(
    dir: &Path,
    tree: &sled::Tree,
    head: &LogHead,
    options: &StoreOptions,
) -> Result<Option<UsableRuns>, String> {
    let Some(manifest) = Manifest::load(dir)? else {
        return Ok(None);
    };
    if manifest.window_seconds < options.dedup_window.num_seconds() {
        return Err(format!(
            "the runs were kept for a window of {} s, shorter than the current one",
            manifest.window_seconds
        ));
    }
    if manifest.covered_seq > head.seq {
        return Err(format!(
            "the runs cover the log up to seq {}, but it ends at seq {}",
            manifest.covered_seq, head.seq
        ));
    }
    let hash = reader::hash_at(tree, manifest.covered_seq).map_err(|error| error.to_string())?;
    if hash != manifest.covered_hash {
        return Err(format!(
            "the log has another chain hash at seq {} than the runs were written for",
            manifest.covered_seq
        ));
    }
    let mut runs = Vec::with_capacity(manifest.runs.len());
    for &(number, len) in &manifest.runs {
        let run = Run::open(dir, number).map_err(|error| format!("run {number}: {error}"))?;
        if run.file_len != len {
            return Err(format!(
                "run {number} has another length than the manifest says"
            ));
        }
        runs.push(Arc::new(run));
    }
    Ok(Some((manifest, runs)))
}

/// Deletes the files in `dir` the manifest does not list (a spill or merge cut short, runs
/// of a discarded index).
fn remove_unlisted(dir: &Path, manifest: &Manifest, keep_manifest: bool) -> std::io::Result<()> {
    let listed: Vec<String> = manifest
        .runs
        .iter()
        .map(|(number, _)| run::file_name(*number))
        .collect();
    let mut removed = false;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let keep =
            listed.iter().any(|listed| *listed == name) || (name == MANIFEST_FILE && keep_manifest);
        if !keep {
            std::fs::remove_file(dir.join(&*name))?;
            removed = true;
        }
    }
    if removed {
        durability::sync_dir(dir)?;
    }
    Ok(())
}
