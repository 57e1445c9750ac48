//! The open server streams (WatchKpis, ReplayEvents): the limit on how many run at once,
//! and what each one is doing (position, messages sent, pending updates), for
//! Audit.ListStreams. A stream holds a [`StreamHandle`]; dropping it (the stream ended or
//! its client went away) frees the place and removes the entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};

use crate::domain::Rejection;
use crate::domain::query::{StreamInfo, StreamKind};

/// What a stream reports about itself while it runs; updated by the stream, read by
/// ListStreams. Relaxed atomics: each figure is exact, the set is not a consistent cut.
#[derive(Debug)]
pub struct StreamStats {
    position: AtomicU64,
    sent: AtomicU64,
    pending: AtomicU64,
    max_pending: AtomicU64,
}

impl StreamStats {
    /// Every event up to `seq` has been handled.
    pub fn set_position(&self, seq: u64) {
        self.position.store(seq, Ordering::Relaxed);
    }

    /// One more message handed to the transport.
    pub fn sent_one(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// The stream now holds `pending` updates not yet handed to the transport.
    pub fn set_pending(&self, pending: usize) {
        let pending = u64::try_from(pending).unwrap_or(u64::MAX);
        self.pending.store(pending, Ordering::Relaxed);
        self.max_pending.fetch_max(pending, Ordering::Relaxed);
    }
}

struct Entry {
    kind: StreamKind,
    peer: Option<SocketAddr>,
    opened_at: DateTime<Utc>,
    stats: Arc<StreamStats>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    streams: BTreeMap<u64, Entry>,
}

/// The open streams and their limit.
pub struct Streams {
    limit: usize,
    open: Mutex<Open>,
}

impl Streams {
    /// No stream open yet; at most `limit` at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(Open::default()),
        })
    }

    /// Most streams open at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more stream starting at `position`, or RESOURCE_EXHAUSTED past the
    /// limit.
    pub fn open(
        self: &Arc<Self>,
        kind: StreamKind,
        peer: Option<SocketAddr>,
        position: u64,
    ) -> Result<StreamHandle, Rejection> {
        let mut open = self.lock();
        if open.streams.len() >= self.limit {
            return Err(Rejection::ResourceExhausted {
                field: "stream".into(),
                reason: format!(
                    "{} streams are open, the most this server allows (--max-streams); retry later",
                    self.limit
                ),
            });
        }
        open.next_id += 1;
        let id = open.next_id;
        let stats = Arc::new(StreamStats {
            position: AtomicU64::new(position),
            sent: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            max_pending: AtomicU64::new(0),
        });
        open.streams.insert(
            id,
            Entry {
                kind,
                peer,
                opened_at: Utc::now(),
                stats: stats.clone(),
            },
        );
        Ok(StreamHandle {
            id,
            stats,
            streams: self.clone(),
        })
    }

    /// Streams open now.
    pub fn count(&self) -> usize {
        self.lock().streams.len()
    }

    /// Every open stream, oldest first.
    pub fn list(&self) -> Vec<StreamInfo> {
        self.lock()
            .streams
            .iter()
            .map(|(&id, entry)| StreamInfo {
                id,
                kind: entry.kind,
                peer: entry.peer,
                opened_at: entry.opened_at,
                position: entry.stats.position.load(Ordering::Relaxed),
                sent: entry.stats.sent.load(Ordering::Relaxed),
                pending: entry.stats.pending.load(Ordering::Relaxed),
                max_pending: entry.stats.max_pending.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// A stream's place among the open streams; freed when dropped.
pub struct StreamHandle {
    id: u64,
    stats: Arc<StreamStats>,
    streams: Arc<Streams>,
}

impl StreamHandle {
    /// Where the stream reports what it does.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.streams.lock().streams.remove(&self.id);
    }
}

impl std::fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHandle")
            .field("id", &self.id)
            .finish()
    }
}
