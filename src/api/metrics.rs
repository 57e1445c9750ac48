//! Metrics and per-RPC spans: the layer that times every request and counts it by method
//! and gRPC status (rejected ones included: it sits outside the gate), the values read at
//! each scrape (the log's appends, requests, groups, flushes and their durations, its head, the fold's progress, the buckets'
//! memory, open streams and their lag, connections, the process's resident memory,
//! snapshots), and the HTTP endpoint that serves them in the Prometheus text format on
//! `--metrics-listen`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::connections::Connections;
use crate::domain::query::StreamKind;
use crate::service::KpiService;
use crate::store::{DurationCounts, SYNC_BUCKETS_MICROS};

/// The label of an RPC and its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// `/package.Service/Method`, or `other` for a path the server does not serve.
    method: &'static str,
    /// The gRPC status code's name (`OK`, `INVALID_ARGUMENT`, ...).
    code: &'static str,
}

/// The label of an RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcLabels, Counter>,
    seconds: Family<MethodLabels, Histogram>,
    snapshots: Arc<SnapshotStats>,
}

/// The snapshots written since start and how long the last one took.
#[derive(Debug, Default)]
struct SnapshotStats {
    count: AtomicU64,
    last_micros: AtomicU64,
}

impl Metrics {
    /// The metrics of `service`, whose connections are `connections`.
    pub fn new(service: KpiService, connections: Connections) -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "kpi_rpc_requests",
            "Requests finished, by method and gRPC status code",
            requests.clone(),
        );
        let seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            // 100 µs to about 105 s.
            Histogram::new(exponential_buckets(0.0001, 4.0, 11))
        });
        registry.register(
            "kpi_rpc_duration_seconds",
            "Time from a request's arrival to the end of its response (a stream's whole life)",
            seconds.clone(),
        );
        let snapshots = Arc::new(SnapshotStats::default());
        registry.register_collector(Box::new(Scraped {
            service,
            connections,
            snapshots: snapshots.clone(),
        }));
        Arc::new(Self {
            registry,
            requests,
            seconds,
            snapshots,
        })
    }

    /// Notes a snapshot that took `took`.
    pub fn snapshot_written(&self, took: Duration) {
        self.snapshots.count.fetch_add(1, Ordering::Relaxed);
        self.snapshots.last_micros.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::warn!("metrics could not be encoded");
        }
        text
    }

    fn finished(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.requests
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.seconds
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
    }
}

/// The name gRPC gives `code`.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The method label of a request path: the served RPCs by name, the rest as `other`, so a
/// client cannot grow the label set without bound.
fn method_label(path: &str) -> &'static str {
    const OTHERS: [&str; 4] = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    super::auth::RPC_ROLES
        .iter()
        .map(|(method, _)| *method)
        .chain(OTHERS)
        .find(|method| *method == path)
        .unwrap_or("other")
}

