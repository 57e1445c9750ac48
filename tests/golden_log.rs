//! The golden logs: data directories written by released versions through the real server
//! (`tests/golden/vX.Y.Z/`), with the answers that version gave (`tests/golden/vX.Y.Z.json`).
//! Every later version must open them, verify the hash chain, answer the same queries the
//! same way, and continue the log. `write_golden_log` writes the directory of a new release
//! (see tests/golden/README.md); a written directory is never regenerated.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use common::TestServer;
use kpi_service::proto::{
    self, Direction, Fill, Grain, KpiDefinition, KpiKind, Measurement, TargetMode, TrendMethod,
    bucket::Detail, event_record::Payload, get_target_status_request::Selector,
    retract_request::Target as RetractTarget,
};
use prost_types::Timestamp;
use serde_json::{Map, Value, json};

/// The environment variable naming the directory `write_golden_log` writes; its answers go
/// to the same path with `.json` appended.
const GOLDEN_DIR_ENV: &str = "KPI_GOLDEN_DIR";

/// The data directory version 0.1.0 wrote, relative to the crate root.
const V0_1_0: &str = "tests/golden/v0.1.0";

/// Days of the scenario: twelve weeks from Monday 2026-01-05, measured every other day.
const SCENARIO_DAYS: u32 = 84;

#[tokio::test]
async fn golden_log_v0_1_0_opens_verifies_answers_the_same_and_continues() {
    check_golden_log(&golden_dir(V0_1_0), Derived::Kept).await;
}

#[tokio::test]
async fn golden_log_v0_1_0_rebuilt_from_the_log_alone_answers_the_same() {
    check_golden_log(&golden_dir(V0_1_0), Derived::Dropped).await;
}

fn golden_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// What the check does with the read models' snapshot and pages of the copied directory.
#[derive(Clone, Copy, Debug)]
enum Derived {
    /// Opened as written (a version that cannot read them discards them itself).
    Kept,
    /// Removed before the start, so the read models are rebuilt from the log, as after a
    /// change of the snapshot's format.
    Dropped,
}

/// Writes a new golden directory through the real server, and its answers beside it:
/// `KPI_GOLDEN_DIR=tests/golden/vX.Y.Z cargo test --test golden_log -- --ignored`.
#[tokio::test]
#[ignore = "writes the golden directory of a release; run with KPI_GOLDEN_DIR set"]
async fn write_golden_log() {
    let dir = PathBuf::from(
        std::env::var_os(GOLDEN_DIR_ENV).expect("KPI_GOLDEN_DIR names the directory to write"),
    );
    let answers_path = answers_path(&dir);
    assert!(
        !dir.exists() && !answers_path.exists(),
        "{} or its answers exist: a golden directory is never regenerated",
        dir.display()
    );
    let server = TestServer::start(&dir).await;
    let seqs = write_scenario(&server).await;
    let answers = answers(&server, &seqs).await;
    // A graceful stop leaves what a stopped server leaves: the snapshot, the pages, the
    // history index and its checkpoints.
    server.stop().await;
    let mut file = Map::new();
    file.insert("scenario".into(), seqs.to_json());
    file.insert("answers".into(), Value::Object(answers));
    let text = serde_json::to_string_pretty(&Value::Object(file)).unwrap() + "\n";
    std::fs::write(&answers_path, text).unwrap();
}

