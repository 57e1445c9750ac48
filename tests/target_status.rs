//! Black-box tests of GetTargetStatus and GetTrend on the seed scenarios of the source
//! article, with fixed evaluation times.

mod common;

use chrono::{DateTime, TimeZone, Utc};
use common::{TestServer, kpi, measurement};
use kpi_service::proto::{
    self, Direction, Grain, KpiKind, Measurement, TargetMode, TargetState,
    get_target_status_request::Selector,
};
use prost_types::Timestamp;
use tonic::Code;

fn ts(instant: DateTime<Utc>) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: instant.timestamp(),
        nanos: 0,
    })
}

fn day(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

fn midnight(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

fn at(kpi_id: &str, value: f64, when: DateTime<Utc>) -> Measurement {
    Measurement {
        occurred_at: ts(when),
        ..measurement(kpi_id, value)
    }
}

/// `counts[i]` new customers in month i + 1 of 2026, recorded mid-month.
async fn customers_per_month(server: &TestServer, kpi_id: &str, counts: &[u32]) {
    let mut batch = Vec::new();
    for (month, count) in counts.iter().enumerate() {
        let month = u32::try_from(month).unwrap() + 1;
        batch.extend((0..*count).map(|_| at(kpi_id, 1.0, day(2026, month, 15))));
    }
    if !batch.is_empty() {
        server.record(batch).await.unwrap();
    }
}

async fn set_target(server: &TestServer, target: proto::TargetDefinition) -> proto::Target {
    server
        .catalog()
        .set_target(proto::SetTargetRequest {
            target: Some(target),
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner()
        .target
        .unwrap()
}

/// "50 new customers in six months" on `kpi_id`.
fn fifty(kpi_id: &str) -> proto::TargetDefinition {
    proto::TargetDefinition {
        id: format!("{kpi_id}_h1"),
        kpi_id: kpi_id.into(),
        name: "50 new customers in six months".into(),
        value: 50.0,
        start: ts(midnight(2026, 1, 1)),
        deadline: ts(midnight(2026, 7, 1)),
        mode: TargetMode::Cumulative.into(),
        period_grain: Grain::Month.into(),
        tolerance: None,
    }
}

async fn status_at(
    server: &TestServer,
    selector: Selector,
    when: DateTime<Utc>,
    as_of: Option<proto::AsOf>,
) -> Result<Vec<proto::TargetStatus>, tonic::Status> {
    server
        .query()
        .get_target_status(proto::GetTargetStatusRequest {
            selector: Some(selector),
            evaluated_at: ts(when),
            as_of,
        })
        .await
        .map(|r| r.into_inner().statuses)
}

async fn one_status(
    server: &TestServer,
    target_id: &str,
    when: DateTime<Utc>,
) -> proto::TargetStatus {
    let mut statuses = status_at(server, Selector::TargetId(target_id.into()), when, None)
        .await
        .unwrap();
    assert_eq!(statuses.len(), 1);
    statuses.remove(0)
}

#[tokio::test]
async fn fifty_new_customers_in_six_months() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let april = midnight(2026, 4, 1);
    for id in ["ahead", "on_pace", "behind", "early", "missed"] {
        server.define(kpi(id, KpiKind::Count)).await;
        set_target(&server, fifty(id)).await;
    }

    // Ahead: 10 a month. Running totals 10, 20, 30 lie on a line through 0 with slope 10:
    // at the deadline (month 6) 60, an exact fit, so the interval is the point itself.
    customers_per_month(&server, "ahead", &[10, 10, 10]).await;
    let ahead = one_status(&server, "ahead_h1", april).await;
    assert_eq!(ahead.state(), TargetState::OnTrack);
    assert_eq!(ahead.actual, Some(30.0));
    assert_eq!(ahead.projected, Some(60.0));
    assert_eq!(ahead.reason, "projected 60 of 50 by 30 Jun 2026");
    // (50 - 30) / 3 months left.
    assert!((ahead.required_rate.unwrap() - 20.0 / 3.0).abs() < 1e-9);
    assert_eq!(ahead.required_rate_grain(), Grain::Month);
    // The line reaches 50 at x = 5: the start of June.
    assert_eq!(ahead.estimated_reached_at, ts(midnight(2026, 6, 1)));

    // On pace: 8, 8, 9 (25 by 1 April, the linear pace 50 x 90/181 = 24.9). Totals 8, 16, 25:
    // slope 17/2 = 8.5, intercept 16.33 - 17 = -0.67, at month 6: 50.33.
    customers_per_month(&server, "on_pace", &[8, 8, 9]).await;
    let on_pace = one_status(&server, "on_pace_h1", april).await;
    assert_eq!(on_pace.state(), TargetState::OnTrack);
    assert!((on_pace.projected.unwrap() - 50.0 - 1.0 / 3.0).abs() < 1e-9);
    assert_eq!(on_pace.reason, "projected 50.33 of 50 by 30 Jun 2026");
    let interval = on_pace.projected_interval.unwrap();
    assert!(
        interval.lower < 50.0 && interval.upper > 51.0,
        "{interval:?}"
    );

    // Behind: 5 a month -> projected 30, more than 10 % short.
    customers_per_month(&server, "behind", &[5, 5, 5]).await;
    let behind = one_status(&server, "behind_h1", april).await;
    assert_eq!(behind.state(), TargetState::OffTrack);
    assert_eq!(behind.reason, "projected 30 of 50 by 30 Jun 2026");

    // Achieved early: 20, 20, then 10 by 5 March.
    server
        .record(
            (0..50)
                .map(|i| at("early", 1.0, day(2026, 1 + i / 20, 5)))
                .collect(),
        )
        .await
        .unwrap();
    let early = one_status(&server, "early_h1", midnight(2026, 3, 10)).await;
    assert_eq!(early.state(), TargetState::Achieved);
    assert_eq!(early.reason, "achieved early: 50 of 50");

    // Missed: 43 in the window, judged after the deadline.
    customers_per_month(&server, "missed", &[8, 7, 7, 7, 7, 7]).await;
    let missed = one_status(&server, "missed_h1", midnight(2026, 7, 2)).await;
    assert_eq!(missed.state(), TargetState::Missed);
    assert_eq!(missed.actual, Some(43.0));
    assert_eq!(missed.reason, "missed: 43 of 50 by 30 Jun 2026");
    server.stop().await;
}

#[tokio::test]
async fn a_hundred_customers_in_a_year_measured_per_month() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("customers", KpiKind::Count)).await;
    set_target(
        &server,
        proto::TargetDefinition {
            id: "year_100".into(),
            name: "100 new customers this year".into(),
            value: 100.0,
            deadline: ts(midnight(2027, 1, 1)),
            ..fifty("customers")
        },
    )
    .await;
    customers_per_month(&server, "customers", &[10, 10, 10, 10, 10, 10]).await;
    let status = one_status(&server, "year_100", midnight(2026, 7, 1)).await;
    // Slope 10 a month through 0: 120 at month 12; 40 more needed over 6 months.
    assert_eq!(status.state(), TargetState::OnTrack);
    assert_eq!(status.projected, Some(120.0));
    assert_eq!(status.reason, "projected 120 of 100 by 31 Dec 2026");
    assert!((status.required_rate.unwrap() - 40.0 / 6.0).abs() < 1e-9);
    // expected_now = 100 x 181/365.
    assert!((status.expected_now - 100.0 * 181.0 / 365.0).abs() < 1e-9);
    server.stop().await;
}

#[tokio::test]
async fn level_targets_judge_every_period() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server
        .define(proto::KpiDefinition {
            direction: Direction::LowerIsBetter.into(),
            unit: "h".into(),
            ..kpi("reply_time", KpiKind::Average)
        })
        .await;
    server.define(kpi("nps", KpiKind::Nps)).await;
    // Reply time at most 4 h each month of Q1.
    set_target(
        &server,
        proto::TargetDefinition {
            id: "reply_4h".into(),
            kpi_id: "reply_time".into(),
            name: "reply within 4 hours".into(),
            value: 4.0,
            start: ts(midnight(2026, 1, 1)),
            deadline: ts(midnight(2026, 4, 1)),
            mode: TargetMode::Level.into(),
            period_grain: Grain::Month.into(),
            tolerance: None,
        },
    )
    .await;
    server
        .record(vec![
            at("reply_time", 3.0, day(2026, 1, 10)),
            at("reply_time", 4.0, day(2026, 1, 20)),
            at("reply_time", 4.5, day(2026, 2, 10)),
            at("reply_time", 4.2, day(2026, 3, 5)),
        ])
        .await
        .unwrap();
    let reply = one_status(&server, "reply_4h", midnight(2026, 3, 15)).await;
    let states: Vec<TargetState> = reply.periods.iter().map(|p| p.state()).collect();
    // January 3.5 <= 4 met; February 4.5 missed; March so far 4.2, within 10 % (<= 4.4).
    assert_eq!(
        states,
        [
            TargetState::Achieved,
            TargetState::Missed,
            TargetState::AtRisk
        ]
    );
    assert!(reply.periods[2].current);
    assert_eq!(reply.state(), TargetState::AtRisk);
    assert_eq!(reply.actual, Some(4.2));

    // NPS at least 40 per quarter of 2026.
    set_target(
        &server,
        proto::TargetDefinition {
            id: "nps_40".into(),
            kpi_id: "nps".into(),
            name: "NPS 40 or more every quarter".into(),
            value: 40.0,
            start: ts(midnight(2026, 1, 1)),
            deadline: ts(midnight(2027, 1, 1)),
            mode: TargetMode::Level.into(),
            period_grain: Grain::Quarter.into(),
            tolerance: None,
        },
    )
    .await;
    let scores = |promoters: usize, passives: usize, detractors: usize, when| {
        let mut batch = Vec::new();
        batch.extend((0..promoters).map(|_| at("nps", 10.0, when)));
        batch.extend((0..passives).map(|_| at("nps", 8.0, when)));
        batch.extend((0..detractors).map(|_| at("nps", 3.0, when)));
        batch
    };
    // Q1: 6 - 1 of 10 = 50; Q2: 4 - 1 of 10 = 30; Q3 so far: 5 - 0 of 10 = 50.
    server
        .record(scores(6, 3, 1, day(2026, 2, 1)))
        .await
        .unwrap();
    server
        .record(scores(4, 5, 1, day(2026, 5, 1)))
        .await
        .unwrap();
    server
        .record(scores(5, 5, 0, day(2026, 7, 10)))
        .await
        .unwrap();
    let nps = one_status(&server, "nps_40", midnight(2026, 7, 15)).await;
    let states: Vec<TargetState> = nps.periods.iter().map(|p| p.state()).collect();
    assert_eq!(
        states,
        [
            TargetState::Achieved,
            TargetState::Missed,
            TargetState::OnTrack
        ]
    );
    assert_eq!(nps.state(), TargetState::OnTrack);
    assert_eq!(nps.actual, Some(50.0));
    assert!(nps.reason.contains("2 of 3 periods"), "{}", nps.reason);
    server.stop().await;
}

