//! `kpi-load query`: concurrent `Query.GetAggregates` calls for the latest buckets of one
//! KPI (by default 24 months up to the workload's end), each timed until its stream ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use indicatif::ProgressBar;
use serde_json::Value;

use super::{GrainArg, Latencies, LoadError, Report, connect, connect_many};
use crate::domain::calendar::{bucket_of, previous_bucket};
use crate::domain::{Grain, kpi::parse_timezone};
use crate::proto::kpi_catalog_client::KpiCatalogClient;
use crate::proto::query_client::QueryClient;
use crate::proto::{self, GetAggregatesRequest, to_proto};
use crate::workload::Workload;

/// The question of the query scenarios (GetAggregates and the raw-sled scan): the latest
/// buckets of one KPI up to the workload's end.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregateQuestion {
    /// The KPI to query.
    #[arg(long, default_value = "revenue_001")]
    pub kpi: String,
    /// Bucket grain.
    #[arg(long, value_enum, ignore_case = true, default_value = "MONTH")]
    pub grain: GrainArg,
    /// Number of buckets: the one containing the workload's end and those before it.
    #[arg(long, default_value_t = 24)]
    pub buckets: u32,
}

impl AggregateQuestion {
    /// The question's fields for a report's parameters.
    pub(super) fn params(&self) -> [(&'static str, Value); 3] {
        [
            ("kpi", Value::from(self.kpi.clone())),
            (
                "grain",
                Value::from(format!("{:?}", self.grain).to_uppercase()),
            ),
            ("buckets", Value::from(self.buckets)),
        ]
    }
}

/// Options of the query scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryOptions {
    /// Concurrent callers.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Calls in total.
    #[arg(long, default_value_t = 10_000)]
    pub requests: u64,
    /// What each call asks.
    #[command(flatten)]
    pub question: AggregateQuestion,
    /// HTTP/2 connections the callers share (round-robin).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

/// What one caller saw.
#[derive(Default)]
struct Asked {
    calls: u64,
    buckets: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Latencies,
}

/// `[start, end)` of the `buckets` buckets of `grain` in the KPI's zone that end with the
/// one containing the last instant before `end`.
async fn range(
    addr: &str,
    options: &QueryOptions,
    end: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), LoadError> {
    let kpi = KpiCatalogClient::new(connect(addr).await?)
        .get_kpi(proto::GetKpiRequest {
            kpi_id: options.question.kpi.clone(),
        })
        .await
        .map_err(|status| LoadError::Rpc {
            call: format!("GetKpi {}", options.question.kpi),
            status,
        })?
        .into_inner();
    let timezone = kpi
        .kpi
        .and_then(|kpi| kpi.definition)
        .map(|definition| definition.timezone)
        .unwrap_or_default();
    let tz = parse_timezone(&timezone, "timezone")
        .map_err(|rejection| LoadError::Invalid(rejection.to_string()))?;
    Ok(latest_buckets(
        options.question.grain.into(),
        tz,
        end,
        options.question.buckets,
    ))
}

/// `[start, end)` of the `buckets` buckets of `grain` in `tz` that end with the one
/// containing the last instant before `end` (at least one bucket). Shared with the raw-sled
/// scenario, so both ask for the same range.
pub(super) fn latest_buckets(
    grain: Grain,
    tz: Tz,
    end: DateTime<Utc>,
    buckets: u32,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let last = bucket_of(grain, tz, end - TimeDelta::milliseconds(1));
    let mut first = last;
    for _ in 1..buckets.max(1) {
        first = previous_bucket(grain, tz, first);
    }
    (first.start, last.end)
}

/// Runs `requests` GetAggregates calls from `concurrency` callers; items are the buckets
/// received.
pub async fn query(
    addr: &str,
    workload: Arc<Workload>,
    options: &QueryOptions,
    progress: &ProgressBar,
) -> Result<Report, LoadError> {
    if options.concurrency == 0 {
        return Err(LoadError::Invalid("concurrency must be at least 1".into()));
    }
    let (start, end) = range(addr, options, workload.end()).await?;
    let request = GetAggregatesRequest {
        kpi_id: options.question.kpi.clone(),
        grain: to_proto::grain(options.question.grain.into()).into(),
        start: Some(to_proto::timestamp(start)),
        end: Some(to_proto::timestamp(end)),
        ..GetAggregatesRequest::default()
    };
    let channels = connect_many(addr, options.connections.min(options.concurrency)).await?;
    let remaining = Arc::new(AtomicU64::new(options.requests));
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..options.concurrency {
        let mut client = QueryClient::new(channels[caller % channels.len()].clone());
        let remaining = Arc::clone(&remaining);
        let request = request.clone();
        let progress = progress.clone();
        callers.spawn(async move {
            let mut asked = Asked::default();
            // Take one request at a time from the shared count until none is left.
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let sent = Instant::now();
                let outcome = async {
                    let mut stream = client.get_aggregates(request.clone()).await?.into_inner();
                    let mut buckets = 0_u64;
                    while stream.message().await?.is_some() {
                        buckets += 1;
                    }
                    Ok::<_, tonic::Status>(buckets)
                }
                .await;
                asked.latencies.record(sent.elapsed());
                asked.calls += 1;
                progress.inc(1);
                match outcome {
                    Ok(buckets) => asked.buckets += buckets,
                    Err(status) => {
                        asked.errors += 1;
                        asked.first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            asked
        });
    }
    let mut total = Asked::default();
    while let Some(asked) = callers.join_next().await {
        let asked = asked?;
        total.calls += asked.calls;
        total.buckets += asked.buckets;
        total.errors += asked.errors;
        if total.first_error.is_none() {
            total.first_error = asked.first_error;
        }
        total.latencies.merge(&asked.latencies);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let mut extra = vec![
        ("errors", Value::from(total.errors)),
        ("range_start", Value::from(start.to_rfc3339())),
        ("range_end", Value::from(end.to_rfc3339())),
    ];
    if let Some(first) = total.first_error {
        extra.push(("first_error", Value::from(first)));
    }
    Ok(Report {
        scenario: "query",
        params: vec![
            ("concurrency", Value::from(options.concurrency)),
            ("requests", Value::from(options.requests)),
        ]
        .into_iter()
        .chain(options.question.params())
        .collect(),
        items: total.buckets,
        ops: total.calls,
        elapsed,
        latencies: total.latencies,
        extra,
    })
}
