//! Durable append throughput of the event log: one append (= one group commit, one
//! fsync) of 1, 100 and 1000 measurements, and four threads appending 1000-measurement
//! batches at once so that group commit shares flushes. After the benches (in bench mode
//! only) it appends 1,000,000 measurements and prints the bytes per event on disk. Also the
//! SHA-256 chain over 1000 records alone.
//!
//! Run: `cargo bench --bench append`

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use kpi_service::domain::{Event, Measurement};
use kpi_service::store::{AppendRequest, EventLog, GENESIS_HASH, Outcome, StoreOptions, next_hash};

/// A realistic measurement: a 16-character KPI id, one label, and an event_id on every
/// other one (ids are unique per run, so none is a duplicate).
fn measurement(index: u64, run: u64) -> Event {
    let occurred_at = Utc.with_ymd_and_hms(2026, 5, 4, 10, 0, 0).unwrap()
        + chrono::TimeDelta::milliseconds(i64::try_from(index % 86_400_000).unwrap());
    Event::MeasurementRecorded(Measurement {
        kpi_id: "website_visitors".into(),
        value: f64::from(u32::try_from(index % 1000).unwrap()) * 0.25,
        occurred_at,
        labels: BTreeMap::from([("channel".into(), "newsletter".into())]),
        subject: None,
        event_id: index
            .is_multiple_of(2)
            .then(|| format!("evt-{run:08x}-{index:012x}")),
    })
}

fn request(first: u64, len: u64, run: u64) -> AppendRequest {
    AppendRequest {
        events: (first..first + len)
            .map(|index| measurement(index, run))
            .collect(),
        validation_unchanged_since: None,
        ..Default::default()
    }
}

fn appended(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Outcome::Appended { .. }))
        .count()
}

fn durable_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable_append");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.warm_up_time(Duration::from_secs(2));
    for size in [1_u64, 100, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
        let mut next = 0;
        group.throughput(Throughput::Elements(size));
        group.bench_function(format!("{size}_events_per_append"), |b| {
            b.iter_batched(
                || {
                    next += size;
                    request(next - size, size, 1)
                },
                |request| {
                    let outcomes = log.append_blocking(request).unwrap();
                    assert_eq!(appended(&outcomes), outcomes.len());
                },
                BatchSize::SmallInput,
            );
        });
        log.close().unwrap();
    }
    group.finish();
}

fn concurrent_append(c: &mut Criterion) {
    const THREADS: u64 = 4;
    const BATCH: u64 = 1000;
    let mut group = c.benchmark_group("durable_append_concurrent");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(THREADS * BATCH));
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let mut next = 0;
    group.bench_function("4_threads_x_1000_events", |b| {
        b.iter_custom(|iterations| {
            let barrier = Barrier::new(usize::try_from(THREADS).unwrap() + 1);
            // Requests are built before the clock starts; each thread has its own range of
            // ids so nothing is a duplicate.
            let per_thread: Vec<Vec<AppendRequest>> = (0..THREADS)
                .map(|_| {
                    (0..iterations)
                        .map(|_| {
                            next += BATCH;
                            request(next - BATCH, BATCH, 2)
                        })
                        .collect()
                })
                .collect();
            std::thread::scope(|scope| {
                for requests in per_thread {
                    let (log, barrier) = (&log, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        for request in requests {
                            log.append_blocking(request).unwrap();
                        }
                    });
                }
                barrier.wait();
                let start = Instant::now();
                // Leaving the scope joins the threads.
                start
            })
            .elapsed()
        });
    });
    let stats = log.stats();
    println!(
        "group commit: {} appends of {BATCH} events in {} flushes ({} appends per flush)",
        stats.events / BATCH,
        stats.flushes,
        ratio(stats.events / BATCH, stats.flushes)
    );
    log.close().unwrap();
    group.finish();
}

/// `total / count` with one decimal, in integer arithmetic.
fn ratio(total: u64, count: u64) -> String {
    let tenths = (total * 10 + count / 2) / count.max(1);
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// Bytes of all files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dir_size(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Appends 1,000,000 measurements in 1000-event appends and prints the disk footprint.
fn disk_usage() {
    const EVENTS: u64 = 1_000_000;
    const BATCH: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let empty = dir_size(dir.path());
    let start = Instant::now();
    for first in (0..EVENTS).step_by(usize::try_from(BATCH).unwrap()) {
        log.append_blocking(request(first, BATCH, 3)).unwrap();
    }
    let elapsed = start.elapsed();
    log.close().unwrap();
    let size = dir_size(dir.path());
    let record_bytes: usize = {
        let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
        let total = log
            .read(1, 1000)
            .map(|event| event.unwrap().record.len())
            .sum();
        log.close().unwrap();
        total
    };
    println!(
        "disk: {EVENTS} events in {BATCH}-event appends took {:.2} s (incl. building the \
         events); data dir {size} bytes (empty {empty}) = {} bytes/event; average record {} \
         bytes",
        elapsed.as_secs_f64(),
        ratio(size - empty, EVENTS),
        ratio(u64::try_from(record_bytes).unwrap(), 1000),
    );
}

/// The SHA-256 chain over 1000 records of the stored size (131 bytes): what the writer adds
/// per segment and every reader recomputes.
fn chain_hash(c: &mut Criterion) {
    let records: Vec<Vec<u8>> = (0..1000_u32).map(|i| vec![(i % 251) as u8; 131]).collect();
    let mut group = c.benchmark_group("chain_hash");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000_records_of_131_bytes", |b| {
        b.iter(|| {
            records
                .iter()
                .enumerate()
                .fold(GENESIS_HASH, |prev, (seq, record)| {
                    next_hash(&prev, seq as u64 + 1, std::hint::black_box(record))
                })
        });
    });
    group.finish();
}

criterion_group!(benches, durable_append, concurrent_append, chain_hash);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` does not, and skips this.
    if std::env::args().any(|arg| arg == "--bench") {
        disk_usage();
    }
}
