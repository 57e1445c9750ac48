//! The aggregate projection kept current by commit notifications (incremental) equals a
//! fold of the whole log (rebuild), for random histories with late measurements,
//! definition changes and restarts; and as-of answers, read through the history index
//! (stored blocks, parts in memory, parts lost in a crash and read again from the log),
//! equal a fold of the log up to the same seq.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use kpi_service::domain::Catalog;
use kpi_service::domain::query::{AggregateQuery, AnsweredBucket, Fill};
use kpi_service::domain::{
    Direction, Event, Grain, KpiDefinition, KpiKind, Measurement, Rejection,
};
use kpi_service::projection::pages::PageStore;
use kpi_service::projection::{Aggregates, Grains, History, HistoryOptions, ReadModels, Tier};
use kpi_service::store::{AppendRequest, EventLog, StoreOptions};
use proptest::prelude::*;

const KPIS: [(&str, KpiKind, Tz); 5] = [
    ("revenue", KpiKind::Sum, Tz::Europe__Amsterdam),
    ("signups", KpiKind::Count, Tz::UTC),
    ("reply_time", KpiKind::Percentile, Tz::America__New_York),
    ("nps", KpiKind::Nps, Tz::Asia__Kolkata),
    ("stock", KpiKind::Last, Tz::Australia__Lord_Howe),
];

#[derive(Debug, Clone)]
enum Op {
    /// Record measurements of KPI `kpi` at hours after the epoch of the test.
    Record(Vec<(usize, u32, u8, u8)>),
    /// Change the timezone (and for SUM/COUNT the kind) of a KPI.
    Redefine(usize, bool),
    /// Retract the measurement chosen by this index among those still standing.
    Retract(usize),
    /// Close and reopen the log, restoring the projection (from a snapshot taken just
    /// before and the history index closed, or from the last snapshot and a history
    /// index that lost its part in memory, as in a crash).
    Restart(bool),
    /// Compare the answers as of the seq chosen by the first index, in the grain chosen by
    /// the second (an as-of fold folds only the grain asked), with a fold of the log.
    AsOf(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((0..KPIS.len(), 0u32..17_520, 0u8..11, 0u8..3), 1..40)
            .prop_map(Op::Record),
        1 => (0..KPIS.len(), any::<bool>()).prop_map(|(k, flip)| Op::Redefine(k, flip)),
        2 => any::<usize>().prop_map(Op::Retract),
        1 => any::<bool>().prop_map(Op::Restart),
        2 => (any::<usize>(), 0..GRAINS.len()).prop_map(|(seq, grain)| Op::AsOf(seq, grain)),
    ]
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
}

fn definition(index: usize, tz: Tz, kind: KpiKind) -> KpiDefinition {
    let (id, _, _) = KPIS[index];
    KpiDefinition {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        unit: String::new(),
        kind,
        direction: Direction::HigherIsBetter,
        timezone: tz,
        dimensions: vec!["channel".into()],
        ratio: None,
    }
}

fn append(log: &EventLog, events: Vec<Event>) -> Vec<u64> {
    log.append_blocking(AppendRequest {
        events,
        validation_unchanged_since: None,
        ..Default::default()
    })
    .expect("append")
    .into_iter()
    .map(|outcome| outcome.seq())
    .collect()
}

/// Defines every KPI of [`KPIS`] with its kind and timezone.
fn define_all(log: &EventLog) {
    append(
        log,
        KPIS.iter()
            .enumerate()
            .map(|(i, (_, kind, tz))| Event::KpiDefined {
                definition: definition(i, *tz, *kind),
            })
            .collect(),
    );
}

/// The grains the answers compare.
const GRAINS: [Grain; 4] = [Grain::Day, Grain::Week, Grain::Month, Grain::Year];

/// Every bucket of every KPI, grain and channel.
fn answers(aggregates: &Aggregates) -> Vec<Vec<AnsweredBucket>> {
    answers_in(aggregates, &GRAINS)
}

/// Every bucket of every KPI and channel in `grains`.
fn answers_in(aggregates: &Aggregates, grains: &[Grain]) -> Vec<Vec<AnsweredBucket>> {
    let mut all = Vec::new();
    for (id, _, _) in KPIS {
        for &grain in grains {
            let query = AggregateQuery {
                kpi_id: id.into(),
                grain,
                start: start(),
                end: start() + TimeDelta::days(2 * 366),
                filter: BTreeMap::new(),
                group_by: vec!["channel".into()],
                fill: Fill::None,
            };
            all.push(aggregates.query(&query).expect("query"));
        }
    }
    all
}