/// What is read at each scrape.
struct Scraped {
    service: KpiService,
    connections: Connections,
    snapshots: Arc<SnapshotStats>,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// The flushes' durations as a histogram (the store counts them per bucket).
fn sync_histogram(encoder: &mut DescriptorEncoder, sync: &DurationCounts) -> std::fmt::Result {
    let buckets: Vec<(f64, u64)> = SYNC_BUCKETS_MICROS
        .iter()
        .zip(sync.buckets)
        .map(|(bound, count)| {
            let bound = if *bound == u64::MAX {
                f64::MAX
            } else {
                *bound as f64 / 1e6
            };
            (bound, count)
        })
        .collect();
    let count = sync.buckets.iter().sum();
    let mut metric = encoder.encode_descriptor(
        "kpi_log_sync_duration_seconds",
        "Time a flush took to make its groups durable (fsyncs and the acknowledgement record)",
        None,
        prometheus_client::metrics::MetricType::Histogram,
    )?;
    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        sync.sum_micros as f64 / 1e6,
        count,
        &buckets,
        None,
    )
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let now = self.service.gauges();
        let e = &mut encoder;
        counter(
            e,
            "kpi_events_appended",
            "Events appended to the log since start",
            now.log.events,
        )?;
        counter(
            e,
            "kpi_log_flushes",
            "Flushes (fsyncs) that made appended events durable",
            now.log.flushes,
        )?;
        counter(
            e,
            "kpi_log_segments_written",
            "Log segments written since start",
            now.log.segments,
        )?;
        counter(
            e,
            "kpi_append_requests",
            "Append requests (batches) answered since start",
            now.log.requests,
        )?;
        counter(
            e,
            "kpi_append_groups",
            "Groups committed: the requests the writer took at once",
            now.log.groups,
        )?;
        sync_histogram(e, &now.log.sync)?;
        gauge(
            e,
            "kpi_log_head_seq",
            "Seq of the last durable event",
            signed(now.head_seq),
        )?;
        gauge(
            e,
            "kpi_fold_lag_events",
            "Durable events not yet folded into the aggregates",
            signed(now.head_seq.saturating_sub(now.folded_seq)),
        )?;
        gauge(
            e,
            "kpi_bucket_memory_bytes",
            "Bytes the aggregates' buckets hold in memory",
            signed(now.bucket_bytes),
        )?;
        let streams = self.service.list_streams();
        for (kind, name) in [
            (StreamKind::WatchKpis, "watch_kpis"),
            (StreamKind::ReplayEvents, "replay_events"),
        ] {
            let open = streams.streams.iter().filter(|stream| stream.kind == kind);
            let count = open.clone().count();
            let lag = open
                .map(|stream| streams.head_seq.saturating_sub(stream.position))
                .max()
                .unwrap_or(0);
            gauge(
                e,
                &format!("kpi_open_streams_{name}"),
                "Open server streams of this RPC",
                signed(count as u64),
            )?;
            gauge(
                e,
                &format!("kpi_stream_lag_events_{name}"),
                "Largest distance of an open stream of this RPC behind the head, in events",
                signed(lag),
            )?;
        }
        gauge(
            e,
            "kpi_open_connections",
            "Open client connections",
            signed(self.connections.count() as u64),
        )?;
        counter(
            e,
            "kpi_snapshots",
            "Read-model snapshots written since start",
            self.snapshots.count.load(Ordering::Relaxed),
        )?;
        let micros = self.snapshots.last_micros.load(Ordering::Relaxed);
        let metric = ConstGauge::new(micros as f64 / 1e6);
        metric.encode(e.encode_descriptor(
            "kpi_snapshot_last_duration_seconds",
            "How long the last read-model snapshot took",
            None,
            metric.metric_type(),
        )?)?;
        if let Some(bytes) = resident_bytes() {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory of the process",
                signed(bytes),
            )?;
        }
        Ok(())
    }
}

/// The process's resident memory, from /proc (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The tower layer that times and counts every request, in a span of its own.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Option<Arc<Metrics>>,
}

impl ObserveLayer {
    /// Counts into `metrics` (when set); spans either way.
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service whose requests are timed and counted.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

impl<S, B> tower::Service<http::Request<B>> for Observed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            method,
            code = tracing::field::Empty,
            seconds = tracing::field::Empty
        );
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let mut outcome = Outcome {
            method,
            started: Instant::now(),
            metrics: self.metrics.clone(),
            span,
            done: false,
        };
        Box::pin(async move {
            let response = call.await?;
            // A status in the headers is a "trailers-only" answer: the call is over.
            let code = response
                .headers()
                .get("grpc-status")
                .map(|value| tonic::Code::from_bytes(value.as_bytes()));
            if let Some(code) = code {
                outcome.finish(code);
            }
            Ok(response.map(|body| tonic::body::Body::new(ObservedBody { body, outcome })))
        })
    }
}

/// A request in flight: reported once, when its status is known or it is dropped.
struct Outcome {
    method: &'static str,
    started: Instant,
    metrics: Option<Arc<Metrics>>,
    span: tracing::Span,
    done: bool,
}

impl Outcome {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let took = self.started.elapsed();
        self.span.record("code", code_name(code));
        self.span.record("seconds", took.as_secs_f64());
        self.span.in_scope(|| tracing::debug!("rpc finished"));
        if let Some(metrics) = &self.metrics {
            metrics.finished(self.method, code, took);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // A response the client stopped reading, or the server cut off.
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that reports its call's status from the trailers.
struct ObservedBody {
    body: tonic::body::Body,
    outcome: Outcome,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|trailers| trailers.get("grpc-status"))
                    .map(|value| tonic::Code::from_bytes(value.as_bytes()))
                {
                    self.outcome.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.outcome.finish(status.code()),
            Poll::Ready(None) => self.outcome.finish(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves `GET /metrics` on `listener` (HTTP/1.1) until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    use http_body_util::Full;
    use hyper::service::service_fn;
    loop {
        let tcp = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    tracing::warn!(%error, "metrics: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let answer = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let response = if request.uri().path() == "/metrics" {
                        http::Response::builder()
                            .header(
                                http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.encode())))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
                    };
                    Ok::<_, Infallible>(response.unwrap_or_default())
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), answer);
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}
