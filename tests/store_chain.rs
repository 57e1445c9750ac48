//! The stored hash chain seen from outside: recomputed with nothing but SHA-256, and
//! damaged directly in sled to check that verification and open report it.

mod common;

use std::path::Path;

use chrono::{TimeZone, Utc};
use common::store::{append, measurement_at, read};
use kpi_service::domain::Event;
use kpi_service::store::{
    AcknowledgedHead, AppendRequest, EventLog, SEGMENTS_TREE, StoreError, StoreOptions, StoredEvent,
};
use prost::Message;
use sha2::{Digest, Sha256};

fn measurement(kpi_id: &str, value: f64, event_id: Option<&str>) -> Event {
    measurement_at(
        kpi_id,
        value,
        event_id,
        Utc.with_ymd_and_hms(2026, 4, 1, 9, 30, 0).unwrap(),
    )
}

fn read_all(log: &EventLog) -> Vec<StoredEvent> {
    read(log, 1, u64::MAX)
}

/// Three appends of three events each: seqs 1..=3, 4..=6 and 7..=9, one segment each
/// (sequential appends never share a group).
fn three_segments(dir: &Path) -> Vec<StoredEvent> {
    three_segments_with(dir, StoreOptions::default())
}

/// The same, stored as builds before format 2 did (records uncompressed), so that a test
/// can change a record's bytes in place as an attacker or a bad disk would.
fn three_verbatim_segments(dir: &Path) -> Vec<StoredEvent> {
    three_segments_with(
        dir,
        StoreOptions {
            legacy_layout: true,
            ..StoreOptions::default()
        },
    )
}

fn three_segments_with(dir: &Path, options: StoreOptions) -> Vec<StoredEvent> {
    let log = EventLog::open(dir, options).unwrap();
    for request in 0..3 {
        let events = (0..3)
            .map(|index| {
                let id = format!("order-{request}-{index}");
                measurement("revenue_web_shop", f64::from(index), Some(&id))
            })
            .collect();
        append(&log, events);
    }
    assert_eq!(log.stats().segments, 3);
    let events = read_all(&log);
    log.close().unwrap();
    events
}

/// Rewrites the segment stored under `first_seq` (8 bytes big-endian in the `segments`
/// tree) by applying `damage` to its value, with sled directly, as an attacker or a bad
/// disk would.
fn damage_segment(dir: &Path, first_seq: u64, damage: impl FnOnce(&mut Vec<u8>)) {
    // sled's background threads release its lock a moment after the log closed; wait for
    // it the way the log does.
    assert!(
        kpi_service::store::wait_for_sled(dir, std::time::Duration::from_secs(10)).unwrap(),
        "sled's lock was not released"
    );
    let db = sled::open(dir).unwrap();
    let tree = db.open_tree(SEGMENTS_TREE).unwrap();
    let key = first_seq.to_be_bytes();
    let mut value = tree.get(key).unwrap().expect("the segment exists").to_vec();
    damage(&mut value);
    tree.insert(key, value).unwrap();
    db.flush().unwrap();
}

/// Where `record` lies in a segment value.
fn find(haystack: &[u8], record: &[u8]) -> usize {
    haystack
        .windows(record.len())
        .position(|window| window == record)
        .expect("the record is stored verbatim")
}

#[test]
fn an_auditor_recomputes_every_hash_with_sha256_alone() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    append(
        &log,
        vec![
            measurement("new_customers_eu", 1.0, Some("c-1")),
            measurement("new_customers_eu", 2.0, None),
        ],
    );
    append(
        &log,
        vec![
            measurement("website_visitors", 1.0, Some("v-1")),
            Event::MeasurementRetracted {
                retracted_seq: 2,
                reason: "entered twice".into(),
            },
            measurement("website_visitors", 1.0, Some("v-2")),
        ],
    );
    append(&log, vec![measurement("revenue_web_shop", 99.95, None)]);

    let events = read_all(&log);
    assert_eq!(events.len(), 6);
    let mut hash = [0_u8; 32];
    for (expected_seq, event) in (1..).zip(&events) {
        assert_eq!(event.seq, expected_seq);
        assert_eq!(event.prev_hash, hash, "prev_hash of seq {expected_seq}");
        let mut hasher = Sha256::new();
        hasher.update(hash);
        hasher.update(event.seq.to_be_bytes());
        hasher.update(&event.record);
        hash = hasher.finalize().into();
        assert_eq!(event.hash, hash, "hash of seq {expected_seq}");

        // The record is a plain kpi.v1.EventRecord that any protobuf library decodes.
        let decoded = kpi_service::proto::EventRecord::decode(event.record.clone()).unwrap();
        let (recorded_at, decoded_event) =
            kpi_service::proto::from_proto::event_record(decoded).unwrap();
        assert_eq!(recorded_at, event.recorded_at);
        assert_eq!(decoded_event, event.event);
    }
    let head = log.head();
    assert_eq!(head.seq, 6);
    assert_eq!(head.hash, hash);
    let verification = log.verify().unwrap();
    assert_eq!(verification.result, Ok(hash));
    assert_eq!(verification.checked_events, 6);

    // The chain is stored, not recomputed from scratch at open: reopening gives the same.
    log.close().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(log.head(), head);
    assert_eq!(read_all(&log), events);
}