/// Opens a copy of `golden` and compares every answer with the recorded one, then records
/// one more measurement.
async fn check_golden_log(golden: &Path, derived: Derived) {
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(answers_path(golden)).unwrap()).unwrap();
    let seqs = ScenarioSeqs::from_json(&recorded["scenario"]);
    let recorded = recorded["answers"].as_object().expect("answers object");

    let scratch = tempfile::tempdir().unwrap();
    common::copy_dir(golden, scratch.path());
    if let Derived::Dropped = derived {
        for derived_dir in ["snapshots", "pages"] {
            let path = scratch.path().join(derived_dir);
            if path.exists() {
                std::fs::remove_dir_all(path).unwrap();
            }
        }
    }
    let server = TestServer::start(scratch.path()).await;
    let info = server.log_info().await;
    eprintln!(
        "{} ({derived:?}): read models restored from a snapshot at seq {}, {} events replayed",
        golden.display(),
        info.restored_snapshot_seq,
        info.replayed_events
    );
    if let Derived::Dropped = derived {
        assert_eq!(info.restored_snapshot_seq, 0, "no snapshot to restore");
    }
    let live = answers(&server, &seqs).await;

    let recorded_names: Vec<&String> = recorded.keys().collect();
    let live_names: Vec<&String> = live.keys().collect();
    assert_eq!(live_names, recorded_names, "the same queries");
    for (name, expected) in recorded {
        let actual = &live[name];
        assert!(
            actual == expected,
            "{name}: recorded\n{}\nlive\n{}",
            serde_json::to_string_pretty(expected).unwrap(),
            serde_json::to_string_pretty(actual).unwrap()
        );
    }

    // The log continues: one more measurement is accepted, chained and aggregated.
    let head = server.log_info().await.head_seq;
    let when = day_at(SCENARIO_DAYS + 1, 10, 0);
    let results = server
        .record(vec![at(
            "revenue",
            7.5,
            when,
            &[("channel", "web"), ("region", "north")],
        )])
        .await
        .expect("a measurement after the golden log");
    assert_eq!(results[0].seq, head + 1);
    assert!(!results[0].duplicate);
    let verify = server.verify_log().await;
    assert!(verify.ok, "{:?}", verify.chain_break);
    assert_eq!(verify.head_seq, head + 1);
    let day = common::buckets(
        &server,
        aggregates_request(
            "revenue",
            Grain::Day,
            (when, when + chrono::TimeDelta::hours(1)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (day.len(), day[0].count, day[0].value),
        (1, 1, Some(7.5)),
        "the new measurement's day"
    );
    server.stop().await;
}

/// Where the answers of the golden directory `dir` are: `dir` with `.json` appended.
fn answers_path(dir: &Path) -> PathBuf {
    let mut path = dir.as_os_str().to_owned();
    path.push(".json");
    PathBuf::from(path)
}

/// Seqs of the scenario that queries refer to (as_of points), recorded with the answers.
struct ScenarioSeqs {
    /// The head after the first half of the days, before the second half, the target
    /// change, the late measurement, the retractions, the KPI updates and the retirement.
    as_of_middle: u64,
    /// The head just before the target `nps_q1` was removed.
    before_target_removed: u64,
}

impl ScenarioSeqs {
    fn to_json(&self) -> Value {
        json!({
            "as_of_middle": self.as_of_middle,
            "before_target_removed": self.before_target_removed,
        })
    }

    fn from_json(value: &Value) -> Self {
        let seq = |name: &str| value[name].as_u64().expect("scenario seq");
        Self {
            as_of_middle: seq("as_of_middle"),
            before_target_removed: seq("before_target_removed"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The scenario: fixed definitions, occurred_at times and values. Only recorded_at (the
// server's clock when it was written) differs from one run to the next.

fn ts(instant: DateTime<Utc>) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: instant.timestamp(),
        nanos: 0,
    })
}

fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

/// `hour:minute` UTC on day `day` of the scenario (day 0 is Monday 2026-01-05).
fn day_at(day: u32, hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, hour, minute, 0).unwrap()
        + chrono::TimeDelta::days(i64::from(day))
}

/// A deterministic value in 0..modulus that varies with the day and a salt.
fn wave(day: u32, salt: u32, modulus: u32) -> f64 {
    f64::from((day * 37 + salt * 11 + day * day * 3) % modulus)
}

fn at(kpi_id: &str, value: f64, when: DateTime<Utc>, labels: &[(&str, &str)]) -> Measurement {
    Measurement {
        kpi_id: kpi_id.into(),
        value,
        occurred_at: ts(when),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        subject: String::new(),
        event_id: String::new(),
    }
}

fn definition(
    id: &str,
    kind: KpiKind,
    timezone: &str,
    dimensions: &[&str],
    unit: &str,
) -> KpiDefinition {
    KpiDefinition {
        id: id.into(),
        name: format!("golden {id}"),
        description: format!("{id} of the golden log"),
        unit: unit.into(),
        kind: kind.into(),
        direction: Direction::HigherIsBetter.into(),
        timezone: timezone.into(),
        dimensions: dimensions.iter().map(|d| (*d).to_owned()).collect(),
        ratio: None,
    }
}

async fn set_target(server: &TestServer, target: proto::TargetDefinition) {
    server
        .catalog()
        .set_target(proto::SetTargetRequest {
            target: Some(target),
            expected_version: None,
        })
        .await
        .expect("set target");
}

fn target(
    id: &str,
    kpi_id: &str,
    value: f64,
    window: (DateTime<Utc>, DateTime<Utc>),
    mode: TargetMode,
    tolerance: Option<f64>,
) -> proto::TargetDefinition {
    proto::TargetDefinition {
        id: id.into(),
        kpi_id: kpi_id.into(),
        name: format!("golden target {id}"),
        value,
        start: ts(window.0),
        deadline: ts(window.1),
        mode: mode.into(),
        period_grain: Grain::Month.into(),
        tolerance,
    }
}

/// The measurements of scenario day `day` (an even day of the twelve weeks).
fn measurements_of_day(day: u32) -> Vec<Measurement> {
    let channel = if day.is_multiple_of(4) {
        "web"
    } else {
        "store"
    };
    let region = if day % 6 < 3 { "north" } else { "south" };
    // 23:xx UTC is the next day in Amsterdam and 04:xx the next day in Kolkata.
    let hour = (day * 5) % 24;
    let minute = (day * 13) % 60;
    let when = day_at(day, hour, minute);
    let mut batch = vec![
        at(
            "revenue",
            20.0 + wave(day, 1, 50) * 0.25,
            when,
            &[("channel", channel), ("region", region)],
        ),
        at(
            "revenue",
            5.5 + wave(day, 2, 30),
            day_at(day, 23, 30),
            &[("channel", "web"), ("region", "south")],
        ),
        Measurement {
            event_id: format!("order-{day:04}"),
            ..at("orders", 1.0, when, &[("channel", channel)])
        },
        at("visits", 1.0, when, &[("channel", channel)]),
        at("visits", 1.0, day_at(day, 9, 15), &[("channel", "web")]),
        at(
            "reply_time_ms",
            120.0 + wave(day, 3, 400),
            when,
            &[("region", region)],
        ),
        at(
            "basket_size",
            1.0 + wave(day, 4, 9),
            when,
            &[("channel", channel)],
        ),
        at("nps", wave(day, 5, 11), when, &[]),
        at("csat", 1.0 + wave(day, 6, 5), day_at(day, 20, 0), &[]),
        Measurement {
            subject: format!("visitor-{}", day % 9),
            ..at("visitors", 1.0, when, &[])
        },
    ];
    if day.is_multiple_of(6) {
        batch.push(at("queue_depth", wave(day, 7, 20), when, &[]));
        batch.push(at("stock_low", 40.0 - wave(day, 8, 30), when, &[]));
        batch.push(at("latency_peak", 300.0 + wave(day, 9, 700), when, &[]));
        batch.push(at("legacy_score", wave(day, 10, 10), when, &[]));
        batch.push(at("handle_time", 30.0 + wave(day, 11, 60), when, &[]));
    }
    batch
}

/// Writes the scenario through the server's clients; returns the seqs queries refer to.
async fn write_scenario(server: &TestServer) -> ScenarioSeqs {
    use KpiKind::*;
    let amsterdam = "Europe/Amsterdam";
    let mut definitions = vec![
        definition("revenue", Sum, amsterdam, &["channel", "region"], "EUR"),
        definition("orders", Count, amsterdam, &["channel"], ""),
        definition("visits", Count, amsterdam, &["channel"], ""),
        KpiDefinition {
            ratio: Some(proto::RatioSettings {
                numerator_kpi_id: "orders".into(),
                denominator_kpi_id: "visits".into(),
                scale: Some(100.0),
            }),
            ..definition("conversion", Ratio, amsterdam, &["channel"], "%")
        },
        KpiDefinition {
            direction: Direction::LowerIsBetter.into(),
            ..definition("reply_time_ms", Percentile, "", &["region"], "ms")
        },
        definition("basket_size", Average, amsterdam, &["channel"], "items"),
        definition("nps", Nps, amsterdam, &[], ""),
        definition("csat", Csat, "Asia/Kolkata", &[], ""),
        definition("visitors", Distinct, amsterdam, &[], ""),
        definition("queue_depth", Last, "UTC", &[], ""),
        definition("stock_low", Min, amsterdam, &[], ""),
        definition("latency_peak", Max, amsterdam, &[], "ms"),
        definition("legacy_score", Average, amsterdam, &[], ""),
        definition("handle_time", Sum, amsterdam, &[], "s"),
    ];
    for definition in definitions.drain(..) {
        server.define(definition).await;
    }

    let q1 = (utc(2026, 1, 1, 0), utc(2026, 4, 1, 0));
    let h1 = (utc(2026, 1, 1, 0), utc(2026, 7, 1, 0));
    use TargetMode::{Cumulative, Level};
    set_target(
        server,
        target("revenue_q1", "revenue", 2500.0, q1, Cumulative, None),
    )
    .await;
    set_target(
        server,
        target("orders_h1", "orders", 40.0, h1, Cumulative, Some(0.2)),
    )
    .await;
    set_target(
        server,
        target("conversion_monthly", "conversion", 60.0, h1, Level, None),
    )
    .await;
    set_target(server, target("nps_q1", "nps", 10.0, q1, Level, None)).await;

    let mut last_seq = 0;
    for day in (0..SCENARIO_DAYS / 4).map(|d| d * 2) {
        let results = server.record(measurements_of_day(day)).await.unwrap();
        last_seq = results.last().unwrap().seq;
    }
    let as_of_middle = last_seq;

    // A target changed: version 2.
    set_target(
        server,
        target("orders_h1", "orders", 45.0, h1, Cumulative, Some(0.2)),
    )
    .await;
    for day in (SCENARIO_DAYS / 4..SCENARIO_DAYS / 2).map(|d| d * 2) {
        server.record(measurements_of_day(day)).await.unwrap();
    }

    // A late measurement: back-dated into the first week, recorded after the twelfth.
    let late = server
        .record(vec![Measurement {
            event_id: "late-revenue-1".into(),
            ..at(
                "revenue",
                480.0,
                day_at(2, 14, 0),
                &[("channel", "store"), ("region", "north")],
            )
        }])
        .await
        .unwrap();

    // Retractions: one by event id, one by seq.
    for target in [
        RetractTarget::EventId("order-0010".into()),
        RetractTarget::Seq(late[0].seq),
    ] {
        server
            .ingest()
            .retract(proto::RetractRequest {
                target: Some(target),
                reason: "golden log retraction".into(),
            })
            .await
            .expect("retract");
    }

    // KPI updates: a new name, and a new kind with the history recomputed.
    for (definition, recompute_history) in [
        (
            KpiDefinition {
                name: "golden basket size (items)".into(),
                ..definition("basket_size", Average, amsterdam, &["channel"], "items")
            },
            false,
        ),
        (
            definition("handle_time", Average, amsterdam, &[], "s"),
            true,
        ),
    ] {
        server
            .catalog()
            .update_kpi(proto::UpdateKpiRequest {
                definition: Some(definition),
                expected_version: Some(1),
                recompute_history,
            })
            .await
            .expect("update kpi");
    }

    server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: "legacy_score".into(),
            reason: "golden log retirement".into(),
            expected_version: None,
        })
        .await
        .expect("retire kpi");

    let before_target_removed = server.log_info().await.head_seq;
    server
        .catalog()
        .remove_target(proto::RemoveTargetRequest {
            target_id: "nps_q1".into(),
            reason: "golden log removal".into(),
        })
        .await
        .expect("remove target");

    // One more measurement after all of it, so the log ends with one.
    server
        .record(vec![at(
            "revenue",
            12.25,
            day_at(SCENARIO_DAYS, 8, 0),
            &[("channel", "store"), ("region", "south")],
        )])
        .await
        .unwrap();

    ScenarioSeqs {
        as_of_middle,
        before_target_removed,
    }
}

