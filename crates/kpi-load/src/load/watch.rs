//! `kpi-load watch`: live-update latency of `Query.WatchKpis` with many watchers.
//!
//! `W` watchers (100 per HTTP/2 connection, under hyper's default of about 200 concurrent
//! streams per connection) each watch one SUM or COUNT KPI of the workload (round-robin)
//! on HOUR grain. Once every watcher has its snapshot, one producer records `rate`
//! measurements per second with occurred_at = now: a unary `Record` of `rate / 100`
//! measurements every 10 ms, spread round-robin over the watched KPIs, without waiting for
//! one call before starting the next.
//!
//! For every batch and KPI the producer keeps the highest seq the acknowledgement gave that
//! KPI (a *mark*). A watcher keeps the instant at which it first saw each higher seq in an
//! update of its KPI. Afterwards each mark of a watcher's KPI is matched to the first
//! update whose seq is at least the mark's: the batch was visible to that watcher from then
//! on. Updates are coalesced, so one update can cover several marks. Latency is measured
//! from the acknowledgement (clamped to 0: the update can beat the ack to the client) and,
//! in a second histogram, from the request's send. A watcher that errs or has not seen its
//! KPI's last mark within the grace period after the producer stops *fell behind*.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use indicatif::ProgressBar;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{Latencies, LoadError, Report, connect, connect_many, setup};
use crate::workload::{Workload, WorkloadKpi};
use kpi_service::proto::ingest_client::IngestClient;
use kpi_service::proto::query_client::QueryClient;
use kpi_service::proto::watch_kpis_response::Item;
use kpi_service::proto::{self, RecordRequest, WatchKpisRequest};

/// The producer's period: one Record call per tick.
const TICK: Duration = Duration::from_millis(10);
/// Ticks per second.
const TICKS_PER_SECOND: u32 = 100;
/// How long every watcher may take to get its snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of the watch scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchOptions {
    /// Watchers; a comma-separated list runs the scenario once per count (1,100,1000).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub watchers: Vec<usize>,
    /// Measurements per second the producer records (in batches of rate/100 every 10 ms).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// How long the producer records, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Watchers per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    pub per_connection: usize,
    /// How long watchers may take, after the producer stops, to see its last batch before
    /// they count as fallen behind, in seconds.
    #[arg(long, default_value_t = 5)]
    pub grace_secs: u64,
}

/// The highest seq a batch gave one KPI, and when the batch was sent and acknowledged.
#[derive(Debug, Clone, Copy)]
struct Mark {
    kpi: usize,
    seq: u64,
    sent: Instant,
    acked: Instant,
}

/// What one watcher saw: each new highest seq of its KPI and when it arrived.
struct Watched {
    kpi: usize,
    seen: Vec<(u64, Instant)>,
    updates: u64,
    error: Option<String>,
}

/// Runs the scenario once per watcher count.
pub async fn watch(
    addr: &str,
    workload: Arc<Workload>,
    options: &WatchOptions,
    progress: &ProgressBar,
) -> Result<Vec<Report>, LoadError> {
    let targets: Vec<WorkloadKpi> = workload
        .kpis()
        .iter()
        .filter(|kpi| kpi.role.is_summable())
        .cloned()
        .collect();
    if targets.is_empty() || options.rate == 0 || options.per_connection == 0 {
        return Err(LoadError::Invalid(
            "the workload needs a SUM or COUNT kpi, rate and per-connection at least 1".into(),
        ));
    }
    setup(addr, &workload).await?;
    let mut reports = Vec::new();
    for &watchers in &options.watchers {
        reports.push(watch_once(addr, &workload, &targets, watchers, options, progress).await?);
    }
    progress.finish_and_clear();
    Ok(reports)
}

