//! kpi-service: an embedded-friendly gRPC microservice that tracks Key Performance
//! Indicators with event sourcing.
//!
//! Every change is an immutable event in a hash-chained sled log; the catalog and (later)
//! aggregates, trends and target status are projections folded from that log.
//!
//! # Layout
//! - [`domain`]: pure KPI logic (definitions, measurements, events, catalog decisions).
//! - [`store`]: the sled event log: segments, group commit, deduplication, hash chain.
//! - [`projection`]: read models folded from the log.
//! - [`service`]: commands and reads, free of gRPC.
//! - [`api`]: the tonic services, health and reflection; the only module that knows tonic.
//! - [`proto`]: the generated kpi.v1 code and its conversions to and from `domain`.
//! - [`config`]: flags and environment.
//!
//! [`run`] is the entry point: it takes a bound listener and a shutdown future, so tests
//! start the real server on port 0 and stop it cleanly.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod domain;
pub mod projection;
pub mod proto;
pub mod service;
pub mod store;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;

use crate::service::KpiService;
use crate::store::{EventLog, StoreError, StoreOptions};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The event log could not be opened or closed.
    #[error("event log in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: String,
        /// What went wrong.
        source: StoreError,
    },
    /// The gRPC transport failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Server reflection could not be built from the descriptors.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A blocking start-up or shut-down task panicked.
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Opens the log in `config.data_dir`, rebuilds the read models and serves gRPC on
/// `listener` until `shutdown` completes; then stops taking requests, lets running ones
/// finish, and flushes and closes the log.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let store_error = |source| RunError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    };
    let options = StoreOptions {
        dedup_window: config.dedup_window(),
        ..StoreOptions::default()
    };
    let data_dir = config.data_dir.clone();
    let max_future_skew = config.max_future_skew();
    let (log, service) = tokio::task::spawn_blocking(move || {
        let log = EventLog::open(&data_dir, options)?;
        let service = KpiService::new(log.clone(), max_future_skew)?;
        Ok::<_, StoreError>((log, service))
    })
    .await?
    .map_err(store_error)?;
    let head = log.head();
    tracing::info!(
        data_dir = %config.data_dir.display(),
        head_seq = head.seq,
        "event log open"
    );
    let (routes, health) = api::routes(service).await?;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving kpi.v1 over gRPC");
    }
    let served = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            tracing::info!("shutting down: finishing running requests");
            for name in api::SERVICE_NAMES {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        })
        .await;
    let closed = tokio::task::spawn_blocking(move || log.close()).await?;
    served?;
    closed.map_err(store_error)?;
    tracing::info!("event log flushed and closed");
    Ok(())
}