/// Runs `ops`; with a `budget`, the buckets beyond it leave memory for the page store.
fn run(ops: Vec<Op>, budget: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let tier = || {
        budget.map(|budget| Tier {
            store: std::sync::Arc::new(
                PageStore::open(&dir.path().join("pages"), 0).expect("pages"),
            ),
            budget,
            gives_way_to: None,
        })
    };
    let open = || EventLog::open(dir.path(), StoreOptions::default()).expect("open");
    let mut log = open();
    let mut kinds: Vec<(KpiKind, Tz)> = KPIS.iter().map(|(_, kind, tz)| (*kind, *tz)).collect();
    define_all(&log);
    let snapshots = dir.path().join("snapshots");
    let history = |log: &EventLog| {
        let options = HistoryOptions {
            flush_every_events: 7,
            // Checkpoints after a few measurements: as-of folds start from them.
            checkpoint_every: 3,
            checkpoint_span_per_byte: 0,
            ..HistoryOptions::default()
        };
        History::open(&dir.path().join("history"), log, options).expect("history")
    };
    let mut models = ReadModels::restore(&log, &snapshots, history(&log), tier()).expect("restore");
    let mut versions = vec![1u64; KPIS.len()];
    let mut standing: Vec<u64> = Vec::new();
    for op in ops {
        match op {
            Op::Record(measurements) => {
                let events = measurements
                    .into_iter()
                    .map(|(kpi, hour, score, channel)| {
                        let (id, _, _) = KPIS[kpi];
                        Event::MeasurementRecorded(Measurement {
                            kpi_id: id.into(),
                            // Scores 0..10 are valid for every kind used here.
                            value: f64::from(score),
                            occurred_at: start() + TimeDelta::hours(i64::from(hour)),
                            labels: BTreeMap::from([(
                                "channel".into(),
                                ["web", "shop", "app"][usize::from(channel)].into(),
                            )]),
                            subject: None,
                            event_id: None,
                        })
                    })
                    .collect();
                standing.extend(append(&log, events));
            }
            Op::Retract(choice) => {
                if standing.is_empty() {
                    continue;
                }
                let retracted_seq = standing.remove(choice % standing.len());
                append(
                    &log,
                    vec![Event::MeasurementRetracted {
                        retracted_seq,
                        reason: String::new(),
                    }],
                );
            }
            Op::Redefine(kpi, flip) => {
                let (kind, tz) = kinds[kpi];
                let tz = if tz == Tz::UTC {
                    Tz::Pacific__Chatham
                } else {
                    Tz::UTC
                };
                let kind = match (kind, flip) {
                    (KpiKind::Sum, true) => KpiKind::Count,
                    (KpiKind::Count, true) => KpiKind::Sum,
                    (kind, _) => kind,
                };
                kinds[kpi] = (kind, tz);
                versions[kpi] += 1;
                append(
                    &log,
                    vec![Event::KpiUpdated {
                        definition: definition(kpi, tz, kind),
                        version: versions[kpi],
                    }],
                );
            }
            Op::Restart(snapshot) => {
                let before = answers(&models.aggregates.read());
                let catalog_before = models.catalog.read().clone();
                if snapshot {
                    models.snapshot(&log, &snapshots, 0).expect("snapshot");
                    models.history.close().expect("close the history index");
                }
                log.close().expect("close");
                drop(models);
                log = open();
                models =
                    ReadModels::restore(&log, &snapshots, history(&log), tier()).expect("restore");
                if snapshot {
                    assert_eq!(models.restored.replayed_events, 0);
                }
                assert_eq!(answers(&models.aggregates.read()), before, "after restart");
                assert_eq!(
                    *models.catalog.read(),
                    catalog_before,
                    "catalog after restart"
                );
            }
            Op::AsOf(choice, grain) => {
                // After the KPIs' definitions (seqs 1 to 5), which every answer needs.
                let defined = u64::try_from(KPIS.len()).unwrap();
                let head = log.head().seq;
                let seq = defined + u64::try_from(choice).unwrap() % (head - defined + 1);
                let ids: Vec<&str> = KPIS.iter().map(|(id, _, _)| *id).collect();
                let (catalog, aggregates) = fold_log(&log, seq);
                let grain = GRAINS[grain];
                // The parts handed to the index's writer are stored and checkpointed.
                assert!(
                    models
                        .history
                        .wait_stored(std::time::Duration::from_secs(10))
                );
                assert!(
                    models
                        .aggregates
                        .wait_checkpoints(std::time::Duration::from_secs(10))
                );
                let past = models
                    .aggregates
                    .as_of(seq, &ids, Grains::only([grain]))
                    .expect("as of");
                assert_eq!(
                    answers_in(&past, &[grain]),
                    answers_in(&aggregates, &[grain]),
                    "as of {seq} in {grain:?}"
                );
                let past_catalog = models.history.catalog_as_of(seq).expect("catalog as of");
                assert_eq!(past_catalog, catalog, "catalog as of {seq}");
            }
        }
        let ids: Vec<&str> = KPIS.iter().map(|(id, _, _)| *id).collect();
        let rebuilt = models
            .aggregates
            .as_of(log.head().seq, &ids, Grains::default())
            .expect("fold");
        assert_eq!(
            answers(&models.aggregates.read()),
            answers(&rebuilt),
            "incremental vs rebuild"
        );
    }
    if let Some(budget) = budget {
        let aggregates = models.aggregates.read();
        let held = aggregates.bytes();
        let all: usize = rebuilt_bytes(&log);
        if all > 4 * budget {
            assert!(
                !aggregates.page_files().is_empty(),
                "{all} bytes of buckets, budget {budget}: some must be stored"
            );
        }
        // A stored chunk keeps a 72-byte entry in its map's directory: storing pays once
        // the maps hold more than a few buckets each.
        if all > 8 * budget {
            assert!(held < all, "{held} of {all} bytes held in memory");
        }
    }
    log.close().expect("close");
}