async fn watch_once(
    addr: &str,
    workload: &Arc<Workload>,
    targets: &[WorkloadKpi],
    watchers: usize,
    options: &WatchOptions,
    progress: &ProgressBar,
) -> Result<Report, LoadError> {
    let connections = watchers.div_ceil(options.per_connection).max(1);
    let channels = connect_many(addr, connections).await?;
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(watchers.max(1));
    // Highest seq seen per watcher, read while waiting for them to catch up.
    let highest: Arc<Vec<AtomicU64>> = Arc::new((0..watchers).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for watcher in 0..watchers {
        let kpi = watcher % targets.len();
        let client = QueryClient::new(channels[watcher / options.per_connection].clone());
        tasks.spawn(follow(
            client,
            kpi,
            targets[kpi].id.clone(),
            ready_tx.clone(),
            Arc::clone(&highest),
            watcher,
            stop.clone(),
        ));
    }
    drop(ready_tx);
    let all_ready = async {
        let mut ready = 0;
        while ready < watchers && ready_rx.recv().await.is_some() {
            ready += 1;
        }
        ready
    };
    let ready = tokio::time::timeout(SNAPSHOT_TIMEOUT, all_ready)
        .await
        .unwrap_or(0);
    if ready < watchers {
        stop.cancel();
        let mut reason = format!("only {ready} of {watchers} watchers got their snapshot");
        while let Some(done) = tasks.join_next().await {
            if let Some(error) = done?.error {
                reason = format!("{reason}; first error: {error}");
                break;
            }
        }
        return Err(LoadError::Invalid(reason));
    }

    let produced = produce(connect(addr).await?, workload, targets, options, progress).await?;

    // Wait for every watcher to see the last mark of its KPI, within the grace period.
    let mut last = vec![0_u64; targets.len()];
    for mark in &produced.marks {
        last[mark.kpi] = last[mark.kpi].max(mark.seq);
    }
    let grace_end = Instant::now() + Duration::from_secs(options.grace_secs);
    let caught_up = |highest: &[AtomicU64]| {
        highest
            .iter()
            .enumerate()
            .all(|(w, seen)| seen.load(Ordering::Relaxed) >= last[w % targets.len()])
    };
    while !caught_up(&highest) && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let mut watched = Vec::with_capacity(watchers);
    while let Some(done) = tasks.join_next().await {
        watched.push(done?);
    }

    let mut from_ack = Latencies::new();
    let mut from_send = Latencies::new();
    let mut marks_by_kpi: Vec<Vec<Mark>> = vec![Vec::new(); targets.len()];
    for mark in &produced.marks {
        marks_by_kpi[mark.kpi].push(*mark);
    }
    for marks in &mut marks_by_kpi {
        marks.sort_by_key(|mark| mark.seq);
    }
    let mut updates = 0;
    let mut fell_behind = 0;
    let mut missed = 0_u64;
    let mut first_error = None;
    for watcher in &watched {
        updates += watcher.updates;
        let behind = watcher
            .seen
            .last()
            .is_none_or(|&(seq, _)| seq < last[watcher.kpi]);
        if watcher.error.is_some() || behind {
            fell_behind += 1;
        }
        if first_error.is_none() {
            first_error.clone_from(&watcher.error);
        }
        let mut seen = watcher.seen.iter().peekable();
        for mark in &marks_by_kpi[watcher.kpi] {
            while seen.next_if(|&&(seq, _)| seq < mark.seq).is_some() {}
            match seen.peek() {
                Some(&&(_, at)) => {
                    from_ack.record(at.saturating_duration_since(mark.acked));
                    from_send.record(at.saturating_duration_since(mark.sent));
                }
                None => missed += 1,
            }
        }
    }
    let mut extra = vec![
        ("updates", Value::from(updates)),
        ("fell_behind", Value::from(fell_behind)),
        ("marks_missed", Value::from(missed)),
        ("record_errors", Value::from(produced.errors)),
        ("from_send_p50_us", rounded(from_send.quantile_us(0.5))),
        ("from_send_p90_us", rounded(from_send.quantile_us(0.9))),
        ("from_send_p99_us", rounded(from_send.quantile_us(0.99))),
        ("from_send_max_us", rounded(from_send.max_us())),
        (
            "record_p50_us",
            rounded(produced.latencies.quantile_us(0.5)),
        ),
        (
            "record_p99_us",
            rounded(produced.latencies.quantile_us(0.99)),
        ),
    ];
    if let Some(error) = first_error.or(produced.first_error) {
        extra.push(("first_error", Value::from(error)));
    }
    Ok(Report {
        scenario: "watch",
        params: vec![
            ("watchers", Value::from(watchers)),
            ("connections", Value::from(connections)),
            ("rate", Value::from(options.rate)),
            ("duration_secs", Value::from(options.duration_secs)),
            ("kpis_watched", Value::from(targets.len().min(watchers))),
        ],
        items: produced.recorded,
        ops: updates,
        elapsed: produced.elapsed,
        latencies: from_ack,
        extra,
    })
}

fn rounded(value: f64) -> Value {
    Value::from((value * 10.0).round() / 10.0)
}

/// One watcher: reports ready at snapshot_complete, then notes every new highest seq of
/// an update until stopped.
async fn follow(
    mut client: QueryClient<Channel>,
    kpi: usize,
    kpi_id: String,
    ready: mpsc::Sender<()>,
    highest: Arc<Vec<AtomicU64>>,
    watcher: usize,
    stop: CancellationToken,
) -> Watched {
    let mut watched = Watched {
        kpi,
        seen: Vec::new(),
        updates: 0,
        error: None,
    };
    let request = WatchKpisRequest {
        kpi_ids: vec![kpi_id],
        grain: proto::Grain::Hour.into(),
        ..WatchKpisRequest::default()
    };
    let mut stream = tokio::select! {
        () = stop.cancelled() => return watched,
        answer = client.watch_kpis(request) => match answer {
            Ok(response) => response.into_inner(),
            Err(status) => {
                watched.error = Some(status.to_string());
                return watched;
            }
        },
    };
    let mut top = 0;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = stream.message() => message,
        };
        let item = match message {
            Ok(Some(response)) => response.item,
            Ok(None) => {
                watched.error = Some("stream ended".into());
                break;
            }
            Err(status) => {
                watched.error = Some(status.to_string());
                break;
            }
        };
        match item {
            Some(Item::SnapshotComplete(_)) => {
                let _ = ready.send(()).await;
            }
            Some(Item::Update(update)) => {
                let at = Instant::now();
                watched.updates += 1;
                if update.seq > top {
                    top = update.seq;
                    watched.seen.push((top, at));
                    if let Some(slot) = highest.get(watcher) {
                        slot.store(top, Ordering::Relaxed);
                    }
                }
            }
            Some(Item::Snapshot(_) | Item::Heartbeat(_)) | None => {}
        }
    }
    watched
}

