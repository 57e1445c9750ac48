//! Black-box tests of ReplayEvents with follow: catch-up then live with no gap and no
//! duplicate under concurrent writers, KPI filters, checkpoints, stream limits, shutdown,
//! and VerifyLog on a damaged log.

mod common;

use std::time::Duration;

use common::{TestServer, kpi, measurement};
use kpi_service::Config;
use kpi_service::proto::{
    self, KpiKind, replay_events_request::Start, replay_events_response::Item,
};
use tonic::Code;

fn follow_from(seq: u64) -> proto::ReplayEventsRequest {
    proto::ReplayEventsRequest {
        start: Some(Start::FromSeq(seq)),
        follow: true,
        ..Default::default()
    }
}

/// Bounds every wait of these tests, so a bug fails them instead of hanging them.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_follower_gets_every_seq_once_in_order_across_the_switch_to_live() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(dir.path()).await;
        server.define(kpi("clicks", KpiKind::Count)).await;
        server
            .record((0..500).map(|_| measurement("clicks", 1.0)).collect())
            .await
            .unwrap();
        // Writers keep appending while the follower catches up and then follows live.
        let mut writers = Vec::new();
        for _ in 0..3 {
            let mut ingest = server.ingest();
            writers.push(tokio::spawn(async move {
                for _ in 0..40 {
                    let measurements = (0..25).map(|_| measurement("clicks", 1.0)).collect();
                    ingest
                        .record(proto::RecordRequest { measurements })
                        .await
                        .expect("record");
                }
            }));
        }
        let mut stream = server
            .audit()
            .replay_events(follow_from(1))
            .await
            .unwrap()
            .into_inner();
        let total = 1 + 500 + 3 * 40 * 25;
        let mut expected = 1;
        while expected <= total {
            let item = tokio::time::timeout(PATIENCE, stream.message())
                .await
                .expect("the follower keeps up")
                .expect("stream ok")
                .expect("stream open");
            if let Some(Item::Event(event)) = item.item {
                assert_eq!(event.seq, expected, "round {round}");
                expected += 1;
            }
        }
        for writer in writers {
            writer.await.unwrap();
        }
        drop(stream);
        server.stop().await;
    }
}

