//! The `kpi-history` thread: writes the frozen parts in order, each as blocks in the page
//! files with a directory, synced, then listed in the tree in one sled batch with its
//! covered seq, while there is room on the disk, and tells the listeners (the checkpoint
//! thread) of every part it stored.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};

use super::blocks::{StoredRef, encode_directory, widen};
use super::{
    BLOCKS_DIR, COVERED_KEY, FORMAT, Part, ROOM_RETRY, State, StoredListeners, StoredPart, lock,
};
use crate::projection::pages::PageStore;
use crate::store::{self, LogReader, StoreError};

/// The `kpi-history` thread: stores frozen parts in order.
pub(super) struct Writer {
    pub(super) stopping: Arc<AtomicBool>,
    pub(super) listeners: StoredListeners,
    pub(super) tree: sled::Tree,
    pub(super) pages: Arc<PageStore>,
    pub(super) state: Arc<Mutex<State>>,
    pub(super) log: LogReader,
    pub(super) dir: PathBuf,
    pub(super) min_free: u64,
}

impl Writer {
    pub(super) fn run(self, parts: &Receiver<Arc<Part>>) {
        while let Ok(part) = parts.recv() {
            let bytes = widen(part.bytes);
            let mut waited = false;
            while !store::room_beside_guard(&self.dir, self.min_free, bytes) {
                if self.stopping.load(Ordering::Relaxed) {
                    return;
                }
                if !waited {
                    tracing::warn!(
                        "too little free space to write the history index; it waits in memory"
                    );
                    waited = true;
                }
                std::thread::sleep(ROOM_RETRY);
            }
            let stored = match self.store(&part) {
                Ok(stored) => stored,
                Err(error) => {
                    // Later parts cannot be stored after a gap: they all stay in memory, and
                    // the next start reads the log after the last stored seq again.
                    tracing::error!(%error, "cannot write the history index; it stays in memory");
                    return;
                }
            };
            let mut state = lock(&self.state);
            state.stored = part.last_seq;
            state.parts.push(stored);
            if state
                .frozen
                .front()
                .is_some_and(|front| Arc::ptr_eq(front, &part))
            {
                state.frozen.pop_front();
            }
            drop(state);
            let mut listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !listeners.is_empty() {
                let stored = StoredPart {
                    last_seq: part.last_seq,
                    measured: part
                        .measurements
                        .iter()
                        .map(|(kpi_id, kpi)| {
                            let bytes = widen(kpi.area.bytes.len());
                            (kpi_id.clone(), u64::from(kpi.area.count), bytes)
                        })
                        .collect(),
                };
                listeners.retain(|listener| listener.send(stored.clone()).is_ok());
            }
        }
    }

    /// Writes `part`'s blocks and directory to the page files and syncs them, then lists
    /// the part in the tree with the new covered seq (one batch): the tree names only
    /// durable pages. A crash before the batch leaves unnamed pages, which nothing reads.
    pub(super) fn store(&self, part: &Part) -> Result<StoredRef, StoreError> {
        let hash = self.log.hash_at(part.last_seq)?;
        let io = |source| StoreError::Io {
            path: self.dir.join(BLOCKS_DIR),
            source,
        };
        let mut kpis: Vec<_> = part.measurements.iter().collect();
        kpis.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut directory = Vec::with_capacity(kpis.len());
        for (kpi_id, kpi) in kpis {
            let page = self.pages.write_as_is(&kpi.area.encode()).map_err(io)?;
            directory.push((kpi_id.as_str(), page));
        }
        let others = if part.others.count > 0 {
            Some(self.pages.write_as_is(&part.others.encode()).map_err(io)?)
        } else {
            None
        };
        let directory = self
            .pages
            .write(&encode_directory(&directory))
            .map_err(io)?;
        self.pages.sync().map_err(io)?;
        let stored = StoredRef {
            first_seq: part.first_seq,
            directory,
            others,
        };
        let mut batch = sled::Batch::default();
        batch.insert(stored.key(), stored.value());
        let mut covered = Vec::with_capacity(41);
        covered.push(FORMAT);
        covered.extend_from_slice(&part.last_seq.to_le_bytes());
        covered.extend_from_slice(&hash);
        batch.insert(COVERED_KEY, covered);
        self.tree.apply_batch(batch)?;
        Ok(stored)
    }
}
