//! Black-box test of the error contract: every status code the API produces carries the
//! standard google.rpc detail the README's table promises for it, naming the field.

mod common;

use common::{TestServer, kpi, measurement};
use kpi_service::Config;
use kpi_service::proto::{self, Grain, KpiKind};
use tonic::Code;
use tonic_types::StatusExt;

/// Which standard details a status carries.
#[derive(Debug, PartialEq)]
struct Details {
    bad_request_field: Option<String>,
    precondition_subject: Option<String>,
    quota_subject: Option<String>,
    error_reason: Option<String>,
}

fn details(status: &tonic::Status) -> Details {
    Details {
        bad_request_field: status
            .get_details_bad_request()
            .and_then(|d| d.field_violations.first().map(|v| v.field.clone())),
        precondition_subject: status.get_details_precondition_failure().and_then(|d| {
            d.violations.first().map(|v| {
                assert_eq!(v.r#type, "STATE");
                assert!(!v.description.is_empty());
                v.subject.clone()
            })
        }),
        quota_subject: status
            .get_details_quota_failure()
            .and_then(|d| d.violations.first().map(|v| v.subject.clone())),
        error_reason: status.get_details_error_info().map(|d| d.reason),
    }
}

fn only_bad_request(field: &str) -> Details {
    Details {
        bad_request_field: Some(field.into()),
        precondition_subject: None,
        quota_subject: None,
        error_reason: None,
    }
}

#[tokio::test]
async fn every_status_code_carries_its_documented_detail() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.max_streams = 1;
    let server = TestServer::start_with(config).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("old", KpiKind::Sum)).await;
    server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: "old".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // INVALID_ARGUMENT: BadRequest with the field path.
    let status = server
        .record(vec![measurement("revenue", f64::NAN)])
        .await
        .expect_err("NaN");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(details(&status), only_bad_request("measurements[0].value"));

    // NOT_FOUND: BadRequest naming the field that refers to it.
    let status = server
        .catalog()
        .get_kpi(proto::GetKpiRequest {
            kpi_id: "missing".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(details(&status), only_bad_request("kpi_id"));

    // ALREADY_EXISTS: BadRequest.
    let status = server
        .catalog()
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(kpi("revenue", KpiKind::Sum)),
        })
        .await
        .expect_err("taken");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(details(&status), only_bad_request("definition.id"));

    // OUT_OF_RANGE: BadRequest.
    let status = common::buckets(
        &server,
        proto::GetAggregatesRequest {
            kpi_id: "revenue".into(),
            grain: Grain::Day.into(),
            start: Some(prost_types::Timestamp::default()),
            end: Some(prost_types::Timestamp {
                seconds: 86_400,
                nanos: 0,
            }),
            as_of: Some(proto::AsOf {
                point: Some(proto::as_of::Point::Seq(1_000)),
            }),
            ..Default::default()
        },
    )
    .await
    .expect_err("beyond the head");
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(details(&status), only_bad_request("as_of.seq"));

    // FAILED_PRECONDITION: PreconditionFailure (type STATE, subject = the field), not
    // BadRequest.
    let status = server
        .record(vec![measurement("old", 1.0)])
        .await
        .expect_err("retired");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        details(&status),
        Details {
            bad_request_field: None,
            precondition_subject: Some("measurements[0].kpi_id".into()),
            quota_subject: None,
            error_reason: None,
        }
    );

    // ABORTED: ErrorInfo VERSION_MISMATCH with both versions.
    let status = server
        .catalog()
        .update_kpi(proto::UpdateKpiRequest {
            definition: Some(kpi("revenue", KpiKind::Sum)),
            expected_version: Some(7),
            recompute_history: false,
        })
        .await
        .expect_err("stale");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(
        details(&status).error_reason.as_deref(),
        Some("VERSION_MISMATCH")
    );
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.metadata["expected_version"], "7");
    assert_eq!(info.metadata["current_version"], "1");

    // RESOURCE_EXHAUSTED: QuotaFailure. One stream is allowed; the second is refused.
    let _open = server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            grain: Grain::Day.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            grain: Grain::Day.into(),
            ..Default::default()
        })
        .await
        .expect_err("over the stream limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let found = details(&status);
    assert!(found.quota_subject.is_some(), "{found:?}");
    assert_eq!(found.bad_request_field, None);
    drop(_open);
    server.stop().await;
}

#[tokio::test]
async fn times_in_messages_are_rfc_3339() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let future = chrono::Utc::now() + chrono::TimeDelta::days(2);
    let status = server
        .record(vec![proto::Measurement {
            occurred_at: Some(prost_types::Timestamp {
                seconds: future.timestamp(),
                nanos: 500_000_000,
            }),
            ..measurement("revenue", 1.0)
        }])
        .await
        .expect_err("too far ahead");
    let message = status.message();
    let written = future.format("%Y-%m-%dT%H:%M:%S.500Z").to_string();
    assert!(
        message.contains(&written),
        "{message} should contain {written}"
    );
    assert!(!message.contains(" UTC"), "{message}");
    server.stop().await;
}
