//! The `kpi-load` scenarios through their library entry points against the real server:
//! small sizes, real outcomes (what the server stored, what the watchers saw).
//!
//! Size: one test per `kpi-load` scenario against one real server each (about 720 lines).

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use chrono::{DurationRound, TimeDelta, Utc};
use common::TestServer;
use indicatif::ProgressBar;
use kpi_load::load::{
    self, AggregateQuestion, GrainArg, IngestOptions, LoadError, QueryOptions, RawSledOptions,
    ReadyOptions, RecordOptions, WatchOptions,
};
use kpi_load::workload::{Workload, WorkloadConfig};
use kpi_service::proto;

fn workload(measurements: u64) -> Arc<Workload> {
    let end = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap();
    Arc::new(
        Workload::new(WorkloadConfig {
            kpis: 8,
            measurements,
            event_ids: true,
            ..WorkloadConfig::ending_at(end)
        })
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let addr = format!("http://{}", server.addr);
    let hidden = ProgressBar::hidden();
    let workload = workload(5003);

    // Ingest: every measurement acknowledged once, and the log holds exactly them.
    let options = IngestOptions {
        producers: 3,
        batch: 100,
        window: 2,
        first: 0,
        count: None,
    };
    let report = load::ingest(&addr, Arc::clone(&workload), &options, &hidden)
        .await
        .unwrap();
    assert_eq!(report.items, 5003, "{}", report.table());
    assert_eq!(report.ops, 51);
    assert_eq!(report.latencies.count(), 51);
    let head = server.log_info().await.head_seq;
    assert_eq!(head, 8 + 5003);
    let json: serde_json::Value = serde_json::from_str(&report.json_line()).unwrap();
    assert_eq!(json["scenario"], "ingest");
    assert_eq!(json["producers"], 3);
    assert_eq!(json["items"], 5003);
    assert_eq!(json["rejected_batches"], 0);

    // The same run again: the KPIs exist (tolerated) and every event_id is a duplicate.
    let again = load::ingest(&addr, Arc::clone(&workload), &options, &hidden)
        .await
        .unwrap();
    assert_eq!(
        again
            .extra
            .iter()
            .find(|(k, _)| *k == "duplicates")
            .unwrap()
            .1,
        5003
    );
    assert_eq!(server.log_info().await.head_seq, head);

    raw_sled_agrees_with_the_server(&server, &workload).await;

    // Query: one latency per request, at most 24 monthly buckets each.
    let options = QueryOptions {
        concurrency: 2,
        requests: 20,
        question: monthly(24, 0),
        connections: 2,
        as_of_seq: None,
        as_of_random: false,
        as_of_seed: 1,
        duration_secs: None,
        trend: false,
    };
    let report = load::query(&addr, Arc::clone(&workload), &options, &hidden)
        .await
        .unwrap();
    assert_eq!(report.ops, 20);
    assert_eq!(report.latencies.count(), 20);
    // Without TCP_NODELAY on the server's connections every call waited ~40 ms for the
    // client's delayed ACK before its stream's last frames left; a call takes well under
    // a millisecond otherwise, even unoptimised.
    assert!(
        report.latencies.quantile_us(0.5) < 30_000.0,
        "{}",
        report.table()
    );
    assert!(
        report.items > 20 * 20 && report.items <= 20 * 24,
        "{}",
        report.table()
    );

    // The same buckets through GetTrend, each call as of a random seq.
    let options = QueryOptions {
        trend: true,
        as_of_random: true,
        ..options
    };
    let report = load::query(&addr, Arc::clone(&workload), &options, &hidden)
        .await
        .unwrap();
    assert_eq!(report.ops, 20);
    assert_eq!(extra(&report, "errors"), 0, "{}", report.table());
    assert_eq!(extra(&report, "rpc"), "GetTrend");
    // A trend answers its whole window, empty buckets included; GetAggregates as of
    // early seqs would answer fewer.
    assert_eq!(report.items, 20 * 24, "{}", report.table());

    // Record: one measurement per call, all stored.
    let options = RecordOptions {
        concurrency: 4,
        duration_secs: 1,
        connections: 2,
    };
    let before = server.log_info().await.head_seq;
    let report = load::record(&addr, Arc::clone(&workload), &options, &hidden)
        .await
        .unwrap();
    assert!(report.ops > 10, "{}", report.table());
    assert_eq!(report.items, report.ops);
    assert_eq!(report.latencies.count(), report.ops);
    // The calls reuse the workload's event ids, so some may be duplicates of the ingest.
    assert!(server.log_info().await.head_seq >= before);

    // Watch: every watcher sees the producer's batches.
    let options = WatchOptions {
        watchers: vec![1, 5],
        rate: 1000,
        duration_secs: 1,
        per_connection: 2,
        grace_secs: 5,
    };
    let reports = load::watch(&addr, Arc::clone(&workload), &options, &hidden)
        .await
        .unwrap();
    assert_eq!(reports.len(), 2);
    for report in &reports {
        let extra = |key: &str| {
            report
                .extra
                .iter()
                .find(|(k, _)| *k == key)
                .unwrap()
                .1
                .clone()
        };
        assert!(report.items >= 900, "{}", report.table());
        assert!(report.ops > 0, "{}", report.table());
        assert!(report.latencies.count() > 0);
        assert_eq!(extra("fell_behind"), 0, "{}", report.table());
        assert_eq!(extra("marks_missed"), 0, "{}", report.table());
        assert_eq!(extra("record_errors"), 0);
    }
    server.stop().await;
}

/// The `sled` scenario on the workload the server was fed: every measurement is one key
/// holding its protobuf encoding, and the full-scan query finds the monthly buckets
/// GetAggregates answers for the same range.
async fn raw_sled_agrees_with_the_server(server: &TestServer, workload: &Arc<Workload>) {
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("db");
    let options = RawSledOptions {
        data_dir: db_dir.clone(),
        producers: 3,
        batch: 100,
        queries: 2,
        question: monthly(24, 0),
    };
    let run = {
        let (workload, options) = (Arc::clone(workload), options.clone());
        tokio::task::spawn_blocking(move || {
            load::raw_sled(&workload, &options, &ProgressBar::hidden())
        })
    };
    let reports = run.await.unwrap().unwrap();
    assert_eq!(reports.len(), 2);
    let (ingest, query) = (&reports[0], &reports[1]);
    let extra = |report: &load::Report, key: &str| {
        report
            .extra
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no {key} in {}", report.table()))
            .1
            .clone()
    };

    assert_eq!(ingest.scenario, "sled");
    assert_eq!(ingest.items, 5003, "{}", ingest.table());
    assert_eq!(ingest.ops, 51);
    assert_eq!(ingest.latencies.count(), 51);
    assert_eq!(extra(ingest, "keys"), 5003);
    let per_measurement = extra(ingest, "disk_bytes_per_measurement")
        .as_f64()
        .unwrap();
    assert!(per_measurement > 20.0, "{}", ingest.table());
    let json: serde_json::Value = serde_json::from_str(&ingest.json_line()).unwrap();
    assert_eq!(json["scenario"], "sled");
    assert_eq!(json["items"], 5003);

    // The database itself, opened again: key i is measurement i, encoded by prost.
    let db = open_when_released(&db_dir);
    let tree = db.open_tree("measurements").unwrap();
    assert_eq!(tree.len(), 5003);
    for index in [0_u64, 1, 2500, 5002] {
        let value = tree.get(index.to_be_bytes()).unwrap().unwrap();
        let stored = <proto::Measurement as prost::Message>::decode(value.as_ref()).unwrap();
        assert_eq!(stored, workload.measurement(index), "key {index}");
    }
    drop(tree);
    drop(db);

    assert_eq!(query.scenario, "sled_query");
    assert_eq!(query.ops, 2);
    assert_eq!(query.latencies.count(), 2);
    assert_eq!(query.items, 2 * 5003);
    assert_eq!(extra(query, "rows_per_query"), 5003);
    let answer = extra(query, "answer");
    let answer = answer.as_array().unwrap();
    let parse = |key: &str| {
        chrono::DateTime::parse_from_rfc3339(extra(query, key).as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc)
    };
    let request = proto::GetAggregatesRequest {
        kpi_id: "revenue_001".into(),
        grain: proto::Grain::Month.into(),
        start: Some(kpi_load::workload::timestamp(parse("range_start"))),
        end: Some(kpi_load::workload::timestamp(parse("range_end"))),
        fill: proto::Fill::None.into(),
        ..proto::GetAggregatesRequest::default()
    };
    let served = common::buckets(server, request).await.unwrap();
    assert!(served.len() >= 20, "{served:?}");
    assert_eq!(answer.len(), served.len(), "{}", query.table());
    let mut in_range = 0;
    for (ours, theirs) in answer.iter().zip(&served) {
        let start = chrono::DateTime::parse_from_rfc3339(ours["start"].as_str().unwrap()).unwrap();
        assert_eq!(start.timestamp(), theirs.start.unwrap().seconds, "{ours}");
        assert_eq!(ours["count"], theirs.count, "{ours}");
        let (sum, served_sum) = (ours["sum"].as_f64().unwrap(), theirs.sum.unwrap());
        assert!(
            (sum - served_sum).abs() <= 1e-9 * served_sum.abs().max(1.0),
            "{ours} vs {served_sum}"
        );
        in_range += theirs.count;
    }
    assert_eq!(extra(query, "measurements_in_range"), in_range);

    // A second run into the same directory is refused: its figures would not be a fresh
    // database's.
    let workload = Arc::clone(workload);
    let again = tokio::task::spawn_blocking(move || {
        load::raw_sled(&workload, &options, &ProgressBar::hidden())
    })
    .await
    .unwrap();
    assert!(
        matches!(&again, Err(LoadError::Invalid(message)) if message.contains("not empty")),
        "{again:?}"
    );
}

/// Opens the sled database in `dir`, waiting while the scenario's closed handles still hold
/// its lock (sled's background threads release it a moment after the last drop).
fn open_when_released(dir: &std::path::Path) -> sled::Db {
    assert!(
        kpi_service::store::wait_for_sled(dir, std::time::Duration::from_secs(10)).unwrap(),
        "sled's lock was not released"
    );
    sled::open(dir).unwrap()
}

#[test]
fn generate_writes_the_two_csv_files() {
    let dir = tempfile::tempdir().unwrap();
    let workload = workload(1000);
    let report = load::generate(&workload, dir.path(), &ProgressBar::hidden()).unwrap();
    assert_eq!(report.items, 1000);
    let kpis = std::fs::read_to_string(dir.path().join("kpis.csv")).unwrap();
    let mut lines = kpis.lines();
    assert_eq!(
        lines.next(),
        Some("kpi_id,kind,timezone,direction,numerator,denominator")
    );
    assert_eq!(
        lines.next(),
        Some("revenue_001,SUM,Europe/Amsterdam,HIGHER_IS_BETTER,,")
    );
    assert!(kpis.contains("conversion_001,RATIO,Europe/Amsterdam,HIGHER_IS_BETTER,new_customers_001,website_visitors_001"));
    assert!(kpis.contains("reply_time_001,PERCENTILE,Europe/Amsterdam,LOWER_IS_BETTER,,"));
    let measurements = std::fs::read_to_string(dir.path().join("measurements.csv")).unwrap();
    let lines: Vec<&str> = measurements.lines().collect();
    assert_eq!(lines[0], "kpi_id,occurred_at,value,channel,subject");
    assert_eq!(lines.len(), 1001);
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), 5, "{line}");
        assert!(fields[1].ends_with('Z'), "{line}");
        chrono::DateTime::parse_from_rfc3339(fields[1]).unwrap();
        fields[2].parse::<f64>().unwrap();
        assert_eq!(
            fields[4].is_empty(),
            !fields[0].starts_with("unique_visitors")
        );
    }
}