#[test]
fn a_changed_record_is_reported_at_its_segment_and_the_log_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let events = three_verbatim_segments(dir.path());
    // Change one letter of the kpi id of seq 5: the record still decodes, only the hash
    // tells. Per-event hashes are not stored, so the break is located to its segment.
    damage_segment(dir.path(), 4, |value| {
        let at = find(value, &events[4].record) + find(&events[4].record, b"revenue_web_shop");
        value[at] = b'R';
    });

    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let verification = log.verify().unwrap();
    assert_eq!(verification.head_seq, 9);
    assert_eq!(verification.checked_events, 3);
    let chain_break = verification.result.unwrap_err();
    assert_eq!(chain_break.seq, 4);
    assert!(
        chain_break.reason.contains("4..=6"),
        "{}",
        chain_break.reason
    );
    assert_eq!(chain_break.stored_hash, Some(events[5].hash));
    assert!(chain_break.expected_hash.is_some());
    assert_ne!(chain_break.expected_hash, chain_break.stored_hash);

    // Reads stop before the damaged segment instead of serving it.
    let read: Vec<_> = log.read(1, 9).collect();
    assert_eq!(read.len(), 4);
    assert!(read[..3].iter().all(Result::is_ok));
    assert!(
        matches!(read[3], Err(StoreError::Corrupt { seq: 4, .. })),
        "{:?}",
        read[3]
    );
    // The damage does not stop appends: the tail is intact.
    append(&log, vec![measurement("revenue_web_shop", 1.0, None)]);
    assert_eq!(log.head().seq, 10);
}

#[test]
fn a_record_that_does_not_decode_is_reported_at_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let events = three_verbatim_segments(dir.path());
    // Field number 0 is invalid in protobuf: seq 5 no longer decodes.
    damage_segment(dir.path(), 4, |value| {
        let at = find(value, &events[4].record);
        value[at] = 0;
    });

    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let verification = log.verify().unwrap();
    let chain_break = verification.result.unwrap_err();
    assert_eq!(chain_break.seq, 5, "{chain_break:?}");
    assert!(
        chain_break.reason.contains("does not decode"),
        "{}",
        chain_break.reason
    );
    assert_eq!(verification.checked_events, 3);
}

#[test]
fn damage_in_the_tail_segment_fails_the_open_with_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let events = three_verbatim_segments(dir.path());
    damage_segment(dir.path(), 7, |value| {
        let at = find(value, &events[7].record) + find(&events[7].record, b"revenue_web_shop");
        value[at] = b'R';
    });

    let error = EventLog::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(error, StoreError::Corrupt { seq: 7, .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().starts_with("corrupt log at seq 7: "),
        "{error}"
    );
}

#[test]
fn a_changed_byte_of_a_compressed_segment_is_reported_at_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let events = three_segments(dir.path());
    // One byte in the middle of the compressed records: either they no longer decompress
    // or a record changed; both are found at the segment.
    damage_segment(dir.path(), 4, |value| {
        let middle = 77 + 4 + (value.len() - 81) / 2;
        value[middle] ^= 0x5a;
    });
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let verification = log.verify().unwrap();
    assert_eq!(verification.checked_events, 3);
    let chain_break = verification.result.unwrap_err();
    assert!((4..=6).contains(&chain_break.seq), "{chain_break:?}");
    let read: Vec<_> = log.read(1, 9).collect();
    assert!(read[..3].iter().all(Result::is_ok));
    assert!(read[3].is_err(), "{:?}", read[3]);
    assert_eq!(read_all_ok(&read[..3]), events[..3]);
}

