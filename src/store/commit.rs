//! The last stages of the write side, each on its own thread:
//!
//! - the *flusher* writes out what the writer has applied (sled's flush);
//! - the *syncer* makes it durable (the fsyncs of `durability.rs`, beside the
//!   acknowledgement record of `checkpoint.rs`) and publishes the head;
//! - the *publisher* hands the durable groups to the commit listeners (the read models) and
//!   answers.
//!
//! So the writer builds the next group while sled flushes this one, sled flushes the next
//! while the disk syncs this one, and the disk syncs the next while the read models fold
//! this one in (at 10 M measurements over 1,000 KPIs folding is the largest single cost of
//! an append). Each stage takes every batch waiting for it, so one fsync may cover several
//! groups. Nobody hears back before the fsync that covers their events and the read models
//! that include them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};

use super::checkpoint::{Acknowledged, CheckpointWorker};
use super::durability::DiskSync;
use super::writer::{Applied, answer, reply_all};
use super::{CommitListener, Committed, LogHead, Shared, StoreError, read, write};
use crate::store::segment::widen;

/// The flushing stage.
pub struct Flusher {
    db: sled::Db,
    shared: Arc<Shared>,
    /// Flushed groups, for the syncer.
    flushed: SyncSender<Vec<Applied>>,
}

/// The syncing stage.
pub struct Syncer {
    /// The fsyncs sled's flush leaves out.
    disk: DiskSync,
    /// The committed head, recorded (beside the fsyncs) before anyone is answered.
    checkpoint: CheckpointWorker,
    /// The head of the last commit that was wholly durable: the floor of the next record.
    durable: LogHead,
    shared: Arc<Shared>,
    /// Durable groups, for the publisher.
    publish: SyncSender<Vec<Applied>>,
}

/// The publishing stage.
pub struct Publisher {
    shared: Arc<Shared>,
}

/// Stops the writer for good after a failed write or sync, and answers `groups` so.
fn fail(shared: &Shared, groups: Vec<Applied>, error: &str) {
    let first_seq = groups.first().map(|applied| applied.first_seq);
    tracing::error!(
        %error,
        first_seq,
        "making the event log durable failed; the writer stops"
    );
    shared.failed.store(true, Ordering::Release);
    for applied in groups {
        reply_all(applied.group, || StoreError::WriterFailed);
    }
}

/// Hands `groups` to the next stage, or answers them when it is gone (it panicked).
fn pass_on(next: &SyncSender<Vec<Applied>>, groups: Vec<Applied>) {
    if let Err(unsent) = next.send(groups) {
        for applied in unsent.0 {
            reply_all(applied.group, || StoreError::WriterFailed);
        }
    }
}

impl Flusher {
    /// A flusher of `db`, passing flushed groups to `flushed`.
    pub fn new(db: sled::Db, shared: Arc<Shared>, flushed: SyncSender<Vec<Applied>>) -> Self {
        Self {
            db,
            shared,
            flushed,
        }
    }

    /// Flushes applied groups until the writer is gone.
    pub fn run(self, applied: Receiver<Applied>) {
        while let Ok(first) = applied.recv() {
            let mut groups = vec![first];
            groups.extend(applied.try_iter());
            if self.shared.failed.load(Ordering::Acquire) {
                for applied in groups {
                    reply_all(applied.group, || StoreError::WriterFailed);
                }
                continue;
            }
            let written = groups.iter().any(|applied| applied.segments > 0);
            if written && let Err(error) = self.db.flush() {
                fail(&self.shared, groups, &format!("flush: {error}"));
                continue;
            }
            pass_on(&self.flushed, groups);
        }
    }
}

impl Syncer {
    /// A syncer of the log at `head`, syncing what `disk` names and recording each
    /// commit's head in `checkpoint`, passing durable groups to `publish`.
    pub fn new(
        disk: DiskSync,
        checkpoint: CheckpointWorker,
        head: LogHead,
        shared: Arc<Shared>,
        publish: SyncSender<Vec<Applied>>,
    ) -> Self {
        Self {
            disk,
            checkpoint,
            durable: head,
            shared,
            publish,
        }
    }

    /// Syncs flushed groups until the flusher is gone, then records the last durable head
    /// as acknowledged for sure (so the next open checks the whole log).
    pub fn run(mut self, flushed: Receiver<Vec<Applied>>) {
        while let Ok(mut groups) = flushed.recv() {
            for more in flushed.try_iter() {
                groups.extend(more);
            }
            self.commit(groups);
        }
        let head = self.durable;
        let closed = self
            .checkpoint
            .start(acknowledged(head), head.seq)
            .and_then(|()| self.checkpoint.finish());
        if let Err(error) = closed {
            tracing::warn!(%error, "could not record the acknowledged head at close");
        }
    }

    /// Makes the flushed groups durable and records their head; the record's fdatasync
    /// runs beside sled's (`checkpoint.rs` says why that is safe).
    fn make_durable(&mut self, head: LogHead) -> Result<(), String> {
        self.checkpoint
            .start(acknowledged(head), self.durable.seq)
            .map_err(|error| format!("acknowledgement record: {error}"))?;
        let synced = self.disk.sync();
        let recorded = self.checkpoint.finish();
        synced.map_err(|error| format!("fsync: {error}"))?;
        recorded.map_err(|error| format!("acknowledgement record: {error}"))?;
        self.durable = head;
        Ok(())
    }

    /// Syncs (if anything was written), publishes and answers `groups`, in order.
    fn commit(&mut self, groups: Vec<Applied>) {
        if self.shared.failed.load(Ordering::Acquire) {
            for applied in groups {
                reply_all(applied.group, || StoreError::WriterFailed);
            }
            return;
        }
        let segments: u64 = groups.iter().map(|applied| applied.segments).sum();
        if segments > 0 {
            let head = groups.last().map_or(self.durable, |applied| applied.head);
            let started = std::time::Instant::now();
            if let Err(error) = self.make_durable(head) {
                fail(&self.shared, groups, &error);
                return;
            }
            self.shared.synced(started.elapsed());
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
        let requests: usize = groups.iter().map(|applied| applied.group.len()).sum();
        shared
            .requests_answered
            .fetch_add(widen(requests), Ordering::Relaxed);
        shared
            .groups_committed
            .fetch_add(widen(groups.len()), Ordering::Relaxed);
        pass_on(&self.publish, groups);
    }
}

impl Publisher {
    /// A publisher to the listeners registered in `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Publishes durable groups until the syncer is gone.
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

/// A head as the acknowledgement record stores it.
fn acknowledged(head: LogHead) -> Acknowledged {
    Acknowledged {
        seq: head.seq,
        hash: head.hash,
    }
}
