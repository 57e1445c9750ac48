//! Black-box tests of the target RPCs of kpi.v1.KpiCatalog: targets are events, changes
//! keep their history, and as-of shows the target in force then.

mod common;

use chrono::{TimeZone, Utc};
use common::{TestServer, bad_request_field, kpi};
use kpi_service::proto::{self, Grain, KpiKind, TargetMode};
use prost_types::Timestamp;
use tonic::Code;

fn ts(y: i32, m: u32, d: u32) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp(),
        nanos: 0,
    })
}

/// "50 new customers in six months".
fn fifty_customers() -> proto::TargetDefinition {
    proto::TargetDefinition {
        id: "h1_customers".into(),
        kpi_id: "new_customers".into(),
        name: "50 new customers in six months".into(),
        value: 50.0,
        start: ts(2026, 1, 1),
        deadline: ts(2026, 7, 1),
        mode: TargetMode::Cumulative.into(),
        period_grain: Grain::Month.into(),
        tolerance: None,
    }
}

async fn set(
    server: &TestServer,
    target: proto::TargetDefinition,
    expected_version: Option<u64>,
) -> Result<proto::Target, tonic::Status> {
    server
        .catalog()
        .set_target(proto::SetTargetRequest {
            target: Some(target),
            expected_version,
        })
        .await
        .map(|r| r.into_inner().target.expect("target"))
}

async fn list(
    server: &TestServer,
    kpi_id: &str,
    as_of: Option<proto::AsOf>,
) -> Result<Vec<proto::Target>, tonic::Status> {
    server
        .catalog()
        .list_targets(proto::ListTargetsRequest {
            kpi_id: kpi_id.into(),
            as_of,
        })
        .await
        .map(|r| r.into_inner().targets)
}

#[tokio::test]
async fn targets_change_with_history_and_as_of_shows_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("new_customers", KpiKind::Count)).await;
    server.define(kpi("nps", KpiKind::Nps)).await;

    let first = set(&server, fifty_customers(), Some(0)).await.unwrap();
    assert_eq!(first.version, 1);
    let stored = first.definition.clone().unwrap();
    assert_eq!(stored.tolerance, Some(0.10));
    assert_eq!(stored.value, 50.0);

    let raised = set(
        &server,
        proto::TargetDefinition {
            value: 60.0,
            ..fifty_customers()
        },
        Some(1),
    )
    .await
    .unwrap();
    assert_eq!(raised.version, 2);
    assert!(raised.seq > first.seq);

    let nps_target = proto::TargetDefinition {
        id: "nps_quarterly".into(),
        kpi_id: "nps".into(),
        name: "NPS at least 40 every quarter".into(),
        value: 40.0,
        start: ts(2026, 1, 1),
        deadline: ts(2027, 1, 1),
        mode: TargetMode::Level.into(),
        period_grain: Grain::Quarter.into(),
        tolerance: Some(0.05),
    };
    set(&server, nps_target, None).await.unwrap();

    let now = list(&server, "", None).await.unwrap();
    let ids: Vec<&str> = now
        .iter()
        .map(|t| t.definition.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["h1_customers", "nps_quarterly"]);
    let of_customers = list(&server, "new_customers", None).await.unwrap();
    assert_eq!(of_customers.len(), 1);
    assert_eq!(of_customers[0].definition.as_ref().unwrap().value, 60.0);

    // As known just after the first SetTarget: the old value.
    let then = list(
        &server,
        "new_customers",
        Some(proto::AsOf {
            point: Some(proto::as_of::Point::Seq(first.seq)),
        }),
    )
    .await
    .unwrap();
    assert_eq!(then.len(), 1);
    assert_eq!(then[0].definition.as_ref().unwrap().value, 50.0);
    assert_eq!(then[0].version, 1);

    // Removed now, still in force as of before the removal, and the log keeps all of it.
    let removed = server
        .catalog()
        .remove_target(proto::RemoveTargetRequest {
            target_id: "h1_customers".into(),
            reason: "replaced".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        list(&server, "new_customers", None)
            .await
            .unwrap()
            .is_empty()
    );
    let before_removal = list(
        &server,
        "new_customers",
        Some(proto::AsOf {
            point: Some(proto::as_of::Point::Seq(removed.seq - 1)),
        }),
    )
    .await
    .unwrap();
    assert_eq!(before_removal[0].definition.as_ref().unwrap().value, 60.0);
    let target_events = server
        .replay_all()
        .await
        .into_iter()
        .filter(|e| {
            matches!(
                e.event.as_ref().and_then(|r| r.payload.as_ref()),
                Some(
                    proto::event_record::Payload::TargetSet(_)
                        | proto::event_record::Payload::TargetRemoved(_)
                )
            )
        })
        .count();
    assert_eq!(target_events, 4);

    // A restart rebuilds the targets from the snapshot and the log.
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    assert_eq!(list(&server, "", None).await.unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_targets_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("new_customers", KpiKind::Count)).await;
    server.define(kpi("reply_time", KpiKind::Average)).await;
    server.define(kpi("old", KpiKind::Count)).await;
    server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: "old".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let cases: Vec<(proto::TargetDefinition, Code, &str)> = vec![
        (
            proto::TargetDefinition {
                deadline: ts(2025, 12, 1),
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.deadline",
        ),
        (
            proto::TargetDefinition {
                deadline: None,
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.deadline",
        ),
        (
            proto::TargetDefinition {
                value: f64::NAN,
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.value",
        ),
        (
            proto::TargetDefinition {
                mode: TargetMode::Unspecified.into(),
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.mode",
        ),
        (
            proto::TargetDefinition {
                mode: TargetMode::Level.into(),
                period_grain: Grain::Unspecified.into(),
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.period_grain",
        ),
        (
            proto::TargetDefinition {
                tolerance: Some(-0.1),
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.tolerance",
        ),
        (
            proto::TargetDefinition {
                id: "H1!".into(),
                ..fifty_customers()
            },
            Code::InvalidArgument,
            "target.id",
        ),
        (
            proto::TargetDefinition {
                kpi_id: "profit".into(),
                ..fifty_customers()
            },
            Code::NotFound,
            "target.kpi_id",
        ),
        (
            proto::TargetDefinition {
                kpi_id: "old".into(),
                ..fifty_customers()
            },
            Code::FailedPrecondition,
            "target.kpi_id",
        ),
        (
            proto::TargetDefinition {
                kpi_id: "reply_time".into(),
                ..fifty_customers()
            },
            Code::FailedPrecondition,
            "target.mode",
        ),
    ];
    for (target, code, field) in cases {
        let err = set(&server, target.clone(), None).await.unwrap_err();
        assert_eq!(err.code(), code, "{target:?}: {err:?}");
        assert_eq!(
            common::violated_field(&err).as_deref(),
            Some(field),
            "{err:?}"
        );
        if code == Code::InvalidArgument {
            assert_eq!(bad_request_field(&err).as_deref(), Some(field));
        }
    }
    // Optimistic concurrency: a stale version, and "must not exist" for an existing one.
    set(&server, fifty_customers(), Some(0)).await.unwrap();
    let err = set(&server, fifty_customers(), Some(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let err = set(&server, fifty_customers(), Some(5)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let err = server
        .catalog()
        .remove_target(proto::RemoveTargetRequest {
            target_id: "nothing".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = list(&server, "profit", None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}
