//! Black-box tests of kpi.v1.Ingest over loopback gRPC: batches, streams, every kind of
//! bad input, and idempotency across restarts.

mod common;

use std::collections::BTreeMap;

use common::{TestServer, bad_request_field, kpi, measurement, with_event_id};
use kpi_service::proto::{self, KpiKind, Measurement, RatioSettings};
use prost_types::Timestamp;
use tonic::Code;

/// Defines the KPIs the tests record to.
async fn define_all(server: &TestServer) {
    for (id, kind) in [
        ("revenue", KpiKind::Sum),
        ("nps", KpiKind::Nps),
        ("csat", KpiKind::Csat),
        ("visitors", KpiKind::Distinct),
        ("buyers", KpiKind::Count),
        ("old", KpiKind::Sum),
    ] {
        server.define(kpi(id, kind)).await;
    }
    server
        .define(proto::KpiDefinition {
            ratio: Some(RatioSettings {
                numerator_kpi_id: "buyers".into(),
                denominator_kpi_id: "revenue".into(),
                scale: None,
            }),
            ..kpi("conversion", KpiKind::Ratio)
        })
        .await;
    server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: "old".into(),
            ..Default::default()
        })
        .await
        .expect("retire");
}

fn seconds_from_now(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: chrono::Utc::now().timestamp() + seconds,
        nanos: 0,
    })
}