/// Bytes the buckets of a fold of the whole log hold in memory.
fn rebuilt_bytes(log: &EventLog) -> usize {
    let (_, aggregates) = fold_log(log, log.head().seq);
    aggregates.footprint().bytes.iter().sum()
}

/// The catalog and aggregates at `to_seq`, folded from the log itself (the reference the
/// history index is checked against).
fn fold_log(log: &EventLog, to_seq: u64) -> (Catalog, Aggregates) {
    let mut catalog = Catalog::default();
    let mut aggregates = Aggregates::default();
    let mut measurements: Vec<(u64, Measurement)> = Vec::new();
    let mut changed = BTreeSet::new();
    for stored in log.read(1, to_seq) {
        let stored = stored.expect("read");
        catalog.apply(stored.seq, stored.recorded_at, &stored.event);
        if let Event::MeasurementRecorded(m) = &stored.event {
            measurements.push((stored.seq, m.clone()));
        }
        let find = |seq| {
            measurements
                .iter()
                .find(|(at, _)| *at == seq)
                .map(|(_, m)| m.clone())
        };
        if let Some(kpi_id) = aggregates.apply(stored.seq, &stored.event, find) {
            changed.insert(kpi_id);
        }
    }
    for kpi_id in changed {
        let of_kpi = measurements.iter().filter(|(_, m)| m.kpi_id == kpi_id);
        aggregates.rebuild_kpi(&kpi_id, of_kpi.map(|(seq, m)| (*seq, m)));
    }
    (catalog, aggregates)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn incremental_projection_equals_a_rebuild(ops in prop::collection::vec(op(), 1..12)) {
        run(ops, None);
    }

    /// The same with a memory budget of 2 KiB: most buckets are stored as pages, read back
    /// for queries, changes, retractions, refolds and after restarts.
    #[test]
    fn buckets_beyond_the_budget_answer_the_same(ops in prop::collection::vec(op(), 1..12)) {
        run(ops, Some(2048));
    }
}

/// Appends the KPIs' definitions and ten measurements of `revenue` with `value` to a new
/// log in `log_dir`, and restores the read models with the history index in `history_dir`
/// (which the listener keeps current), closing both gracefully.
fn fill(log_dir: &std::path::Path, history_dir: &std::path::Path, value: f64) {
    let log = EventLog::open(log_dir, StoreOptions::default()).expect("open");
    let options = HistoryOptions {
        flush_every_events: 3,
        checkpoint_every: 2,
        checkpoint_span_per_byte: 0,
        ..HistoryOptions::default()
    };
    let history = History::open(history_dir, &log, options).expect("history");
    let models =
        ReadModels::restore(&log, &log_dir.join("no-snapshots"), history, None).expect("restore");
    append(
        &log,
        (0..KPIS.len())
            .map(|i| Event::KpiDefined {
                definition: definition(i, KPIS[i].2, KPIS[i].1),
            })
            .collect(),
    );
    let measurements: Vec<Event> = (0..10)
        .map(|hour| {
            Event::MeasurementRecorded(Measurement {
                kpi_id: "revenue".into(),
                value,
                occurred_at: start() + TimeDelta::hours(hour),
                labels: BTreeMap::from([("channel".into(), "web".into())]),
                subject: None,
                event_id: None,
            })
        })
        .collect();
    // In batches, so that the index stores several parts, each with a checkpoint.
    for batch in measurements.chunks(2) {
        append(&log, batch.to_vec());
    }
    let patience = std::time::Duration::from_secs(10);
    assert!(models.history.wait_stored(patience));
    assert!(models.aggregates.wait_checkpoints(patience));
    let head = log.head().seq;
    assert!(
        models
            .history
            .checkpoint("revenue", head, |_, _| Ok(()))
            .unwrap()
            .is_some(),
        "no as-of checkpoint of revenue"
    );
    models.history.close().expect("close the history index");
    log.close().expect("close");
}

