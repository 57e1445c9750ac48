//! Live fan-out: the committed head seq as a `tokio::sync::watch` value, moved by the
//! writer after each flush. Followers wait on it and then read the new events from the log,
//! so a slow follower never makes the writer buffer anything, and catching up after a lag
//! is the same code as following live (no gap, no duplicate at any switch).

use tokio::sync::watch;

use crate::store::{CommitListener, Committed};

/// Publishes the durable head seq to every follower.
#[derive(Debug)]
pub struct HeadWatch {
    head: watch::Sender<u64>,
}

impl HeadWatch {
    /// A watch starting at the log's current head.
    pub fn new(head: u64) -> Self {
        Self {
            head: watch::Sender::new(head),
        }
    }

    /// A receiver that sees every later head (only the latest, which is all a follower
    /// needs: it reads everything up to it from the log).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

impl CommitListener for HeadWatch {
    fn committed(&self, events: &[Committed<'_>]) {
        if let Some(last) = events.last() {
            // `send_replace` never blocks and works without receivers.
            self.head.send_replace(last.seq);
        }
    }
}
