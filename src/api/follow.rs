//! What the following streams (ReplayEvents with follow, WatchKpis) share: waiting for the
//! durable head to move, and reading the log forward in chunks off the executor without
//! decoding a segment twice.

use crate::service::streams::StreamStats;
use crate::store::{EventLog, ReadEvents, StoreError, StoredEvent};

/// What a following stream waits with: the durable head, its idle interval, the server's
/// shutdown, and where its messages go.
pub(crate) struct Waiting<'a, T> {
    /// The durable head.
    pub head: &'a mut tokio::sync::watch::Receiver<u64>,
    /// How long the stream may be idle before it gets a checkpoint or heartbeat.
    pub heartbeat: std::time::Duration,
    /// Cancelled when the server shuts down.
    pub shutdown: &'a tokio_util::sync::CancellationToken,
    /// The stream's messages.
    pub sender: &'a tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    /// Where the stream reports the messages it sends.
    pub stats: &'a StreamStats,
}

impl<T> Waiting<'_, T> {
    /// Waits until the head moves (true: read the new events). When the heartbeat
    /// interval passes first, sends `beat(seq)`, where `seq` is `position` (everything up
    /// to it was sent or filtered out) but never past the durable head, and waits again.
    /// False when the stream is over: the client went away, or the server is shutting down
    /// (the stream then got UNAVAILABLE).
    pub(crate) async fn for_more(&mut self, position: u64, beat: impl Fn(u64) -> T) -> bool {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    let unavailable = super::status::store_status(&crate::store::StoreError::Closed);
                    let _ = self.sender.send(Err(unavailable)).await;
                    return false;
                }
                () = self.sender.closed() => return false,
                changed = self.head.changed() => return changed.is_ok(),
                () = tokio::time::sleep(self.heartbeat) => {
                    let seq = position.min(*self.head.borrow());
                    if self.sender.send(Ok(beat(seq))).await.is_err() {
                        return false;
                    }
                    self.stats.sent_one();
                }
            }
        }
    }
}

/// Runs a blocking read of the log for a following stream off the executor. On failure
/// the stream gets the error's status and `None` comes back: the stream is over.
pub(crate) async fn read_for_stream<T: Send + 'static, R: Send + 'static>(
    sender: &tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    read: impl FnOnce() -> Result<R, crate::store::StoreError> + Send + 'static,
) -> Option<R> {
    let status = match tokio::task::spawn_blocking(read).await {
        Ok(Ok(value)) => return Some(value),
        Ok(Err(error)) => super::status::store_status(&error),
        Err(error) => crate::service::ServiceError::TaskFailed(error.to_string()).into(),
    };
    let _ = sender.send(Err(status)).await;
    None
}

/// A forward reader of the log for one stream. Chunks that continue where the last one
/// ended reuse the open iterator, so a segment holding several chunks is loaded, checked
/// and decoded once, not once per chunk.
pub(crate) struct LogCursor {
    log: EventLog,
    /// The open iterator and the seq it yields next.
    open: Option<(ReadEvents, u64)>,
}

impl LogCursor {
    /// A cursor over `log`, not yet reading.
    pub(crate) fn new(log: EventLog) -> Self {
        Self { log, open: None }
    }

    /// Calls `each` with the events `from..=to` (`to` at or below the durable head), in
    /// order. Blocking.
    pub(crate) fn read(
        &mut self,
        from: u64,
        to: u64,
        mut each: impl FnMut(StoredEvent) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let (mut events, mut next) = match self.open.take() {
            Some((events, next)) if next == from => (events, next),
            // Up to the head as it is now, for the chunks after this one.
            _ => (self.log.read(from, u64::MAX), from),
        };
        let mut reopened = false;
        while next <= to {
            match events.next() {
                Some(stored) => {
                    let stored = stored?;
                    next = stored.seq + 1;
                    each(stored)?;
                }
                // The iterator ended at the head it was opened at: once more up to the
                // head now, which is at or past `to`.
                None if !reopened => {
                    events = self.log.read(next, u64::MAX);
                    reopened = true;
                }
                None => break,
            }
        }
        self.open = Some((events, next));
        Ok(())
    }

    /// The log read.
    pub(crate) fn log(&self) -> &EventLog {
        &self.log
    }
}
