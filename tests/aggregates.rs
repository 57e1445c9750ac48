//! Black-box tests of kpi.v1.Query.GetAggregates: exact bucket values per kind, calendars
//! in the KPI's timezone, late measurements, filters, group-by, fill and as-of.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use common::{TestServer, buckets, kpi, measurement};
use kpi_service::proto::{self, Grain, KpiKind, Measurement, RatioSettings, bucket::Detail};
use prost_types::Timestamp;
use tonic::Code;

fn ts(instant: DateTime<Utc>) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: instant.timestamp(),
        nanos: 0,
    })
}

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

fn at(kpi_id: &str, value: f64, when: DateTime<Utc>) -> Measurement {
    Measurement {
        occurred_at: ts(when),
        ..measurement(kpi_id, value)
    }
}

fn labelled(mut m: Measurement, channel: &str) -> Measurement {
    m.labels = BTreeMap::from([("channel".into(), channel.into())]);
    m
}

fn request(
    kpi_id: &str,
    grain: Grain,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> proto::GetAggregatesRequest {
    proto::GetAggregatesRequest {
        kpi_id: kpi_id.into(),
        grain: grain.into(),
        start: ts(start),
        end: ts(end),
        ..Default::default()
    }
}

fn start_of(bucket: &proto::Bucket) -> DateTime<Utc> {
    let start = bucket.start.unwrap();
    DateTime::from_timestamp(start.seconds, 0).unwrap()
}

fn end_of(bucket: &proto::Bucket) -> DateTime<Utc> {
    let end = bucket.end.unwrap();
    DateTime::from_timestamp(end.seconds, 0).unwrap()
}

#[tokio::test]
async fn a_million_cents_sum_to_exactly_ten_thousand() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let when = utc(2026, 5, 12, 10, 0);
    let mut writers = Vec::new();
    for _ in 0..4 {
        let mut ingest = server.ingest();
        writers.push(tokio::spawn(async move {
            for _ in 0..25 {
                let batch = (0..10_000).map(|_| at("revenue", 0.01, when)).collect();
                ingest
                    .record(proto::RecordRequest {
                        measurements: batch,
                    })
                    .await
                    .expect("record");
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let answer = buckets(
        &server,
        request(
            "revenue",
            Grain::Year,
            utc(2026, 1, 1, 0, 0),
            utc(2027, 1, 1, 0, 0),
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].count, 1_000_000);
    assert_eq!(answer[0].value, Some(10_000.0));
    assert_eq!(answer[0].sum, Some(10_000.0));
    server.stop().await;
}

#[tokio::test]
async fn every_kind_reports_its_exact_bucket_values() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for (id, kind) in [
        ("visitors", KpiKind::Count),
        ("buyers", KpiKind::Count),
        ("reply_time", KpiKind::Average),
        ("lowest", KpiKind::Min),
        ("highest", KpiKind::Max),
        ("stock", KpiKind::Last),
        ("nps", KpiKind::Nps),
        ("csat", KpiKind::Csat),
        ("latency", KpiKind::Percentile),
        ("unique_visitors", KpiKind::Distinct),
    ] {
        server.define(kpi(id, kind)).await;
    }
    server
        .define(proto::KpiDefinition {
            ratio: Some(RatioSettings {
                numerator_kpi_id: "buyers".into(),
                denominator_kpi_id: "visitors".into(),
                scale: None,
            }),
            ..kpi("conversion", KpiKind::Ratio)
        })
        .await;
    let day = |h| utc(2026, 6, 10, h, 0);
    let mut batch = Vec::new();
    // 200 visitors, 7 buyers: conversion 100 x 7 / 200 = 3.5 %.
    batch.extend((0..200).map(|_| at("visitors", 1.0, day(9))));
    batch.extend((0..7).map(|_| at("buyers", 1.0, day(10))));
    // Reply times 2, 4, 4, 4, 5, 5, 7, 9: mean 5, population stddev 2.
    batch.extend([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].map(|v| at("reply_time", v, day(11))));
    batch.extend([3.0, -1.5, 8.0].map(|v| at("lowest", v, day(11))));
    batch.extend([3.0, -1.5, 8.0].map(|v| at("highest", v, day(11))));
    // LAST: the latest occurred_at wins, whatever the order of recording.
    batch.extend(
        [(10.0, day(15)), (30.0, day(17)), (20.0, day(16))].map(|(v, h)| at("stock", v, h)),
    );
    // NPS: 5 promoters (9, 10), 3 passives (7, 8), 2 detractors (0..6) of 10: 100 x (5 - 2) / 10 = 30.
    batch.extend(
        [10.0, 10.0, 9.0, 9.0, 9.0, 8.0, 7.0, 7.0, 6.0, 0.0].map(|v| at("nps", v, day(12))),
    );
    // CSAT: scores 5, 5, 4, 3, 1: 3 of 5 satisfied = 60 %; mean rating 18 / 5 = 3.6.
    batch.extend([5.0, 5.0, 4.0, 3.0, 1.0].map(|v| at("csat", v, day(12))));
    // Latencies 1..=1000 ms: p50 ~ 500, p99 ~ 990 within 1 %.
    batch.extend((1..=1000).map(|v| at("latency", f64::from(v), day(13))));
    // 300 visits by 120 distinct visitors.
    batch.extend((0..300).map(|i| Measurement {
        subject: format!("visitor-{}", i % 120),
        ..at("unique_visitors", 1.0, day(14))
    }));
    for chunk in batch.chunks(500) {
        server.record(chunk.to_vec()).await.unwrap();
    }

    let june = |kpi_id: &str| {
        request(
            kpi_id,
            Grain::Month,
            utc(2026, 6, 1, 0, 0),
            utc(2026, 7, 1, 0, 0),
        )
    };
    let one = |answer: Vec<proto::Bucket>| {
        assert_eq!(answer.len(), 1, "{answer:?}");
        answer.into_iter().next().unwrap()
    };
    let b = one(buckets(&server, june("visitors")).await.unwrap());
    assert_eq!((b.value, b.count), (Some(200.0), 200));
    let b = one(buckets(&server, june("conversion")).await.unwrap());
    assert_eq!(b.value, Some(3.5));
    assert!(
        matches!(b.detail, Some(Detail::Ratio(r)) if r.numerator == 7.0 && r.denominator == 200.0 && r.scale == 100.0)
    );
    let b = one(buckets(&server, june("reply_time")).await.unwrap());
    assert_eq!(
        (b.value, b.count, b.min, b.max),
        (Some(5.0), 8, Some(2.0), Some(9.0))
    );
    assert!(matches!(b.detail, Some(Detail::Average(a)) if (a.stddev - 2.0).abs() < 1e-12));
    let b = one(buckets(&server, june("lowest")).await.unwrap());
    assert_eq!(b.value, Some(-1.5));
    let b = one(buckets(&server, june("highest")).await.unwrap());
    assert_eq!(b.value, Some(8.0));
    let b = one(buckets(&server, june("stock")).await.unwrap());
    assert_eq!(b.value, Some(30.0));
    let b = one(buckets(&server, june("nps")).await.unwrap());
    assert_eq!((b.value, b.count), (Some(30.0), 10));
    let Some(Detail::Nps(nps)) = b.detail else {
        panic!("nps detail: {b:?}")
    };
    assert_eq!((nps.promoters, nps.passives, nps.detractors), (5, 3, 2));
    assert!(nps.thin_sample);
    let interval = nps.interval.unwrap();
    assert!(
        interval.lower < 30.0 && 30.0 < interval.upper,
        "{interval:?}"
    );
    let b = one(buckets(&server, june("csat")).await.unwrap());
    assert_eq!(b.value, Some(60.0));
    let Some(Detail::Csat(csat)) = b.detail else {
        panic!("csat detail: {b:?}")
    };
    assert_eq!(csat.satisfied, 3);
    assert!((csat.mean_rating - 3.6).abs() < 1e-12);
    let b = one(buckets(&server, june("latency")).await.unwrap());
    let Some(Detail::Percentile(p)) = b.detail else {
        panic!("percentile detail: {b:?}")
    };
    assert!((p.p50 - 500.0).abs() <= 0.011 * 500.0, "p50 {}", p.p50);
    assert!((p.p99 - 990.0).abs() <= 0.011 * 990.0, "p99 {}", p.p99);
    let b = one(buckets(&server, june("unique_visitors")).await.unwrap());
    assert_eq!(b.count, 300);
    let distinct = b.value.unwrap();
    assert!(
        (distinct - 120.0).abs() <= 0.02 * 120.0,
        "distinct {distinct}"
    );
    server.stop().await;
}

#[tokio::test]
async fn days_and_months_follow_the_kpi_timezone_across_dst() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server
        .define(proto::KpiDefinition {
            timezone: "Europe/Amsterdam".into(),
            ..kpi("orders", KpiKind::Count)
        })
        .await;
    server
        .record(vec![
            // 2026-03-29 01:30 local (CET, before the spring change): the 23-hour day.
            at("orders", 1.0, utc(2026, 3, 29, 0, 30)),
            // 2026-03-29 23:30 local (CEST) is still the 29th.
            at("orders", 1.0, utc(2026, 3, 29, 21, 30)),
            // 2026-10-25 00:30 local (CEST), first hour of the 25-hour day.
            at("orders", 1.0, utc(2026, 10, 24, 22, 30)),
            // 2026-06-01 00:30 local is 2026-05-31 22:30 UTC: June, not May.
            at("orders", 1.0, utc(2026, 5, 31, 22, 30)),
        ])
        .await
        .unwrap();
    let days = buckets(
        &server,
        request(
            "orders",
            Grain::Day,
            utc(2026, 3, 29, 0, 0),
            utc(2026, 3, 29, 12, 0),
        ),
    )
    .await
    .unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(start_of(&days[0]), utc(2026, 3, 28, 23, 0));
    assert_eq!(end_of(&days[0]), utc(2026, 3, 29, 22, 0));
    assert_eq!(days[0].count, 2);

    let autumn = buckets(
        &server,
        request(
            "orders",
            Grain::Day,
            utc(2026, 10, 25, 0, 0),
            utc(2026, 10, 25, 1, 0),
        ),
    )
    .await
    .unwrap();
    assert_eq!(autumn.len(), 1);
    assert_eq!(start_of(&autumn[0]), utc(2026, 10, 24, 22, 0));
    assert_eq!(
        end_of(&autumn[0]) - start_of(&autumn[0]),
        chrono::TimeDelta::hours(25)
    );
    assert_eq!(autumn[0].count, 1);

    let months = buckets(
        &server,
        request(
            "orders",
            Grain::Month,
            utc(2026, 5, 1, 0, 0),
            utc(2026, 6, 15, 0, 0),
        ),
    )
    .await
    .unwrap();
    assert_eq!(months.len(), 1, "{months:?}");
    assert_eq!(start_of(&months[0]), utc(2026, 5, 31, 22, 0));
    assert_eq!(end_of(&months[0]), utc(2026, 6, 30, 22, 0));
    server.stop().await;
}

#[tokio::test]
async fn late_measurements_filters_group_by_and_fill() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server
        .record(vec![
            labelled(at("revenue", 100.0, utc(2026, 9, 3, 12, 0)), "web"),
            labelled(at("revenue", 50.0, utc(2026, 9, 20, 12, 0)), "shop"),
            labelled(at("revenue", 10.0, utc(2026, 11, 2, 12, 0)), "web"),
        ])
        .await
        .unwrap();
    let range = || {
        request(
            "revenue",
            Grain::Month,
            utc(2026, 8, 1, 0, 0),
            utc(2026, 12, 1, 0, 0),
        )
    };
    let answer = buckets(&server, range()).await.unwrap();
    let values: Vec<(DateTime<Utc>, Option<f64>)> =
        answer.iter().map(|b| (start_of(b), b.value)).collect();
    assert_eq!(
        values,
        [
            (utc(2026, 9, 1, 0, 0), Some(150.0)),
            (utc(2026, 11, 1, 0, 0), Some(10.0))
        ]
    );

    // A late measurement for September, recorded in November, updates September.
    server
        .record(vec![labelled(
            at("revenue", 25.0, utc(2026, 9, 30, 23, 0)),
            "shop",
        )])
        .await
        .unwrap();
    let answer = buckets(&server, range()).await.unwrap();
    assert_eq!(answer[0].value, Some(175.0));
    assert_eq!(answer[0].count, 3);

    let zero = buckets(
        &server,
        proto::GetAggregatesRequest {
            fill: proto::Fill::Zero.into(),
            ..range()
        },
    )
    .await
    .unwrap();
    let values: Vec<Option<f64>> = zero.iter().map(|b| b.value).collect();
    assert_eq!(values, [Some(0.0), Some(175.0), Some(0.0), Some(10.0)]);
    let absent = buckets(
        &server,
        proto::GetAggregatesRequest {
            fill: proto::Fill::Absent.into(),
            ..range()
        },
    )
    .await
    .unwrap();
    assert_eq!(absent.len(), 4);
    assert_eq!((absent[0].value, absent[0].count), (None, 0));

    let web = buckets(
        &server,
        proto::GetAggregatesRequest {
            filter: BTreeMap::from([("channel".into(), "web".into())]),
            ..range()
        },
    )
    .await
    .unwrap();
    let values: Vec<Option<f64>> = web.iter().map(|b| b.value).collect();
    assert_eq!(values, [Some(100.0), Some(10.0)]);

    let grouped = buckets(
        &server,
        proto::GetAggregatesRequest {
            group_by: vec!["channel".into()],
            ..range()
        },
    )
    .await
    .unwrap();
    let rows: Vec<(String, DateTime<Utc>, Option<f64>)> = grouped
        .iter()
        .map(|b| (b.labels["channel"].clone(), start_of(b), b.value))
        .collect();
    assert_eq!(
        rows,
        [
            ("shop".into(), utc(2026, 9, 1, 0, 0), Some(75.0)),
            ("web".into(), utc(2026, 9, 1, 0, 0), Some(100.0)),
            ("web".into(), utc(2026, 11, 1, 0, 0), Some(10.0)),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn as_of_answers_from_the_events_known_then() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("signups", KpiKind::Count)).await;
    let first = server
        .record(
            (0..3)
                .map(|_| at("signups", 1.0, utc(2026, 10, 5, 9, 0)))
                .collect(),
        )
        .await
        .unwrap();
    let known_seq = first.last().unwrap().seq;
    let known_at = server.log_info().await.head_recorded_at;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    server
        .record(
            (0..4)
                .map(|_| at("signups", 1.0, utc(2026, 10, 6, 9, 0)))
                .collect(),
        )
        .await
        .unwrap();
    let october = || {
        request(
            "signups",
            Grain::Month,
            utc(2026, 10, 1, 0, 0),
            utc(2026, 11, 1, 0, 0),
        )
    };
    assert_eq!(
        buckets(&server, october()).await.unwrap()[0].value,
        Some(7.0)
    );
    let by_seq = buckets(
        &server,
        proto::GetAggregatesRequest {
            as_of: common::as_of_seq(known_seq),
            ..october()
        },
    )
    .await
    .unwrap();
    assert_eq!(by_seq[0].value, Some(3.0));
    let by_time = buckets(
        &server,
        proto::GetAggregatesRequest {
            as_of: Some(proto::AsOf {
                point: Some(proto::as_of::Point::RecordedAt(known_at.unwrap())),
            }),
            ..october()
        },
    )
    .await
    .unwrap();
    assert_eq!(by_time[0].value, Some(3.0));
    server.stop().await;
}

#[tokio::test]
async fn answers_are_the_same_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("nps", KpiKind::Nps)).await;
    for day in 1..=20 {
        server
            .record(vec![
                labelled(
                    at("revenue", f64::from(day) * 1.5, utc(2026, 10, day, 8, 0)),
                    "web",
                ),
                at("nps", f64::from(day % 11), utc(2026, 10, day, 9, 0)),
            ])
            .await
            .unwrap();
    }
    let questions = || {
        vec![
            request(
                "revenue",
                Grain::Day,
                utc(2026, 10, 1, 0, 0),
                utc(2026, 11, 1, 0, 0),
            ),
            request(
                "nps",
                Grain::Week,
                utc(2026, 10, 1, 0, 0),
                utc(2026, 11, 1, 0, 0),
            ),
        ]
    };
    let mut before = Vec::new();
    for question in questions() {
        before.push(buckets(&server, question).await.unwrap());
    }
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    for (question, expected) in questions().into_iter().zip(before) {
        assert_eq!(buckets(&server, question).await.unwrap(), expected);
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_questions_get_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let june = || {
        request(
            "revenue",
            Grain::Day,
            utc(2026, 6, 1, 0, 0),
            utc(2026, 7, 1, 0, 0),
        )
    };
    let cases = vec![
        (
            proto::GetAggregatesRequest {
                kpi_id: "profit".into(),
                ..june()
            },
            Code::NotFound,
            "kpi_id",
        ),
        (
            proto::GetAggregatesRequest {
                grain: Grain::Unspecified.into(),
                ..june()
            },
            Code::InvalidArgument,
            "grain",
        ),
        (
            proto::GetAggregatesRequest {
                start: None,
                ..june()
            },
            Code::InvalidArgument,
            "start",
        ),
        (
            proto::GetAggregatesRequest {
                start: ts(utc(2026, 8, 1, 0, 0)),
                ..june()
            },
            Code::InvalidArgument,
            "end",
        ),
        (
            proto::GetAggregatesRequest {
                grain: Grain::Hour.into(),
                start: ts(utc(1970, 1, 1, 0, 0)),
                end: ts(utc(2026, 1, 1, 0, 0)),
                ..june()
            },
            Code::InvalidArgument,
            "grain",
        ),
        (
            proto::GetAggregatesRequest {
                filter: BTreeMap::from([("country".into(), "nl".into())]),
                ..june()
            },
            Code::InvalidArgument,
            "filter[\"country\"]",
        ),
        (
            proto::GetAggregatesRequest {
                group_by: vec!["country".into()],
                ..june()
            },
            Code::InvalidArgument,
            "group_by[0]",
        ),
    ];
    for (question, code, field) in cases {
        let err = buckets(&server, question.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{question:?}: {err:?}");
        assert_eq!(
            common::violated_field(&err).as_deref(),
            Some(field),
            "{err:?}"
        );
    }
    server.stop().await;
}

async fn retract(
    server: &TestServer,
    target: proto::retract_request::Target,
) -> Result<proto::RetractResponse, tonic::Status> {
    server
        .ingest()
        .retract(proto::RetractRequest {
            target: Some(target),
            reason: "test order".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_retraction_removes_the_contribution_from_every_kind() {
    use proto::retract_request::Target;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("peak", KpiKind::Max)).await;
    let when = utc(2026, 7, 14, 12, 0);
    let recorded = server
        .record(vec![
            common::with_event_id(at("revenue", 40.0, when), "order-1"),
            common::with_event_id(at("revenue", 2.5, when), "order-2"),
            at("peak", 7.0, when),
            at("peak", 99.0, when),
        ])
        .await
        .unwrap();
    let july = |kpi_id: &str| {
        request(
            kpi_id,
            Grain::Month,
            utc(2026, 7, 1, 0, 0),
            utc(2026, 8, 1, 0, 0),
        )
    };
    assert_eq!(
        buckets(&server, july("revenue")).await.unwrap()[0].value,
        Some(42.5)
    );

    // By event_id (SUM subtracts exactly) and by seq (MAX is recomputed from the log).
    let by_id = retract(&server, Target::EventId("order-1".into()))
        .await
        .unwrap();
    assert_eq!(by_id.retracted_seq, recorded[0].seq);
    let revenue = buckets(&server, july("revenue")).await.unwrap();
    assert_eq!((revenue[0].value, revenue[0].count), (Some(2.5), 1));
    retract(&server, Target::Seq(recorded[3].seq))
        .await
        .unwrap();
    let peak = buckets(&server, july("peak")).await.unwrap();
    assert_eq!((peak[0].value, peak[0].count), (Some(7.0), 1));

    // Twice, or something that is not a measurement, or not there: refused.
    let err = retract(&server, Target::Seq(recorded[0].seq))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = retract(&server, Target::Seq(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = retract(&server, Target::Seq(10_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = retract(&server, Target::EventId("never-sent".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The log keeps both the measurement and its retraction; a restart agrees.
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    assert_eq!(
        buckets(&server, july("revenue")).await.unwrap()[0].value,
        Some(2.5)
    );
    assert_eq!(
        buckets(&server, july("peak")).await.unwrap()[0].value,
        Some(7.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn restarts_replay_only_the_log_tail_and_answer_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("latency", KpiKind::Percentile)).await;
    let record_day = |day: u32| {
        vec![
            labelled(
                at("revenue", f64::from(day) + 0.25, utc(2026, 9, day, 8, 0)),
                "web",
            ),
            at("latency", f64::from(day * 7 % 50), utc(2026, 9, day, 9, 0)),
        ]
    };
    for day in 1..=10 {
        server.record(record_day(day)).await.unwrap();
    }
    let questions = || {
        vec![
            request(
                "revenue",
                Grain::Day,
                utc(2026, 9, 1, 0, 0),
                utc(2026, 10, 1, 0, 0),
            ),
            proto::GetAggregatesRequest {
                group_by: vec!["channel".into()],
                ..request(
                    "revenue",
                    Grain::Month,
                    utc(2026, 9, 1, 0, 0),
                    utc(2026, 10, 1, 0, 0),
                )
            },
            request(
                "latency",
                Grain::Week,
                utc(2026, 9, 1, 0, 0),
                utc(2026, 10, 1, 0, 0),
            ),
        ]
    };
    let answers = |server: &TestServer| {
        let channel = server.channel();
        async move {
            let mut client = kpi_service::proto::query_client::QueryClient::new(channel);
            let mut all = Vec::new();
            for question in questions() {
                let mut stream = client.get_aggregates(question).await.unwrap().into_inner();
                let mut buckets = Vec::new();
                while let Some(response) = stream.message().await.unwrap() {
                    buckets.push(response.bucket.unwrap());
                }
                all.push(buckets);
            }
            all
        }
    };
    let before = answers(&server).await;
    let head = server.log_info().await.head_seq;
    server.stop().await;

    // A graceful stop snapshots at the head: nothing to replay.
    let server = TestServer::start(dir.path()).await;
    let info = server.log_info().await;
    assert_eq!(
        (info.restored_snapshot_seq, info.replayed_events),
        (head, 0)
    );
    assert_eq!(answers(&server).await, before);

    // A crash after more events: the snapshot stays at the old head, the tail is replayed.
    for day in 11..=15 {
        server.record(record_day(day)).await.unwrap();
    }
    let before_kill = answers(&server).await;
    assert_ne!(before_kill, before);
    server.kill().await;
    let server = TestServer::start_after_kill(dir.path()).await;
    let info = server.log_info().await;
    assert_eq!(info.restored_snapshot_seq, head);
    assert_eq!(info.replayed_events, 10);
    assert_eq!(info.head_seq, head + 10);
    assert_eq!(answers(&server).await, before_kill);

    // A damaged snapshot is discarded: the whole log is replayed, the answers hold. (That
    // every single flipped bit is refused, by the checksum, is the unit test
    // `projection::snapshot::tests::every_flipped_bit_is_refused`.)
    let snapshot = dir.path().join("snapshots").join("projection.snapshot");
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 2] = [
        ("one bit flipped near the end", |bytes| {
            let at = bytes.len() - 10;
            bytes[at] ^= 0x04;
        }),
        ("cut in half", |bytes| bytes.truncate(bytes.len() / 2)),
    ];
    let mut server = server;
    for (damage, apply) in damages {
        server.stop().await;
        let mut bytes = std::fs::read(&snapshot).unwrap();
        apply(&mut bytes);
        std::fs::write(&snapshot, bytes).unwrap();
        server = TestServer::start(dir.path()).await;
        let info = server.log_info().await;
        assert_eq!(
            (info.restored_snapshot_seq, info.replayed_events),
            (0, head + 10),
            "{damage}"
        );
        assert_eq!(answers(&server).await, before_kill, "{damage}");
    }
    server.stop().await;
}

#[tokio::test]
async fn label_combinations_per_kpi_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("clicks", KpiKind::Count)).await;
    let when = utc(2026, 8, 1, 12, 0);
    let limit = kpi_service::projection::aggregates::MAX_SERIES_PER_KPI;
    let batch = (0..limit)
        .map(|i| labelled(at("clicks", 1.0, when), &format!("c{i}")))
        .collect();
    server.record(batch).await.unwrap();
    let err = server
        .record(vec![labelled(at("clicks", 1.0, when), "one-too-many")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        common::violated_field(&err).as_deref(),
        Some("measurements[0].labels"),
        "{err:?}"
    );
    // Existing combinations still take measurements.
    server
        .record(vec![labelled(at("clicks", 1.0, when), "c7")])
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn as_of_beyond_the_head_is_out_of_range_in_every_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("signups", KpiKind::Count)).await;
    server
        .record(vec![at("signups", 1.0, utc(2026, 10, 5, 9, 0))])
        .await
        .unwrap();
    let head = server.log_info().await.head_seq;
    let tomorrow = Utc::now() + chrono::TimeDelta::days(1);
    let beyond = [
        (
            proto::as_of::Point::Seq(1_000_000_000_000),
            "as_of.seq",
            format!("head seq {head}"),
        ),
        (
            proto::as_of::Point::RecordedAt(ts(tomorrow).unwrap()),
            "as_of.recorded_at",
            "server's clock".to_owned(),
        ),
    ];
    for (point, field, names) in beyond {
        let as_of = Some(proto::AsOf { point: Some(point) });
        let aggregates = buckets(
            &server,
            proto::GetAggregatesRequest {
                as_of,
                ..request(
                    "signups",
                    Grain::Month,
                    utc(2026, 10, 1, 0, 0),
                    utc(2026, 11, 1, 0, 0),
                )
            },
        )
        .await
        .expect_err("GetAggregates");
        let trend = server
            .query()
            .get_trend(proto::GetTrendRequest {
                kpi_id: "signups".into(),
                grain: Grain::Day.into(),
                window: 7,
                as_of,
                ..Default::default()
            })
            .await
            .expect_err("GetTrend");
        let status = server
            .query()
            .get_target_status(proto::GetTargetStatusRequest {
                selector: Some(proto::get_target_status_request::Selector::KpiId(
                    "signups".into(),
                )),
                as_of,
                ..Default::default()
            })
            .await
            .expect_err("GetTargetStatus");
        let targets = server
            .catalog()
            .list_targets(proto::ListTargetsRequest {
                as_of,
                ..Default::default()
            })
            .await
            .expect_err("ListTargets");
        for refused in [aggregates, trend, status, targets] {
            assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
            assert!(refused.message().contains(&names), "{refused:?}");
            assert_eq!(common::bad_request_field(&refused).as_deref(), Some(field));
        }
    }
    // The head itself is the current answer.
    let at_head = buckets(
        &server,
        proto::GetAggregatesRequest {
            as_of: common::as_of_seq(head),
            ..request(
                "signups",
                Grain::Month,
                utc(2026, 10, 1, 0, 0),
                utc(2026, 11, 1, 0, 0),
            )
        },
    )
    .await
    .unwrap();
    assert_eq!(at_head[0].value, Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn a_change_that_rewrites_history_needs_consent_and_as_of_keeps_the_old_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut amounts = kpi("amounts", KpiKind::Sum);
    amounts.dimensions = vec!["channel".into(), "region".into()];
    server.define(amounts.clone()).await;
    let recorded = server
        .record(vec![
            labelled(at("amounts", 10.0, utc(2026, 10, 5, 9, 0)), "web"),
            labelled(at("amounts", 30.0, utc(2026, 10, 5, 10, 0)), "web"),
        ])
        .await
        .unwrap();
    let before = recorded.last().unwrap().seq;
    let update = |definition: proto::KpiDefinition, recompute_history: bool| {
        let mut catalog = server.catalog();
        async move {
            catalog
                .update_kpi(proto::UpdateKpiRequest {
                    definition: Some(definition),
                    expected_version: None,
                    recompute_history,
                })
                .await
        }
    };
    let mut average = amounts.clone();
    average.kind = KpiKind::Average.into();
    let refused = update(average.clone(), false)
        .await
        .expect_err("needs consent");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("recompute_history"),
        "{refused:?}"
    );
    let mut zoned = amounts.clone();
    zoned.timezone = "Europe/Amsterdam".into();
    let refused = update(zoned, false).await.expect_err("needs consent");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Dropping a dimension the stored measurements use is never allowed; an unused one is.
    let mut no_channel = amounts.clone();
    no_channel.dimensions = vec!["region".into()];
    let refused = update(no_channel, true).await.expect_err("used dimension");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("channel"), "{refused:?}");
    let mut no_region = amounts.clone();
    no_region.dimensions = vec!["channel".into()];
    update(no_region, false)
        .await
        .expect("unused dimension dropped");

    let october = || {
        request(
            "amounts",
            Grain::Month,
            utc(2026, 10, 1, 0, 0),
            utc(2026, 11, 1, 0, 0),
        )
    };
    assert_eq!(
        buckets(&server, october()).await.unwrap()[0].value,
        Some(40.0)
    );
    average.dimensions = vec!["channel".into()];
    update(average, true).await.expect("consented");
    assert_eq!(
        buckets(&server, october()).await.unwrap()[0].value,
        Some(20.0)
    );
    let old = buckets(
        &server,
        proto::GetAggregatesRequest {
            as_of: common::as_of_seq(before),
            ..october()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        old[0].value,
        Some(40.0),
        "as of before the change: still a SUM"
    );
    server.stop().await;
}