#[tokio::test]
async fn a_target_changed_mid_window_and_as_of() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("signups", KpiKind::Count)).await;
    let first = set_target(&server, fifty("signups")).await;
    customers_per_month(&server, "signups", &[10, 10, 10]).await;
    set_target(
        &server,
        proto::TargetDefinition {
            value: 80.0,
            ..fifty("signups")
        },
    )
    .await;
    let april = midnight(2026, 4, 1);
    let now = one_status(&server, "signups_h1", april).await;
    assert_eq!(
        now.target
            .as_ref()
            .unwrap()
            .definition
            .as_ref()
            .unwrap()
            .value,
        80.0
    );
    // Projected 60 of 80: 25 % short, beyond the tolerance.
    assert_eq!(now.state(), TargetState::OffTrack);
    assert_eq!(now.reason, "projected 60 of 80 by 30 Jun 2026");
    let then = status_at(
        &server,
        Selector::KpiId("signups".into()),
        april,
        Some(proto::AsOf {
            point: Some(proto::as_of::Point::Seq(first.seq)),
        }),
    )
    .await
    .unwrap();
    assert_eq!(then.len(), 1);
    assert_eq!(
        then[0]
            .target
            .as_ref()
            .unwrap()
            .definition
            .as_ref()
            .unwrap()
            .value,
        50.0
    );
    // As known then, no customers were recorded yet.
    assert_eq!(then[0].actual, Some(0.0));
    server.stop().await;
}

