//! kpi-service: an embedded-friendly gRPC microservice that tracks Key Performance
//! Indicators with event sourcing.
//!
//! Every change is an immutable event in a hash-chained sled log; the catalog, aggregates,
//! trends and target status are projections folded from that log. The load generator,
//! `kpi-load`, is a crate of its own (`crates/kpi-load`).
//!
//! # Layout
//! - [`domain`]: pure KPI logic (definitions, measurements, events, catalog decisions).
//! - [`store`]: the sled event log: segments, group commit, deduplication, hash chain.
//! - [`projection`]: read models folded from the log.
//! - [`service`]: commands and reads, free of gRPC.
//! - [`api`]: the tonic services, health and reflection; the only module that knows tonic.
//! - [`proto`]: the generated kpi.v1 code and its conversions to and from `domain`.
//! - [`config`]: flags and environment.
//! - [`encoding`]: the one serde format (postcard) of the read models' stored bytes.
//! - [`backup`]: `kpi-server backup` (an online copy of the log, through the API) and
//!   `kpi-server restore`.
//! - [`recover`]: `kpi-server recover`, the operator's repair of a log that lost events.
//! - [`telemetry`]: logs on stderr and spans to an OpenTelemetry collector.
//! - [`signing`]: the server's Ed25519 key that signs the heads it reports.
//!
//! [`run`] is the entry point: it takes a bound listener and a shutdown future, so tests
//! start the real server on port 0 and stop it cleanly.

pub mod api;
pub mod backup;
pub mod config;
pub mod domain;
pub mod encoding;
pub mod priority;
pub mod projection;
pub mod proto;
pub mod recover;
pub mod service;
pub mod signing;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::service::{KpiService, ServiceOptions};
use crate::store::{StoreError, StoreOptions};

/// Directory of the event log (sled) inside the data directory.
pub const LOG_DIR: &str = "log";
/// Directory of the read-model snapshots inside the data directory.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// Directory of the history index (each KPI's events, `projection::history`) inside the
/// data directory.
pub const HISTORY_DIR: &str = "history";
/// Directory of the buckets that left memory (`projection::pages`) inside the data
/// directory.
pub const PAGES_DIR: &str = "pages";
/// How long new events may wait for a snapshot when fewer than `--snapshot-every-events`
/// arrive.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);
/// How often the snapshot task looks at the head.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(5);

/// A snapshot costs time in proportion to the whole state (it is cloned, then encoded and
/// written on a thread of its own at background priority); after one took `d`, the next waits at least this many
/// times `d`, so snapshots never take more than about a tenth of the machine however large
/// the state and however fast events arrive.
const SNAPSHOT_COST_SHARE: u32 = 10;

/// Writes a snapshot of the read models when enough events (`every_events`) or time have
/// passed, until `stop` is cancelled.
async fn snapshot_periodically(
    service: KpiService,
    every_events: u64,
    metrics: Option<Arc<api::metrics::Metrics>>,
    stop: CancellationToken,
) {
    let mut covered = service.restored().snapshot_seq;
    let mut last = Instant::now();
    let mut last_cost = Duration::ZERO;
    let mut ticks = tokio::time::interval(SNAPSHOT_CHECK);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let head = service.head().seq;
        let since = last.elapsed();
        let due = (head >= covered.saturating_add(every_events)
            && since >= last_cost * SNAPSHOT_COST_SHARE)
            || (head > covered && since >= SNAPSHOT_EVERY);
        if !due {
            continue;
        }
        let writer = service.clone();
        let started = Instant::now();
        // On a thread of its own, at background priority (`priority`): a blocking-pool
        // thread would keep the lowered priority for the queries it runs next.
        let (done, snapshotted) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("kpi-snapshot".into())
            .spawn(move || {
                priority::lower_this_thread();
                let _ = done.send(writer.snapshot());
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a snapshot thread; will retry");
            continue;
        }
        match snapshotted.await {
            Ok(Ok(seq)) => {
                last_cost = started.elapsed();
                if let Some(metrics) = &metrics {
                    metrics.snapshot_written(last_cost);
                }
                tracing::info!(
                    seq,
                    seconds = last_cost.as_secs_f64(),
                    "read models snapshotted"
                );
                covered = seq;
            }
            Ok(Err(error)) => tracing::warn!(%error, "snapshot failed; will retry"),
            Err(_) => tracing::warn!("snapshot thread panicked; will retry"),
        }
        last = Instant::now();
    }
}

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
    /// The configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The gRPC transport failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Server reflection could not be built from the descriptors.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A blocking start-up or shut-down task panicked.
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Closing the log did not finish within the shutdown timeout. Every acknowledged event
    /// was durable before its acknowledgement, so nothing acknowledged is lost; the caller
    /// should end the process without waiting for the stuck thread.
    #[error(
        "the log did not close within the shutdown timeout ({seconds} s); acknowledged events are durable"
    )]
    ShutdownTimedOut {
        /// The timeout.
        seconds: u64,
    },
}

