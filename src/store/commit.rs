//! The committing stage of the write side: one fsync for everything the writer has
//! applied, then publication (head, counters, commit listeners) and the answers.
//!
//! It runs on its own thread so that the writer builds the next group while the disk
//! flushes this one. It takes every applied group waiting for it, so one fsync may cover
//! several groups. Nobody hears back before the flush that covers their events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use super::writer::{Applied, answer, reply_all};
use super::{CommitListener, Committed, Shared, StoreError, read, write};
use crate::store::segment::widen;

/// The committing stage.
pub struct Committer {
    db: sled::Db,
    shared: Arc<Shared>,
}

impl Committer {
    /// A committer flushing `db`.
    pub fn new(db: sled::Db, shared: Arc<Shared>) -> Self {
        Self { db, shared }
    }

    /// Commits applied groups until the writer is gone.
    pub fn run(self, applied: Receiver<Applied>) {
        while let Ok(first) = applied.recv() {
            let mut groups = vec![first];
            groups.extend(applied.try_iter());
            self.commit(groups);
        }
    }

    /// Flushes (if anything was written), publishes and answers `groups`, in order.
    fn commit(&self, groups: Vec<Applied>) {
        let shared = &self.shared;
        if shared.failed.load(Ordering::Acquire) {
            for applied in groups {
                reply_all(applied.group, || StoreError::WriterFailed);
            }
            return;
        }
        let segments: u64 = groups.iter().map(|applied| applied.segments).sum();
        if segments > 0 {
            if let Err(error) = self.db.flush() {
                let first_seq = groups.first().map(|applied| applied.first_seq);
                tracing::error!(
                    %error,
                    first_seq,
                    "flushing the event log failed; the writer stops"
                );
                shared.failed.store(true, Ordering::Release);
                for applied in groups {
                    reply_all(applied.group, || StoreError::WriterFailed);
                }
                return;
            }
            shared.flushes.fetch_add(1, Ordering::Relaxed);
        }

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

        let listeners: Vec<Arc<dyn CommitListener>> = read(&shared.listeners).clone();
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
