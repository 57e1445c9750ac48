//! Black-box tests of Query.WatchKpis: a snapshot, then updates for new, late and
//! retracted measurements, in order, with the revised flag on past buckets.

mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::{TestServer, kpi, measurement};
use kpi_service::proto::{self, Grain, KpiKind, watch_kpis_response::Item};
use prost_types::Timestamp;
use tonic::Code;
use tonic::codec::Streaming;

const PATIENCE: Duration = Duration::from_secs(30);

async fn next_item(stream: &mut Streaming<proto::WatchKpisResponse>) -> Item {
    loop {
        let response = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("an item in time")
            .expect("stream ok")
            .expect("stream open");
        match response.item.expect("item") {
            Item::Heartbeat(_) => continue,
            item => return item,
        }
    }
}

#[tokio::test]
async fn a_watcher_sees_the_snapshot_then_new_late_and_retracted_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("visits", KpiKind::Count)).await;
    let ts = |at: chrono::DateTime<Utc>| {
        Some(Timestamp {
            seconds: at.timestamp(),
            nanos: 0,
        })
    };
    server
        .catalog()
        .set_target(proto::SetTargetRequest {
            target: Some(proto::TargetDefinition {
                id: "month_revenue".into(),
                kpi_id: "revenue".into(),
                name: "1000 this month".into(),
                value: 1000.0,
                start: ts(Utc::now() - TimeDelta::days(10)),
                deadline: ts(Utc::now() + TimeDelta::days(20)),
                mode: proto::TargetMode::Cumulative.into(),
                period_grain: Grain::Day.into(),
                tolerance: None,
            }),
            expected_version: None,
        })
        .await
        .unwrap();
    server
        .record(vec![measurement("revenue", 10.0)])
        .await
        .unwrap();
    let head = server.log_info().await.head_seq;

    let mut stream = server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["revenue".into()],
            grain: Grain::Day.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Item::Snapshot(snapshot) = next_item(&mut stream).await else {
        panic!("snapshot first");
    };
    assert_eq!(snapshot.kpi_id, "revenue");
    assert_eq!(snapshot.bucket.as_ref().unwrap().value, Some(10.0));
    // The KPI's targets come with its buckets.
    assert_eq!(snapshot.targets.len(), 1);
    assert_eq!(snapshot.targets[0].actual, Some(10.0));
    let Item::SnapshotComplete(complete) = next_item(&mut stream).await else {
        panic!("end of snapshot");
    };
    assert_eq!(complete.head_seq, head);

    // A new measurement today: the current bucket, not a revision. Visits are not watched.
    server
        .record(vec![measurement("visits", 1.0)])
        .await
        .unwrap();
    let new = server
        .record(vec![measurement("revenue", 5.0)])
        .await
        .unwrap();
    let Item::Update(update) = next_item(&mut stream).await else {
        panic!("an update");
    };
    assert_eq!(update.bucket.as_ref().unwrap().value, Some(15.0));
    assert_eq!(update.seq, new[0].seq);
    assert!(!update.revised);
    assert_eq!(update.targets[0].actual, Some(15.0));

    // A late measurement for three days ago revises that day.
    let late_at = Utc::now() - TimeDelta::days(3);
    let late = server
        .record(vec![proto::Measurement {
            occurred_at: Some(Timestamp {
                seconds: late_at.timestamp(),
                nanos: 0,
            }),
            ..measurement("revenue", 7.0)
        }])
        .await
        .unwrap();
    let Item::Update(update) = next_item(&mut stream).await else {
        panic!("an update");
    };
    assert!(update.revised);
    assert_eq!(update.seq, late[0].seq);
    assert_eq!(update.bucket.as_ref().unwrap().value, Some(7.0));

    // Retracting today's 5 brings the current bucket back to 10, marked as revised.
    server
        .ingest()
        .retract(proto::RetractRequest {
            target: Some(proto::retract_request::Target::Seq(new[0].seq)),
            reason: "duplicate order".into(),
        })
        .await
        .unwrap();
    let Item::Update(update) = next_item(&mut stream).await else {
        panic!("an update");
    };
    assert!(update.revised);
    assert_eq!(update.bucket.as_ref().unwrap().value, Some(10.0));
    drop(stream);

    // Resuming from a seq sends the changes from there on, without a snapshot.
    let mut resumed = server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["revenue".into()],
            grain: Grain::Day.into(),
            from_seq: late[0].seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Item::Update(update) = next_item(&mut resumed).await else {
        panic!("an update, no snapshot");
    };
    assert_eq!(update.seq, late[0].seq);

    let err = server
        .query()
        .watch_kpis(proto::WatchKpisRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    drop(resumed);
    server.stop().await;
}
