//! The last two stages of the write side: the committer makes everything the writer has
//! applied durable (sled's flush, then the fsyncs of `durability.rs`, then the
//! acknowledgement record of `checkpoint.rs`) and publishes the head; the publisher hands
//! the durable groups to the commit listeners (the read models) and answers.
//!
//! Each runs on its own thread, so the writer builds the next group while the disk
//! flushes this one, and the disk flushes the next groups while the read models fold this
//! one in (at 10 M measurements over 1,000 KPIs folding is the largest single cost of an
//! append). The committer takes every applied group waiting for it, so one fsync may
//! cover several groups. Nobody hears back before the flush that covers their events and
//! the read models that include them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};

use super::checkpoint::{Acknowledged, Checkpoint};
use super::durability::DiskSync;
use super::writer::{Applied, answer, reply_all};
use super::{CommitListener, Committed, Shared, StoreError, read, write};
use crate::store::segment::widen;

/// The committing stage.
pub struct Committer {
    db: sled::Db,
    /// The fsyncs sled's flush leaves out.
    disk: DiskSync,
    /// The acknowledged head, recorded before anyone is answered.
    checkpoint: Checkpoint,
    shared: Arc<Shared>,
    /// Durable groups, for the publisher.
    durable: SyncSender<Vec<Applied>>,
}

/// The publishing stage.
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Committer {
    /// A committer flushing `db` (and syncing what `disk` names, and recording the head in
    /// `checkpoint`) and passing durable groups to `durable`.
    pub fn new(
        db: sled::Db,
        disk: DiskSync,
        checkpoint: Checkpoint,
        shared: Arc<Shared>,
        durable: SyncSender<Vec<Applied>>,
    ) -> Self {
        Self {
            db,
            disk,
            checkpoint,
            shared,
            durable,
        }
    }

    /// Commits applied groups until the writer is gone.
    pub fn run(mut self, applied: Receiver<Applied>) {
        while let Ok(first) = applied.recv() {
            let mut groups = vec![first];
            groups.extend(applied.try_iter());
            self.commit(groups);
        }
    }

    /// Makes the groups' segments durable and records the new acknowledged head.
    fn make_durable(&mut self, groups: &[Applied]) -> Result<(), String> {
        self.db.flush().map_err(|error| format!("flush: {error}"))?;
        self.disk
            .sync()
            .map_err(|error| format!("fsync: {error}"))?;
        if let Some(last) = groups.last() {
            self.checkpoint
                .record(Acknowledged {
                    seq: last.head.seq,
                    hash: last.head.hash,
                })
                .map_err(|error| format!("acknowledgement record: {error}"))?;
        }
        Ok(())
    }

    /// Flushes (if anything was written), publishes and answers `groups`, in order.
    fn commit(&mut self, groups: Vec<Applied>) {
        if self.shared.failed.load(Ordering::Acquire) {
            for applied in groups {
                reply_all(applied.group, || StoreError::WriterFailed);
            }
            return;
        }
        let segments: u64 = groups.iter().map(|applied| applied.segments).sum();
        if segments > 0 {
            if let Err(error) = self.make_durable(&groups) {
                let first_seq = groups.first().map(|applied| applied.first_seq);
                tracing::error!(
                    %error,
                    first_seq,
                    "making the event log durable failed; the writer stops"
                );
                self.shared.failed.store(true, Ordering::Release);
                for applied in groups {
                    reply_all(applied.group, || StoreError::WriterFailed);
                }
                return;
            }
            self.shared.flushes.fetch_add(1, Ordering::Relaxed);
        }
        let shared = &self.shared;

        // Durable: publish before anyone hears about it, head first so that a listener or
        // a caller that reads sees its events.
        if let Some(last) = groups.last() {
            *write(&shared.head) = last.head;
        }
        let events: usize = groups.iter().map(|applied| applied.appended.len()).sum();
        shared
            .segments_written
            .fetch_add(segments, Ordering::Relaxed);
        shared
            .events_written
            .fetch_add(widen(events), Ordering::Relaxed);

        if let Err(unsent) = self.durable.send(groups) {
            // The publisher is gone (it panicked): nobody else will answer.
            for applied in unsent.0 {
                reply_all(applied.group, || StoreError::WriterFailed);
            }
        }
    }
}

impl Publisher {
    /// A publisher to the listeners registered in `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Publishes durable groups until the committer is gone.
    pub fn run(self, durable: Receiver<Vec<Applied>>) {
        while let Ok(groups) = durable.recv() {
            self.publish(groups);
        }
    }

    /// Hands `groups` to the commit listeners, then answers them, in order.
    fn publish(&self, groups: Vec<Applied>) {
        let listeners: Vec<Arc<dyn CommitListener>> = read(&self.shared.listeners).clone();
        for applied in groups {
            if !listeners.is_empty() && !applied.appended.is_empty() {
                let committed: Vec<Committed<'_>> = (applied.first_seq..)
                    .zip(&applied.appended)
                    .map(|(seq, &(request, event))| Committed {
                        seq,
                        recorded_at: applied.recorded_at,
                        event: &applied.group[request].events[event],
                    })
                    .collect();
                for listener in &listeners {
                    listener.committed(&committed);
                }
            }
            answer(applied.group, applied.decisions);
        }
    }
}
