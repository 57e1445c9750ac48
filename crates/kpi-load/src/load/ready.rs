//! `kpi-load ready`: waits until a (re)starting server answers one `Query.GetAggregates`
//! and reports how long that took, so a script can time a restart from process start to
//! the first answered query.
//!
//! The server binds its port before it opens the log and rebuilds its read models, so a
//! connection may be refused (not bound yet), accepted but left unanswered (still opening:
//! the call waits), or fail while it starts; all of these are retried every
//! [`RETRY_INTERVAL`] until the deadline. A status the server chose itself (such as
//! NOT_FOUND for an unknown KPI) is an answer, but to a wrong question: it ends the probe
//! with an error instead of waiting for nothing, except NOT_FOUND with
//! `--allow-not-found`, the answer of a server with an empty data directory.

use std::time::{Duration, Instant};

use chrono_tz::Tz;
use serde_json::Value;

use super::query::count_buckets;
use super::{AggregateQuestion, Latencies, LoadError, Report, connect};
use crate::workload::Workload;
use kpi_service::proto::query_client::QueryClient;
use kpi_service::proto::{GetAggregatesRequest, to_proto};

/// Pause between attempts: short beside a restart (tens of milliseconds and up), long
/// enough not to busy-loop against a port that is not bound yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// Options of the ready probe.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadyOptions {
    /// Give up after this many seconds without an answer.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Count NOT_FOUND (the KPI is not defined, as on an empty data directory) as the
    /// answer that shows the server serves.
    #[arg(long)]
    pub allow_not_found: bool,
    /// What the probe asks.
    #[command(flatten)]
    pub question: AggregateQuestion,
}

/// Calls GetAggregates until the server answers; the report's elapsed time runs from the
/// first attempt to the answer, ops counts the attempts, items the buckets received and
/// the `answer` extra is `ok` or `not_found`.
/// The range is computed in UTC (no GetKpi first, so the first answered call is this
/// one); the server answers every bucket that overlaps it whole.
pub async fn ready(
    workload: &Workload,
    addr: &str,
    options: &ReadyOptions,
) -> Result<Report, LoadError> {
    let (start, end) = options.question.range(Tz::UTC, workload.end());
    let request = GetAggregatesRequest {
        kpi_id: options.question.kpi.clone(),
        grain: to_proto::grain(options.question.grain.into()).into(),
        start: Some(to_proto::timestamp(start)),
        end: Some(to_proto::timestamp(end)),
        ..GetAggregatesRequest::default()
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.timeout_secs);
    let mut attempts = 0_u64;
    let mut last_failure = String::from("no attempt");
    while Instant::now() < deadline {
        attempts += 1;
        let sent = Instant::now();
        let answer = match ask(addr, request.clone()).await {
            Ok(buckets) => Some((buckets, "ok")),
            Err(Attempt::Fatal(LoadError::Rpc { status, .. }))
                if options.allow_not_found && status.code() == tonic::Code::NotFound =>
            {
                Some((0, "not_found"))
            }
            Err(Attempt::Retry(failure)) => {
                last_failure = failure;
                None
            }
            Err(Attempt::Fatal(error)) => return Err(error),
        };
        if let Some((buckets, answer)) = answer {
            let mut latencies = Latencies::new();
            latencies.record(sent.elapsed());
            return Ok(Report {
                scenario: "ready",
                params: vec![("timeout_secs", Value::from(options.timeout_secs))]
                    .into_iter()
                    .chain(options.question.params())
                    .collect(),
                items: buckets,
                ops: attempts,
                elapsed: started.elapsed(),
                latencies,
                extra: vec![
                    ("answer", Value::from(answer)),
                    ("last_failure", Value::from(last_failure)),
                ],
            });
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    Err(LoadError::Invalid(format!(
        "no answer from {addr} within {} s after {attempts} attempts; last: {last_failure}",
        options.timeout_secs
    )))
}

/// Why one attempt got no answer.
enum Attempt {
    /// The server is not serving yet.
    Retry(String),
    /// The server answered with an error of its own: asking again will not help.
    Fatal(LoadError),
}

/// One attempt on a new connection: the number of buckets answered.
async fn ask(addr: &str, request: GetAggregatesRequest) -> Result<u64, Attempt> {
    let channel = connect(addr)
        .await
        .map_err(|error| Attempt::Retry(error.to_string()))?;
    let mut client = QueryClient::new(channel);
    let outcome = count_buckets(&mut client, request).await;
    outcome.map_err(|status| match status.code() {
        // What a connection to a process that is starting or stopping looks like.
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            Attempt::Retry(status.to_string())
        }
        _ => Attempt::Fatal(LoadError::Rpc {
            call: "GetAggregates".into(),
            status,
        }),
    })
}
