//! `kpi-load query`: concurrent `Query.GetAggregates` calls for the latest buckets of one
//! KPI (by default 24 months up to the workload's end), each timed until its stream ends;
//! or, with `--trend`, `Query.GetTrend` calls over the same buckets.
//!
//! Variants for a history benchmark: `--end-offset-buckets K` asks buckets that end K
//! buckets before the workload's end (old data, not touched by recent writes), and
//! `--as-of-seq N` / `--as-of-random` ask the answer as known at a point of the log (one
//! fixed seq, or one drawn per call uniformly from `[1, head]`, reproducibly: call *i*'s
//! seq is a function of `--as-of-seed` and *i* alone, whatever the concurrency).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use indicatif::ProgressBar;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde_json::Value;
use tonic::transport::Channel;

use super::{GrainArg, Latencies, LoadError, Report, connect, connect_many};
use crate::workload::Workload;
use kpi_service::domain::calendar::{bucket_of, previous_bucket};
use kpi_service::domain::{Grain, kpi::parse_timezone};
use kpi_service::proto::audit_client::AuditClient;
use kpi_service::proto::kpi_catalog_client::KpiCatalogClient;
use kpi_service::proto::query_client::QueryClient;
use kpi_service::proto::{self, GetAggregatesRequest, GetTrendRequest, to_proto};

/// The question of the query scenarios (GetAggregates and the raw-sled scan): the latest
/// buckets of one KPI up to the workload's end, or up to some buckets before it.
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
    /// Buckets to skip back from the workload's end: the range ends this many buckets
    /// before the one containing the end (0: the latest buckets; larger asks older data).
    #[arg(long, default_value_t = 0)]
    pub end_offset_buckets: u32,
}