fn read_all_ok(read: &[Result<StoredEvent, StoreError>]) -> Vec<StoredEvent> {
    read.iter()
        .map(|event| event.as_ref().expect("readable").clone())
        .collect()
}

#[test]
fn a_damaged_segment_header_is_named_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    damage_segment(dir.path(), 7, |value| value.truncate(40));

    let error = EventLog::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(&error, StoreError::CorruptSegment { key, .. } if key == "7"),
        "{error:?}"
    );
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let error = EventLog::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(error, StoreError::AlreadyInUse { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("another kpi-server is already using the data directory"),
        "{error}"
    );
    log.close().unwrap();
    let reopened = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    reopened.close().unwrap();
}

#[test]
fn an_unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let meta = db.open_tree(kpi_service::store::META_TREE).unwrap();
        meta.insert(kpi_service::store::FORMAT_KEY, &[2]).unwrap();
        db.flush().unwrap();
    }
    let error = EventLog::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(error, StoreError::UnsupportedFormat { .. }),
        "{error:?}"
    );
}

#[test]
fn appends_after_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    append(&log, vec![measurement("revenue_web_shop", 1.0, None)]);
    log.close().unwrap();
    let error = log
        .append_blocking(AppendRequest {
            events: vec![measurement("revenue_web_shop", 1.0, None)],
            validation_unchanged_since: None,
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            error,
            kpi_service::store::AppendError::Store(StoreError::Closed)
        ),
        "{error:?}"
    );
    assert!(matches!(log.verify(), Err(StoreError::Closed)));
    log.close().unwrap();
}

#[test]
fn verification_runs_while_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    append(&log, vec![measurement("revenue_web_shop", 1.0, None)]);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for batch in 0..200 {
                let events = (0..5)
                    .map(|index| {
                        measurement("revenue_web_shop", f64::from(batch * 5 + index), None)
                    })
                    .collect();
                append(&log, events);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut verified = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || verified == 0 {
            let verification = log.verify().unwrap();
            assert!(verification.result.is_ok(), "{verification:?}");
            assert_eq!(verification.checked_events, verification.head_seq);
            // Reads during appends stop at the committed head too.
            let events = log.read(1, u64::MAX).map(Result::unwrap).count();
            assert!(events >= usize::try_from(verification.head_seq).unwrap());
            verified += 1;
        }
    });
    assert_eq!(log.head().seq, 1001);
    assert_eq!(log.verify().unwrap().result, Ok(log.head().hash));
}

#[test]
fn handles_and_read_iterators_cross_threads() {
    fn send_and_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    send_and_sync(&log);
    send(&log.read(1, 10));
}

#[test]
fn a_head_acknowledged_elsewhere_is_checked_against_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let events = three_segments(dir.path());
    let acknowledged = |seq, hash| {
        Some(AcknowledgedHead {
            seq,
            hash,
            evidence: "the read-model snapshot".into(),
        })
    };
    let log = EventLog::open_checked(
        dir.path(),
        StoreOptions::default(),
        acknowledged(6, events[5].hash),
    )
    .unwrap();
    // The dedup index does not depend on it: every id is found.
    let ids: Vec<_> = (0..3)
        .flat_map(|request| (0..3).map(move |index| format!("order-{request}-{index}")))
        .map(|id| log.find_event_id(&id))
        .collect();
    assert_eq!(ids, (1..=9).map(Some).collect::<Vec<_>>());
    log.close().unwrap();
    // A log that has another hash at that seq, or ends before it, is not the log that was
    // acknowledged, and is not opened.
    let mut wrong = events[5].hash;
    wrong[0] ^= 1;
    let refused =
        EventLog::open_checked(dir.path(), StoreOptions::default(), acknowledged(6, wrong));
    assert!(
        matches!(refused, Err(StoreError::Diverged { seq: 6, .. })),
        "{refused:?}"
    );
    let refused = EventLog::open_checked(
        dir.path(),
        StoreOptions::default(),
        acknowledged(42, events[5].hash),
    );
    assert!(
        matches!(
            refused,
            Err(StoreError::MissingEvents {
                log_head: 9,
                acknowledged: 42,
                ..
            })
        ),
        "{refused:?}"
    );
}