/// What the producer did.
struct Produced {
    marks: Vec<Mark>,
    recorded: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Latencies,
    elapsed: Duration,
}

/// Records `rate` measurements per second for the duration, one Record call per tick.
async fn produce(
    channel: Channel,
    workload: &Arc<Workload>,
    targets: &[WorkloadKpi],
    options: &WatchOptions,
    progress: &ProgressBar,
) -> Result<Produced, LoadError> {
    let per_batch = (options.rate / TICKS_PER_SECOND).max(1);
    let ticks = options.duration_secs * u64::from(TICKS_PER_SECOND);
    let shared = Arc::new(Mutex::new(Produced {
        marks: Vec::new(),
        recorded: 0,
        errors: 0,
        first_error: None,
        latencies: Latencies::new(),
        elapsed: Duration::ZERO,
    }));
    let mut interval = tokio::time::interval(TICK);
    let mut calls = tokio::task::JoinSet::new();
    let mut next = 0_u64;
    let started = Instant::now();
    for _ in 0..ticks {
        interval.tick().await;
        let now = Utc::now();
        let batch: Vec<(usize, proto::Measurement)> = (0..per_batch)
            .map(|_| {
                let kpi =
                    usize::try_from(next % u64::try_from(targets.len()).unwrap_or(1)).unwrap_or(0);
                let measurement = workload.measurement_of(&targets[kpi], now, next);
                next += 1;
                (kpi, measurement)
            })
            .collect();
        let mut client = IngestClient::new(channel.clone());
        let shared = Arc::clone(&shared);
        let progress = progress.clone();
        calls.spawn(async move {
            let (kpis, measurements): (Vec<usize>, Vec<proto::Measurement>) =
                batch.into_iter().unzip();
            let sent = Instant::now();
            let answer = client.record(RecordRequest { measurements }).await;
            let acked = Instant::now();
            progress.inc(u64::try_from(kpis.len()).unwrap_or(0));
            let mut produced = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            produced.latencies.record(acked - sent);
            match answer {
                Ok(response) => {
                    let results = response.into_inner().results;
                    produced.recorded += u64::try_from(results.len()).unwrap_or(0);
                    let mut highest: Vec<(usize, u64)> = Vec::new();
                    for (kpi, result) in kpis.iter().zip(&results) {
                        match highest.iter_mut().find(|(k, _)| k == kpi) {
                            Some((_, seq)) => *seq = (*seq).max(result.seq),
                            None => highest.push((*kpi, result.seq)),
                        }
                    }
                    produced
                        .marks
                        .extend(highest.into_iter().map(|(kpi, seq)| Mark {
                            kpi,
                            seq,
                            sent,
                            acked,
                        }));
                }
                Err(status) => {
                    produced.errors += 1;
                    produced
                        .first_error
                        .get_or_insert_with(|| status.to_string());
                }
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done?;
    }
    let elapsed = started.elapsed();
    let mut produced = std::mem::replace(
        &mut *shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        Produced {
            marks: Vec::new(),
            recorded: 0,
            errors: 0,
            first_error: None,
            latencies: Latencies::new(),
            elapsed: Duration::ZERO,
        },
    );
    produced.elapsed = elapsed;
    Ok(produced)
}
