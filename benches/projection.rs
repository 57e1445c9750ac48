//! Benchmarks of the aggregate projection: applying measurements (all six grains), a
//! 24-month GetAggregates query, and restoring the read models from a log without a
//! snapshot.
//!
//! Run with `cargo bench --bench projection`. The restore benchmark replays
//! `KPI_BENCH_RESTORE_EVENTS` measurements (default 1,000,000); the 10,000,000-event figure
//! in BENCHMARKS.md comes from
//! `KPI_BENCH_RESTORE_EVENTS=10000000 cargo bench --bench projection -- projection_restore`.

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kpi_service::domain::query::{AggregateQuery, Fill};
use kpi_service::domain::{Direction, Event, Grain, KpiDefinition, KpiKind, Measurement};
use kpi_service::projection::{Aggregates, History, HistoryOptions, ReadModels};
use kpi_service::store::{AppendRequest, EventLog, StoreOptions};

const MEASUREMENTS: usize = 1_000_000;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
}

fn definition(id: &str, kind: KpiKind) -> KpiDefinition {
    KpiDefinition {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        unit: String::new(),
        kind,
        direction: Direction::HigherIsBetter,
        timezone: Tz::Europe__Amsterdam,
        dimensions: vec!["channel".into()],
        ratio: None,
    }
}

/// `count` measurements of `kpi_id` in time order over two years, over three channels.
fn measurements(kpi_id: &str, count: usize) -> Vec<Event> {
    let span = 2 * 365 * 24 * 3600;
    let channels = ["web", "shop", "app"];
    (0..count)
        .map(|i| {
            let offset = i64::try_from(i).unwrap() * span / i64::try_from(count).unwrap();
            Event::MeasurementRecorded(Measurement {
                kpi_id: kpi_id.into(),
                value: f64::from(u32::try_from(i % 1000).unwrap()) * 0.01,
                occurred_at: start() + TimeDelta::seconds(offset),
                labels: BTreeMap::from([("channel".into(), channels[i % 3].into())]),
                subject: None,
                event_id: None,
            })
        })
        .collect()
}

fn loaded(kind: KpiKind, count: usize) -> Aggregates {
    let mut aggregates = Aggregates::default();
    aggregates.apply(
        1,
        &Event::KpiDefined {
            definition: definition("k", kind),
        },
        |_| None,
    );
    for (i, event) in measurements("k", count).iter().enumerate() {
        aggregates.apply(2 + u64::try_from(i).unwrap(), event, |_| None);
    }
    aggregates
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("projection_apply");
    group.sample_size(10);
    group.throughput(Throughput::Elements(u64::try_from(MEASUREMENTS).unwrap()));
    for kind in [KpiKind::Sum, KpiKind::Average, KpiKind::Percentile] {
        let events = measurements("k", MEASUREMENTS);
        group.bench_function(format!("{kind:?}_1M_measurements_6_grains"), |b| {
            b.iter_batched(
                || {
                    let mut aggregates = Aggregates::default();
                    aggregates.apply(
                        1,
                        &Event::KpiDefined {
                            definition: definition("k", kind),
                        },
                        |_| None,
                    );
                    aggregates
                },
                |mut aggregates| {
                    for (i, event) in events.iter().enumerate() {
                        aggregates.apply(2 + u64::try_from(i).unwrap(), event, |_| None);
                    }
                    aggregates
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn query(c: &mut Criterion) {
    let mut group = c.benchmark_group("projection_query");
    for kind in [KpiKind::Sum, KpiKind::Percentile] {
        let aggregates = loaded(kind, MEASUREMENTS);
        let question = AggregateQuery {
            kpi_id: "k".into(),
            grain: Grain::Month,
            start: start(),
            end: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            filter: BTreeMap::new(),
            group_by: Vec::new(),
            fill: Fill::None,
        };
        assert_eq!(aggregates.query(&question).unwrap().len(), 24);
        group.bench_function(format!("{kind:?}_24_months_of_1M"), |b| {
            b.iter(|| black_box(aggregates.query(black_box(&question)).unwrap()));
        });
    }
    group.finish();
}

fn restore(c: &mut Criterion) {
    let events: usize = std::env::var("KPI_BENCH_RESTORE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MEASUREMENTS);
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(&dir.path().join("log"), StoreOptions::default()).unwrap();
    log.append_blocking(AppendRequest {
        events: vec![Event::KpiDefined {
            definition: definition("k", KpiKind::Sum),
        }],
        validation_unchanged_since: None,
        ..Default::default()
    })
    .unwrap();
    // Generated a million at a time: ten million events at once would hold gigabytes.
    let mut appended = 0;
    while appended < events {
        let count = MEASUREMENTS.min(events - appended);
        for chunk in measurements("k", count).chunks(10_000) {
            log.append_blocking(AppendRequest {
                events: chunk.to_vec(),
                validation_unchanged_since: None,
                ..Default::default()
            })
            .unwrap();
        }
        appended += count;
    }
    let no_snapshots = dir.path().join("no-snapshots");
    let mut group = c.benchmark_group("projection_restore");
    group.sample_size(10);
    let replayed = u64::try_from(events).unwrap() + 1;
    group.throughput(Throughput::Elements(replayed));
    group.bench_function(format!("{events}_events_without_snapshot"), |b| {
        b.iter(|| {
            // A new history index each time, so each restore rebuilds it too, as the
            // first start of a directory without one does.
            let history_dir = tempfile::tempdir().unwrap();
            let history =
                History::open(history_dir.path(), &log, HistoryOptions::default()).unwrap();
            let models = ReadModels::restore(&log, &no_snapshots, history, None).unwrap();
            assert_eq!(models.restored.replayed_events, replayed);
        });
    });
    group.finish();
    log.close().unwrap();
}

criterion_group!(benches, apply, query, restore);
criterion_main!(benches);