// ---------------------------------------------------------------------------------------
// The queries and their answers as JSON. Only fields that depend on the log alone are
// kept: GetLogInfo's restored_snapshot_seq and replayed_events say how this start loaded
// its read models (a version that cannot read an older snapshot rebuilds from the log), so
// they are left out.

fn aggregates_request(
    kpi_id: &str,
    grain: Grain,
    range: (DateTime<Utc>, DateTime<Utc>),
) -> proto::GetAggregatesRequest {
    proto::GetAggregatesRequest {
        kpi_id: kpi_id.into(),
        grain: grain.into(),
        start: ts(range.0),
        end: ts(range.1),
        ..Default::default()
    }
}

/// The GetAggregates queries, by name.
fn aggregates_queries(seqs: &ScenarioSeqs) -> Vec<(&'static str, proto::GetAggregatesRequest)> {
    let quarter = (utc(2026, 1, 1, 0), utc(2026, 4, 1, 0));
    let january = (utc(2026, 1, 1, 0), utc(2026, 2, 1, 0));
    let web = BTreeMap::from([("channel".to_owned(), "web".to_owned())]);
    let middle = common::as_of_seq(seqs.as_of_middle);
    vec![
        (
            "revenue_day_january",
            aggregates_request("revenue", Grain::Day, january),
        ),
        (
            "revenue_hour_one_day",
            aggregates_request(
                "revenue",
                Grain::Hour,
                (utc(2026, 1, 6, 22), utc(2026, 1, 8, 0)),
            ),
        ),
        (
            "revenue_month_by_channel",
            proto::GetAggregatesRequest {
                group_by: vec!["channel".into()],
                ..aggregates_request("revenue", Grain::Month, quarter)
            },
        ),
        (
            "revenue_week_by_channel_region_as_of_middle",
            proto::GetAggregatesRequest {
                group_by: vec!["channel".into(), "region".into()],
                as_of: middle,
                ..aggregates_request("revenue", Grain::Week, quarter)
            },
        ),
        (
            "revenue_week_web_fill_zero",
            proto::GetAggregatesRequest {
                filter: web.clone(),
                fill: Fill::Zero.into(),
                ..aggregates_request("revenue", Grain::Week, quarter)
            },
        ),
        (
            "revenue_quarter_fill_absent",
            proto::GetAggregatesRequest {
                fill: Fill::Absent.into(),
                ..aggregates_request(
                    "revenue",
                    Grain::Quarter,
                    (utc(2025, 10, 1, 0), utc(2026, 10, 1, 0)),
                )
            },
        ),
        (
            "revenue_year",
            aggregates_request(
                "revenue",
                Grain::Year,
                (utc(2026, 1, 1, 0), utc(2026, 1, 2, 0)),
            ),
        ),
        (
            "orders_week_by_channel",
            proto::GetAggregatesRequest {
                group_by: vec!["channel".into()],
                ..aggregates_request("orders", Grain::Week, quarter)
            },
        ),
        (
            "visits_month",
            aggregates_request("visits", Grain::Month, quarter),
        ),
        (
            "conversion_month_by_channel",
            proto::GetAggregatesRequest {
                group_by: vec!["channel".into()],
                ..aggregates_request("conversion", Grain::Month, quarter)
            },
        ),
        (
            "conversion_week_web_as_of_middle",
            proto::GetAggregatesRequest {
                filter: web,
                as_of: middle,
                ..aggregates_request("conversion", Grain::Week, quarter)
            },
        ),
        (
            "reply_time_month_by_region",
            proto::GetAggregatesRequest {
                group_by: vec!["region".into()],
                ..aggregates_request("reply_time_ms", Grain::Month, quarter)
            },
        ),
        (
            "basket_size_month",
            aggregates_request("basket_size", Grain::Month, quarter),
        ),
        (
            "basket_size_month_as_of_middle",
            proto::GetAggregatesRequest {
                as_of: middle,
                ..aggregates_request("basket_size", Grain::Month, quarter)
            },
        ),
        (
            "nps_month",
            aggregates_request("nps", Grain::Month, quarter),
        ),
        (
            "csat_week_kolkata",
            aggregates_request("csat", Grain::Week, quarter),
        ),
        (
            "visitors_month",
            aggregates_request("visitors", Grain::Month, quarter),
        ),
        (
            "queue_depth_day",
            aggregates_request("queue_depth", Grain::Day, january),
        ),
        (
            "stock_low_month",
            aggregates_request("stock_low", Grain::Month, quarter),
        ),
        (
            "latency_peak_month",
            aggregates_request("latency_peak", Grain::Month, quarter),
        ),
        (
            "legacy_score_month_retired",
            aggregates_request("legacy_score", Grain::Month, quarter),
        ),
        (
            "handle_time_month_recomputed",
            aggregates_request("handle_time", Grain::Month, quarter),
        ),
        (
            "handle_time_month_as_of_middle",
            proto::GetAggregatesRequest {
                as_of: middle,
                ..aggregates_request("handle_time", Grain::Month, quarter)
            },
        ),
    ]
}