/// A history index that another log does not continue (a log restored from elsewhere, or
/// cut and continued by `kpi-server recover`) is discarded at open and rebuilt from the
/// log that is there, even when both end at the same seq; its as-of checkpoints are not
/// used.
#[test]
fn an_index_of_another_log_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let history_dir = dir.path().join("history");
    fill(&dir.path().join("first"), &history_dir, 1.0);
    // Same events, same seqs, another value: its own index elsewhere, so the one in
    // `history_dir` still covers the first log up to the same head seq.
    let second = dir.path().join("second");
    fill(&second, &dir.path().join("second-history"), 2.0);
    let log = EventLog::open(&second, StoreOptions::default()).expect("open");
    let history = History::open(&history_dir, &log, HistoryOptions::default()).expect("history");
    let models =
        ReadModels::restore(&log, &second.join("no-snapshots"), history, None).expect("restore");
    let head = log.head().seq;
    let ids: Vec<&str> = KPIS.iter().map(|(id, _, _)| *id).collect();
    let past = models
        .aggregates
        .as_of(head, &ids, Grains::default())
        .expect("as of");
    let (catalog, reference) = fold_log(&log, head);
    assert_eq!(answers(&past), answers(&reference));
    // The first log's checkpoints are still there, and name another chain hash: months
    // are checkpointed grains, so this fold would start from them if it took them.
    for seq in [head - 3, head] {
        let month = Grains::only([Grain::Month]);
        let past = models.aggregates.as_of(seq, &ids, month).expect("as of");
        let (_, reference) = fold_log(&log, seq);
        assert_eq!(
            answers_in(&past, &[Grain::Month]),
            answers_in(&reference, &[Grain::Month])
        );
    }
    assert_eq!(
        models.history.catalog_as_of(head).expect("catalog"),
        catalog
    );
    log.close().expect("close");
}

/// An index whose block files are gone (deleted by hand, or a restore that left out
/// `history/blocks/`) is discarded at open and rebuilt from the log, instead of failing
/// every as-of question that reaches a stored part.
#[test]
fn an_index_without_its_block_files_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (log_dir, history_dir) = (dir.path().join("log"), dir.path().join("history"));
    fill(&log_dir, &history_dir, 1.0);
    let blocks = history_dir.join("blocks");
    let files: Vec<_> = std::fs::read_dir(&blocks)
        .expect("the index's block files")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert!(!files.is_empty(), "the index stored no block");
    for file in files {
        std::fs::remove_file(file).expect("remove");
    }
    let log = EventLog::open(&log_dir, StoreOptions::default()).expect("open");
    let history = History::open(&history_dir, &log, HistoryOptions::default()).expect("history");
    assert_eq!(history.stored_seq(), 0, "the index was not discarded");
    let models =
        ReadModels::restore(&log, &log_dir.join("no-snapshots"), history, None).expect("restore");
    let head = log.head().seq;
    let ids: Vec<&str> = KPIS.iter().map(|(id, _, _)| *id).collect();
    for seq in [head - 3, head] {
        let past = models
            .aggregates
            .as_of(seq, &ids, Grains::default())
            .expect("as of");
        let (_, reference) = fold_log(&log, seq);
        assert_eq!(answers(&past), answers(&reference), "as of {seq}");
    }
    log.close().expect("close");
}

