//! The reproducible workload of the benchmarks and the `kpi-load` tool: the source article's
//! KPIs, repeated to any number of KPIs, and a seeded stream of realistic measurements of
//! them.
//!
//! Every measurement is a pure function of the seed and its index in the stream, so any
//! range of the stream can be generated on its own, in any order, on any thread (producers
//! of a load test each generate their own share), and nothing is materialised: a
//! measurement costs a few hundred nanoseconds, mostly its allocations.
//!
//! The random numbers come from PCG (`rand_pcg`, an algorithm with a documented, stable
//! output stream), seeded per measurement from `(seed, index)` through
//! `SeedableRng::seed_from_u64`, which `rand_core` documents as portable. `StdRng` is not
//! used: its algorithm may change between `rand` versions.

mod kpis;
mod values;

use std::ops::Range;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;

use kpi_service::proto::{self, to_proto};

pub use kpis::{KpiRole, WorkloadKpi};

/// The default length of the stream's time span: two years.
pub const DEFAULT_SPAN_DAYS: i64 = 730;
/// The default share of late measurements.
pub const DEFAULT_LATE_SHARE: f64 = 0.05;
/// The label dimension every workload KPI declares.
pub const CHANNEL: &str = "channel";
/// The values of the `channel` label, with their relative frequencies.
pub const CHANNELS: [(&str, u32); 4] = [("web", 5), ("shop", 2), ("phone", 2), ("partner", 1)];
/// A late measurement occurs at least this long before its place in the stream: far more
/// than the on-time jitter, so "late" is unambiguous.
const LATE_MIN: TimeDelta = TimeDelta::days(1);
/// ... and at most this long before it.
const LATE_MAX: TimeDelta = TimeDelta::days(60);
/// On-time measurements occur up to this long before their place in the stream (clients
/// report roughly, not exactly, in time order).
const JITTER: TimeDelta = TimeDelta::minutes(30);

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    /// Seed of every random choice; the same seed gives the same workload.
    pub seed: u64,
    /// Number of KPIs: the article's eight repeated (`revenue_001`, ..., `revenue_002`, ...)
    /// and cut to this many.
    pub kpis: usize,
    /// Number of measurements in the stream.
    pub measurements: u64,
    /// The end of the time span: the latest occurred_at.
    pub end: DateTime<Utc>,
    /// Length of the time span; occurred_at lies in `[end - span, end]`.
    pub span: TimeDelta,
    /// Share (0 to 1) of late measurements: occurred_at 1 to 60 days before their
    /// neighbours in the stream.
    pub late_share: f64,
    /// Give every measurement a deterministic event_id (idempotent retries, and the
    /// server's deduplication index in the measured path).
    pub event_ids: bool,
}

impl WorkloadConfig {
    /// The defaults with `end` given: seed 1, 8 KPIs, 1,000,000 measurements over two
    /// years, 5 % late, no event ids.
    pub fn ending_at(end: DateTime<Utc>) -> WorkloadConfig {
        WorkloadConfig {
            seed: 1,
            kpis: kpis::SET.len(),
            measurements: 1_000_000,
            end,
            span: TimeDelta::days(DEFAULT_SPAN_DAYS),
            late_share: DEFAULT_LATE_SHARE,
            event_ids: false,
        }
    }
}

/// The default end of the stream: `now` rounded down to the hour.
pub fn default_end(now: DateTime<Utc>) -> DateTime<Utc> {
    now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now)
}

/// Why a configuration cannot make a workload.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    /// No KPI.
    #[error("kpis must be at least 1")]
    NoKpis,
    /// More KPIs than ids of the form `name_NNN` allow.
    #[error("kpis must be at most {max}, got {got}")]
    TooManyKpis {
        /// The limit.
        max: usize,
        /// What was asked.
        got: usize,
    },
    /// The share of late measurements is not in 0..=1.
    #[error("late share must be between 0 and 1, got {0}")]
    LateShare(f64),
    /// The span is not positive, or reaches before 1970.
    #[error("span must be positive and start after 1970-01-01, got {0}")]
    Span(TimeDelta),
}

/// A workload ready to generate: the KPIs and the measurement stream of one configuration.
#[derive(Debug, Clone)]
pub struct Workload {
    config: WorkloadConfig,
    kpis: Vec<WorkloadKpi>,
    /// Indexes (into `kpis`) of the KPIs that take measurements, with the cumulative weight
    /// that picks them.
    measured: Vec<(usize, u32)>,
    total_weight: u32,
    start: DateTime<Utc>,
}

