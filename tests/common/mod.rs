//! Test harness: the real server on a loopback port 0 with a temporary data directory,
//! reached through the generated tonic clients.

#![allow(dead_code)]

pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kpi_service::proto::audit_client::AuditClient;
use kpi_service::proto::ingest_client::IngestClient;
use kpi_service::proto::kpi_catalog_client::KpiCatalogClient;
use kpi_service::proto::query_client::QueryClient;
use kpi_service::proto::{self, KpiDefinition, KpiKind, Measurement};
use kpi_service::{Config, RunError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How long a test waits for the server to stop before it fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server and the way to stop it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), RunError>>>,
    channel: Channel,
}

impl TestServer {
    /// Starts a server with default settings on `data_dir`.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(Config::with_data_dir(data_dir)).await
    }

    /// Starts a server with `config` (its `listen` is ignored: port 0 on loopback).
    pub async fn start_with(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let handle = tokio::spawn(kpi_service::run(config, listener, async move {
            let _ = stop.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Self {
            addr,
            data_dir,
            shutdown: Some(shutdown),
            handle: Some(handle),
            channel,
        }
    }

    /// Asks the server to shut down gracefully and waits until it has; panics if it
    /// reported an error.
    pub async fn stop(mut self) {
        self.stop_inner().await.expect("server stopped cleanly");
    }

    /// Like `stop`, returning what `run` returned.
    pub async fn stop_inner(&mut self) -> Result<(), RunError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let handle = self.handle.take().expect("server running");
        tokio::time::timeout(STOP_TIMEOUT, handle)
            .await
            .expect("server stops in time")
            .expect("server task did not panic")
    }

    /// Stops the server the way a crash would: the `run` future is dropped mid-flight, with
    /// no graceful shutdown, no final snapshot and no close of the log. Waits until the
    /// data directory is free again (its last handles are released by background tasks).
    pub async fn kill(mut self) {
        self.shutdown.take();
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Starts a server on `data_dir` after a `kill`, retrying while the killed one still
    /// holds the directory lock.
    pub async fn start_after_kill(data_dir: &Path) -> Self {
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        loop {
            let server = Self::start(data_dir).await;
            // A started server answers; one that could not open the log has returned.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !server.handle.as_ref().is_some_and(JoinHandle::is_finished) {
                return server;
            }
            let error = server
                .exit()
                .await
                .expect_err("finished early means failed");
            assert!(
                error.to_string().contains("already using")
                    && tokio::time::Instant::now() < deadline,
                "restart after kill failed: {error}"
            );
        }
    }

    /// Whether `run` has returned (a server that could not start returns at once).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for `run` to return by itself (e.g. because it could not start).
    pub async fn exit(mut self) -> Result<(), RunError> {
        let handle = self.handle.take().expect("server running");
        tokio::time::timeout(STOP_TIMEOUT, handle)
            .await
            .expect("server returns in time")
            .expect("server task did not panic")
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A new connection that buffers little (64 KiB HTTP/2 windows): what its client does
    /// not read stays with the server.
    pub async fn small_window_channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .expect("connect")
    }

    pub fn catalog(&self) -> KpiCatalogClient<Channel> {
        KpiCatalogClient::new(self.channel())
    }

    pub fn ingest(&self) -> IngestClient<Channel> {
        IngestClient::new(self.channel())
    }

    pub fn query(&self) -> QueryClient<Channel> {
        QueryClient::new(self.channel())
    }

    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel())
    }

    /// Defines a KPI and returns it as stored.
    pub async fn define(&self, definition: KpiDefinition) -> proto::Kpi {
        self.catalog()
            .define_kpi(proto::DefineKpiRequest {
                definition: Some(definition),
            })
            .await
            .expect("define kpi")
            .into_inner()
            .kpi
            .expect("kpi in response")
    }

    /// Records a batch through the unary Record call.
    pub async fn record(
        &self,
        measurements: Vec<Measurement>,
    ) -> Result<Vec<proto::RecordResult>, tonic::Status> {
        self.ingest()
            .record(proto::RecordRequest { measurements })
            .await
            .map(|r| r.into_inner().results)
    }

    /// The open server streams.
    pub async fn list_streams(&self) -> proto::ListStreamsResponse {
        self.audit()
            .list_streams(proto::ListStreamsRequest {})
            .await
            .expect("ListStreams")
            .into_inner()
    }

    /// The log's head seq, head hash and event count.
    pub async fn log_info(&self) -> proto::GetLogInfoResponse {
        self.audit()
            .get_log_info(proto::GetLogInfoRequest {})
            .await
            .expect("log info")
            .into_inner()
    }

    /// The answer of VerifyLog.
    pub async fn verify_log(&self) -> proto::VerifyLogResponse {
        self.audit()
            .verify_log(proto::VerifyLogRequest {})
            .await
            .expect("verify log")
            .into_inner()
    }

    /// Every stored envelope, seq 1 to head.
    pub async fn replay_all(&self) -> Vec<proto::EventEnvelope> {
        let mut stream = self
            .audit()
            .replay_events(proto::ReplayEventsRequest::default())
            .await
            .expect("replay")
            .into_inner();
        let mut envelopes = Vec::new();
        while let Some(item) = stream.message().await.expect("replay item") {
            if let Some(proto::replay_events_response::Item::Event(envelope)) = item.item {
                envelopes.push(envelope);
            }
        }
        envelopes
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that panicked still stops its server, so the runtime can end.
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Copies a directory tree, as a crash or a backup sees it: what was written. A file
/// removed between the listing and its copy (a run a merge replaced, while the log is
/// open) is left out, as a crash at that moment would miss it too; any other failure
/// fails the test.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            match std::fs::copy(entry.path(), &target) {
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => panic!("copying {}: {error}", entry.path().display()),
            }
        }
    }
}

