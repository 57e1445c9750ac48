//! The commands and reads of the service, free of gRPC: validate against the catalog,
//! append to the log, answer from the read models. `api` is a thin layer over this.
//!
//! This file holds the service's state, its options and error; `commands.rs` the
//! commands, `queries.rs` the reads, `follow/` the server streams that follow the log
//! (ReplayEvents, WatchKpis), `streams.rs` the register of open streams, `series.rs` the
//! reservations that keep the per-KPI series limit exact.

mod commands;
mod follow;
mod queries;
mod series;
pub mod streams;

pub use follow::{ReplayItem, StreamReceiver, WATCH_PENDING_LIMIT, WatchItem};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use tokio_util::sync::CancellationToken;

use crate::domain::query::{ListedStreams, LogInfo, StreamKind};
use crate::domain::signed_head::SignedHead;
use crate::domain::{KpiEntry, Rejection};
use crate::projection::{AggregateView, CatalogView, ReadModels, Restored, SnapshotError};
use crate::store::{EventLog, LogHead, StoreError};
use streams::{StreamHandle, Streams};

/// Most measurements in one Record call or RecordStream batch: large enough to amortise the
/// flush, small enough that a batch stays far below gRPC's message limit and is validated
/// within a millisecond.
pub const MAX_BATCH_MEASUREMENTS: usize = 10_000;

/// How often a command is re-validated when definitions keep changing under it. Definition
/// changes are rare, so reaching this means something is hammering the catalog.
const MAX_VALIDATION_ATTEMPTS: usize = 64;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The client's input or the current state refused it.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The log could not do it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Definitions changed under the command more than `MAX_VALIDATION_ATTEMPTS` times.
    #[error("definitions kept changing while the request was validated; retry")]
    Contended,
    /// A blocking task of the request panicked or was cancelled: a bug, not a state of the
    /// log.
    #[error("a task of the request failed: {0}")]
    TaskFailed(String),
}

/// Runs blocking work (sled reads, folds, large answers) off the async executor; a task
/// that panicked is an internal error of this request, not a failure of the log.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ServiceError::TaskFailed(error.to_string()))
}

/// The service's state: the log and the read models folded from it.
#[derive(Clone)]
pub struct KpiService {
    log: EventLog,
    catalog: Arc<CatalogView>,
    aggregates: Arc<AggregateView>,
    models: Arc<ReadModels>,
    snapshot_dir: PathBuf,
    max_future_skew: TimeDelta,
    streams: Arc<Streams>,
    heartbeat: Duration,
    min_free_bytes: u64,
    /// Most KPIs the catalog may hold.
    max_kpis: usize,
    /// Signs the heads of GetLogInfo and of replay checkpoints.
    signing_key: Option<Arc<ed25519_dalek::SigningKey>>,
    shutdown: CancellationToken,
    /// The new series of batches in flight, for the per-KPI limit.
    series: Arc<series::SeriesReservations>,
    /// Who this handle's commands are made by: stored with every event they append
    /// (`EventRecord.actor`); `None` for a server without authentication.
    actor: Option<Arc<str>>,
}

/// The service's state for metrics.
#[derive(Debug, Clone, Copy)]
pub struct ServiceGauges {
    /// The log's write counters since open.
    pub log: crate::store::StoreStats,
    /// The durable head.
    pub head_seq: u64,
    /// The last seq folded into the aggregates.
    pub folded_seq: u64,
    /// Bytes the aggregates' buckets hold in memory.
    pub bucket_bytes: u64,
}

/// How the service behaves, from the configuration.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Where read-model snapshots go.
    pub snapshot_dir: PathBuf,
    /// How far in the future occurred_at may be.
    pub max_future_skew: TimeDelta,
    /// Most server streams open at once.
    pub max_streams: usize,
    /// Most KPIs the catalog may hold.
    pub max_kpis: usize,
    /// Interval of checkpoints and heartbeats on idle streams.
    pub heartbeat: Duration,
    /// Space a snapshot leaves free on its file system, or it is not written.
    pub min_free_bytes: u64,
    /// The key that signs the heads the service reports, when it has one.
    pub signing_key: Option<Arc<ed25519_dalek::SigningKey>>,
}

/// Aggregates to answer from: the live read model, or a fold as of a point of the log.
enum AggregatesAt {
    /// The live projection.
    Current(Arc<AggregateView>),
    /// A fold of the log up to an as-of point.
    Past(Box<crate::projection::Aggregates>),
}