/// Checkpoints that cannot be used are passed over: bytes that are not a checkpoint (the
/// newest, so an older one is used), and another KPI's state filed under a KPI; the
/// answers are still a fold's.
#[test]
fn unusable_checkpoints_are_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let (log_dir, history_dir) = (dir.path().join("log"), dir.path().join("history"));
    fill(&log_dir, &history_dir, 1.0);
    let log = EventLog::open(&log_dir, StoreOptions::default()).expect("open");
    let history = History::open(&history_dir, &log, HistoryOptions::default()).expect("history");
    let head = log.head().seq;
    let (at, bytes) = history
        .checkpoint("revenue", head, |_, _| Ok(()))
        .unwrap()
        .expect("a checkpoint of revenue");
    assert!(
        history
            .checkpoint("revenue", at - 1, |_, _| Ok(()))
            .unwrap()
            .is_some(),
        "one older checkpoint of revenue to fall back on"
    );
    history.put_checkpoint("signups", at, &bytes).unwrap();
    // In its place: the newest is no checkpoint.
    history
        .put_checkpoint("revenue", at, b"not a checkpoint")
        .unwrap();
    let models =
        ReadModels::restore(&log, &log_dir.join("no-snapshots"), history, None).expect("restore");
    let ids: Vec<&str> = KPIS.iter().map(|(id, _, _)| *id).collect();
    for grain in [Grain::Month, Grain::Year] {
        let past = models
            .aggregates
            .as_of(head, &ids, Grains::only([grain]))
            .expect("as of");
        let (_, reference) = fold_log(&log, head);
        assert_eq!(
            answers_in(&past, &[grain]),
            answers_in(&reference, &[grain])
        );
    }
    log.close().expect("close");
}

/// A measurement of `revenue` on the web channel `hour` hours after the test's start.
fn revenue_at(hour: u32, value: f64) -> Event {
    measured_at("revenue", hour, value)
}

/// A measurement of `kpi_id` on the web channel `hour` hours after the test's start.
fn measured_at(kpi_id: &str, hour: u32, value: f64) -> Event {
    Event::MeasurementRecorded(Measurement {
        kpi_id: kpi_id.into(),
        value,
        occurred_at: start() + TimeDelta::hours(i64::from(hour)),
        labels: BTreeMap::from([("channel".into(), "web".into())]),
        subject: None,
        event_id: None,
    })
}

/// A log of 2,000 measurements of `revenue` in `dir`, 7 hours apart, and a page store
/// tier for it with a budget of `budget` bytes (2 KiB: nearly every bucket leaves memory).
fn paged_log(dir: &std::path::Path, budget: usize) -> (EventLog, impl Fn() -> Option<Tier>) {
    let log = EventLog::open(&dir.join("log"), StoreOptions::default()).expect("open");
    define_all(&log);
    let measurements = (0..2000u32)
        .map(|i| revenue_at(i * 7, f64::from(i % 10)))
        .collect();
    append(&log, measurements);
    let pages = dir.join("pages");
    let tier = move || {
        Some(Tier {
            store: std::sync::Arc::new(PageStore::open(&pages, 0).expect("pages")),
            budget,
            gives_way_to: None,
        })
    };
    (log, tier)
}

/// The buckets' budget also pays for the dedup index's run filters: with a budget that
/// holds every bucket and half the runs' memory, a model that gives way to the runs stores
/// its oldest buckets as pages where one that does not keeps them all, and both answer
/// like a fold of the log.
#[test]
fn the_buckets_give_way_to_the_dedup_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let log = EventLog::open(&log_dir, StoreOptions::default()).expect("open");
    define_all(&log);
    let measurements = (0..2000u32)
        .map(|i| match revenue_at(i * 7, f64::from(i % 10)) {
            Event::MeasurementRecorded(m) => Event::MeasurementRecorded(Measurement {
                event_id: Some(format!("sale-{i}")),
                ..m
            }),
            other => other,
        })
        .collect();
    let head = *append(&log, measurements).last().expect("appended");
    log.close().expect("close");
    // Reopened with room for few ids in memory: the open spills the window into runs.
    let options = StoreOptions {
        dedup_memory_bytes: 4096,
        ..StoreOptions::default()
    };
    let log = EventLog::open(&log_dir, options).expect("reopen");
    let runs = log.dedup_run_memory();
    assert!(log.dedup_stats().runs > 0, "{:?}", log.dedup_stats());
    assert!(runs.bytes() > 0);
    let (_, reference) = fold_log(&log, head);
    let budget = reference.bytes() + runs.bytes() / 2;
    let restore = |name: &str, gives_way_to| {
        let tier = Tier {
            store: std::sync::Arc::new(
                PageStore::open(&dir.path().join(name).join("pages"), 0).expect("pages"),
            ),
            budget,
            gives_way_to,
        };
        let history = History::open(
            &dir.path().join(name).join("history"),
            &log,
            HistoryOptions::default(),
        )
        .expect("history");
        ReadModels::restore(&log, &dir.path().join(name), history, Some(tier)).expect("restore")
    };
    let apart = restore("apart", None);
    let giving = restore("giving", Some(runs));
    assert!(apart.aggregates.read().page_files().is_empty());
    assert!(!giving.aggregates.read().page_files().is_empty());
    assert_eq!(answers(&apart.aggregates.read()), answers(&reference));
    assert_eq!(answers(&giving.aggregates.read()), answers(&reference));
    for models in [apart, giving] {
        models.history.close().expect("close the history index");
    }
    log.close().expect("close");
}

