//! The `kpi-load` scenarios through their library entry points against the real server:
//! small sizes, real outcomes (what the server stored, what the watchers saw).

mod common;

use std::sync::Arc;

use chrono::{DurationRound, TimeDelta, Utc};
use common::TestServer;
use indicatif::ProgressBar;
use kpi_service::load::{self, GrainArg, IngestOptions, QueryOptions, RecordOptions, WatchOptions};
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

    // Query: one latency per request, at most 24 monthly buckets each.
    let options = QueryOptions {
        concurrency: 2,
        requests: 20,
        kpi: "revenue_001".into(),
        grain: GrainArg::Month,
        buckets: 24,
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