impl KpiService {
    /// Serves from read models already restored from `log` (see
    /// [`crate::projection::open`]).
    pub fn with_models(log: EventLog, models: ReadModels, options: ServiceOptions) -> Self {
        let models = Arc::new(models);
        Self {
            log,
            catalog: models.catalog.clone(),
            aggregates: models.aggregates.clone(),
            models,
            snapshot_dir: options.snapshot_dir,
            max_future_skew: options.max_future_skew,
            streams: Streams::new(options.max_streams),
            heartbeat: options.heartbeat,
            min_free_bytes: options.min_free_bytes,
            signing_key: options.signing_key,
            max_kpis: options.max_kpis,
            shutdown: CancellationToken::new(),
            series: Arc::default(),
            actor: None,
        }
    }

    /// The same service, whose commands are made by `actor` (the authenticated
    /// principal's name): the events they append say so. A cheap clone, one per request.
    pub fn acting_as(&self, actor: Option<Arc<str>>) -> Self {
        Self {
            actor,
            ..self.clone()
        }
    }

    /// A place for one more server stream starting at `position`, or RESOURCE_EXHAUSTED
    /// past the limit.
    fn open_stream(
        &self,
        kind: StreamKind,
        peer: Option<std::net::SocketAddr>,
        position: u64,
    ) -> Result<StreamHandle, ServiceError> {
        Ok(self.streams.open(kind, peer, position)?)
    }

    /// ListStreams: the open server streams, their limits and the durable head.
    pub fn list_streams(&self) -> ListedStreams {
        ListedStreams {
            streams: self.streams.list(),
            head_seq: self.log.head().seq,
            max_streams: self.streams.limit(),
            watch_pending_limit: WATCH_PENDING_LIMIT,
        }
    }

    /// The log's durable head.
    pub fn head(&self) -> LogHead {
        self.log.head()
    }

    /// GetLogInfo: the durable head and how the read models were restored at start.
    pub fn log_info(&self) -> LogInfo {
        let head = self.log.head();
        let restored = self.models.restored;
        LogInfo {
            head_seq: head.seq,
            head_hash: head.hash,
            head_recorded_at: head.recorded_at,
            restored_snapshot_seq: restored.snapshot_seq,
            replayed_events: restored.replayed_events,
            signed_head: self.sign_head(head.seq, head.hash),
        }
    }

    /// What the metrics endpoint shows of the service now: the log's write counters, its
    /// head and the read models' progress and size.
    pub fn gauges(&self) -> ServiceGauges {
        let (folded_seq, bucket_bytes) = {
            let aggregates = self.aggregates.read();
            (aggregates.seq(), aggregates.bytes())
        };
        ServiceGauges {
            log: self.log.stats(),
            head_seq: self.log.head().seq,
            folded_seq,
            bucket_bytes: u64::try_from(bucket_bytes).unwrap_or(u64::MAX),
        }
    }

    /// The head `seq` with chain hash `hash`, signed now, when the service has a key.
    fn sign_head(&self, seq: u64, hash: [u8; 32]) -> Option<SignedHead> {
        let key = self.signing_key.as_ref()?;
        Some(SignedHead::sign(key, seq, hash, chrono::Utc::now()))
    }

    /// Cancelled when the server starts shutting down: open streams end with UNAVAILABLE.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// How the read models were restored at start.
    pub fn restored(&self) -> Restored {
        self.models.restored
    }

    /// Writes a snapshot of the read models; returns the seq it covers. Blocking.
    pub fn snapshot(&self) -> Result<u64, SnapshotError> {
        self.models
            .snapshot(&self.log, &self.snapshot_dir, self.min_free_bytes)
    }

    /// Writes the history index's part in memory and stops its writer (at shutdown,
    /// before the log closes). Blocking.
    pub fn close_history(&self) -> Result<(), StoreError> {
        self.models.history.close()
    }

    /// The KPI `kpi_id` of the current catalog, retired or not; NOT_FOUND naming `kpi_id`.
    fn current_kpi(&self, kpi_id: &str) -> Result<KpiEntry, ServiceError> {
        self.catalog
            .read()
            .get(kpi_id)
            .cloned()
            .ok_or_else(|| Rejection::not_found("kpi_id", format!("kpi '{kpi_id}'")).into())
    }
}