/// The GetTrend queries, by name.
fn trend_queries(seqs: &ScenarioSeqs) -> Vec<(&'static str, proto::GetTrendRequest)> {
    vec![
        (
            "revenue_week_linear",
            proto::GetTrendRequest {
                kpi_id: "revenue".into(),
                grain: Grain::Week.into(),
                window: 8,
                horizon: 2,
                evaluated_at: ts(utc(2026, 3, 30, 12)),
                method: TrendMethod::Linear.into(),
                ..Default::default()
            },
        ),
        (
            "orders_month_holt",
            proto::GetTrendRequest {
                kpi_id: "orders".into(),
                grain: Grain::Month.into(),
                window: 3,
                horizon: 1,
                evaluated_at: ts(utc(2026, 3, 15, 12)),
                method: TrendMethod::Holt.into(),
                ..Default::default()
            },
        ),
        (
            "conversion_week_web_as_of_middle",
            proto::GetTrendRequest {
                kpi_id: "conversion".into(),
                grain: Grain::Week.into(),
                window: 6,
                horizon: 1,
                evaluated_at: ts(utc(2026, 2, 15, 12)),
                filter: BTreeMap::from([("channel".to_owned(), "web".to_owned())]),
                as_of: common::as_of_seq(seqs.as_of_middle),
                ..Default::default()
            },
        ),
    ]
}