/// [`paged_log`] with its read models restored (history index, no snapshot).
fn paged_models(dir: &std::path::Path, budget: usize) -> (EventLog, ReadModels) {
    let (log, tier) = paged_log(dir, budget);
    let models = restore_paged(dir, &log, tier());
    (log, models)
}

/// The read models of a [`paged_log`] directory restored from its snapshot directory and
/// history index.
fn restore_paged(dir: &std::path::Path, log: &EventLog, tier: Option<Tier>) -> ReadModels {
    let history =
        History::open(&dir.join("history"), log, HistoryOptions::default()).expect("history");
    ReadModels::restore(log, &dir.join("snapshots"), history, tier).expect("restore")
}

/// A snapshot that refers to a page file that is gone is not used: the read models are
/// rebuilt from the log and answer as before, instead of failing on the missing pages.
#[test]
fn a_snapshot_whose_pages_are_gone_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let open = || EventLog::open(&dir.path().join("log"), StoreOptions::default()).expect("open");
    let (mut log, tier) = paged_log(dir.path(), 2048);
    let snapshots = dir.path().join("snapshots");
    let models = restore_paged(dir.path(), &log, tier());
    let before = answers(&models.aggregates.read());
    assert!(
        !models.aggregates.read().page_files().is_empty(),
        "pages are used"
    );
    let seq = models.snapshot(&log, &snapshots, 0).expect("snapshot");
    models.history.close().expect("close the history index");
    log.close().expect("close");
    drop(models);
    for entry in std::fs::read_dir(dir.path().join("pages")).expect("pages") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove");
    }
    log = open();
    let models = restore_paged(dir.path(), &log, tier());
    assert_eq!(
        models.restored.snapshot_seq, 0,
        "the snapshot at {seq} is not used"
    );
    assert_eq!(answers(&models.aggregates.read()), before);
    log.close().expect("close");
}

/// Names of the page files in `dir`'s page store.
fn page_file_names(dir: &std::path::Path) -> BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir.join("pages"))
        .expect("pages")
        .map(|entry| entry.expect("entry").file_name())
        .collect()
}

/// Chunks read back and stored again leave their old pages behind as garbage. A page file
/// that is more than half garbage has its live pages moved to the file appended to, and
/// the next snapshot deletes it: the page files do not grow with every rewrite.
#[test]
fn page_files_mostly_garbage_are_compacted_away() {
    let dir = tempfile::tempdir().unwrap();
    let open = || EventLog::open(&dir.path().join("log"), StoreOptions::default()).expect("open");
    let (mut log, tier) = paged_log(dir.path(), 2048);
    let snapshots = dir.path().join("snapshots");
    let models = restore_paged(dir.path(), &log, tier());
    models.snapshot(&log, &snapshots, 0).expect("snapshot");
    let first = page_file_names(dir.path());
    assert!(!first.is_empty(), "pages are used");
    models.history.close().expect("close the history index");
    log.close().expect("close");
    drop(models);

    // Opened again, pages go to a new file. Late measurements to the older two thirds of
    // the buckets have their chunks read back and stored again; the last third's pages
    // stay live in the first file.
    log = open();
    let models = restore_paged(dir.path(), &log, tier());
    let late = (0..1300u32).map(|i| revenue_at(i * 7, 1.5)).collect();
    append(&log, late);
    models.snapshot(&log, &snapshots, 0).expect("snapshot");
    let now = page_file_names(dir.path());
    assert!(
        first.iter().all(|file| !now.contains(file)),
        "{first:?} compacted away, {now:?} left"
    );
    let (_, reference) = fold_log(&log, log.head().seq);
    let before = answers(&models.aggregates.read());
    assert_eq!(before, answers(&reference));
    models.history.close().expect("close the history index");
    log.close().expect("close");
    drop(models);

    log = open();
    let models = restore_paged(dir.path(), &log, tier());
    assert_ne!(models.restored.snapshot_seq, 0, "the snapshot is used");
    assert_eq!(answers(&models.aggregates.read()), before);
    log.close().expect("close");
}