#[tokio::test]
async fn filters_checkpoints_and_the_end_of_a_follow() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.heartbeat_ms = 100;
    let server = TestServer::start_with(config).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("visits", KpiKind::Count)).await;
    server
        .record(vec![
            measurement("revenue", 5.0),
            measurement("visits", 1.0),
            measurement("revenue", 7.0),
        ])
        .await
        .unwrap();
    let head = server.log_info().await.head_seq;
    let mut stream = server
        .audit()
        .replay_events(proto::ReplayEventsRequest {
            kpi_ids: vec!["revenue".into()],
            ..follow_from(1)
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let checkpoint = loop {
        let item = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match item.item {
            Some(Item::Event(event)) => seen.push(event.seq),
            Some(Item::Checkpoint(checkpoint)) => break checkpoint,
            None => panic!("empty item"),
        }
    };
    // The definition of revenue (seq 1) and its two measurements (3 and 5), not visits.
    assert_eq!(seen, [1, 3, 5]);
    assert_eq!(checkpoint.seq, head);
    // A new revenue measurement arrives live.
    server
        .record(vec![
            measurement("visits", 1.0),
            measurement("revenue", 1.0),
        ])
        .await
        .unwrap();
    let live = loop {
        let item = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Item::Event(event)) = item.item {
            break event.seq;
        }
    };
    assert_eq!(live, head + 2);
    // Shutdown ends the follow with UNAVAILABLE instead of waiting for it.
    let stopping = tokio::spawn(server.stop());
    let end = loop {
        match tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable);
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn streams_are_limited_and_a_gone_client_frees_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.max_streams = 1;
    let server = TestServer::start_with(config).await;
    let first = server
        .audit()
        .replay_events(follow_from(1))
        .await
        .unwrap()
        .into_inner();
    let err = server
        .audit()
        .replay_events(follow_from(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let list = server.list_streams().await;
    assert_eq!(list.max_streams, 1);
    assert_eq!(list.streams.len(), 1, "{list:?}");
    let open = &list.streams[0];
    assert_eq!(open.kind(), proto::StreamKind::ReplayEvents);
    assert!(open.peer.starts_with("127.0.0.1:"), "{open:?}");
    assert_eq!(open.position_seq, 0, "nothing recorded, nothing read");
    drop(first);
    // The follower notices its client is gone and frees the place.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match server.audit().replay_events(follow_from(1)).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place was never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn list_streams_shows_a_followers_position_and_forgets_it_when_its_client_goes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server
        .record(
            (0..10)
                .map(|i| measurement("revenue", f64::from(i)))
                .collect(),
        )
        .await
        .unwrap();
    let head = server.log_info().await.head_seq;
    let mut follower = server
        .audit()
        .replay_events(follow_from(1))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..head {
        follower.message().await.unwrap().expect("an event");
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let stream = loop {
        let list = server.list_streams().await;
        assert_eq!(list.head_seq, head);
        assert_eq!(list.streams.len(), 1, "{list:?}");
        if list.streams[0].position_seq == head {
            break list.streams[0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{list:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stream.messages_sent, head);
    assert_eq!(stream.pending_updates, 0);
    drop(follower);
    loop {
        let list = server.list_streams().await;
        if list.streams.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never forgotten: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn verify_log_reports_a_damaged_segment_and_earlier_reads_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let mut firsts = Vec::new();
    for i in 0..4 {
        let results = server
            .record(
                (0..10)
                    .map(|j| measurement("revenue", f64::from(i * 10 + j)))
                    .collect(),
            )
            .await
            .unwrap();
        firsts.push(results[0].seq);
    }
    assert_eq!(server.replay_all().await.len(), 41);
    server.stop().await;

    // Change one byte of a stored record in the second batch's segment, straight in sled.
    let damaged_first = firsts[1];
    {
        let db = sled::open(dir.path().join("log")).unwrap();
        let segments = db.open_tree(kpi_service::store::SEGMENTS_TREE).unwrap();
        let key = damaged_first.to_be_bytes();
        let mut value = segments
            .get(key)
            .unwrap()
            .expect("segment of the second batch")
            .to_vec();
        // A byte in the middle of its compressed records: whether they no longer
        // decompress or a record changed (the hash tells), the break is at the segment.
        let middle = 77 + 4 + (value.len() - 81) / 2;
        value[middle] ^= 0x5a;
        segments.insert(key, value).unwrap();
        db.flush().unwrap();
    }

    let server = TestServer::start(dir.path()).await;
    let verified = server.verify_log().await;
    assert!(!verified.ok);
    let chain_break = verified.chain_break.expect("a break");
    assert_eq!(chain_break.seq, damaged_first);
    assert_eq!(verified.checked_events, damaged_first - 1);
    // Reads before the break are served.
    let mut stream = server
        .audit()
        .replay_events(proto::ReplayEventsRequest {
            to_seq: Some(damaged_first - 1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        if let Some(Item::Event(event)) = item.item {
            seqs.push(event.seq);
        }
    }
    assert_eq!(seqs, (1..damaged_first).collect::<Vec<_>>());
    // A replay that reaches the damage ends with DATA_LOSS naming where, after every event
    // before it.
    let mut stream = server
        .audit()
        .replay_events(proto::ReplayEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut delivered = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(item)) => delivered += u64::from(matches!(item.item, Some(Item::Event(_)))),
            Ok(None) => panic!("a replay over damage must not end as if whole"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains(&damaged_first.to_string()),
        "{status:?}"
    );
    assert_eq!(delivered, damaged_first - 1);
    server.stop().await;

    // A segment gone from the middle of the log: VerifyLog names the missing seqs.
    {
        let db = sled::open(dir.path().join("log")).unwrap();
        let segments = db.open_tree(kpi_service::store::SEGMENTS_TREE).unwrap();
        segments.remove(damaged_first.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let server = TestServer::start(dir.path()).await;
    let verified = server.verify_log().await;
    let chain_break = verified.chain_break.expect("a break");
    assert_eq!(chain_break.seq, damaged_first);
    assert!(
        chain_break.reason.contains(&format!(
            "seqs {}..={} are missing",
            damaged_first,
            firsts[2] - 1
        )),
        "{}",
        chain_break.reason
    );
    server.stop().await;
}

/// The seqs a replay without follow sends.
async fn replayed_seqs(
    server: &TestServer,
    request: proto::ReplayEventsRequest,
) -> Result<Vec<u64>, tonic::Status> {
    let mut stream = server.audit().replay_events(request).await?.into_inner();
    let mut seqs = Vec::new();
    while let Some(item) = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("replay ends by itself")?
    {
        if let Some(Item::Event(envelope)) = item.item {
            seqs.push(envelope.seq);
        }
    }
    Ok(seqs)
}

#[tokio::test]
async fn replay_ranges_and_kpi_ids_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("clicks", KpiKind::Count)).await;
    server
        .record((0..4).map(|_| measurement("clicks", 1.0)).collect())
        .await
        .unwrap();
    let head = server.log_info().await.head_seq;
    assert_eq!(head, 5);
    let from = |seq: u64| proto::ReplayEventsRequest {
        start: Some(Start::FromSeq(seq)),
        ..Default::default()
    };

    // A typo in a KPI id is NOT_FOUND, not an empty replay.
    let status = replayed_seqs(
        &server,
        proto::ReplayEventsRequest {
            kpi_ids: vec!["clicks".into(), "clickz".into()],
            ..Default::default()
        },
    )
    .await
    .expect_err("unknown kpi");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("clickz"), "{status:?}");

    // from_seq after to_seq is INVALID_ARGUMENT naming to_seq.
    let status = replayed_seqs(
        &server,
        proto::ReplayEventsRequest {
            to_seq: Some(2),
            ..from(4)
        },
    )
    .await
    .expect_err("empty range");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        common::bad_request_field(&status).as_deref(),
        Some("to_seq")
    );

    // Past the head without follow: OUT_OF_RANGE naming the head; head + 1 is an empty
    // replay (nothing new yet), and with follow a later seq waits for it.
    let status = replayed_seqs(&server, from(head + 2))
        .await
        .expect_err("past the head");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains(&format!("head seq {head}")),
        "{status:?}"
    );
    assert_eq!(
        replayed_seqs(&server, from(head + 1)).await.unwrap(),
        Vec::<u64>::new()
    );
    let tomorrow = chrono::Utc::now() + chrono::TimeDelta::days(1);
    let status = replayed_seqs(
        &server,
        proto::ReplayEventsRequest {
            start: Some(Start::FromRecordedAt(prost_types::Timestamp {
                seconds: tomorrow.timestamp(),
                nanos: 0,
            })),
            ..Default::default()
        },
    )
    .await
    .expect_err("a time not reached yet");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Without follow a to_seq beyond the head ends at the head, at once.
    assert_eq!(
        replayed_seqs(
            &server,
            proto::ReplayEventsRequest {
                to_seq: Some(head + 100),
                ..from(3)
            },
        )
        .await
        .unwrap(),
        vec![3, 4, 5]
    );
    // With follow, a start past the head is where the follower begins.
    let mut stream = server
        .audit()
        .replay_events(follow_from(head + 2))
        .await
        .unwrap()
        .into_inner();
    server
        .record((0..2).map(|_| measurement("clicks", 1.0)).collect())
        .await
        .unwrap();
    loop {
        let item = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("in time")
            .unwrap()
            .expect("open");
        if let Some(Item::Event(envelope)) = item.item {
            assert_eq!(envelope.seq, head + 2);
            break;
        }
    }
    server.stop().await;
}