/// The GetTargetStatus queries, by name. Every one names its evaluation time.
fn target_status_queries(
    seqs: &ScenarioSeqs,
) -> Vec<(&'static str, proto::GetTargetStatusRequest)> {
    let request = |selector, evaluated_at, as_of| proto::GetTargetStatusRequest {
        selector: Some(selector),
        evaluated_at: ts(evaluated_at),
        as_of,
    };
    vec![
        (
            "revenue_march",
            request(Selector::KpiId("revenue".into()), utc(2026, 3, 1, 0), None),
        ),
        (
            "revenue_after_deadline",
            request(Selector::KpiId("revenue".into()), utc(2026, 5, 1, 0), None),
        ),
        (
            "orders_h1_version_2",
            request(
                Selector::TargetId("orders_h1".into()),
                utc(2026, 3, 15, 0),
                None,
            ),
        ),
        (
            "orders_h1_as_of_middle",
            request(
                Selector::TargetId("orders_h1".into()),
                utc(2026, 2, 1, 0),
                common::as_of_seq(seqs.as_of_middle),
            ),
        ),
        (
            "conversion_level",
            request(
                Selector::KpiId("conversion".into()),
                utc(2026, 3, 20, 0),
                None,
            ),
        ),
        (
            "nps_before_removal",
            request(
                Selector::KpiId("nps".into()),
                utc(2026, 2, 10, 0),
                common::as_of_seq(seqs.before_target_removed),
            ),
        ),
        (
            "nps_after_removal",
            request(Selector::KpiId("nps".into()), utc(2026, 2, 10, 0), None),
        ),
    ]
}