/// Pages damaged under a running model: a query that needs them is refused as
/// UNAVAILABLE (never answered without them), and the KPI is rebuilt from the history
/// index, after which it answers as before.
#[test]
fn damaged_pages_are_refused_then_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (log, models) = paged_models(dir.path(), 2048);
    let before = answers(&models.aggregates.read());
    damage_page_files(dir.path());
    let query = revenue_query(Grain::Day, start(), start() + TimeDelta::days(2 * 366));
    let refused = models.aggregates.read().query(&query);
    assert!(
        matches!(&refused, Err(Rejection::Unavailable { field, .. }) if field == "kpi_id"),
        "{refused:?}"
    );
    assert!(models.aggregates.heal(), "the kpi is rebuilt");
    assert!(!models.aggregates.heal(), "once");
    assert_eq!(answers(&models.aggregates.read()), before);
    models.history.close().expect("close the history index");
    log.close().expect("close");
}

/// Changes a byte in every 64 of every page file under `dir`.
fn damage_page_files(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir.join("pages")).expect("pages") {
        let path = entry.expect("entry").path();
        let mut bytes = std::fs::read(&path).expect("read");
        for at in (0..bytes.len()).step_by(64) {
            bytes[at] ^= 0x5a;
        }
        std::fs::write(&path, bytes).expect("write");
    }
}

/// The buckets of `revenue` in `grain` from `from` to `to`, by channel.
fn revenue_query(grain: Grain, from: DateTime<Utc>, to: DateTime<Utc>) -> AggregateQuery {
    AggregateQuery {
        kpi_id: "revenue".into(),
        grain,
        start: from,
        end: to,
        filter: BTreeMap::new(),
        group_by: vec!["channel".into()],
        fill: Fill::None,
    }
}

/// However small the budget, the buckets still open and those that ended within the hour
/// stay in memory: the next measurements go there. With a budget below what they alone
/// hold and every page file damaged, the newest hour is still answered (from memory)
/// while an old one is refused.
#[test]
fn the_newest_buckets_stay_in_memory_under_any_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (log, models) = paged_models(dir.path(), 64);
    // paged_log's last measurement is at hour 7 * 1999.
    let latest = start() + TimeDelta::hours(7 * 1999);
    let newest = revenue_query(Grain::Hour, latest, latest + TimeDelta::hours(1));
    let answered = models
        .aggregates
        .read()
        .query(&newest)
        .expect("newest hour");
    assert_eq!(answered.len(), 1, "{answered:?}");
    damage_page_files(dir.path());
    assert_eq!(
        models
            .aggregates
            .read()
            .query(&newest)
            .expect("newest hour, pages damaged"),
        answered
    );
    let oldest = revenue_query(Grain::Hour, start(), start() + TimeDelta::hours(1));
    assert!(
        matches!(
            models.aggregates.read().query(&oldest),
            Err(Rejection::Unavailable { .. })
        ),
        "the oldest hour is stored"
    );
    models.history.close().expect("close the history index");
    log.close().expect("close");
}

/// A model whose buckets cannot get down to the eviction's target (three quarters of
/// the budget) is not walked again at every measurement that passes the budget: two
/// evictions are at least a quarter budget of growth apart (a measurement's own growth
/// aside). The answers stay those of a fold of the log.
#[test]
fn a_model_near_its_floor_is_not_evicted_at_every_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(&dir.path().join("log"), StoreOptions::default()).expect("open");
    define_all(&log);
    // 40 channels of revenue every hour, their hours ageing out of memory one by one,
    // and PERCENTILE values that the newest buckets keep: memory that cannot leave.
    let channels = 40;
    let measurements = (0..12_000u32)
        .flat_map(|i| {
            let Event::MeasurementRecorded(mut m) = revenue_at(i / channels, 1.0) else {
                unreachable!("revenue_at makes a measurement")
            };
            m.labels = BTreeMap::from([("channel".into(), format!("c{}", i % channels))]);
            let reply = measured_at("reply_time", i / channels, f64::from(i % 1000));
            [Event::MeasurementRecorded(m), reply]
        })
        .collect();
    let head = *append(&log, measurements).last().expect("appended");
    // Folds the log with `budget`, calling `folded` with the bytes before and after each
    // event and whether it ran an eviction.
    let fold = |name: &str, budget: usize, folded: &mut dyn FnMut(usize, usize, bool)| {
        let pages = PageStore::open(&dir.path().join(name), 0).expect("pages");
        let mut aggregates = Aggregates::default();
        aggregates.set_tier(Tier {
            store: std::sync::Arc::new(pages),
            budget,
            gives_way_to: None,
        });
        for stored in log.read(1, head) {
            let stored = stored.expect("read");
            let (before, evictions) = (aggregates.bytes(), aggregates.evictions());
            let refold = aggregates.apply(stored.seq, &stored.event, |_| None);
            assert_eq!(refold, None, "no event here refolds");
            folded(
                before,
                aggregates.bytes(),
                aggregates.evictions() > evictions,
            );
        }
        aggregates
    };
    // With a budget of 64 bytes only what cannot leave stays.
    let floor = fold("floor", 64, &mut |_, _, _| {}).bytes();
    let budget = floor + floor / 64;
    let (mut evictions, mut held) = (0, None);
    let near = fold("near", budget, &mut |before, after, evicted| {
        if evicted {
            if let Some(held) = held {
                assert!(
                    before + budget / 8 >= held + budget / 4,
                    "eviction {evictions} at {before} bytes, the last one left {held}"
                );
            }
            (evictions, held) = (evictions + 1, Some(after));
        }
    });
    assert!(evictions > 1, "the model passed its budget {budget}");
    let (_, reference) = fold_log(&log, head);
    assert_eq!(answers(&near), answers(&reference));
    log.close().expect("close");
}