impl Workload {
    /// Checks `config` and lays out its KPIs.
    pub fn new(config: WorkloadConfig) -> Result<Workload, WorkloadError> {
        if config.kpis == 0 {
            return Err(WorkloadError::NoKpis);
        }
        if config.kpis > kpis::MAX_KPIS {
            return Err(WorkloadError::TooManyKpis {
                max: kpis::MAX_KPIS,
                got: config.kpis,
            });
        }
        if !(0.0..=1.0).contains(&config.late_share) {
            return Err(WorkloadError::LateShare(config.late_share));
        }
        let start = config.end - config.span;
        if config.span <= TimeDelta::zero() || start < DateTime::UNIX_EPOCH + LATE_MAX {
            return Err(WorkloadError::Span(config.span));
        }
        let kpis = kpis::layout(config.kpis);
        let mut measured = Vec::new();
        let mut total_weight = 0;
        for (index, kpi) in kpis.iter().enumerate() {
            let weight = kpi.role.weight();
            if weight > 0 {
                total_weight += weight;
                measured.push((index, total_weight));
            }
        }
        Ok(Workload {
            config,
            kpis,
            measured,
            total_weight,
            start,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WorkloadConfig {
        &self.config
    }

    /// The KPIs, in the order they must be defined (a RATIO after its numerator and
    /// denominator).
    pub fn kpis(&self) -> &[WorkloadKpi] {
        &self.kpis
    }

    /// The KPI definitions as DefineKpi takes them, in definition order.
    pub fn definitions(&self) -> Vec<proto::KpiDefinition> {
        self.kpis.iter().map(WorkloadKpi::definition).collect()
    }

    /// Number of measurements in the stream.
    pub fn len(&self) -> u64 {
        self.config.measurements
    }

    /// True when the stream has no measurement.
    pub fn is_empty(&self) -> bool {
        self.config.measurements == 0
    }

    /// The measurements with indexes in `range` (cut to the stream), in stream order.
    pub fn measurements(&self, range: Range<u64>) -> impl Iterator<Item = proto::Measurement> {
        let end = range.end.min(self.config.measurements);
        (range.start..end).map(move |index| self.measurement(index))
    }

    /// Batch number `batch` of the stream cut in batches of `size` (the last may be
    /// shorter; past the end it is empty).
    pub fn batch(&self, batch: u64, size: u64) -> Vec<proto::Measurement> {
        let first = batch.saturating_mul(size);
        self.measurements(first..first.saturating_add(size))
            .collect()
    }

    /// Number of batches of `size` (at least 1) that make up the stream.
    pub fn batch_count(&self, size: u64) -> u64 {
        self.config.measurements.div_ceil(size.max(1))
    }

    /// Measurement number `index` of the stream (its KPI, value, occurred_at, labels,
    /// subject and event_id are a function of the seed and `index` alone).
    pub fn measurement(&self, index: u64) -> proto::Measurement {
        let mut rng = self.rng(index);
        let pick = rng.random_range(0..self.total_weight);
        let slot = self
            .measured
            .partition_point(|&(_, cumulative)| cumulative <= pick);
        let kpi = &self.kpis[self.measured[slot.min(self.measured.len() - 1)].0];
        let occurred_at = self.occurred_at(index, &mut rng);
        let mut measurement = values::measurement(kpi, occurred_at, &mut rng);
        if self.config.event_ids {
            measurement.event_id = format!("load-{:x}-{index:x}", self.config.seed);
        }
        measurement
    }

    /// A measurement of `kpi` occurring at `occurred_at`, with a value, label and subject
    /// drawn as the stream draws them (number `index` of a side stream that does not
    /// repeat the main one).
    pub fn measurement_of(
        &self,
        kpi: &WorkloadKpi,
        occurred_at: DateTime<Utc>,
        index: u64,
    ) -> proto::Measurement {
        let mut rng = self.rng(index ^ (1 << 63));
        values::measurement(kpi, occurred_at, &mut rng)
    }

    /// The generator of measurement `index`: its own stream, so ranges are independent.
    fn rng(&self, index: u64) -> Pcg64Mcg {
        // The golden-ratio step spreads consecutive indexes over the seed space.
        Pcg64Mcg::seed_from_u64(
            self.config
                .seed
                .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        )
    }

    /// Where measurement `index` falls: its even place in the span, a little earlier
    /// (jitter), or much earlier for a late one; never before the span's start.
    fn occurred_at(&self, index: u64, rng: &mut Pcg64Mcg) -> DateTime<Utc> {
        let span_ms = self.config.span.num_milliseconds();
        let count = self.config.measurements.max(1);
        // i128: index x span in milliseconds overflows u64 for long streams.
        let place_ms = i128::from(index) * i128::from(span_ms) / i128::from(count);
        let place = self.start + TimeDelta::milliseconds(i64::try_from(place_ms).unwrap_or(0));
        let earlier = if rng.random_bool(self.config.late_share) {
            rng.random_range(LATE_MIN.num_seconds()..=LATE_MAX.num_seconds()) * 1000
        } else {
            rng.random_range(0..=JITTER.num_milliseconds())
        };
        (place - TimeDelta::milliseconds(earlier)).max(self.start)
    }

    /// The time span's start (`end - span`).
    pub fn start(&self) -> DateTime<Utc> {
        self.start
    }

    /// The time span's end.
    pub fn end(&self) -> DateTime<Utc> {
        self.config.end
    }
}

/// `instant` as a protobuf timestamp (for requests built around the workload).
pub fn timestamp(instant: DateTime<Utc>) -> prost_types::Timestamp {
    to_proto::timestamp(instant)
}

#[cfg(test)]
mod tests;
