//! Following the log for the server streams: ReplayEvents (`replay.rs`) and WatchKpis
//! (`watch.rs`), and what they share: waiting for the durable head to move, and reading
//! the log forward in chunks off the executor without decoding a segment twice.
//!
//! A stream runs as its own task and sends its items, or the error that ends it, into a
//! bounded channel; the api turns each into a message. Free of gRPC, like the rest of the
//! service.

mod replay;
mod watch;

pub use replay::ReplayItem;
pub use watch::{WATCH_PENDING_LIMIT, WatchItem};

use tokio::sync::mpsc;

use super::{KpiService, ServiceError};
use crate::service::streams::{StreamHandle, StreamStats};
use crate::store::{EventLog, ReadEvents, StoreError, StoredEvent};

/// The receiving end of a stream: its items, then possibly the error that ended it.
pub type StreamReceiver<T> = mpsc::Receiver<Result<T, ServiceError>>;
/// The sending end of a stream.
type StreamSender<T> = mpsc::Sender<Result<T, ServiceError>>;

/// What every following stream has: its channel, its place among the open streams, the
/// durable head it follows, its idle interval and the server's shutdown.
struct Following<T> {
    /// The stream's items.
    sender: StreamSender<T>,
    /// The stream's place among the open streams, where it reports its progress.
    handle: StreamHandle,
    /// The durable head.
    head: tokio::sync::watch::Receiver<u64>,
    /// How long the stream may be idle before it gets a checkpoint or heartbeat.
    heartbeat: std::time::Duration,
    /// Cancelled when the server shuts down.
    shutdown: tokio_util::sync::CancellationToken,
}

impl<T: Send + 'static> Following<T> {
    /// A stream of `service` that sends to `sender` and holds the place `handle`.
    fn new(service: &KpiService, sender: StreamSender<T>, handle: StreamHandle) -> Self {
        Self {
            sender,
            handle,
            head: service.models.live.subscribe(),
            heartbeat: service.heartbeat,
            shutdown: service.shutdown.clone(),
        }
    }

    /// The durable head now (marked seen, so `for_more` waits for the next one).
    fn head(&mut self) -> u64 {
        *self.head.borrow_and_update()
    }

    /// Where the stream reports its progress.
    fn stats(&self) -> &StreamStats {
        self.handle.stats()
    }

    /// Sends `item`; false when the client went away, or when the server shuts down while
    /// the client does not read (the task then ends, and with it its hold on the log).
    async fn send(&self, item: T) -> bool {
        let sent = tokio::select! {
            sent = self.sender.send(Ok(item)) => sent.is_ok(),
            () = self.shutdown.cancelled() => false,
        };
        if sent {
            self.stats().sent_one();
        }
        sent
    }

    /// Ends the stream with `error`: sent when there is room for it, or dropped at shutdown
    /// when the client does not read.
    async fn fail(&self, error: ServiceError) {
        tokio::select! {
            biased;
            _ = self.sender.send(Err(error)) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// Waits until the head moves (true: read the new events). When the heartbeat
    /// interval passes first, sends `beat(seq)`, where `seq` is `position` (everything up
    /// to it was sent or filtered out) but never past the durable head, and waits again.
    /// False when the stream is over: the client went away, or the server is shutting down
    /// (the stream then got UNAVAILABLE).
    async fn for_more(&mut self, position: u64, beat: impl Fn(u64) -> T) -> bool {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.fail(StoreError::Closed.into()).await;
                    return false;
                }
                () = self.sender.closed() => return false,
                changed = self.head.changed() => return changed.is_ok(),
                () = tokio::time::sleep(self.heartbeat) => {
                    let seq = position.min(*self.head.borrow());
                    if !self.send(beat(seq)).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Runs a blocking read of the log off the executor. On failure the stream gets the
    /// error and `None` comes back: the stream is over.
    async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
    ) -> Option<R> {
        let error = match super::blocking(read).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(error)) => error.into(),
            Err(error) => error,
        };
        self.fail(error).await;
        None
    }
}

/// A forward reader of the log for one stream. Chunks that continue where the last one
/// ended reuse the open iterator, so a segment holding several chunks is loaded, checked
/// and decoded once, not once per chunk.
struct LogCursor {
    log: EventLog,
    /// The open iterator and the seq it yields next.
    open: Option<(ReadEvents, u64)>,
}

impl LogCursor {
    /// A cursor over `log`, not yet reading.
    fn new(log: EventLog) -> Self {
        Self { log, open: None }
    }

    /// Calls `each` with the events `from..=to` (`to` at or below the durable head), in
    /// order. Blocking.
    fn read(
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
    fn log(&self) -> &EventLog {
        &self.log
    }
}
