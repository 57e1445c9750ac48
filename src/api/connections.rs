//! The server's connections: the accept loop (plain TCP or TLS), the cap on open
//! connections, the idle timeout, and closing whatever is still open when a shutdown runs
//! out of time.
//!
//! Every accepted socket is wrapped in a [`Connection`] that notes when a byte last went
//! either way and can be closed from outside. At the cap (`--max-connections`), a new
//! connection closes one whose client never sent a byte or else the one that has been
//! quiet longest, so a flood of idle or half-open
//! connections cannot lock out a health probe or a real client; a connection quiet for
//! `--idle-timeout-secs` is closed by the sweeper. Live HTTP/2 clients are never quiet
//! that long: the server pings a connection after `--keepalive-secs` without a frame and
//! drops it when the ping goes unanswered.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections past their handshake waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Length of the client preface that opens every HTTP/2 connection.
const HTTP2_PREFACE_BYTES: u64 = 24;
/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How many connections may be open and how long one may stay quiet.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections open at once; at the cap a new one closes the quietest.
    pub max: usize,
    /// A connection without a byte either way for this long is closed.
    pub idle_timeout: Duration,
}

/// One open connection's record: when it was last active, and how to close it.
struct Entry {
    /// Milliseconds since the registry's epoch of the last byte read or written.
    active_ms: AtomicU64,
    /// Bytes the client sent.
    read_bytes: AtomicU64,
    /// Cancelled to close the connection.
    close: CancellationToken,
}

/// The open connections.
struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Entry>>>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection, closing the quietest ones while `max` are open: first
    /// those whose client never sent a byte, then those quiet for longest.
    fn admit(&self, max: usize) -> (u64, Arc<Entry>) {
        let entry = Arc::new(Entry {
            active_ms: AtomicU64::new(self.now_ms()),
            read_bytes: AtomicU64::new(0),
            close: CancellationToken::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut open = self.open();
        while open.len() >= max.max(1) {
            let Some(quietest) = open
                .iter()
                .min_by_key(|(id, entry)| {
                    (
                        entry.read_bytes.load(Ordering::Relaxed) > 0,
                        entry.active_ms.load(Ordering::Relaxed),
                        **id,
                    )
                })
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some(evicted) = open.remove(&quietest) {
                tracing::debug!("connection cap reached: closing the quietest connection");
                evicted.close.cancel();
            }
        }
        open.insert(id, entry.clone());
        (id, entry)
    }

    /// Closes the connections quiet for longer than `idle`.
    fn sweep(&self, idle: Duration) {
        let now = self.now_ms();
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        self.open().retain(|_, entry| {
            let quiet = now.saturating_sub(entry.active_ms.load(Ordering::Relaxed));
            let keep = quiet < idle_ms;
            if !keep {
                tracing::debug!(quiet_ms = quiet, "closing an idle connection");
                entry.close.cancel();
            }
            keep
        });
    }
}

/// The open connections of one server, to close those that never started HTTP/2 when a
/// shutdown begins and all of them when it runs out of time.
#[derive(Clone)]
pub struct Connections {
    registry: Arc<Registry>,
}

impl Default for Connections {
    fn default() -> Self {
        Self::new()
    }
}

impl Connections {
    /// No connections yet.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Registry {
                epoch: Instant::now(),
                next_id: AtomicU64::new(0),
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Closes the connections whose client has not sent as much as the HTTP/2 preface (a
    /// silent or half-open connection): at shutdown, nothing of theirs can be running,
    /// and HTTP/2's graceful close would wait for them until the shutdown timeout.
    pub fn close_unstarted(&self) {
        self.registry.open().retain(|_, entry| {
            let started = entry.read_bytes.load(Ordering::Relaxed) >= HTTP2_PREFACE_BYTES;
            if !started {
                entry.close.cancel();
            }
            started
        });
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        self.registry.open().len()
    }

    /// Closes every open connection: their requests and streams end, and their tasks let go
    /// of the service.
    pub fn close_all(&self) {
        for (_, entry) in self.registry.open().drain() {
            entry.close.cancel();
        }
    }
}

/// An accepted socket that records its activity and ends (reads and writes fail) once
/// closed from outside.
pub struct Connection {
    tcp: TcpStream,
    id: u64,
    entry: Arc<Entry>,
    registry: Arc<Registry>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Connection {
    fn touch(&self) {
        self.entry
            .active_ms
            .store(self.registry.now_ms(), Ordering::Relaxed);
    }

    /// `Err` once the connection was closed from outside.
    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the server (idle, over the cap, or shut down)",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.open().remove(&self.id);
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_open(cx)?;
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.tcp).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if read > 0 {
            self.touch();
            self.entry
                .read_bytes
                .fetch_add(u64::try_from(read).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_open(cx)?;
        let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, data))?;
        if written > 0 {
            self.touch();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_open(cx)?;
        let written = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, data))?;
        if written > 0 {
            self.touch();
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_open(cx)?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// A stream of accepted connections for tonic.
pub type Incoming<T> = Pin<Box<dyn Stream<Item = io::Result<T>> + Send>>;

/// The connections of `listener` under `limits`, registered in `connections`, each made ready by `handshake` (a TLS
/// handshake, say) on a task of its own, so a slow or silent client delays nobody else.
/// A failed handshake is logged at debug level and dropped. The loop ends when the stream
/// is dropped (the server stopped accepting).
pub fn incoming<T, H, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    connections: &Connections,
    handshake: H,
) -> Incoming<T>
where
    T: Send + 'static,
    H: Fn(Connection) -> F + Send + 'static,
    F: Future<Output = io::Result<T>> + Send + 'static,
{
    let registry = connections.registry.clone();
    let (accepted, ready) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    let sweep_every =
        (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    tokio::spawn(async move {
        let mut sweeps = tokio::time::interval(sweep_every);
        sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (tcp, peer) = tokio::select! {
                () = accepted.closed() => return,
                _ = sweeps.tick() => {
                    registry.sweep(limits.idle_timeout);
                    continue;
                }
                result = listener.accept() => match result {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            // TCP_NODELAY on every connection: without it, the small frames that end a
            // call (the last message, the trailers) wait for the client's delayed ACK,
            // and every GetAggregates call took about 40 ms on loopback (BENCHMARKS.md).
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
            }
            let (id, entry) = registry.admit(limits.max);
            let closed = Box::pin(entry.close.clone().cancelled_owned());
            let connection = Connection {
                tcp,
                id,
                entry,
                registry: registry.clone(),
                closed,
            };
            let ready = handshake(connection);
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match ready.await {
                    Ok(connection) => {
                        let _ = accepted.send(Ok(connection)).await;
                    }
                    Err(error) => tracing::debug!(%peer, %error, "connection handshake failed"),
                }
            });
        }
    });
    Box::pin(ReceiverStream::new(ready))
}
