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

/// The next item, heartbeats included.
async fn next_message(stream: &mut Streaming<proto::WatchKpisResponse>) -> Item {
    let response = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("an item in time")
        .expect("stream ok")
        .expect("stream open");
    response.item.expect("item")
}

async fn next_item(stream: &mut Streaming<proto::WatchKpisResponse>) -> Item {
    loop {
        match next_message(stream).await {
            Item::Heartbeat(_) => continue,
            item => return item,
        }
    }
}

/// A WatchKpis stream of DAY buckets of `kpi_ids` (empty: all KPIs).
async fn watch_days(server: &TestServer, kpi_ids: &[&str]) -> Streaming<proto::WatchKpisResponse> {
    server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: kpi_ids.iter().map(|id| (*id).to_owned()).collect(),
            grain: Grain::Day.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
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

    let mut stream = watch_days(&server, &["revenue"]).await;
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

/// The open WatchKpis stream as Audit.ListStreams reports it.
async fn watch_stream_info(server: &TestServer) -> (proto::StreamInfo, proto::ListStreamsResponse) {
    let list = server.list_streams().await;
    let watchers: Vec<_> = list
        .streams
        .iter()
        .filter(|s| s.kind() == proto::StreamKind::WatchKpis)
        .cloned()
        .collect();
    assert_eq!(watchers.len(), 1, "one watcher open: {list:?}");
    (watchers[0].clone(), list)
}

/// A WatchKpis stream of the HOUR buckets of `orders` on a connection that buffers little
/// (64 KiB windows), so the server must hold what the client does not read; its snapshot
/// (of no bucket) already read.
async fn watch_orders_through_a_small_window(
    server: &TestServer,
) -> Streaming<proto::WatchKpisResponse> {
    let small_window = server.small_window_channel().await;
    let mut stream = proto::query_client::QueryClient::new(small_window)
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["orders".into()],
            grain: Grain::Hour.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Item::SnapshotComplete(_) = next_item(&mut stream).await else {
        panic!("an empty snapshot");
    };
    stream
}

/// Reads `stream` until a heartbeat at `head`, handing every update to `each`.
async fn read_until(
    stream: &mut Streaming<proto::WatchKpisResponse>,
    head: u64,
    mut each: impl FnMut(proto::BucketUpdate),
) {
    loop {
        match next_message(stream).await {
            Item::Update(update) => each(update),
            Item::Heartbeat(beat) if beat.head_seq == head => return,
            Item::Heartbeat(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A watcher catching up reads the log in chunks of 1,024 events. Here each chunk touches
/// 1,000 new buckets, so the pending buckets of a watcher that reads chunk after chunk
/// pass 4,096 in the middle of its fifth chunk: it must send what it holds there, not
/// after the chunk.
#[tokio::test]
async fn a_catching_up_watcher_never_holds_more_than_its_pending_limit() {
    const CHUNK: u64 = 1024;
    const NEW_PER_CHUNK: u64 = 1000;
    const CHUNKS: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("orders", KpiKind::Sum)).await;
    let hours = CHUNKS * NEW_PER_CHUNK / 2;
    let first_hour = (Utc::now() - TimeDelta::hours(hours as i64 + 2)).timestamp() / 3600 * 3600;
    let mut stream = watch_orders_through_a_small_window(&server).await;
    // Measurement j is seq j + 2 and lies in the watcher's chunk j / 1,024 (its first
    // chunk starts after the snapshot's head, seq 1); the chunk's last 24 repeat a bucket.
    let mut ingest = server.ingest();
    for chunk in 0..CHUNKS {
        let measurements = (0..CHUNK)
            .map(|offset| {
                let key = chunk * NEW_PER_CHUNK + offset.min(NEW_PER_CHUNK - 1);
                let channel = if key.is_multiple_of(2) { "web" } else { "shop" };
                proto::Measurement {
                    occurred_at: Some(Timestamp {
                        seconds: first_hour + (key / 2) as i64 * 3600 + 60,
                        nanos: 0,
                    }),
                    labels: [("channel".to_owned(), channel.to_owned())].into(),
                    ..measurement("orders", 1.0)
                }
            })
            .collect();
        ingest
            .record(proto::RecordRequest { measurements })
            .await
            .expect("record");
    }
    let head = server.log_info().await.head_seq;
    let mut buckets = std::collections::HashSet::new();
    read_until(&mut stream, head, |update| {
        let bucket = update.bucket.expect("bucket");
        buckets.insert((
            bucket.labels["channel"].clone(),
            bucket.start.expect("start").seconds,
        ));
    })
    .await;
    assert_eq!(
        buckets.len() as u64,
        CHUNKS * NEW_PER_CHUNK,
        "every bucket arrives"
    );
    let (caught_up, list) = watch_stream_info(&server).await;
    assert_eq!(caught_up.position_seq, head);
    assert!(
        caught_up.max_pending_updates <= list.watch_pending_limit,
        "pending updates {} over the limit {}",
        caught_up.max_pending_updates,
        list.watch_pending_limit
    );
    server.stop().await;
}

#[tokio::test]
async fn a_watcher_that_does_not_read_holds_bounded_updates_then_gets_every_bucket_it_missed() {
    const EVENTS: u64 = 1_000_000;
    const BATCH: u64 = 10_000;
    // 10,000 hours x 2 channels: far more distinct buckets than a watcher may hold.
    const HOURS: u64 = 10_000;
    const BUCKETS: u64 = HOURS * 2;
    let dir = tempfile::tempdir().unwrap();
    let mut config = kpi_service::Config::with_data_dir(dir.path());
    config.heartbeat_ms = 200;
    let server = TestServer::start_with(config).await;
    server.define(kpi("orders", KpiKind::Sum)).await;
    let first_hour = (Utc::now() - TimeDelta::hours(HOURS as i64 + 2)).timestamp() / 3600 * 3600;

    // The dashboard's connection buffers little (64 KiB windows), so the server must
    // hold what the dashboard does not read.
    let mut stream = watch_orders_through_a_small_window(&server).await;

    // 1,000,000 measurements while the watcher's client reads nothing. Measurement i goes
    // to bucket i / 50 with value i % 7: every bucket changes 50 times in a row.
    let mut ingest = server.ingest();
    for first in (0..EVENTS).step_by(BATCH as usize) {
        let measurements = (first..first + BATCH)
            .map(|i| {
                let bucket = i / (EVENTS / BUCKETS);
                let channel = if bucket.is_multiple_of(2) {
                    "web"
                } else {
                    "shop"
                };
                proto::Measurement {
                    occurred_at: Some(Timestamp {
                        seconds: first_hour + (bucket / 2) as i64 * 3600 + 60,
                        nanos: 0,
                    }),
                    labels: [("channel".to_owned(), channel.to_owned())].into(),
                    ..measurement("orders", (i % 7) as f64)
                }
            })
            .collect();
        ingest
            .record(proto::RecordRequest { measurements })
            .await
            .expect("record");
    }
    let head = server.log_info().await.head_seq;

    // The watcher is stuck behind its client, holding no more than its limit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stuck, list) = watch_stream_info(&server).await;
    assert!(list.watch_pending_limit > 0 && list.watch_pending_limit <= 10_000);
    assert!(
        stuck.position_seq < head,
        "the watcher must be behind while its client does not read: {stuck:?}, head {head}"
    );
    assert!(
        stuck.max_pending_updates <= list.watch_pending_limit,
        "pending updates {} over the limit {}",
        stuck.max_pending_updates,
        list.watch_pending_limit
    );
    assert!(stuck.max_pending_updates > 0);

    // Now read everything: the latest update per bucket must be the bucket's final value.
    let mut latest = std::collections::HashMap::new();
    let mut updates = 0;
    read_until(&mut stream, head, |update| {
        let bucket = update.bucket.expect("bucket");
        let key = (
            bucket.labels["channel"].clone(),
            bucket.start.expect("start").seconds,
        );
        latest.insert(key, (bucket.value, bucket.count, update.seq));
        updates += 1;
    })
    .await;
    let (caught_up, _) = watch_stream_info(&server).await;
    assert_eq!(caught_up.position_seq, head);
    assert!(caught_up.max_pending_updates <= list.watch_pending_limit);
    assert_eq!(caught_up.pending_updates, 0);

    let expected = common::buckets(
        &server,
        proto::GetAggregatesRequest {
            kpi_id: "orders".into(),
            grain: Grain::Hour.into(),
            start: Some(Timestamp {
                seconds: first_hour,
                nanos: 0,
            }),
            end: Some(Timestamp {
                seconds: first_hour + HOURS as i64 * 3600,
                nanos: 0,
            }),
            group_by: vec!["channel".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(expected.len() as u64, BUCKETS);
    assert_eq!(latest.len() as u64, BUCKETS, "every missed bucket arrives");
    // Coalesced: far fewer updates than events.
    assert!(
        updates < EVENTS / 10,
        "{updates} updates for {EVENTS} events"
    );
    for bucket in expected {
        let key = (
            bucket.labels["channel"].clone(),
            bucket.start.expect("start").seconds,
        );
        let (value, count, seq) = latest[&key];
        assert_eq!(
            (value, count),
            (bucket.value, bucket.count),
            "bucket {key:?}"
        );
        assert_eq!(count, EVENTS / BUCKETS);
        // Seq 1 defined the KPI; measurement i is seq i + 2, so bucket b last changed at
        // seq 50 b + 51.
        let bucket = (key.1 - first_hour) as u64 / 3600 * 2 + u64::from(key.0 == "shop");
        assert_eq!(
            seq,
            bucket * (EVENTS / BUCKETS) + EVENTS / BUCKETS + 1,
            "{key:?}"
        );
    }
    server.stop().await;
}

/// A RATIO KPI of two operands, orders / visitors in percent, without dimensions.
async fn define_conversion(server: &TestServer) {
    let mut orders = kpi("orders", KpiKind::Count);
    orders.dimensions = vec![];
    let mut visitors = kpi("visitors", KpiKind::Count);
    visitors.dimensions = vec![];
    server.define(orders).await;
    server.define(visitors).await;
    let mut conversion = kpi("conversion", KpiKind::Ratio);
    conversion.dimensions = vec![];
    conversion.ratio = Some(proto::RatioSettings {
        numerator_kpi_id: "orders".into(),
        denominator_kpi_id: "visitors".into(),
        scale: Some(100.0),
    });
    server.define(conversion).await;
}

#[tokio::test]
async fn a_ratio_kpi_is_watched_through_both_operands() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_conversion(&server).await;
    let mut batch = vec![measurement("orders", 1.0)];
    batch.extend((0..4).map(|_| measurement("visitors", 1.0)));
    server.record(batch).await.unwrap();

    let mut stream = watch_days(&server, &["conversion"]).await;
    let Item::Snapshot(snapshot) = next_item(&mut stream).await else {
        panic!("the ratio's bucket in the snapshot");
    };
    assert_eq!(snapshot.kpi_id, "conversion");
    let bucket = snapshot.bucket.expect("bucket");
    assert_eq!(bucket.value, Some(25.0));
    let Some(proto::bucket::Detail::Ratio(detail)) = bucket.detail else {
        panic!("ratio detail");
    };
    assert_eq!((detail.numerator_count, detail.denominator_count), (1, 4));
    assert_eq!(bucket.count, 5, "count is both operands' measurements");
    assert!(matches!(
        next_item(&mut stream).await,
        Item::SnapshotComplete(_)
    ));

    // One more order: the numerator moves the ratio to 50.
    let order = server
        .record(vec![measurement("orders", 1.0)])
        .await
        .unwrap();
    let Item::Update(update) = next_item(&mut stream).await else {
        panic!("an update for the order");
    };
    assert_eq!(update.kpi_id, "conversion");
    assert_eq!(update.bucket.as_ref().unwrap().value, Some(50.0));
    assert_eq!(update.seq, order[0].seq);
    assert!(!update.revised);

    // One more visitor: the denominator moves it to 40.
    let visit = server
        .record(vec![measurement("visitors", 1.0)])
        .await
        .unwrap();
    let Item::Update(update) = next_item(&mut stream).await else {
        panic!("an update for the visit");
    };
    assert_eq!(update.bucket.as_ref().unwrap().value, Some(40.0));
    assert_eq!(update.seq, visit[0].seq);
    server.stop().await;
}

#[tokio::test]
async fn watching_everything_includes_ratio_kpis() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_conversion(&server).await;
    let mut stream = watch_days(&server, &[]).await;
    assert!(matches!(
        next_item(&mut stream).await,
        Item::SnapshotComplete(_)
    ));
    let mut batch = vec![measurement("orders", 1.0)];
    batch.extend((0..2).map(|_| measurement("visitors", 1.0)));
    server.record(batch).await.unwrap();
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 3 {
        let Item::Update(update) = next_item(&mut stream).await else {
            panic!("updates only");
        };
        seen.insert(update.kpi_id.clone(), update.bucket.unwrap().value);
    }
    assert_eq!(seen["orders"], Some(1.0));
    assert_eq!(seen["visitors"], Some(2.0));
    assert_eq!(seen["conversion"], Some(50.0));
    server.stop().await;
}

#[tokio::test]
async fn watching_an_unknown_kpi_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let status = server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["revenue".into(), "never_defined".into()],
            grain: Grain::Day.into(),
            ..Default::default()
        })
        .await
        .expect_err("a typo is refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("never_defined"), "{status:?}");
    assert_eq!(
        common::bad_request_field(&status).as_deref(),
        Some("kpi_ids[1]")
    );
    // Nothing was left open.
    assert!(server.list_streams().await.streams.is_empty());
    server.stop().await;
}
