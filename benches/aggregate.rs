//! Cost of the bucket states: `record` per kind (one state, and the six states one
//! measurement updates, one per grain), `merge` of two buckets of 1000 measurements, and
//! `summary` of such a bucket; and PERCENTILE buckets of a few values (most DAY and WEEK
//! buckets), which keep their values exactly.
//!
//! Run: `cargo bench --bench aggregate`

use std::hint::black_box;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use kpi_service::domain::KpiKind;
use kpi_service::domain::aggregate::{BucketState, Observation};

/// Measurements per batch of the record benchmarks.
const BATCH: u64 = 1024;
/// Distinct visitors the DISTINCT benchmarks draw from: well past the sketch's exact
/// forms (128), so the steady state is the full HyperLogLog.
const VISITORS: u64 = 10_000;

/// Every kind with a state of its own.
const KINDS: [KpiKind; 10] = KpiKind::MEASURED;

/// xorshift64*: reproducible inputs without a dependency.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        f64::from(u32::try_from(self.next() >> 40).unwrap()) / f64::from(1_u32 << 24)
    }
}

/// An owned measurement: value, time, seq and subject.
struct Input {
    value: f64,
    occurred_at: DateTime<Utc>,
    seq: u64,
    subject: String,
}

impl Input {
    fn observation(&self) -> Observation<'_> {
        Observation {
            value: self.value,
            occurred_at: self.occurred_at,
            seq: self.seq,
            subject: Some(&self.subject),
        }
    }
}

/// `n` realistic measurements of `kind`: amounts in euros, scores for NPS and CSAT,
/// reply times from 0.1 s to 100 s for PERCENTILE, visitor ids for DISTINCT.
fn inputs(kind: KpiKind, n: u64, seed: u64) -> Vec<Input> {
    let mut numbers = Numbers(seed);
    let start = Utc.with_ymd_and_hms(2026, 5, 4, 0, 0, 0).unwrap();
    (0..n)
        .map(|i| {
            let value = match kind {
                KpiKind::Nps => f64::from(u32::try_from(numbers.next() % 11).unwrap()),
                KpiKind::Csat => f64::from(u32::try_from(1 + numbers.next() % 5).unwrap()),
                KpiKind::Percentile => 0.1 * 1000_f64.powf(numbers.unit()),
                _ => (numbers.unit() * 20_000.0).round() / 100.0,
            };
            Input {
                value,
                occurred_at: start + TimeDelta::milliseconds(i64::try_from(i).unwrap() * 37),
                seq: seed * 1_000_000 + i,
                subject: format!("visitor-{:06}", numbers.next() % VISITORS),
            }
        })
        .collect()
}

fn state_of(kind: KpiKind, inputs: &[Input]) -> BucketState {
    let mut state = BucketState::new(kind).unwrap();
    for input in inputs {
        state.record(input.observation()).unwrap();
    }
    state
}

fn name(kind: KpiKind) -> String {
    format!("{kind:?}").to_lowercase()
}

/// One state per kind, fed batches of measurements; the state persists across
/// iterations, so sketches are measured in their steady (full) form.
fn record(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(BATCH));
    for kind in KINDS {
        let batch = inputs(kind, BATCH, 1);
        let mut state = state_of(kind, &inputs(kind, 20_000, 2));
        group.bench_function(name(kind), |b| {
            b.iter(|| {
                for input in &batch {
                    state.record(black_box(input.observation())).unwrap();
                }
            });
        });
        black_box(state.count());
    }
    group.finish();
}

/// What the projection does per measurement: update the bucket of each of the six
/// grains (hour, day, week, month, quarter, year). Throughput counts measurements.
fn record_six_grains(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_six_grains");
    group.throughput(Throughput::Elements(BATCH));
    for kind in KINDS {
        let batch = inputs(kind, BATCH, 3);
        let warm = inputs(kind, 20_000, 4);
        let mut grains: [BucketState; 6] = std::array::from_fn(|_| state_of(kind, &warm));
        group.bench_function(name(kind), |b| {
            b.iter(|| {
                for input in &batch {
                    let observation = black_box(input.observation());
                    for state in &mut grains {
                        state.record(observation).unwrap();
                    }
                }
            });
        });
        black_box(grains[0].count());
    }
    group.finish();
}

/// Merging a bucket of 1000 measurements into another (a rollup step). The clone of the
/// target is made outside the timed part.
fn merge(c: &mut Criterion) {
    let mut group = c.benchmark_group("merge");
    for kind in KINDS {
        let left = state_of(kind, &inputs(kind, 1000, 5));
        let right = state_of(kind, &inputs(kind, 1000, 6));
        group.bench_function(name(kind), |b| {
            b.iter_batched_ref(
                || left.clone(),
                |target| target.merge(black_box(&right)).unwrap(),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// Answering a query for one bucket of 1000 measurements.
fn summary(c: &mut Criterion) {
    let mut group = c.benchmark_group("summary");
    for kind in KINDS {
        let state = state_of(kind, &inputs(kind, 1000, 7));
        group.bench_function(name(kind), |b| b.iter(|| black_box(&state).summary()));
    }
    group.finish();
}

/// PERCENTILE buckets of a few values: recording 3, 24 and 128 reply times into a new
/// bucket (per bucket, the allocation included), merging two buckets of 24 (a DAY into a
/// WEEK), and the summary of a bucket of 24.
fn percentile_small(c: &mut Criterion) {
    let kind = KpiKind::Percentile;
    let mut group = c.benchmark_group("percentile_small");
    for n in [3, 24, 128] {
        let batch = inputs(kind, n, 8);
        group.bench_function(format!("record_{n}"), |b| {
            b.iter(|| state_of(kind, black_box(&batch)));
        });
    }
    let left = state_of(kind, &inputs(kind, 24, 9));
    let right = state_of(kind, &inputs(kind, 24, 10));
    group.bench_function("merge_24", |b| {
        b.iter_batched_ref(
            || left.clone(),
            |target| target.merge(black_box(&right)).unwrap(),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("summary_24", |b| b.iter(|| black_box(&left).summary()));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = record, record_six_grains, merge, summary, percentile_small
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