#[tokio::test]
async fn batches_get_dense_seqs_in_request_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_all(&server).await;
    let head = server.log_info().await.head_seq;

    let single = server
        .record(vec![measurement("revenue", 12.5)])
        .await
        .unwrap();
    assert_eq!(single.len(), 1);
    assert_eq!(single[0].seq, head + 1);
    assert!(!single[0].duplicate);

    let mut labelled = measurement("revenue", 3.0);
    labelled.labels = BTreeMap::from([("channel".into(), "web".into())]);
    let batch = vec![
        labelled,
        measurement("nps", 9.0),
        measurement("csat", 4.0),
        Measurement {
            subject: "visitor-1".into(),
            ..measurement("visitors", 1.0)
        },
        measurement("buyers", 1.0),
    ];
    let results = server.record(batch.clone()).await.unwrap();
    let seqs: Vec<u64> = results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (head + 2..head + 7).collect::<Vec<_>>());
    assert_eq!(server.log_info().await.head_seq, head + 6);

    // The log holds exactly what was sent, occurred_at filled in by the server.
    let envelopes = server.replay_all().await;
    let stored: Vec<Measurement> = envelopes[usize::try_from(head + 1).unwrap()..]
        .iter()
        .map(|e| match e.event.as_ref().and_then(|r| r.payload.clone()) {
            Some(proto::event_record::Payload::MeasurementRecorded(m)) => m.measurement.unwrap(),
            other => panic!("not a measurement: {other:?}"),
        })
        .collect();
    assert_eq!(stored.len(), 5);
    for (stored, sent) in stored.iter().zip(&batch) {
        assert!(stored.occurred_at.is_some());
        assert_eq!(
            Measurement {
                occurred_at: None,
                ..stored.clone()
            },
            *sent
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stream_acknowledges_every_batch_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_all(&server).await;
    let head = server.log_info().await.head_seq;

    let batches = vec![
        proto::RecordStreamRequest {
            batch_id: "b1".into(),
            measurements: (0..100)
                .map(|i| measurement("revenue", f64::from(i)))
                .collect(),
        },
        proto::RecordStreamRequest {
            batch_id: "b2".into(),
            measurements: vec![measurement("nps", 10.0), measurement("nps", 11.0)],
        },
        proto::RecordStreamRequest {
            batch_id: "b3".into(),
            measurements: (0..50).map(|_| measurement("buyers", 1.0)).collect(),
        },
        proto::RecordStreamRequest {
            batch_id: "b4".into(),
            measurements: vec![measurement("csat", 5.0)],
        },
    ];
    let mut acks = server
        .ingest()
        .record_stream(tokio_stream::iter(batches))
        .await
        .expect("stream")
        .into_inner();
    let mut received = Vec::new();
    while let Some(ack) = acks.message().await.expect("ack") {
        received.push(ack);
    }
    let ids: Vec<&str> = received.iter().map(|a| a.batch_id.as_str()).collect();
    assert_eq!(ids, ["b1", "b2", "b3", "b4"]);

    assert_eq!(received[0].results.len(), 100);
    assert_eq!(received[0].results[0].seq, head + 1);
    assert_eq!(received[0].results[99].seq, head + 100);
    assert!(received[0].rejection.is_none());

    let rejection = received[1].rejection.as_ref().expect("b2 rejected");
    assert!(received[1].results.is_empty());
    assert_eq!(rejection.code, Code::InvalidArgument as i32);
    assert_eq!(rejection.measurement_index, Some(1));
    assert_eq!(rejection.field, "measurements[1].value");

    assert_eq!(received[2].results[0].seq, head + 101);
    assert_eq!(received[3].results[0].seq, head + 151);
    assert_eq!(server.log_info().await.head_seq, head + 151);
    server.stop().await;
}

#[tokio::test]
async fn every_bad_measurement_is_refused_and_nothing_of_its_batch_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_all(&server).await;
    let before = server.log_info().await;

    let labels = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    };
    let cases: Vec<(&str, Measurement, Code, &str)> = vec![
        (
            "unknown kpi",
            measurement("profit", 1.0),
            Code::NotFound,
            "kpi_id",
        ),
        (
            "retired kpi",
            measurement("old", 1.0),
            Code::FailedPrecondition,
            "kpi_id",
        ),
        (
            "ratio kpi",
            measurement("conversion", 1.0),
            Code::FailedPrecondition,
            "kpi_id",
        ),
        (
            "malformed kpi id",
            measurement("Revenue", 1.0),
            Code::InvalidArgument,
            "kpi_id",
        ),
        (
            "NaN",
            measurement("revenue", f64::NAN),
            Code::InvalidArgument,
            "value",
        ),
        (
            "infinity",
            measurement("revenue", f64::INFINITY),
            Code::InvalidArgument,
            "value",
        ),
        (
            "-infinity",
            measurement("revenue", f64::NEG_INFINITY),
            Code::InvalidArgument,
            "value",
        ),
        (
            "nps above 10",
            measurement("nps", 11.0),
            Code::InvalidArgument,
            "value",
        ),
        (
            "nps below 0",
            measurement("nps", -1.0),
            Code::InvalidArgument,
            "value",
        ),
        (
            "nps fraction",
            measurement("nps", 7.5),
            Code::InvalidArgument,
            "value",
        ),
        (
            "csat 0",
            measurement("csat", 0.0),
            Code::InvalidArgument,
            "value",
        ),
        (
            "csat 6",
            measurement("csat", 6.0),
            Code::InvalidArgument,
            "value",
        ),
        (
            "undeclared label",
            Measurement {
                labels: labels(&[("country", "nl".into())]),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "labels[\"country\"]",
        ),
        (
            "too many labels",
            Measurement {
                labels: (0..9).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "labels",
        ),
        (
            "empty label value",
            Measurement {
                labels: labels(&[("channel", String::new())]),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "labels[\"channel\"]",
        ),
        (
            "oversized label value",
            Measurement {
                labels: labels(&[("channel", "x".repeat(129))]),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "labels[\"channel\"]",
        ),
        (
            "oversized subject",
            Measurement {
                subject: "s".repeat(257),
                ..measurement("visitors", 1.0)
            },
            Code::InvalidArgument,
            "subject",
        ),
        (
            "missing subject",
            measurement("visitors", 1.0),
            Code::InvalidArgument,
            "subject",
        ),
        (
            "oversized event id",
            with_event_id(measurement("revenue", 1.0), &"e".repeat(129)),
            Code::InvalidArgument,
            "event_id",
        ),
        (
            "occurred_at too far ahead",
            Measurement {
                occurred_at: seconds_from_now(3600),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
        (
            "occurred_at before 1970",
            Measurement {
                occurred_at: Some(Timestamp {
                    seconds: -86_400,
                    nanos: 0,
                }),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
        (
            "occurred_at out of range",
            Measurement {
                occurred_at: Some(Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
        (
            "occurred_at with bad nanos",
            Measurement {
                occurred_at: Some(Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..measurement("revenue", 1.0)
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
    ];
    for (name, bad, code, field) in cases {
        // Two good measurements first: the batch is atomic, so they must not be stored either.
        let batch = vec![
            with_event_id(measurement("revenue", 1.0), &format!("{name}-0")),
            measurement("buyers", 1.0),
            bad,
        ];
        let err = server.record(batch).await.unwrap_err();
        let expected_field = format!("measurements[2].{field}");
        let expected_field = if field.is_empty() {
            "measurements[2]".into()
        } else {
            expected_field
        };
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert_eq!(
            common::violated_field(&err).as_deref(),
            Some(expected_field.as_str()),
            "{name}: {err:?}"
        );
        if code != Code::FailedPrecondition {
            assert_eq!(bad_request_field(&err), Some(expected_field), "{name}");
        }
    }
    // Batch-level rules.
    let err = server.record(vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_request_field(&err).as_deref(), Some("measurements"));
    let err = server
        .record((0..10_001).map(|_| measurement("buyers", 1.0)).collect())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("10000"), "{}", err.message());

    // Nothing of any rejected batch reached the log, and the event ids were not taken.
    let after = server.log_info().await;
    assert_eq!(after, before);
    let retry = server
        .record(vec![with_event_id(measurement("revenue", 1.0), "NaN-0")])
        .await
        .unwrap();
    assert!(!retry[0].duplicate);
    assert_eq!(retry[0].seq, before.head_seq + 1);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_of_ten_thousand_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_all(&server).await;
    let head = server.log_info().await.head_seq;
    let batch: Vec<Measurement> = (0..10_000)
        .map(|i| {
            let mut m = with_event_id(measurement("revenue", 0.01), &format!("order-{i:05}"));
            m.labels = BTreeMap::from([("channel".into(), "web".into())]);
            m
        })
        .collect();
    let results = server.record(batch).await.unwrap();
    assert_eq!(results.len(), 10_000);
    assert_eq!(results.last().unwrap().seq, head + 10_000);
    server.stop().await;
}

#[tokio::test]
async fn a_duplicate_event_id_returns_the_original_seq_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_all(&server).await;

    let first = server
        .record(vec![
            with_event_id(measurement("revenue", 10.0), "order-1"),
            with_event_id(measurement("revenue", 20.0), "order-2"),
        ])
        .await
        .unwrap();
    assert!(first.iter().all(|r| !r.duplicate));

    // A retry of the batch stores nothing and returns the same seqs.
    let retry = server
        .record(vec![
            with_event_id(measurement("revenue", 10.0), "order-1"),
            with_event_id(measurement("revenue", 20.0), "order-2"),
        ])
        .await
        .unwrap();
    assert_eq!(
        retry.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [first[0].seq, first[1].seq]
    );
    assert!(retry.iter().all(|r| r.duplicate));

    // Within one batch, the second occurrence points at the first.
    let within = server
        .record(vec![
            with_event_id(measurement("revenue", 1.0), "order-3"),
            with_event_id(measurement("revenue", 1.0), "order-3"),
        ])
        .await
        .unwrap();
    assert!(!within[0].duplicate);
    assert!(within[1].duplicate);
    assert_eq!(within[1].seq, within[0].seq);
    let info = server.log_info().await;
    assert_eq!(info.head_seq, within[0].seq);
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let after_restart = server
        .record(vec![
            with_event_id(measurement("revenue", 10.0), "order-1"),
            with_event_id(measurement("revenue", 1.0), "order-3"),
            with_event_id(measurement("revenue", 5.0), "order-4"),
        ])
        .await
        .unwrap();
    assert_eq!(after_restart[0].seq, first[0].seq);
    assert!(after_restart[0].duplicate);
    assert_eq!(after_restart[1].seq, within[0].seq);
    assert!(after_restart[1].duplicate);
    assert!(!after_restart[2].duplicate);
    assert_eq!(after_restart[2].seq, info.head_seq + 1);
    server.stop().await;
}

/// Records `count` measurements with ids `spill-{n}` from `from`, in batches of 100.
async fn record_ids(server: &TestServer, from: u32, count: u32) -> Vec<u64> {
    let mut seqs = Vec::new();
    for batch in (from..from + count).step_by(100) {
        let batch: Vec<Measurement> = (batch..(batch + 100).min(from + count))
            .map(|n| with_event_id(measurement("revenue", 1.0), &format!("spill-{n}")))
            .collect();
        seqs.extend(server.record(batch).await.unwrap().iter().map(|r| r.seq));
    }
    seqs
}

async fn assert_duplicates(server: &TestServer, seqs: &[u64], what: &str) {
    let again = record_ids(server, 0, u32::try_from(seqs.len()).unwrap()).await;
    assert_eq!(again, seqs, "{what}");
    assert_eq!(
        server.log_info().await.head_seq,
        *seqs.last().unwrap(),
        "{what}"
    );
}

fn run_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let dedup = dir.join("log").join("dedup");
    std::fs::read_dir(dedup)
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "run"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn duplicates_are_found_after_spills_restarts_a_kill_and_a_lost_run_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = || kpi_service::Config {
        // A part of the index is spilled every few dozen ids.
        dedup_memory_kib: 4,
        ..kpi_service::Config::with_data_dir(dir.path())
    };
    let server = TestServer::start_with(config()).await;
    define_all(&server).await;
    let seqs = record_ids(&server, 0, 2_000).await;
    assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while run_files(dir.path()).is_empty() {
        assert!(std::time::Instant::now() < deadline, "nothing was spilled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_duplicates(&server, &seqs, "after spills").await;
    server.stop().await;

    let server = TestServer::start_with(config()).await;
    assert_duplicates(&server, &seqs, "after a restart").await;
    server.kill().await;

    let server = TestServer::start_after_kill(dir.path()).await;
    assert_duplicates(&server, &seqs, "after a kill").await;
    server.stop().await;

    // A run file lost (or damaged): the index is rebuilt from the log.
    let files = run_files(dir.path());
    assert!(!files.is_empty());
    std::fs::remove_file(&files[0]).unwrap();
    let server = TestServer::start_with(config()).await;
    assert_duplicates(&server, &seqs, "after a run file was deleted").await;
    server.stop().await;
}

#[tokio::test]
async fn acknowledged_measurements_are_present_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    define_all(&server).await;
    for i in 0..20 {
        server
            .record(
                (0..50)
                    .map(|j| measurement("revenue", f64::from(i * 50 + j)))
                    .collect(),
            )
            .await
            .unwrap();
    }
    let info = server.log_info().await;
    let envelopes = server.replay_all().await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let restarted = server.log_info().await;
    assert_eq!(
        (
            restarted.head_seq,
            restarted.head_hash,
            restarted.event_count
        ),
        (info.head_seq, info.head_hash.clone(), info.event_count)
    );
    assert_eq!(server.replay_all().await, envelopes);
    // The restarted server appends after the old head, linked to its hash.
    let next = server
        .record(vec![measurement("revenue", 1.0)])
        .await
        .unwrap();
    assert_eq!(next[0].seq, info.head_seq + 1);
    let replayed = server.replay_all().await;
    assert_eq!(replayed.last().unwrap().prev_hash, info.head_hash);
    server.stop().await;
}

#[tokio::test]
async fn no_measurement_is_stored_after_its_kpi_is_retired() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("signups", KpiKind::Count)).await;

    // Writers record as fast as they can while the KPI is retired under them: every batch
    // is either stored before the KpiRetired event or refused after it.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut ingest = server.ingest();
        writers.push(tokio::spawn(async move {
            let mut stored = 0u32;
            for batch in 0..500 {
                let measurements = (0..10)
                    .map(|i| {
                        with_event_id(
                            measurement("signups", 1.0),
                            &format!("{writer}-{batch}-{i}"),
                        )
                    })
                    .collect();
                match ingest.record(proto::RecordRequest { measurements }).await {
                    Ok(_) => stored += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                        return stored;
                    }
                }
            }
            stored
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let retired = server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: "signups".into(),
            ..Default::default()
        })
        .await
        .expect("retire")
        .into_inner()
        .kpi
        .unwrap();
    let mut stored_batches = 0;
    for writer in writers {
        stored_batches += writer.await.unwrap();
    }
    assert!(stored_batches > 0, "the writers never got going");
    let measurements_after_retire = server
        .replay_all()
        .await
        .into_iter()
        .filter(|e| e.seq > retired.seq)
        .filter(|e| {
            matches!(
                e.event.as_ref().and_then(|r| r.payload.as_ref()),
                Some(proto::event_record::Payload::MeasurementRecorded(_))
            )
        })
        .count();
    assert_eq!(measurements_after_retire, 0);
    server.stop().await;
}