/// Every answer of the golden queries, by name.
async fn answers(server: &TestServer, seqs: &ScenarioSeqs) -> Map<String, Value> {
    let mut answers = Map::new();

    let info = server.log_info().await;
    answers.insert(
        "log_info".into(),
        json!({
            "head_seq": info.head_seq,
            "head_hash": hex(&info.head_hash),
            "event_count": info.event_count,
            "head_recorded_at": timestamp(info.head_recorded_at.as_ref()),
        }),
    );
    let verify = server.verify_log().await;
    answers.insert(
        "verify_log".into(),
        json!({
            "ok": verify.ok,
            "checked_events": verify.checked_events,
            "head_seq": verify.head_seq,
            "head_hash": hex(&verify.head_hash),
            "chain_break": verify.chain_break.map(|b| format!("{b:?}")),
        }),
    );
    let envelopes = server.replay_all().await;
    let mut payloads = BTreeMap::<&str, u64>::new();
    for envelope in &envelopes {
        let payload = envelope.event.as_ref().and_then(|e| e.payload.as_ref());
        *payloads.entry(payload_name(payload)).or_default() += 1;
    }
    answers.insert(
        "replay_events".into(),
        json!({
            "count": envelopes.len(),
            "payloads": payloads,
            "first": envelopes.first().map(envelope),
            "last": envelopes.last().map(envelope),
        }),
    );

    let kpis = server
        .catalog()
        .list_kpis(proto::ListKpisRequest {
            page_size: 100,
            page_token: String::new(),
            include_retired: true,
        })
        .await
        .expect("list kpis")
        .into_inner();
    answers.insert(
        "list_kpis".into(),
        Value::Array(kpis.kpis.iter().map(kpi).collect()),
    );
    for (name, as_of) in [
        ("list_targets", None),
        (
            "list_targets_as_of_middle",
            common::as_of_seq(seqs.as_of_middle),
        ),
    ] {
        let targets = server
            .catalog()
            .list_targets(proto::ListTargetsRequest {
                kpi_id: String::new(),
                as_of,
            })
            .await
            .expect("list targets")
            .into_inner();
        answers.insert(
            name.into(),
            Value::Array(targets.targets.iter().map(target_json).collect()),
        );
    }

    for (name, request) in aggregates_queries(seqs) {
        let buckets = common::buckets(server, request)
            .await
            .unwrap_or_else(|status| panic!("GetAggregates {name}: {status}"));
        answers.insert(
            format!("aggregates/{name}"),
            Value::Array(buckets.iter().map(bucket).collect()),
        );
    }
    for (name, request) in trend_queries(seqs) {
        let trend = server
            .query()
            .get_trend(request)
            .await
            .unwrap_or_else(|status| panic!("GetTrend {name}: {status}"))
            .into_inner();
        answers.insert(format!("trend/{name}"), trend_json(&trend));
    }
    for (name, request) in target_status_queries(seqs) {
        let statuses = server
            .query()
            .get_target_status(request)
            .await
            .unwrap_or_else(|status| panic!("GetTargetStatus {name}: {status}"))
            .into_inner();
        answers.insert(
            format!("target_status/{name}"),
            Value::Array(statuses.statuses.iter().map(target_status).collect()),
        );
    }
    answers
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 in UTC, or null.
fn timestamp(value: Option<&Timestamp>) -> Value {
    value.map_or(Value::Null, |t| {
        let nanos = u32::try_from(t.nanos).expect("nanos in range");
        let instant = DateTime::from_timestamp(t.seconds, nanos).expect("timestamp in range");
        Value::String(instant.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    })
}

fn payload_name(payload: Option<&Payload>) -> &'static str {
    match payload {
        None => "none",
        Some(Payload::KpiDefined(_)) => "kpi_defined",
        Some(Payload::KpiUpdated(_)) => "kpi_updated",
        Some(Payload::KpiRetired(_)) => "kpi_retired",
        Some(Payload::TargetSet(_)) => "target_set",
        Some(Payload::TargetRemoved(_)) => "target_removed",
        Some(Payload::MeasurementRecorded(_)) => "measurement_recorded",
        Some(Payload::MeasurementRetracted(_)) => "measurement_retracted",
        Some(Payload::EventsLost(_)) => "events_lost",
    }
}

fn envelope(envelope: &proto::EventEnvelope) -> Value {
    json!({
        "seq": envelope.seq,
        "recorded_at": timestamp(envelope.recorded_at.as_ref()),
        "prev_hash": hex(&envelope.prev_hash),
        "hash": hex(&envelope.hash),
        "record_bytes": envelope.record.len(),
    })
}

/// An enum's name, or its number when this build does not know it.
fn enum_name<E: TryFrom<i32>>(value: i32, name: impl Fn(&E) -> &'static str) -> Value {
    E::try_from(value).map_or_else(|_| json!(value), |e| json!(name(&e)))
}

fn kpi(kpi: &proto::Kpi) -> Value {
    let definition = kpi.definition.as_ref().map(|d| {
        json!({
            "id": d.id,
            "name": d.name,
            "description": d.description,
            "unit": d.unit,
            "kind": enum_name(d.kind, KpiKind::as_str_name),
            "direction": enum_name(d.direction, Direction::as_str_name),
            "timezone": d.timezone,
            "dimensions": d.dimensions,
            "ratio": d.ratio.as_ref().map(|r| json!({
                "numerator_kpi_id": r.numerator_kpi_id,
                "denominator_kpi_id": r.denominator_kpi_id,
                "scale": r.scale,
            })),
        })
    });
    json!({
        "definition": definition,
        "version": kpi.version,
        "retired": kpi.retired,
        "created_at": timestamp(kpi.created_at.as_ref()),
        "updated_at": timestamp(kpi.updated_at.as_ref()),
        "seq": kpi.seq,
    })
}

fn target_json(target: &proto::Target) -> Value {
    let definition = target.definition.as_ref().map(|d| {
        json!({
            "id": d.id,
            "kpi_id": d.kpi_id,
            "name": d.name,
            "value": d.value,
            "start": timestamp(d.start.as_ref()),
            "deadline": timestamp(d.deadline.as_ref()),
            "mode": enum_name(d.mode, TargetMode::as_str_name),
            "period_grain": enum_name(d.period_grain, Grain::as_str_name),
            "tolerance": d.tolerance,
        })
    });
    json!({
        "definition": definition,
        "version": target.version,
        "updated_at": timestamp(target.updated_at.as_ref()),
        "seq": target.seq,
    })
}

fn interval(interval: Option<&proto::Interval>) -> Value {
    interval.map_or(
        Value::Null,
        |i| json!({ "lower": i.lower, "upper": i.upper, "level": i.level }),
    )
}

fn bucket(bucket: &proto::Bucket) -> Value {
    let detail = match &bucket.detail {
        None => Value::Null,
        Some(Detail::Average(d)) => json!({ "average": { "stddev": d.stddev } }),
        Some(Detail::Ratio(d)) => json!({ "ratio": {
            "numerator": d.numerator,
            "denominator": d.denominator,
            "scale": d.scale,
            "numerator_count": d.numerator_count,
            "denominator_count": d.denominator_count,
        } }),
        Some(Detail::Nps(d)) => json!({ "nps": {
            "histogram": d.histogram,
            "promoters": d.promoters,
            "passives": d.passives,
            "detractors": d.detractors,
            "interval": interval(d.interval.as_ref()),
            "thin_sample": d.thin_sample,
        } }),
        Some(Detail::Csat(d)) => json!({ "csat": {
            "histogram": d.histogram,
            "satisfied": d.satisfied,
            "interval": interval(d.interval.as_ref()),
            "mean_rating": d.mean_rating,
            "mean_rating_interval": interval(d.mean_rating_interval.as_ref()),
            "thin_sample": d.thin_sample,
        } }),
        Some(Detail::Percentile(d)) => json!({ "percentile": {
            "p50": d.p50,
            "p90": d.p90,
            "p95": d.p95,
            "p99": d.p99,
            "relative_error": d.relative_error,
        } }),
        Some(Detail::Last(d)) => json!({ "last": {
            "occurred_at": timestamp(d.occurred_at.as_ref()),
            "seq": d.seq,
        } }),
    };
    json!({
        "start": timestamp(bucket.start.as_ref()),
        "end": timestamp(bucket.end.as_ref()),
        "labels": bucket.labels,
        "value": bucket.value,
        "count": bucket.count,
        "sum": bucket.sum,
        "min": bucket.min,
        "max": bucket.max,
        "definition_version": bucket.definition_version,
        "detail": detail,
    })
}

fn trend_json(trend: &proto::GetTrendResponse) -> Value {
    json!({
        "buckets": trend.buckets.iter().map(bucket).collect::<Vec<_>>(),
        "latest": trend.latest,
        "previous": trend.previous,
        "absolute_change": trend.absolute_change,
        "relative_change": trend.relative_change,
        "year_over_year_change": trend.year_over_year_change,
        "moving_average": trend.moving_average,
        "fit": trend.fit.as_ref().map(|f| json!({
            "slope": f.slope,
            "intercept": f.intercept,
            "r_squared": f.r_squared,
        })),
        "forecast": trend.forecast.iter().map(|p| json!({
            "start": timestamp(p.start.as_ref()),
            "end": timestamp(p.end.as_ref()),
            "value": p.value,
            "interval": interval(p.interval.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

fn target_status(status: &proto::TargetStatus) -> Value {
    let state = |state| enum_name(state, proto::TargetState::as_str_name);
    json!({
        "target": status.target.as_ref().map(target_json),
        "state": state(status.state),
        "reason": status.reason,
        "actual": status.actual,
        "progress": status.progress,
        "elapsed_fraction": status.elapsed_fraction,
        "expected_now": status.expected_now,
        "projected": status.projected,
        "projected_interval": interval(status.projected_interval.as_ref()),
        "required_rate": status.required_rate,
        "required_rate_grain": enum_name(status.required_rate_grain, Grain::as_str_name),
        "estimated_reached_at": timestamp(status.estimated_reached_at.as_ref()),
        "periods": status.periods.iter().map(|p| json!({
            "start": timestamp(p.start.as_ref()),
            "end": timestamp(p.end.as_ref()),
            "actual": p.actual,
            "state": state(p.state),
            "current": p.current,
        })).collect::<Vec<_>>(),
    })
}