/// Opens the log in `config.data_dir`, rebuilds the read models and serves gRPC on
/// `listener` until `shutdown` completes; then stops taking requests, lets running ones
/// finish, and flushes and closes the log. Everything after `shutdown` completes is
/// bounded by `config.shutdown_timeout()`: requests still running then are cut off, and a
/// log that does not close in time is [`RunError::ShutdownTimedOut`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let store_error = |source| RunError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    };
    let address = listener
        .local_addr()
        .map_err(|error| RunError::Config(format!("the listener has no local address: {error}")))?;
    config.refuse_insecure(address).map_err(RunError::Config)?;
    config.check_timeouts().map_err(RunError::Config)?;
    if !address.ip().is_loopback() && config.tls_cert.is_none() {
        tracing::warn!(%address, "--insecure: serving beyond loopback without TLS; anyone who reaches the port reads and changes everything");
    }
    let gate = Arc::new(
        api::auth::Gate::new(config.auth_file.as_deref(), !config.no_list_streams)
            .map_err(|error| RunError::Config(error.to_string()))?,
    );
    let tls = config
        .tls_files()
        .map(api::tls::ServerTls::load)
        .transpose()
        .map_err(|error| RunError::Config(error.to_string()))?
        .map(Arc::new);
    let signing_key = config
        .signing_key
        .as_deref()
        .map(|path| signing::load(path, config.generate_signing_key))
        .transpose()
        .map_err(|error| RunError::Config(error.to_string()))?
        .map(Arc::new);
    make_private(&config.data_dir).map_err(|source| {
        RunError::Config(format!(
            "cannot create the data directory {}: {source}",
            config.data_dir.display()
        ))
    })?;
    let options = StoreOptions {
        dedup_window: config.dedup_window(),
        dedup_memory_bytes: config.dedup_memory_bytes(),
        min_free_bytes: config.min_free_bytes(),
        ..StoreOptions::default()
    };
    let log_dir = config.data_dir.join(LOG_DIR);
    let snapshot_dir = config.data_dir.join(SNAPSHOT_DIR);
    let history_dir = config.data_dir.join(HISTORY_DIR);
    let tier = projection::TierOptions {
        pages_dir: config.data_dir.join(PAGES_DIR),
        budget: config.bucket_memory_bytes().map_err(RunError::Config)?,
    };
    let service_options = ServiceOptions {
        snapshot_dir,
        max_future_skew: config.max_future_skew(),
        max_streams: usize::try_from(config.max_streams).unwrap_or(usize::MAX),
        max_kpis: usize::try_from(config.max_kpis).unwrap_or(usize::MAX),
        heartbeat: config.heartbeat(),
        min_free_bytes: config.min_free_bytes(),
        signing_key,
    };
    let (log, service) = tokio::task::spawn_blocking(move || {
        let (log, models) = projection::open(
            &log_dir,
            &service_options.snapshot_dir,
            &history_dir,
            tier,
            options,
        )?;
        let service = KpiService::with_models(log.clone(), models, service_options);
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
    let stop_snapshots = CancellationToken::new();
    // Also stops the task when this future is dropped without a shutdown (aborted).
    let _stop_snapshots_on_drop = stop_snapshots.clone().drop_guard();
    let connections = api::connections::Connections::new();
    let (metrics, metrics_server) = match config.metrics_listen {
        Some(address) => {
            let listener = TcpListener::bind(address).await.map_err(|error| {
                RunError::Config(format!("cannot listen for metrics on {address}: {error}"))
            })?;
            let metrics = api::metrics::Metrics::new(service.clone(), connections.clone());
            tracing::info!(%address, "serving metrics at /metrics");
            let server = tokio::spawn(api::metrics::serve(
                listener,
                metrics.clone(),
                stop_snapshots.clone(),
            ));
            (Some(metrics), Some(server))
        }
        None => (None, None),
    };
    let snapshots = tokio::spawn(snapshot_periodically(
        service.clone(),
        config.snapshot_every_events,
        metrics.clone(),
        stop_snapshots.clone(),
    ));
    let streams_stop = service.shutdown_token();
    // Also ends them when this future is dropped without a shutdown (aborted).
    let _stop_streams_on_drop = streams_stop.clone().drop_guard();
    let (routes, health) = api::routes(service.clone(), !config.no_reflection).await?;
    tracing::info!(
        %address,
        tls = tls.is_some(),
        client_certificates = config.tls_client_ca.is_some(),
        auth_file = config.auth_file.is_some(),
        "serving kpi.v1 over gRPC"
    );
    let reloads = tokio::spawn(api::reload::watch(
        tls.clone(),
        gate.clone(),
        config.reload_check(),
        stop_snapshots.clone(),
    ));
    let timeout = config.shutdown_timeout();
    // When the shutdown began; everything after it must end by then + `timeout`.
    let (stopping, mut stopped_at) = tokio::sync::watch::channel(None::<tokio::time::Instant>);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive()))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // Outside the gate, so refused requests are counted and traced too.
        .layer(api::metrics::ObserveLayer::new(metrics))
        .layer(api::auth::GateLayer::new(gate))
        .add_routes(routes);
    let limits = api::connections::ConnectionLimits {
        max: connection_cap(config.connection_limits().max),
        ..config.connection_limits()
    };
    let unstarted = connections.clone();
    let signal = async move {
        shutdown.await;
        // Connections that never started HTTP/2 have nothing to finish.
        unstarted.close_unstarted();
        stopping.send_replace(Some(tokio::time::Instant::now()));
        tracing::info!("shutting down: finishing running requests");
        // Open streams would keep the server waiting forever: end them now.
        streams_stop.cancel();
        for name in api::SERVICE_NAMES {
            health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    let serve: Pin<Box<dyn Future<Output = _> + Send>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            api::connections::incoming(listener, limits, &connections, api::tls::handshake(tls)),
            signal,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(
            api::connections::incoming(listener, limits, &connections, |connection| async {
                Ok(connection)
            }),
            signal,
        )),
    };
    // Requests still running at the deadline (a client that never sends the rest of its
    // request, or one stuck behind a write that cannot finish) are cut off.
    let deadline = {
        let mut stopped_at = stopped_at.clone();
        async move {
            match stopped_at.wait_for(Option::is_some).await.map(|at| *at) {
                Ok(Some(at)) => tokio::time::sleep_until(at + timeout).await,
                _ => std::future::pending().await,
            }
        }
    };
    let served: Result<(), tonic::transport::Error> = tokio::select! {
        served = serve => served,
        () = deadline => {
            tracing::warn!(
                seconds = timeout.as_secs(),
                connections = connections.count(),
                "requests still running at the shutdown timeout were cut off"
            );
            Ok(())
        }
    };
    // Whatever is still open (a connection whose client never finished its preface, a
    // request cut off at the deadline) is closed, so its task lets go of the service.
    connections.close_all();
    let deadline = stopped_at
        .borrow_and_update()
        .unwrap_or_else(tokio::time::Instant::now)
        + timeout;
    stop_snapshots.cancel();
    snapshots.await?;
    reloads.await?;
    if let Some(server) = metrics_server {
        server.await?;
    }
    // A snapshot at the head makes the next start replay nothing.
    let closing = tokio::task::spawn_blocking(move || {
        match service.snapshot() {
            Ok(seq) => tracing::info!(seq, "read models snapshotted"),
            Err(error) => {
                tracing::warn!(%error, "no snapshot at shutdown; the next start replays more")
            }
        }
        if let Err(error) = service.close_history() {
            tracing::warn!(%error, "history index not written at shutdown; the next start reads more of the log");
        }
        log.close()
    });
    // The log gets at least a moment to close, even when requests used up the time.
    let close_by = deadline.max(tokio::time::Instant::now() + MIN_CLOSE_TIME);
    let closed = match tokio::time::timeout_at(close_by, closing).await {
        Ok(closed) => closed?,
        Err(_) => {
            return Err(RunError::ShutdownTimedOut {
                seconds: timeout.as_secs(),
            });
        }
    };
    served?;
    closed.map_err(store_error)?;
    tracing::info!("event log flushed and closed");
    Ok(())
}

