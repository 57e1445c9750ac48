//! Bucket lookups on the projection's hot path: 1,000,000 measurement instants spread
//! evenly over two years, in time order, each looked up in all six grains through one
//! `Calendar`, for UTC and Europe/Amsterdam. For comparison, the same through the
//! from-scratch `bucket_of` (on a tenth of the instants), and a jittered order.
//!
//! Run: `cargo bench --bench calendar`. Divide the reported time by 6,000,000 (or 600,000
//! for the reference) for the time of one lookup; criterion's throughput line counts
//! lookups.

use std::hint::black_box;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use criterion::{Criterion, Throughput, criterion_group};
use kpi_service::domain::{Calendar, Grain, bucket_of};

/// Instants from 2025-01-01T00:00Z, 63 s apart (1,000,000 of them span two years), with
/// a sub-second part as real timestamps have.
fn instants_in_order(count: i64) -> Vec<DateTime<Utc>> {
    let first = DateTime::from_timestamp(1_735_689_600, 0).unwrap();
    let step = TimeDelta::seconds(2 * 365 * 86_400 / 1_000_000);
    (0..count)
        .map(|index| {
            first + step * i32::try_from(index).unwrap() + TimeDelta::milliseconds(index % 1000)
        })
        .collect()
}

/// The same instants, each moved by up to ±30 minutes: measurements from many clients
/// arrive roughly, not exactly, in time order.
fn instants_jittered(count: i64) -> Vec<DateTime<Utc>> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    instants_in_order(count)
        .into_iter()
        .map(|instant| {
            // xorshift: a fixed, cheap pseudo-random sequence.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let jitter = i64::try_from(state % 3_600).unwrap() - 1_800;
            instant + TimeDelta::seconds(jitter)
        })
        .collect()
}

/// Looks up all six grains of every instant through one calendar; returns a checksum so
/// nothing is optimised away.
fn all_grains_cached(tz: Tz, instants: &[DateTime<Utc>]) -> i64 {
    let mut calendar = Calendar::new(tz);
    let mut checksum = 0_i64;
    for &instant in instants {
        for grain in Grain::ALL {
            checksum =
                checksum.wrapping_add(calendar.bucket_of(grain, instant).key().unix_seconds());
        }
    }
    checksum
}

fn all_grains_reference(tz: Tz, instants: &[DateTime<Utc>]) -> i64 {
    let mut checksum = 0_i64;
    for &instant in instants {
        for grain in Grain::ALL {
            checksum = checksum.wrapping_add(bucket_of(grain, tz, instant).key().unix_seconds());
        }
    }
    checksum
}

fn calendar(criterion: &mut Criterion) {
    let in_order = instants_in_order(1_000_000);
    let jittered = instants_jittered(1_000_000);
    let lookups = u64::try_from(in_order.len() * Grain::ALL.len()).unwrap();
    let mut group = criterion.benchmark_group("calendar");
    group.sample_size(20);
    for (name, tz) in [("utc", Tz::UTC), ("amsterdam", Tz::Europe__Amsterdam)] {
        group.throughput(Throughput::Elements(lookups));
        group.bench_function(format!("cached_in_order_1m_x6/{name}"), |bencher| {
            bencher.iter(|| all_grains_cached(tz, black_box(&in_order)))
        });
        group.bench_function(format!("cached_jittered_1m_x6/{name}"), |bencher| {
            bencher.iter(|| all_grains_cached(tz, black_box(&jittered)))
        });
        let tenth = &in_order[..in_order.len() / 10];
        group.throughput(Throughput::Elements(lookups / 10));
        group.bench_function(format!("reference_in_order_100k_x6/{name}"), |bencher| {
            bencher.iter(|| all_grains_reference(tz, black_box(tenth)))
        });
    }
    group.finish();
}

criterion_group!(benches, calendar);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