impl AggregateQuestion {
    /// The question's fields for a report's parameters.
    pub(super) fn params(&self) -> [(&'static str, Value); 4] {
        [
            ("kpi", Value::from(self.kpi.clone())),
            (
                "grain",
                Value::from(format!("{:?}", self.grain).to_uppercase()),
            ),
            ("buckets", Value::from(self.buckets)),
            ("end_offset_buckets", Value::from(self.end_offset_buckets)),
        ]
    }

    /// `[start, end)` of the question's buckets in `tz` for a workload ending at `end`.
    pub(super) fn range(&self, tz: Tz, end: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        latest_buckets(
            self.grain.into(),
            tz,
            end,
            self.buckets,
            self.end_offset_buckets,
        )
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
    /// Ask every call as of this seq (as_of.seq: the answer from the events up to it).
    #[arg(long, conflicts_with = "as_of_random")]
    pub as_of_seq: Option<u64>,
    /// Ask every call as of a seq drawn uniformly from [1, head], head being the log's
    /// head (Audit.GetLogInfo) when the run starts; the draws depend on --as-of-seed and
    /// the call's number only.
    #[arg(long)]
    pub as_of_random: bool,
    /// Seed of the --as-of-random draws.
    #[arg(long, default_value_t = 1)]
    pub as_of_seed: u64,
    /// Start no call after this many seconds (calls under way finish): bounds a run of
    /// slow calls, such as as-of questions on a long log; the report counts the calls made.
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Call Query.GetTrend instead (a window of --buckets buckets evaluated at the range's
    /// end, no forecast); items are the buckets of its answers.
    #[arg(long)]
    pub trend: bool,
}

/// Which point of the log the calls ask about.
#[derive(Debug, Clone, Copy)]
enum AsOfPoint {
    /// The present (no as_of).
    Now,
    /// One fixed seq.
    Seq(u64),
    /// A seq per call, uniform in `[1, head]`.
    Random { seed: u64, head: u64 },
}

impl AsOfPoint {
    /// The as_of of call number `call` (0-based).
    fn for_call(self, call: u64) -> Option<proto::AsOf> {
        let seq = match self {
            AsOfPoint::Now => return None,
            AsOfPoint::Seq(seq) => seq,
            AsOfPoint::Random { seed, head } => random_seq(seed, call, head),
        };
        Some(proto::AsOf {
            point: Some(proto::as_of::Point::Seq(seq)),
        })
    }

    /// The point for a report's parameters.
    fn param(self) -> Value {
        match self {
            AsOfPoint::Now => Value::from("now"),
            AsOfPoint::Seq(seq) => Value::from(seq),
            AsOfPoint::Random { .. } => Value::from("random"),
        }
    }
}

/// Call `call`'s seq, uniform in `[1, head]` (`head` at least 1): its own PCG stream
/// seeded from `(seed, call)`, as the workload seeds each measurement.
fn random_seq(seed: u64, call: u64, head: u64) -> u64 {
    // The golden-ratio step spreads consecutive calls over the seed space.
    let mut rng =
        Pcg64Mcg::seed_from_u64(seed.wrapping_add(call.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    rng.random_range(1..=head.max(1))
}

/// The point the options ask about; for `--as-of-random`, reads the log's head.
async fn as_of_point(addr: &str, options: &QueryOptions) -> Result<AsOfPoint, LoadError> {
    if let Some(seq) = options.as_of_seq {
        return Ok(AsOfPoint::Seq(seq));
    }
    if !options.as_of_random {
        return Ok(AsOfPoint::Now);
    }
    let head = AuditClient::new(connect(addr).await?)
        .get_log_info(proto::GetLogInfoRequest {})
        .await
        .map_err(|status| LoadError::Rpc {
            call: "GetLogInfo".into(),
            status,
        })?
        .into_inner()
        .head_seq;
    if head == 0 {
        return Err(LoadError::Invalid(
            "as-of-random needs events in the log, and it is empty".into(),
        ));
    }
    Ok(AsOfPoint::Random {
        seed: options.as_of_seed,
        head,
    })
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
    Ok(options.question.range(tz, end))
}

/// `[start, end)` of the `buckets` buckets of `grain` in `tz` that end with the one
/// `offset` buckets before the one containing the last instant before `end` (at least one
/// bucket). Shared with the raw-sled scenario, so both ask for the same range.
pub(super) fn latest_buckets(
    grain: Grain,
    tz: Tz,
    end: DateTime<Utc>,
    buckets: u32,
    offset: u32,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let mut last = bucket_of(grain, tz, end - TimeDelta::milliseconds(1));
    for _ in 0..offset {
        last = previous_bucket(grain, tz, last);
    }
    let mut first = last;
    for _ in 1..buckets.max(1) {
        first = previous_bucket(grain, tz, first);
    }
    (first.start, last.end)
}

/// One GetAggregates call: the number of buckets its stream sends before it ends, or the
/// status of the call or of the stream. Shared with the ready probe.
pub(super) async fn count_buckets(
    client: &mut QueryClient<Channel>,
    request: GetAggregatesRequest,
) -> Result<u64, tonic::Status> {
    let mut stream = client.get_aggregates(request).await?.into_inner();
    let mut buckets = 0_u64;
    while stream.message().await?.is_some() {
        buckets += 1;
    }
    Ok(buckets)
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
    // The point first: on an empty log, --as-of-random fails saying so.
    let point = as_of_point(addr, options).await?;
    let (start, end) = range(addr, options, workload.end()).await?;
    let request = GetAggregatesRequest {
        kpi_id: options.question.kpi.clone(),
        grain: to_proto::grain(options.question.grain.into()).into(),
        start: Some(to_proto::timestamp(start)),
        end: Some(to_proto::timestamp(end)),
        ..GetAggregatesRequest::default()
    };
    let trend = options.trend.then(|| GetTrendRequest {
        kpi_id: request.kpi_id.clone(),
        grain: request.grain,
        window: options.question.buckets,
        evaluated_at: request.end,
        ..GetTrendRequest::default()
    });
    let channels = connect_many(addr, options.connections.min(options.concurrency)).await?;
    let remaining = Arc::new(AtomicU64::new(options.requests));
    let started = Instant::now();
    let deadline = options
        .duration_secs
        .map(|secs| started + std::time::Duration::from_secs(secs));
    let total_requests = options.requests;
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..options.concurrency {
        let mut client = QueryClient::new(channels[caller % channels.len()].clone());
        let remaining = Arc::clone(&remaining);
        let request = request.clone();
        let trend = trend.clone();
        let progress = progress.clone();
        callers.spawn(async move {
            let mut asked = Asked::default();
            let call = |left| total_requests - left;
            // Take one request at a time from the shared count until none is left (or
            // the time is up); the count taken numbers the call, for its as-of draw.
            while let Ok(left) =
                remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break;
                }
                let as_of = point.for_call(call(left));
                let sent = Instant::now();
                let outcome = match &trend {
                    Some(trend) => {
                        let request = GetTrendRequest {
                            as_of,
                            ..trend.clone()
                        };
                        client
                            .get_trend(request)
                            .await
                            .map(|answer| answer.into_inner().buckets.len())
                            .map(|len| u64::try_from(len).unwrap_or(u64::MAX))
                    }
                    None => {
                        let request = GetAggregatesRequest {
                            as_of,
                            ..request.clone()
                        };
                        count_buckets(&mut client, request).await
                    }
                };
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
    if let AsOfPoint::Random { head, .. } = point {
        extra.push(("as_of_head", Value::from(head)));
    }
    if let Some(first) = total.first_error {
        extra.push(("first_error", Value::from(first)));
    }
    Ok(Report {
        scenario: "query",
        params: vec![
            ("concurrency", Value::from(options.concurrency)),
            ("requests", Value::from(options.requests)),
            ("as_of", point.param()),
            (
                "rpc",
                Value::from(if options.trend {
                    "GetTrend"
                } else {
                    "GetAggregates"
                }),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_seqs_are_reproducible_and_cover_one_to_head() {
        let draws: Vec<u64> = (0..2000).map(|call| random_seq(7, call, 10)).collect();
        assert_eq!(
            draws,
            (0..2000)
                .map(|call| random_seq(7, call, 10))
                .collect::<Vec<_>>()
        );
        assert_ne!(
            draws,
            (0..2000)
                .map(|call| random_seq(8, call, 10))
                .collect::<Vec<_>>()
        );
        for seq in 1..=10 {
            let hits = draws.iter().filter(|&&drawn| drawn == seq).count();
            // Uniform: about 200 each; far outside 120..280 would not be.
            assert!((120..280).contains(&hits), "seq {seq} drawn {hits} times");
        }
        assert_eq!(random_seq(1, 5, 1), 1);
        assert_eq!(random_seq(1, 5, 0), 1);
    }

    #[test]
    fn an_offset_steps_the_range_back_whole_buckets() {
        let tz: Tz = "Europe/Amsterdam".parse().unwrap_or(Tz::UTC);
        let end = DateTime::parse_from_rfc3339("2026-11-27T00:00:00Z")
            .map(|end| end.with_timezone(&Utc))
            .unwrap_or_default();
        let (start, latest_end) = latest_buckets(Grain::Month, tz, end, 24, 0);
        assert_eq!(latest_end.to_rfc3339(), "2026-11-30T23:00:00+00:00");
        assert_eq!(start.to_rfc3339(), "2024-11-30T23:00:00+00:00");
        let (older_start, older_end) = latest_buckets(Grain::Month, tz, end, 3, 22);
        assert_eq!(older_start.to_rfc3339(), "2024-10-31T23:00:00+00:00");
        assert_eq!(older_end.to_rfc3339(), "2025-01-31T23:00:00+00:00");
    }
}