/// Opens the log in `log_dir` and its history index with checkpoints every measurement
/// once they follow `span_per_byte` times their bytes, appends `count` measurements of
/// `revenue` (all in hour 0, so its checkpoints keep their size) one per stored part,
/// and closes both gracefully once the checkpoint thread has seen every part; returns
/// the bytes in the index of each measurement.
fn lifetime(dir: &std::path::Path, span_per_byte: u64, count: usize) -> u64 {
    let log_dir = dir.join("log");
    let log = EventLog::open(&log_dir, StoreOptions::default()).expect("open");
    let options = HistoryOptions {
        flush_every_events: 1,
        checkpoint_every: 1,
        checkpoint_span_per_byte: span_per_byte,
        ..HistoryOptions::default()
    };
    let history = History::open(&dir.join("history"), &log, options).expect("history");
    let parts = history.subscribe_stored();
    let models =
        ReadModels::restore(&log, &log_dir.join("no-snapshots"), history, None).expect("restore");
    if log.head().seq == 0 {
        define_all(&log);
    }
    for _ in 0..count {
        append(&log, vec![revenue_at(0, 1.5)]);
    }
    let patience = std::time::Duration::from_secs(10);
    assert!(models.history.wait_stored(patience));
    assert!(models.aggregates.wait_checkpoints(patience));
    let measured = parts
        .try_iter()
        .flat_map(|part| part.measured)
        .find(|(kpi_id, count, _)| kpi_id == "revenue" && *count == 1)
        .expect("a part with one measurement of revenue");
    models.history.close().expect("close the history index");
    log.close().expect("close");
    measured.2
}

/// A KPI whose next checkpoint must follow more measurements than one run of the process
/// sees still gets it: the checkpoint thread weighs the checkpoint against every
/// measurement since the last one, those before a restart included, not only those it
/// counted since it started (which, restart after restart, declined it for good while
/// the last checkpoint fell behind and as-of folds of the KPI grew with the log).
#[test]
fn checkpoints_follow_the_measurements_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Two measurements: the state of a bucket with one is smaller.
    let bytes = lifetime(dir.path(), 0, 2);
    let checkpoint = |dir: &std::path::Path| {
        let log = EventLog::open(&dir.join("log"), StoreOptions::default()).expect("open");
        let history =
            History::open(&dir.join("history"), &log, HistoryOptions::default()).expect("history");
        let (at, state) = history
            .checkpoint("revenue", log.head().seq, |_, _| Ok(()))
            .unwrap()
            .expect("a checkpoint of revenue");
        history.close().expect("close the history index");
        log.close().expect("close");
        (at, u64::try_from(state.len()).unwrap())
    };
    let (first, size) = checkpoint(dir.path());
    // The next checkpoint follows at least 60 measurements; each run appends 20.
    let per_run = 20;
    let span_per_byte = (3 * per_run * bytes).div_ceil(size);
    for _ in 0..2 {
        lifetime(dir.path(), span_per_byte, per_run as usize);
        assert_eq!(
            checkpoint(dir.path()).0,
            first,
            "60 measurements not reached yet"
        );
    }
    for _ in 0..4 {
        lifetime(dir.path(), span_per_byte, per_run as usize);
    }
    assert!(
        checkpoint(dir.path()).0 > first,
        "a checkpoint after 120 measurements over six runs"
    );
}
