//! `kpi-load ingest`: producers stream the workload's measurements through
//! `Ingest.RecordStream` and measure durable throughput and the latency of each batch.
//!
//! The stream is cut in batches of `batch` measurements; producer `p` of `P` sends batches
//! `p, p + P, p + 2P, ...`, each on its own connection and RecordStream. The server takes
//! one batch of a stream at a time (it reads the next after acknowledging the previous),
//! so a producer keeps up to `window` batches in flight: while the server stores one, the
//! next is already waiting in its receive buffer. Latency is per batch, from handing it to
//! the stream to its acknowledgement, so it includes the wait behind the batches ahead of
//! it on the same stream (at most `window - 1`).
//!
//! `first` and `count` send a *piece* of the stream: measurements `[first, first + count)`
//! of the `--measurements` in it, cut in batches from `first`. A measurement is a function
//! of the seed and its index alone, so pieces sent one after the other send the same
//! measurements as one run of the whole stream (benches/history.py ingests a long history
//! in rounds this way).

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{Latencies, LoadError, Report, connect, setup};
use crate::workload::Workload;
use kpi_service::proto::ingest_client::IngestClient;
use kpi_service::proto::{self, RecordStreamRequest};

/// Options of the ingest scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestOptions {
    /// Producers, each with its own connection and RecordStream.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Measurements per batch (1 to 10,000).
    #[arg(long, default_value_t = 1000)]
    pub batch: u64,
    /// Batches a producer keeps in flight on its stream (sent, not yet acknowledged).
    #[arg(long, default_value_t = 2)]
    pub window: usize,
    /// Index of the first measurement of the stream to send (0: from the start).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Number of measurements to send from --first (default: the rest of the stream);
    /// --first + --count must not exceed --measurements.
    #[arg(long)]
    pub count: Option<u64>,
}

impl IngestOptions {
    /// The indexes of the stream's measurements this run sends, `[first, first + count)`,
    /// or why they do not lie in a stream of `measurements`.
    pub fn piece(&self, measurements: u64) -> Result<Range<u64>, LoadError> {
        let count = match self.count {
            Some(count) => count,
            None => measurements.checked_sub(self.first).ok_or_else(|| {
                LoadError::Invalid(format!(
                    "first ({}) is beyond the stream's {measurements} measurements",
                    self.first
                ))
            })?,
        };
        match self.first.checked_add(count) {
            Some(end) if end <= measurements => Ok(self.first..end),
            _ => Err(LoadError::Invalid(format!(
                "first + count ({} + {count}) exceeds the stream's {measurements} measurements",
                self.first
            ))),
        }
    }
}

/// What one producer saw.
#[derive(Default)]
struct Produced {
    acknowledged: u64,
    duplicates: u64,
    batches: u64,
    rejected: Vec<String>,
    latencies: Latencies,
}

