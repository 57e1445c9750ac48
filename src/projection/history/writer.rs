//! The `kpi-history` thread: writes the frozen parts in order, each in one sled batch with
//! its covered seq, while there is room on the disk, and tells the listeners (the
//! checkpoint thread) of every part it stored.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};

use super::blocks::{Blocks, widen};
use super::{COVERED_KEY, FORMAT, Part, ROOM_RETRY, State, StoredListeners, StoredPart, lock};
use crate::store::{self, LogReader, StoreError};

/// The `kpi-history` thread: stores frozen parts in order.
pub(super) struct Writer {
    pub(super) stopping: Arc<AtomicBool>,
    pub(super) listeners: StoredListeners,
    pub(super) tree: sled::Tree,
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
            if let Err(error) = self.store(&part) {
                // Later parts cannot be stored after a gap: they all stay in memory, and the
                // next start reads the log after the last stored seq again.
                tracing::error!(%error, "cannot write the history index; it stays in memory");
                return;
            }
            let mut state = lock(&self.state);
            state.stored = part.last_seq;
            state.parts.push((part.first_seq, part.others.count > 0));
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

    pub(super) fn store(&self, part: &Part) -> Result<(), StoreError> {
        let hash = self.log.hash_at(part.last_seq)?;
        let mut batch = sled::Batch::default();
        for (kpi_id, kpi) in &part.measurements {
            let key = Blocks::Measurements(kpi_id.clone()).key(part.first_seq);
            batch.insert(key, kpi.area.encode());
        }
        // Also without other events: the key lists the part.
        batch.insert(Blocks::Others.key(part.first_seq), part.others.encode());
        let mut covered = Vec::with_capacity(41);
        covered.push(FORMAT);
        covered.extend_from_slice(&part.last_seq.to_le_bytes());
        covered.extend_from_slice(&hash);
        batch.insert(COVERED_KEY, covered);
        self.tree.apply_batch(batch)?;
        Ok(())
    }
}
