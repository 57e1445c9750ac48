//! The `kpi-load` scenarios through their library entry points against the real server:
//! small sizes, real outcomes (what the server stored, what the watchers saw).

mod common;

use std::sync::Arc;

use chrono::{DurationRound, TimeDelta, Utc};
use common::TestServer;
use indicatif::ProgressBar;
use kpi_service::load::{
    self, AggregateQuestion, GrainArg, IngestOptions, LoadError, QueryOptions, RawSledOptions,
    RecordOptions, WatchOptions,
};
use kpi_service::proto;
use kpi_service::workload::{Workload, WorkloadConfig};

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
        question: AggregateQuestion {
            kpi: "revenue_001".into(),
            grain: GrainArg::Month,
            buckets: 24,
        },
        connections: 2,
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
        question: AggregateQuestion {
            kpi: "revenue_001".into(),
            grain: GrainArg::Month,
            buckets: 24,
        },
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
        start: Some(kpi_service::workload::timestamp(parse("range_start"))),
        end: Some(kpi_service::workload::timestamp(parse("range_end"))),
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(error) if std::time::Instant::now() < deadline => {
                assert!(error.to_string().contains("lock"), "{error}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("{error}"),
        }
    }
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
