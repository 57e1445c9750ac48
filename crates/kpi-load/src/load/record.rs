//! `kpi-load record`: unary `Ingest.Record` calls of one measurement each from concurrent
//! callers for a fixed time; every call is durable (flushed) before it is answered, so
//! this measures the server's group commit under many small writers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::Value;

use super::{Latencies, LoadError, Report, connect_many, setup};
use crate::workload::Workload;
use kpi_service::proto::RecordRequest;
use kpi_service::proto::ingest_client::IngestClient;

/// Options of the record scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordOptions {
    /// Concurrent callers, each waiting for its answer before the next call.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// How long to call, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// HTTP/2 connections the callers share (round-robin).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

/// What one caller saw.
#[derive(Default)]
struct Called {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Latencies,
}

/// Defines the KPIs, then lets `concurrency` callers record one workload measurement per
/// call until the time is up. Caller `c` sends measurements `c, c + C, ...` of the stream
/// (wrapping around at its end).
pub async fn record(
    addr: &str,
    workload: Arc<Workload>,
    options: &RecordOptions,
    progress: &ProgressBar,
) -> Result<Report, LoadError> {
    if options.concurrency == 0 || workload.is_empty() {
        return Err(LoadError::Invalid(
            "concurrency and measurements must be at least 1".into(),
        ));
    }
    let defined = setup(addr, &workload).await?;
    let channels = connect_many(addr, options.connections.min(options.concurrency)).await?;
    let duration = Duration::from_secs(options.duration_secs);
    let started = Instant::now();
    let deadline = started + duration;
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..options.concurrency {
        let client = IngestClient::new(channels[caller % channels.len()].clone());
        let workload = Arc::clone(&workload);
        let progress = progress.clone();
        let step = u64::try_from(options.concurrency).unwrap_or(u64::MAX);
        let mut index = u64::try_from(caller).unwrap_or(0);
        callers.spawn(async move {
            let mut client = client;
            let mut called = Called::default();
            while Instant::now() < deadline {
                let measurement = workload.measurement(index % workload.len());
                index = index.wrapping_add(step);
                let sent = Instant::now();
                let answer = client
                    .record(RecordRequest {
                        measurements: vec![measurement],
                    })
                    .await;
                called.latencies.record(sent.elapsed());
                called.calls += 1;
                progress.inc(1);
                if let Err(status) = answer {
                    called.errors += 1;
                    called.first_error.get_or_insert_with(|| status.to_string());
                }
            }
            called
        });
    }
    let mut total = Called::default();
    while let Some(called) = callers.join_next().await {
        let called = called?;
        total.calls += called.calls;
        total.errors += called.errors;
        if total.first_error.is_none() {
            total.first_error = called.first_error;
        }
        total.latencies.merge(&called.latencies);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let mut extra = vec![
        ("kpis_defined", Value::from(defined)),
        ("errors", Value::from(total.errors)),
    ];
    if let Some(first) = total.first_error {
        extra.push(("first_error", Value::from(first)));
    }
    Ok(Report {
        scenario: "record",
        params: vec![
            ("concurrency", Value::from(options.concurrency)),
            ("connections", Value::from(channels.len())),
            ("duration_secs", Value::from(options.duration_secs)),
        ],
        items: total.calls - total.errors,
        ops: total.calls,
        elapsed,
        latencies: total.latencies,
        extra,
    })
}