#[tokio::test]
async fn trends_report_changes_fit_and_forecast() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("visitors", KpiKind::Count)).await;
    server.define(kpi("basket", KpiKind::Average)).await;
    // April 2025: 8 (the year-ago bucket); January..April 2026: 10, 12, 14, 16.
    server
        .record(
            (0..8)
                .map(|_| at("visitors", 1.0, day(2025, 4, 10)))
                .collect(),
        )
        .await
        .unwrap();
    customers_per_month(&server, "visitors", &[10, 12, 14, 16]).await;
    let trend = server
        .query()
        .get_trend(proto::GetTrendRequest {
            kpi_id: "visitors".into(),
            grain: Grain::Month.into(),
            window: 4,
            horizon: 2,
            evaluated_at: ts(day(2026, 4, 20)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(trend.buckets.len(), 4);
    assert_eq!((trend.latest, trend.previous), (Some(16.0), Some(14.0)));
    assert_eq!(trend.absolute_change, Some(2.0));
    assert!((trend.relative_change.unwrap() - 2.0 / 14.0).abs() < 1e-12);
    assert_eq!(trend.year_over_year_change, Some(8.0));
    // (10 + 12 + 14 + 16) / 4 = 13; the line 10 + 2x fits exactly.
    assert_eq!(trend.moving_average, Some(13.0));
    let fit = trend.fit.unwrap();
    assert!((fit.slope - 2.0).abs() < 1e-12 && (fit.intercept - 10.0).abs() < 1e-12);
    assert!((fit.r_squared - 1.0).abs() < 1e-12);
    let may = &trend.forecast[0];
    assert!((may.value - 18.0).abs() < 1e-9);
    assert_eq!(may.start, ts(midnight(2026, 5, 1)));
    assert_eq!(trend.forecast.len(), 2);

    // An AVERAGE bucket with no measurements has no value; a COUNT bucket would be 0.
    server
        .record(vec![
            at("basket", 20.0, day(2026, 1, 5)),
            at("basket", 30.0, day(2026, 3, 5)),
        ])
        .await
        .unwrap();
    let basket = server
        .query()
        .get_trend(proto::GetTrendRequest {
            kpi_id: "basket".into(),
            grain: Grain::Month.into(),
            window: 3,
            evaluated_at: ts(day(2026, 3, 20)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(basket.buckets[1].value, None);
    assert_eq!(basket.previous, None);
    assert_eq!(basket.moving_average, Some(25.0));

    let err = server
        .query()
        .get_trend(proto::GetTrendRequest {
            kpi_id: "visitors".into(),
            grain: Grain::Month.into(),
            window: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        common::violated_field(&err).as_deref(),
        Some("window"),
        "{err:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_status_requests_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let err = server
        .query()
        .get_target_status(proto::GetTargetStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        common::violated_field(&err).as_deref(),
        Some("selector"),
        "{err:?}"
    );
    let err = status_at(
        &server,
        Selector::TargetId("nothing".into()),
        day(2026, 1, 1),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        common::violated_field(&err).as_deref(),
        Some("target_id"),
        "{err:?}"
    );
    let err = status_at(
        &server,
        Selector::KpiId("profit".into()),
        day(2026, 1, 1),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        common::violated_field(&err).as_deref(),
        Some("kpi_id"),
        "{err:?}"
    );
    server.stop().await;
}

/// An instant given in Amsterdam's local time.
fn amsterdam(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    chrono_tz::Europe::Amsterdam
        .with_ymd_and_hms(y, m, d, h, 0, 0)
        .single()
        .expect("unambiguous local time")
        .with_timezone(&Utc)
}

#[tokio::test]
async fn the_period_starting_at_the_evaluation_time_is_current_for_every_grain() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    // The issue's own example: LEVEL per month from January, evaluated at 1 March 00:00 UTC.
    server.define(kpi("conversion_pct", KpiKind::Average)).await;
    set_target(
        &server,
        proto::TargetDefinition {
            id: "monthly".into(),
            kpi_id: "conversion_pct".into(),
            name: "3 % every month".into(),
            value: 3.0,
            start: ts(midnight(2026, 1, 1)),
            deadline: ts(midnight(2027, 1, 1)),
            mode: TargetMode::Level.into(),
            period_grain: Grain::Month.into(),
            tolerance: None,
        },
    )
    .await;
    server
        .record(vec![
            at("conversion_pct", 2.0, day(2026, 1, 15)),
            at("conversion_pct", 70.0, day(2026, 2, 15)),
        ])
        .await
        .unwrap();
    let march = one_status(&server, "monthly", midnight(2026, 3, 1)).await;
    assert_eq!(march.periods.len(), 3, "{:?}", march.periods);
    let current: Vec<bool> = march.periods.iter().map(|p| p.current).collect();
    assert_eq!(current, [false, false, true]);
    assert_eq!(march.periods[2].start, ts(midnight(2026, 3, 1)));
    assert_eq!(march.periods[2].actual, None);
    assert_eq!(march.state(), TargetState::AtRisk, "{}", march.reason);
    assert!(march.reason.contains("no data"), "{}", march.reason);
    assert!(!march.reason.contains("70"), "{}", march.reason);

    // Every grain in a zone with DST: (grain, first period, second period), local starts.
    let grains = [
        (
            Grain::Hour,
            amsterdam(2026, 1, 5, 10),
            amsterdam(2026, 1, 5, 11),
        ),
        (
            Grain::Day,
            amsterdam(2026, 1, 5, 0),
            amsterdam(2026, 1, 6, 0),
        ),
        (
            Grain::Week,
            amsterdam(2026, 1, 5, 0),
            amsterdam(2026, 1, 12, 0),
        ),
        (
            Grain::Month,
            amsterdam(2026, 3, 1, 0),
            amsterdam(2026, 4, 1, 0),
        ),
        (
            Grain::Quarter,
            amsterdam(2026, 1, 1, 0),
            amsterdam(2026, 4, 1, 0),
        ),
        (
            Grain::Year,
            amsterdam(2026, 1, 1, 0),
            amsterdam(2027, 1, 1, 0),
        ),
    ];
    for (grain, first, second) in grains {
        let name = format!("{grain:?}").to_lowercase();
        let kpi_id = format!("orders_{name}");
        server
            .define(proto::KpiDefinition {
                timezone: "Europe/Amsterdam".into(),
                ..kpi(&kpi_id, KpiKind::Count)
            })
            .await;
        set_target(
            &server,
            proto::TargetDefinition {
                id: format!("level_{name}"),
                kpi_id: kpi_id.clone(),
                name: "one order per period".into(),
                value: 1.0,
                start: ts(first),
                deadline: ts(second + (second - first) * 5),
                mode: TargetMode::Level.into(),
                period_grain: grain.into(),
                tolerance: None,
            },
        )
        .await;
        server
            .record(vec![at(
                &kpi_id,
                1.0,
                first + chrono::TimeDelta::minutes(1),
            )])
            .await
            .unwrap();
        let target = format!("level_{name}");
        let at_boundary = one_status(&server, &target, second).await;
        assert_eq!(
            at_boundary.periods.len(),
            2,
            "{grain:?}: {:?}",
            at_boundary.periods
        );
        assert!(!at_boundary.periods[0].current, "{grain:?}");
        assert_eq!(
            at_boundary.periods[0].state(),
            TargetState::Achieved,
            "{grain:?}"
        );
        assert!(at_boundary.periods[1].current, "{grain:?}");
        assert_eq!(at_boundary.periods[1].start, ts(second), "{grain:?}");
        assert_eq!(at_boundary.state(), TargetState::AtRisk, "{grain:?}");
        let just_before =
            one_status(&server, &target, second - chrono::TimeDelta::seconds(1)).await;
        assert_eq!(just_before.periods.len(), 1, "{grain:?}");
        assert!(just_before.periods[0].current, "{grain:?}");
        assert_eq!(just_before.state(), TargetState::OnTrack, "{grain:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn both_modes_follow_one_rule_at_the_start_instant() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("signups", KpiKind::Count)).await;
    let start = midnight(2026, 1, 1);
    for (id, mode) in [
        ("cumulative", TargetMode::Cumulative),
        ("level", TargetMode::Level),
    ] {
        set_target(
            &server,
            proto::TargetDefinition {
                id: id.into(),
                kpi_id: "signups".into(),
                name: id.into(),
                value: 50.0,
                start: ts(start),
                deadline: ts(midnight(2026, 7, 1)),
                mode: mode.into(),
                period_grain: Grain::Month.into(),
                tolerance: None,
            },
        )
        .await;
    }
    for id in ["cumulative", "level"] {
        let before = one_status(&server, id, start - chrono::TimeDelta::seconds(1)).await;
        assert_eq!(
            before.state(),
            TargetState::OnTrack,
            "{id}: {}",
            before.reason
        );
        assert!(
            before.reason.starts_with("not started"),
            "{id}: {}",
            before.reason
        );
        assert!(before.periods.is_empty(), "{id}");
        let at_start = one_status(&server, id, start).await;
        assert_eq!(
            at_start.state(),
            TargetState::AtRisk,
            "{id}: {}",
            at_start.reason
        );
        assert!(
            at_start.reason.contains("no data"),
            "{id}: {}",
            at_start.reason
        );
        assert_eq!(at_start.elapsed_fraction, 0.0);
    }
    let level = one_status(&server, "level", start).await;
    assert_eq!(level.periods.len(), 1);
    assert!(level.periods[0].current);
    server.stop().await;
}

#[tokio::test]
async fn projections_never_fall_below_a_running_total_and_end_at_the_final_actual() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("wins", KpiKind::Count)).await;
    set_target(&server, fifty("wins")).await;
    // Nothing in the three finished months, one win in the current one: the least-squares
    // line through the running totals 0, 0, 0 ends at 0, below what is already reached.
    customers_per_month(&server, "wins", &[0, 0, 0, 1]).await;
    let status = one_status(&server, "wins_h1", midnight(2026, 4, 20)).await;
    assert_eq!(status.actual, Some(1.0));
    let projected = status.projected.expect("projected");
    assert!(projected >= 1.0, "projected {projected} below the actual 1");
    let interval = status.projected_interval.expect("interval");
    assert!(interval.lower >= 1.0, "{interval:?}");
    assert!(
        status.reason.contains("projected 1 of 50"),
        "{}",
        status.reason
    );
    // After the deadline the projection is the final actual.
    customers_per_month(&server, "wins", &[0, 2, 1, 0, 4, 1]).await;
    let after = one_status(&server, "wins_h1", midnight(2026, 8, 1)).await;
    assert_eq!(after.state(), TargetState::Missed);
    assert_eq!(after.actual, Some(9.0));
    assert_eq!(after.projected, Some(9.0));
    assert_eq!(after.projected_interval, None);
    server.stop().await;
}

#[tokio::test]
async fn estimated_reach_times_are_whole_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("steady", KpiKind::Count)).await;
    set_target(&server, fifty("steady")).await;
    // 7, 9, 11 a month: the line reaches 50 at a fraction of a month.
    customers_per_month(&server, "steady", &[7, 9, 11]).await;
    let status = one_status(&server, "steady_h1", midnight(2026, 4, 1)).await;
    let reached = status.estimated_reached_at.expect("the line reaches 50");
    assert_eq!(reached.nanos, 0, "{reached:?}");
    server.stop().await;
}

/// An as-of answer folds only the grains its question reads: as of a seq, targets in every
/// period grain (a CUMULATIVE one by days by default, months, a LEVEL one by weeks) and
/// trends in several grains answer exactly as the live model did at that seq.
#[tokio::test]
async fn as_of_answers_as_then_in_every_grain() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("signups", KpiKind::Count)).await;
    set_target(&server, fifty("signups")).await;
    let by_days = proto::TargetDefinition {
        id: "signups_days".into(),
        period_grain: Grain::Unspecified.into(),
        ..fifty("signups")
    };
    set_target(&server, by_days).await;
    let weekly = proto::TargetDefinition {
        id: "signups_weekly".into(),
        value: 2.0,
        mode: TargetMode::Level.into(),
        period_grain: Grain::Week.into(),
        ..fifty("signups")
    };
    set_target(&server, weekly).await;
    customers_per_month(&server, "signups", &[10, 12, 14, 16]).await;
    let head = server.log_info().await.head_seq;
    let april = day(2026, 4, 20);
    let now = status_at(&server, Selector::KpiId("signups".into()), april, None)
        .await
        .unwrap();
    assert_eq!(now.len(), 3);
    let grains = [
        Grain::Hour,
        Grain::Day,
        Grain::Week,
        Grain::Month,
        Grain::Year,
    ];
    let trend = |grain: Grain, as_of| proto::GetTrendRequest {
        kpi_id: "signups".into(),
        grain: grain.into(),
        window: 4,
        horizon: 2,
        evaluated_at: ts(april),
        as_of,
        ..Default::default()
    };
    let mut trends_now = Vec::new();
    for grain in grains {
        let answer = server.query().get_trend(trend(grain, None)).await.unwrap();
        trends_now.push(answer.into_inner());
    }
    // Later measurements change every answer now, not those as of `head`.
    customers_per_month(&server, "signups", &[3, 3, 3, 3]).await;
    let later = status_at(&server, Selector::KpiId("signups".into()), april, None)
        .await
        .unwrap();
    assert_ne!(later, now);
    let then = status_at(
        &server,
        Selector::KpiId("signups".into()),
        april,
        common::as_of_seq(head),
    )
    .await
    .unwrap();
    assert_eq!(then, now);
    for target in &now {
        let id = target
            .target
            .as_ref()
            .unwrap()
            .definition
            .as_ref()
            .unwrap()
            .id
            .clone();
        let one = status_at(
            &server,
            Selector::TargetId(id),
            april,
            common::as_of_seq(head),
        )
        .await
        .unwrap();
        assert_eq!(one, vec![target.clone()]);
    }
    for (grain, now) in grains.into_iter().zip(trends_now) {
        let then = server
            .query()
            .get_trend(trend(grain, common::as_of_seq(head)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(then, now, "{grain:?}");
    }
    server.stop().await;
}