/// Creates the data directory when missing, and makes everything the server creates
/// private to its user: the process umask becomes 077, so directories are created 0700
/// and files 0600 (the log holds every subject identifier ever recorded). Files that
/// already exist keep their modes.
fn make_private(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
}

/// The least time the log gets to close at shutdown, even when requests used up the
/// shutdown timeout: a close of a healthy log takes milliseconds (plus the snapshot).
const MIN_CLOSE_TIME: Duration = Duration::from_secs(2);

/// How long an HTTP/2 keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// File descriptors the server needs besides its connections: the log's, history's and
/// pages' sled files, the event ids' run files, snapshots, the listener, and slack.
const FILE_DESCRIPTORS_BESIDES_CONNECTIONS: u64 = 256;

/// The connection cap that the process's file descriptors allow: the soft `nofile` limit
/// is raised (towards the hard one) to fit `wanted` connections; when it cannot be, the
/// cap is lowered to what fits, with a warning, so a flood of connections ends in the
/// cap's eviction of the quietest and never in failed accepts.
fn connection_cap(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let wanted_u64 = u64::try_from(wanted).unwrap_or(u64::MAX);
    let needed = wanted_u64.saturating_add(FILE_DESCRIPTORS_BESIDES_CONNECTIONS);
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= needed {
        return wanted;
    }
    let raised = limit.maximum.map_or(needed, |hard| hard.min(needed));
    let mut allowed = soft;
    if raised > soft {
        let mut new = limit;
        new.current = Some(raised);
        match setrlimit(Resource::Nofile, new) {
            Ok(()) => allowed = raised,
            Err(error) => tracing::warn!(%error, "cannot raise the nofile limit"),
        }
    }
    if allowed >= needed {
        return wanted;
    }
    let cap = allowed
        .saturating_sub(FILE_DESCRIPTORS_BESIDES_CONNECTIONS)
        .max(16);
    tracing::warn!(
        nofile = allowed,
        max_connections = wanted,
        cap,
        "the nofile limit is too low for --max-connections; fewer connections are kept open (raise LimitNOFILE)"
    );
    usize::try_from(cap).unwrap_or(wanted).min(wanted)
}