/// The buckets GetAggregates streams for `request`.
pub async fn buckets(
    server: &TestServer,
    request: proto::GetAggregatesRequest,
) -> Result<Vec<proto::Bucket>, tonic::Status> {
    let mut stream = server.query().get_aggregates(request).await?.into_inner();
    let mut buckets = Vec::new();
    while let Some(response) = stream.message().await? {
        buckets.push(response.bucket.expect("bucket"));
    }
    Ok(buckets)
}

/// A KPI definition with the given id and kind, UTC, one dimension `channel`.
pub fn kpi(id: &str, kind: KpiKind) -> KpiDefinition {
    KpiDefinition {
        id: id.into(),
        name: format!("KPI {id}"),
        description: String::new(),
        unit: String::new(),
        kind: kind.into(),
        direction: proto::Direction::HigherIsBetter.into(),
        timezone: String::new(),
        dimensions: vec!["channel".into()],
        ratio: None,
    }
}

/// A measurement of `kpi_id` with `value`, occurring now (server time).
pub fn measurement(kpi_id: &str, value: f64) -> Measurement {
    Measurement {
        kpi_id: kpi_id.into(),
        value,
        occurred_at: None,
        labels: BTreeMap::new(),
        subject: String::new(),
        event_id: String::new(),
    }
}

/// The same measurement with an idempotency key.
pub fn with_event_id(mut measurement: Measurement, event_id: &str) -> Measurement {
    measurement.event_id = event_id.into();
    measurement
}

/// An as-of point at `seq`.
pub fn as_of_seq(seq: u64) -> Option<proto::AsOf> {
    Some(proto::AsOf {
        point: Some(proto::as_of::Point::Seq(seq)),
    })
}

/// The field a refusal names in its google.rpc details: a BadRequest field violation, or
/// the subject of a PreconditionFailure or QuotaFailure violation.
pub fn violated_field(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    details
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .or_else(|| {
            details
                .precondition_failure()
                .and_then(|p| p.violations.first().map(|v| v.subject.clone()))
        })
        .or_else(|| {
            details
                .quota_failure()
                .and_then(|q| q.violations.first().map(|v| v.subject.clone()))
        })
}

/// The field named by the google.rpc.BadRequest detail of `status`, if any.
pub fn bad_request_field(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

/// A kpi-server process started by a test, killed when dropped.
pub struct ServerProcess(pub std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
