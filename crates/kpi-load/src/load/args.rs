//! Command-line options shared by the scenarios: the workload's flags and the grain.

use chrono::{DateTime, TimeDelta, Utc};

use crate::workload::{self, WorkloadConfig};
use kpi_service::domain::Grain;

/// The flags that choose the workload (the same on every command, so `generate`, `setup`,
/// `ingest` and `query` agree on the data when given the same values).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// Seed of the generator: the same seed and flags give the same KPIs and measurements.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of KPIs: the article's eight (revenue, new_customers, website_visitors,
    /// unique_visitors, conversion, csat, nps, reply_time) numbered _001, repeated as
    /// _002, ... and cut to this many.
    #[arg(long, default_value_t = 8)]
    pub kpis: usize,
    /// Number of measurements in the stream.
    #[arg(long, default_value_t = 1_000_000)]
    pub measurements: u64,
    /// Latest occurred_at, RFC 3339 (such as 2026-03-01T00:00:00Z). Default: now rounded
    /// down to the hour; give a fixed value for reproducible runs (the server rejects
    /// occurred_at more than 5 minutes in the future).
    #[arg(long)]
    pub end: Option<DateTime<Utc>>,
    /// Length of the time span in days, ending at --end.
    #[arg(long, default_value_t = workload::DEFAULT_SPAN_DAYS)]
    pub span_days: i64,
    /// Share (0 to 1) of late measurements: occurred_at 1 to 60 days before their
    /// neighbours in the stream.
    #[arg(long, default_value_t = workload::DEFAULT_LATE_SHARE)]
    pub late_share: f64,
    /// Give every measurement a deterministic event_id (exercises deduplication).
    #[arg(long)]
    pub event_ids: bool,
}

impl WorkloadArgs {
    /// The workload configuration, with `now` deciding the default end.
    pub fn config(&self, now: DateTime<Utc>) -> WorkloadConfig {
        WorkloadConfig {
            seed: self.seed,
            kpis: self.kpis,
            measurements: self.measurements,
            end: self.end.unwrap_or_else(|| workload::default_end(now)),
            span: TimeDelta::days(self.span_days),
            late_share: self.late_share,
            event_ids: self.event_ids,
        }
    }
}

/// A calendar grain on the command line (case-insensitive: `MONTH` or `month`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum GrainArg {
    /// One clock hour.
    Hour,
    /// One local day.
    Day,
    /// One ISO week.
    Week,
    /// One calendar month.
    Month,
    /// One calendar quarter.
    Quarter,
    /// One calendar year.
    Year,
}

impl From<GrainArg> for Grain {
    fn from(value: GrainArg) -> Grain {
        match value {
            GrainArg::Hour => Grain::Hour,
            GrainArg::Day => Grain::Day,
            GrainArg::Week => Grain::Week,
            GrainArg::Month => Grain::Month,
            GrainArg::Quarter => Grain::Quarter,
            GrainArg::Year => Grain::Year,
        }
    }
}