/// Defines the KPIs, then streams the workload's measurements `options.piece` (by default
/// all of them); the report's items are the measurements the server acknowledged as stored.
pub async fn ingest(
    addr: &str,
    workload: Arc<Workload>,
    options: &IngestOptions,
    progress: &ProgressBar,
) -> Result<Report, LoadError> {
    if options.producers == 0 || !(1..=10_000).contains(&options.batch) || options.window == 0 {
        return Err(LoadError::Invalid(
            "producers and window must be at least 1, batch 1 to 10000".into(),
        ));
    }
    let piece = options.piece(workload.len())?;
    let defined = setup(addr, &workload).await?;
    let mut channels = Vec::with_capacity(options.producers);
    for _ in 0..options.producers {
        channels.push(connect(addr).await?);
    }
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for (producer, channel) in channels.into_iter().enumerate() {
        producers.spawn(produce(
            IngestClient::new(channel),
            Arc::clone(&workload),
            options.clone(),
            piece.clone(),
            producer,
            progress.clone(),
        ));
    }
    let mut total = Produced::default();
    while let Some(produced) = producers.join_next().await {
        let produced = produced??;
        total.acknowledged += produced.acknowledged;
        total.duplicates += produced.duplicates;
        total.batches += produced.batches;
        total.rejected.extend(produced.rejected);
        total.latencies.merge(&produced.latencies);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let mut extra = vec![
        ("kpis_defined", Value::from(defined)),
        ("duplicates", Value::from(total.duplicates)),
        ("rejected_batches", Value::from(total.rejected.len())),
    ];
    if let Some(first) = total.rejected.first() {
        extra.push(("first_rejection", Value::from(first.clone())));
    }
    Ok(Report {
        scenario: "ingest",
        params: vec![
            ("producers", Value::from(options.producers)),
            ("batch", Value::from(options.batch)),
            ("window", Value::from(options.window)),
            ("kpis", Value::from(workload.kpis().len())),
            ("measurements", Value::from(workload.len())),
            ("first", Value::from(piece.start)),
            ("count", Value::from(piece.end - piece.start)),
            ("event_ids", Value::from(workload.config().event_ids)),
        ],
        items: total.acknowledged,
        ops: total.batches,
        elapsed,
        latencies: total.latencies,
        extra,
    })
}

/// One producer: its batches of `piece` into one RecordStream, at most `window`
/// unacknowledged.
async fn produce(
    mut client: IngestClient<tonic::transport::Channel>,
    workload: Arc<Workload>,
    options: IngestOptions,
    piece: Range<u64>,
    producer: usize,
    progress: ProgressBar,
) -> Result<Produced, LoadError> {
    let (requests, stream) = mpsc::channel::<RecordStreamRequest>(options.window);
    // Send instants in batch order; the acknowledgements come back in the same order.
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(Instant, u64)>();
    let window = Arc::new(Semaphore::new(options.window));
    // Batch k of the piece holds measurements [piece.start + k x batch, ...), cut to the
    // piece; for the whole stream that is the stream's batch k.
    let batches = (piece.end - piece.start).div_ceil(options.batch);
    let step = u64::try_from(options.producers).unwrap_or(u64::MAX);
    let first = u64::try_from(producer).unwrap_or(u64::MAX);
    let sender = {
        let window = Arc::clone(&window);
        tokio::spawn(async move {
            let mut index = first;
            while index < batches {
                // Closed only when the reader gave up; then stop sending.
                let Ok(permit) = window.acquire().await else {
                    break;
                };
                permit.forget();
                let from = piece
                    .start
                    .saturating_add(index.saturating_mul(options.batch));
                let to = from.saturating_add(options.batch).min(piece.end);
                let measurements: Vec<_> = workload.measurements(from..to).collect();
                let len = u64::try_from(measurements.len()).unwrap_or(u64::MAX);
                let request = RecordStreamRequest {
                    batch_id: index.to_string(),
                    measurements,
                };
                if sent_tx.send((Instant::now(), len)).is_err()
                    || requests.send(request).await.is_err()
                {
                    break;
                }
                index += step;
            }
        })
    };
    let rpc = |status| LoadError::Rpc {
        call: format!("RecordStream of producer {producer}"),
        status,
    };
    let mut acks = client
        .record_stream(ReceiverStream::new(stream))
        .await
        .map_err(rpc)?
        .into_inner();
    let mut produced = Produced::default();
    while let Some(ack) = acks.message().await.map_err(rpc)? {
        let now = Instant::now();
        // Pushed before its batch was sent, so it is there when the batch's ack is.
        let (sent_at, len) = sent_rx.recv().await.unwrap_or((now, 0));
        window.add_permits(1);
        produced
            .latencies
            .record(now.saturating_duration_since(sent_at));
        produced.batches += 1;
        progress.inc(len);
        match ack.rejection {
            Some(rejection) => produced
                .rejected
                .push(format!("batch {}: {}", ack.batch_id, rejection.message)),
            None => {
                produced.acknowledged += u64::try_from(ack.results.len()).unwrap_or(u64::MAX);
                produced.duplicates += u64::try_from(
                    ack.results
                        .iter()
                        .filter(|r: &&proto::RecordResult| r.duplicate)
                        .count(),
                )
                .unwrap_or(u64::MAX);
            }
        }
    }
    window.close();
    sender.await?;
    Ok(produced)
}