/// The question of `buckets` monthly buckets of revenue_001, ending `offset` buckets before
/// the workload's end.
fn monthly(buckets: u32, offset: u32) -> AggregateQuestion {
    AggregateQuestion {
        kpi: "revenue_001".into(),
        grain: GrainArg::Month,
        buckets,
        end_offset_buckets: offset,
    }
}

/// Ingest options with `producers` streams of batches of 100 sending `[first, first + count)`.
fn piece(producers: usize, first: u64, count: Option<u64>) -> IngestOptions {
    IngestOptions {
        producers,
        batch: 100,
        window: 2,
        first,
        count,
    }
}

/// The measurements a server stored, by event id (the workload's ids name the index).
async fn stored_measurements(server: &TestServer) -> Vec<(String, proto::Measurement)> {
    let mut measurements: Vec<_> = server
        .replay_all()
        .await
        .into_iter()
        .filter_map(|envelope| match envelope.event?.payload? {
            proto::event_record::Payload::MeasurementRecorded(recorded) => {
                let measurement = recorded.measurement?;
                Some((measurement.event_id.clone(), measurement))
            }
            _ => None,
        })
        .collect();
    measurements.sort_by(|a, b| a.0.cmp(&b.0));
    measurements
}

/// Every KPI's monthly buckets per channel over the workload's span.
async fn every_aggregate(server: &TestServer, workload: &Workload) -> Vec<proto::Bucket> {
    let mut all = Vec::new();
    for kpi in workload.kpis() {
        let request = proto::GetAggregatesRequest {
            kpi_id: kpi.id.clone(),
            grain: proto::Grain::Month.into(),
            start: Some(kpi_load::workload::timestamp(
                workload.start() - TimeDelta::days(62),
            )),
            end: Some(kpi_load::workload::timestamp(workload.end())),
            group_by: vec!["channel".into()],
            ..proto::GetAggregatesRequest::default()
        };
        all.extend(common::buckets(server, request).await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_in_pieces_stores_what_one_run_stores() {
    let workload = workload(2345);
    let hidden = ProgressBar::hidden();
    let (whole_dir, pieces_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = TestServer::start(whole_dir.path()).await;
    let pieces = TestServer::start(pieces_dir.path()).await;
    let (whole_addr, pieces_addr) = (
        format!("http://{}", whole.addr),
        format!("http://{}", pieces.addr),
    );

    let report = load::ingest(
        &whole_addr,
        Arc::clone(&workload),
        &piece(3, 0, None),
        &hidden,
    )
    .await
    .unwrap();
    assert_eq!(report.items, 2345);

    // Three pieces, cut off the batch grid, the last one "the rest of the stream".
    for (first, count, sent) in [
        (0, Some(1001), 1001),
        (1001, Some(999), 999),
        (2000, None, 345),
    ] {
        let report = load::ingest(
            &pieces_addr,
            Arc::clone(&workload),
            &piece(2, first, count),
            &hidden,
        )
        .await
        .unwrap();
        assert_eq!(report.items, sent, "{}", report.table());
        let json: serde_json::Value = serde_json::from_str(&report.json_line()).unwrap();
        assert_eq!(json["first"], first);
        assert_eq!(json["count"], sent);
        assert_eq!(json["measurements"], 2345);
        assert_eq!(json["duplicates"], 0);
        assert_eq!(pieces.log_info().await.head_seq, 8 + first + sent);
    }

    // The same measurements, byte for byte (event ids name their index), ...
    let stored = stored_measurements(&pieces).await;
    assert_eq!(stored.len(), 2345);
    assert_eq!(stored, stored_measurements(&whole).await);
    // ... hence the same aggregates (counts exact; sums added in another order).
    let (ours, theirs) = (
        every_aggregate(&pieces, &workload).await,
        every_aggregate(&whole, &workload).await,
    );
    // Most of the 8 KPIs x 4 channels x 25 months have data.
    assert!(ours.len() > 500, "{}", ours.len());
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!((a.start, &a.labels, a.count), (b.start, &b.labels, b.count));
        for (x, y) in [(a.sum, b.sum), (a.value, b.value)] {
            match (x, y) {
                (Some(x), Some(y)) => {
                    assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{a:?} vs {b:?}")
                }
                (x, y) => assert_eq!(x.is_some(), y.is_some(), "{a:?} vs {b:?}"),
            }
        }
    }

    // A piece again is all duplicates; a piece past the stream's end is refused, unsent.
    let again = load::ingest(
        &pieces_addr,
        Arc::clone(&workload),
        &piece(2, 1500, Some(100)),
        &hidden,
    )
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&again.json_line()).unwrap();
    assert_eq!(json["duplicates"], 100);
    for (first, count) in [(2000, Some(346)), (2346, None), (1, Some(u64::MAX))] {
        let refused = load::ingest(
            &pieces_addr,
            Arc::clone(&workload),
            &piece(2, first, count),
            &hidden,
        )
        .await;
        assert!(
            matches!(&refused, Err(LoadError::Invalid(message)) if message.contains("2345 measurements")),
            "{refused:?}"
        );
    }
    assert_eq!(pieces.log_info().await.head_seq, 8 + 2345);
    whole.stop().await;
    pieces.stop().await;
}

/// A query run's options: `requests` calls from 2 callers asking `question`.
fn query_options(requests: u64, question: AggregateQuestion) -> QueryOptions {
    QueryOptions {
        concurrency: 2,
        requests,
        question,
        connections: 2,
        as_of_seq: None,
        as_of_random: false,
        as_of_seed: 1,
        duration_secs: None,
        trend: false,
    }
}

/// An extra of a report, as JSON.
fn extra(report: &load::Report, key: &str) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(&report.json_line()).unwrap();
    json[key].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_asks_older_buckets_and_past_points_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let addr = format!("http://{}", server.addr);
    let hidden = ProgressBar::hidden();
    let workload = workload(3000);

    load::setup(&addr, &workload).await.unwrap();
    load::ingest(
        &addr,
        Arc::clone(&workload),
        &piece(2, 0, Some(1500)),
        &hidden,
    )
    .await
    .unwrap();
    let middle = server.log_info().await.head_seq;
    load::ingest(&addr, Arc::clone(&workload), &piece(2, 1500, None), &hidden)
        .await
        .unwrap();
    let head = server.log_info().await.head_seq;
    assert_eq!(head, 8 + 3000);

    // --end-offset-buckets: one month, three months before the latest; the range ends
    // where the latest four months start, and its buckets are the server's for it.
    let latest = load::query(
        &addr,
        Arc::clone(&workload),
        &query_options(4, monthly(4, 0)),
        &hidden,
    )
    .await
    .unwrap();
    let older = load::query(
        &addr,
        Arc::clone(&workload),
        &query_options(4, monthly(1, 3)),
        &hidden,
    )
    .await
    .unwrap();
    assert_eq!(extra(&older, "end_offset_buckets"), 3);
    assert_eq!(extra(&older, "range_start"), extra(&latest, "range_start"));
    assert_eq!(extra(&older, "errors"), 0);
    assert_eq!(older.items, 4, "{}", older.table());
    let end =
        chrono::DateTime::parse_from_rfc3339(extra(&older, "range_end").as_str().unwrap()).unwrap();
    let start =
        chrono::DateTime::parse_from_rfc3339(extra(&older, "range_start").as_str().unwrap())
            .unwrap();
    assert!(
        (28..=31).contains(&(end - start).num_days()),
        "{start} {end}"
    );
    assert!(end < workload.end() - TimeDelta::days(59), "{end}");

    // --as-of-seq: as of the definitions only there are no buckets; as of the first
    // piece, the month that only the second piece reached is missing; beyond the head
    // every call is refused.
    let at = |seq| QueryOptions {
        as_of_seq: Some(seq),
        ..query_options(4, monthly(24, 0))
    };
    let now = load::query(
        &addr,
        Arc::clone(&workload),
        &query_options(4, monthly(24, 0)),
        &hidden,
    )
    .await
    .unwrap();
    let report = load::query(&addr, Arc::clone(&workload), &at(8), &hidden)
        .await
        .unwrap();
    assert_eq!(
        (report.items, extra(&report, "errors")),
        (0, 0.into()),
        "{}",
        report.table()
    );
    assert_eq!(extra(&report, "as_of"), 8);
    let report = load::query(&addr, Arc::clone(&workload), &at(middle), &hidden)
        .await
        .unwrap();
    assert_eq!(extra(&report, "errors"), 0);
    assert!(
        report.items > 0 && report.items < now.items,
        "{} vs {}",
        report.items,
        now.items
    );
    let report = load::query(&addr, Arc::clone(&workload), &at(head), &hidden)
        .await
        .unwrap();
    assert_eq!(report.items, now.items);
    let report = load::query(&addr, Arc::clone(&workload), &at(head + 1), &hidden)
        .await
        .unwrap();
    assert_eq!(extra(&report, "errors"), 4, "{}", report.table());
    assert!(
        extra(&report, "first_error")
            .as_str()
            .unwrap()
            .contains("past the valid range"),
        "{}",
        report.table()
    );

    // --as-of-random: every call answered, points drawn from [1, head].
    let random = QueryOptions {
        as_of_random: true,
        ..query_options(40, monthly(24, 0))
    };
    let report = load::query(&addr, Arc::clone(&workload), &random, &hidden)
        .await
        .unwrap();
    assert_eq!(report.ops, 40);
    assert_eq!(extra(&report, "errors"), 0, "{}", report.table());
    assert_eq!(extra(&report, "as_of"), "random");
    assert_eq!(extra(&report, "as_of_head"), head);
    // Points spread over the log: fewer buckets than 40 answers as of now.
    assert!(
        report.items > 0 && report.items < 40 * now.items / 4,
        "{}",
        report.table()
    );

    // --duration-secs: far fewer calls than asked, and the run ends in time.
    let bounded = QueryOptions {
        duration_secs: Some(1),
        ..query_options(100_000_000, monthly(24, 0))
    };
    let started = std::time::Instant::now();
    let report = load::query(&addr, Arc::clone(&workload), &bounded, &hidden)
        .await
        .unwrap();
    assert!(
        report.ops > 0 && report.ops < 100_000_000,
        "{}",
        report.table()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // ready: a serving server answers the first attempt.
    let ready = ReadyOptions {
        timeout_secs: 10,
        allow_not_found: false,
        question: monthly(24, 0),
    };
    let report = load::ready(&workload, &addr, &ready).await.unwrap();
    assert_eq!(report.ops, 1, "{}", report.table());
    assert!(report.items > 20, "{}", report.table());
    // An unknown KPI is an answer to a wrong question: an error at once, not a wait.
    let wrong = ReadyOptions {
        question: AggregateQuestion {
            kpi: "no_such_kpi".into(),
            ..monthly(24, 0)
        },
        ..ready.clone()
    };
    let refused = load::ready(&workload, &addr, &wrong).await;
    assert!(
        matches!(&refused, Err(LoadError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound),
        "{refused:?}"
    );
    // ... unless NOT_FOUND is allowed (a server on an empty data directory).
    let empty = ReadyOptions {
        allow_not_found: true,
        ..wrong
    };
    let report = load::ready(&workload, &addr, &empty).await.unwrap();
    assert_eq!((report.ops, report.items), (1, 0), "{}", report.table());
    assert_eq!(extra(&report, "answer"), "not_found");
    server.stop().await;

    // A stopped server: attempts until the deadline, then an error naming it.
    let gone = ReadyOptions {
        timeout_secs: 1,
        ..ready
    };
    let refused = load::ready(&workload, &addr, &gone).await;
    assert!(
        matches!(&refused, Err(LoadError::Invalid(message)) if message.contains("no answer")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_random_needs_events() {
    // Checked before anything else, so even without KPIs the refusal says why.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let addr = format!("http://{}", server.addr);
    let options = QueryOptions {
        as_of_random: true,
        ..query_options(4, monthly(24, 0))
    };
    let refused = load::query(&addr, workload(10), &options, &ProgressBar::hidden()).await;
    assert!(
        matches!(&refused, Err(LoadError::Invalid(message)) if message.contains("empty")),
        "{refused:?}"
    );
    server.stop().await;
}
