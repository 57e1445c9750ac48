//! Damage to the stored log: detected, reported with the seq, never served as if whole,
//! and no acknowledged seq ever given to another event; `kpi-server recover` records the
//! loss on purpose. A damaged history index, derived from the log, is rebuilt instead.

mod common;

use std::path::{Path, PathBuf};

use common::{TestServer, copy_dir, kpi, measurement, with_event_id};
use kpi_service::proto::{self, KpiKind, event_record::Payload};
use kpi_service::recover::{Recovery, recover};
use kpi_service::store::StoreError;
use kpi_service::{Config, RunError};

/// Records `batches` unary batches of 10 measurements with event ids
/// `{prefix}-{b}-{i}-{unique_tag(b, i)}`; returns the last acknowledged seq.
async fn fill(server: &TestServer, prefix: &str, batches: usize) -> u64 {
    let mut last = 0;
    for b in 0..batches {
        let batch = (0..10)
            .map(|i| {
                let id = format!("{prefix}-{b:04}-{i}-{}", unique_tag(b, i));
                with_event_id(measurement("revenue", 1.0), &id)
            })
            .collect();
        let results = server.record(batch).await.expect("record");
        last = results.last().expect("results").seq;
    }
    last
}

/// Every offset of `needle` in `haystack`.
fn offsets(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(at, _)| at)
        .collect()
}

/// Flips one byte inside every copy of `marker` in `file`; returns how many.
fn flip_marker(file: &Path, marker: &str) -> usize {
    let mut bytes = std::fs::read(file).expect("read");
    let found = offsets(&bytes, marker.as_bytes());
    for at in &found {
        bytes[at + marker.len() / 2] ^= 0x20;
    }
    std::fs::write(file, &bytes).expect("write");
    found.len()
}

/// A part of an event id that nothing before it resembles, so that LZ4 stores it as it is
/// and a test can find the record in sled's file: 16 hex digits mixed from `b` and `i`
/// (splitmix64).
fn unique_tag(b: usize, i: usize) -> String {
    let mut z = (u64::try_from(b * 1000 + i).unwrap()).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

/// Starts a server on `dir`: the server once it answers, or why `run` returned.
async fn start_result(dir: &Path) -> Result<TestServer, RunError> {
    let server = TestServer::start(dir).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if server.is_finished() {
            return Err(server
                .exit()
                .await
                .expect_err("a server that returns by itself failed to start"));
        }
        let mut audit = server.audit();
        let answered = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            audit.get_log_info(proto::GetLogInfoRequest {}),
        )
        .await;
        if matches!(answered, Ok(Ok(_))) {
            return Ok(server);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server neither started nor failed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The StoreError a refused start returned.
fn refusal(error: RunError) -> StoreError {
    match error {
        RunError::Store { source, .. } => source,
        other => panic!("not a store refusal: {other}"),
    }
}

/// Checks a refusal for missing events: the log ends before `acknowledged`; returns the
/// log's head.
fn missing_events(error: RunError, acknowledged: u64) -> u64 {
    match refusal(error) {
        StoreError::MissingEvents {
            log_head,
            acknowledged: found,
            ..
        } => {
            assert_eq!(found, acknowledged);
            assert!(log_head < acknowledged);
            log_head
        }
        other => panic!("expected missing events, got: {other}"),
    }
}

/// Runs `kpi-server recover` on `dir` (blocking, as the command does).
async fn recover_dir(dir: &Path) -> Recovery {
    let config = Config::with_data_dir(dir);
    tokio::task::spawn_blocking(move || recover(&config, false))
        .await
        .expect("recover task")
        .expect("recovered")
}

/// After a recovery that recorded `first..=last` as lost: the server starts at that head,
/// the chain verifies, each lost seq holds an EventsLost event naming the range, the
/// next measurement gets `last + 1` (no acknowledged seq is reused), an id recorded before
/// the loss is still a duplicate of its seq, and the aggregates are those of the events
/// the log still holds.
async fn check_recovered(dir: &Path, first: u64, last: u64, before_loss: (&str, u64)) {
    let server = start_result(dir).await.expect("starts after recovery");
    assert_eq!(server.log_info().await.head_seq, last);
    let verified = server.verify_log().await;
    assert!(verified.ok, "{verified:?}");
    let envelopes = server.replay_all().await;
    let lost: Vec<u64> = envelopes
        .iter()
        .filter_map(
            |envelope| match envelope.event.as_ref()?.payload.as_ref()? {
                Payload::EventsLost(lost) => {
                    assert_eq!((lost.first_seq, lost.last_seq), (first, last));
                    assert_eq!(lost.acknowledged_hash.len(), 32);
                    Some(envelope.seq)
                }
                _ => None,
            },
        )
        .collect();
    assert_eq!(lost, (first..=last).collect::<Vec<_>>());
    let kept = envelopes
        .iter()
        .filter(|envelope| {
            matches!(
                envelope.event.as_ref().and_then(|e| e.payload.as_ref()),
                Some(Payload::MeasurementRecorded(_))
            )
        })
        .count();
    let new = server
        .record(vec![with_event_id(
            measurement("revenue", 1.0),
            "after-recovery",
        )])
        .await
        .expect("record after recovery");
    assert_eq!(new[0].seq, last + 1);
    assert!(!new[0].duplicate);
    let again = server
        .record(vec![with_event_id(
            measurement("revenue", 1.0),
            before_loss.0,
        )])
        .await
        .expect("retry of an old id");
    assert_eq!((again[0].seq, again[0].duplicate), (before_loss.1, true));
    assert_eq!(
        revenue_count(&server, None).await,
        u64::try_from(kept).unwrap() + 1
    );
    server.stop().await;
}

/// A stopped server's directory: `revenue` (SUM) defined at seq 1, then `batches` unary
/// batches of 10 measurements with ids `{prefix}-..` (see [`fill`]); with the last seq.
async fn filled_dir(prefix: &str, batches: usize) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let acknowledged = fill(&server, prefix, batches).await;
    server.stop().await;
    (dir, acknowledged)
}

/// How many measurements `revenue`'s YEAR buckets count, as of `as_of` (now if `None`).
async fn revenue_count(server: &TestServer, as_of: Option<proto::AsOf>) -> u64 {
    let year = common::buckets(
        server,
        proto::GetAggregatesRequest {
            kpi_id: "revenue".into(),
            grain: proto::Grain::Year.into(),
            start: Some(prost_types::Timestamp::default()),
            end: Some(prost_types::Timestamp {
                seconds: 4_102_444_800,
                nanos: 0,
            }),
            as_of,
            ..Default::default()
        },
    )
    .await
    .expect("aggregates");
    year.iter().map(|bucket| bucket.count).sum()
}

#[tokio::test]
async fn damage_in_an_older_record_is_refused_and_recovered_without_reusing_a_seq() {
    let (dir, acknowledged) = filled_dir("corr", 300).await;
    // seq 1 defines the KPI; batch 150's fourth measurement is seq 2 + 150 * 10 + 3.
    assert!(flip_marker(&dir.path().join("log/db"), &unique_tag(150, 3)) > 0);
    let error = start_result(dir.path()).await.err().expect("refused");
    let message = error.to_string();
    let head = missing_events(error, acknowledged);
    assert!(head < 1505, "the log ends before the damage, at {head}");
    assert!(
        message.contains(&format!("seqs {}..={acknowledged} are missing", head + 1)),
        "{message}"
    );
    assert!(message.contains("kpi-server recover"), "{message}");
    let recovery = recover_dir(dir.path()).await;
    assert_eq!(recovery.lost, Some((head + 1, acknowledged)));
    let first_id = format!("corr-0000-0-{}", unique_tag(0, 0));
    check_recovered(dir.path(), head + 1, acknowledged, (&first_id, 2)).await;
}

#[tokio::test]
async fn damage_in_the_newest_record_is_refused_and_recovered() {
    let (dir, acknowledged) = filled_dir("corr", 300).await;
    assert!(flip_marker(&dir.path().join("log/db"), &unique_tag(299, 9)) > 0);
    let error = start_result(dir.path()).await.err().expect("refused");
    let head = missing_events(error, acknowledged);
    assert!(
        head >= acknowledged - 10,
        "only the newest batch is lost, not {head}"
    );
    let recovery = recover_dir(dir.path()).await;
    assert_eq!(recovery.lost, Some((head + 1, acknowledged)));
    let kept_id = format!("corr-0100-0-{}", unique_tag(100, 0));
    check_recovered(dir.path(), head + 1, acknowledged, (&kept_id, 1002)).await;
}

/// A data directory written with the large segments of older builds, whose leaves sled
/// writes to blob files: one KPI definition, then `events` measurements in batches of 1000
/// with ids `legacy-{batch}-{i}`. Returns the head seq and the blob files.
async fn legacy_dir(dir: &Path, events: usize) -> (u64, Vec<PathBuf>) {
    use kpi_service::domain::{Direction, Event, KpiDefinition, KpiKind as Kind};
    use kpi_service::store::{AppendRequest, EventLog, StoreOptions};
    let log_dir = dir.join("log");
    let head = tokio::task::spawn_blocking(move || {
        let log = EventLog::open(
            &log_dir,
            StoreOptions {
                legacy_layout: true,
                ..StoreOptions::default()
            },
        )
        .expect("open");
        let append = |events: Vec<Event>| {
            log.append_blocking(AppendRequest {
                events,
                validation_unchanged_since: None,
                ..Default::default()
            })
            .expect("append")
        };
        append(vec![Event::KpiDefined {
            definition: KpiDefinition {
                id: "revenue".into(),
                name: "Revenue".into(),
                description: String::new(),
                unit: String::new(),
                kind: Kind::Sum,
                direction: Direction::HigherIsBetter,
                timezone: chrono_tz::Tz::UTC,
                dimensions: vec!["channel".into()],
                ratio: None,
            },
        }]);
        for batch in 0..events / 1000 {
            append(
                (0..1000)
                    .map(|i| {
                        common::store::measurement_at(
                            "revenue",
                            1.0,
                            Some(&format!("legacy-{batch:04}-{i:04}")),
                            chrono::Utc::now(),
                        )
                    })
                    .collect(),
            );
        }
        let head = log.head().seq;
        log.close().expect("close");
        head
    })
    .await
    .expect("legacy writer");
    let mut blobs: Vec<PathBuf> = std::fs::read_dir(dir.join("log/blobs"))
        .expect("blobs")
        .map(|entry| entry.expect("entry").path())
        .collect();
    blobs.sort();
    assert!(
        !blobs.is_empty(),
        "large segments make sled write blob files"
    );
    (head, blobs)
}

#[tokio::test]
async fn a_changed_or_cut_blob_of_an_older_directory_is_refused_naming_the_lost_seqs() {
    for cut in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (acknowledged, blobs) = legacy_dir(dir.path(), 20_000).await;
        for blob in &blobs {
            if cut {
                std::fs::File::options()
                    .write(true)
                    .open(blob)
                    .and_then(|file| file.set_len(100))
                    .expect("cut the blob");
            } else {
                let mut bytes = std::fs::read(blob).expect("blob");
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x55;
                std::fs::write(blob, bytes).expect("change the blob");
            }
        }
        let error = start_result(dir.path()).await.err().expect("refused");
        let message = error.to_string();
        let head = missing_events(error, acknowledged);
        assert!(
            message.contains(&format!("seqs {}..={acknowledged} are missing", head + 1)),
            "{message}"
        );
        // sled cannot open a directory with damaged blob files a second time: never
        // served, and recovery points to the backup instead of guessing.
        let again = start_result(dir.path()).await.err().expect("refused again");
        assert!(again.to_string().contains("backup"), "{again}");
        let config = Config::with_data_dir(dir.path());
        let refused = tokio::task::spawn_blocking(move || recover(&config, false))
            .await
            .expect("recover task")
            .expect_err("cannot recover a directory sled cannot open");
        assert!(refused.to_string().contains("backup"), "{refused}");
    }
}

#[tokio::test]
async fn a_deleted_blob_that_sled_needs_is_reported_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blobs) = legacy_dir(dir.path(), 20_000).await;
    for blob in &blobs {
        std::fs::remove_file(blob).expect("delete the blob");
    }
    let error = start_result(dir.path()).await.err().expect("refused");
    let message = error.to_string();
    assert!(
        matches!(refusal(error), StoreError::Corrupt { .. }),
        "{message}"
    );
    assert!(message.contains("restore the data directory"), "{message}");
    assert!(
        message.len() < 1000,
        "a readable message, not a dump: {message}"
    );
    // Recovery cannot repair what sled cannot read: it says so and changes nothing.
    let config = Config::with_data_dir(dir.path());
    let refused = tokio::task::spawn_blocking(move || recover(&config, false))
        .await
        .expect("recover task");
    assert!(refused.is_err());
}

#[tokio::test]
async fn an_older_log_beside_a_newer_snapshot_is_refused_and_recovered() {
    let (dir, old_head) = filled_dir("early", 20).await;
    let log = dir.path().join("log");
    let kept = dir.path().join("log.kept");
    copy_dir(&log, &kept);
    let server = TestServer::start(dir.path()).await;
    let acknowledged = fill(&server, "late", 20).await;
    server.stop().await;
    // The operator puts the older log back; the snapshot of the later state stays.
    std::fs::remove_dir_all(&log).unwrap();
    std::fs::rename(&kept, &log).unwrap();
    let error = start_result(dir.path()).await.err().expect("refused");
    let message = error.to_string();
    assert_eq!(missing_events(error, acknowledged), old_head);
    assert!(message.contains("read-model snapshot"), "{message}");
    let recovery = recover_dir(dir.path()).await;
    assert_eq!(recovery.lost, Some((old_head + 1, acknowledged)));
    let first_id = format!("early-0000-0-{}", unique_tag(0, 0));
    check_recovered(dir.path(), old_head + 1, acknowledged, (&first_id, 2)).await;
}

/// Builds a sled database in `dir` that sled 0.34 cannot open without panicking, the way a
/// power cut left the history index once: an empty `conf`, no snapshot file, and pages of
/// the data file lost (zeroed) while later ones survived. Which pages sled needs depends on
/// its layout, so this tries damage patterns until sled's own open panics; returns the
/// damaged `db` file's bytes.
fn a_db_sled_panics_on(dir: &Path) -> Vec<u8> {
    let built = dir.join("built");
    {
        let db = sled::Config::new().path(&built).open().expect("sled");
        for tree in 0..8_u32 {
            let tree = db.open_tree(tree.to_be_bytes()).expect("tree");
            for key in 0..1000_u32 {
                tree.insert(key.to_be_bytes(), vec![7_u8; 200])
                    .expect("insert");
            }
            db.flush().expect("flush");
        }
    }
    let whole = std::fs::read(built.join("db")).expect("db file");
    let pages = whole.len() / 4096;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % 1_000_000).unwrap()
    };
    for attempt in 0..100 {
        let mut bytes = whole.clone();
        let around = next() % pages;
        for _ in 0..=next() % 40 {
            let page = (around + next() % 64).min(pages - 1);
            bytes[page * 4096..(page + 1) * 4096].fill(0);
        }
        let trial = dir.join(format!("trial-{attempt}"));
        std::fs::create_dir_all(&trial).unwrap();
        std::fs::write(trial.join("db"), &bytes).unwrap();
        std::fs::write(trial.join("conf"), b"").unwrap();
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(&trial).open().is_ok());
        if opened.is_err() {
            return bytes;
        }
    }
    panic!("no damage pattern made sled panic");
}

#[tokio::test]
async fn a_history_index_whose_open_panics_in_sled_is_rebuilt() {
    let (dir, head) = filled_dir("hist", 20).await;

    let scratch = tempfile::tempdir().unwrap();
    let damaged = a_db_sled_panics_on(scratch.path());
    let history = dir.path().join("history");
    std::fs::remove_dir_all(&history).expect("remove the index");
    std::fs::create_dir_all(&history).unwrap();
    std::fs::write(history.join("db"), damaged).unwrap();
    std::fs::write(history.join("conf"), b"").unwrap();

    let server = start_result(dir.path())
        .await
        .expect("a damaged history index is rebuilt, not a failed start");
    assert_eq!(server.log_info().await.head_seq, head);
    // The definition is seq 1; the 200 measurements follow it.
    assert_eq!(revenue_count(&server, None).await, 200);
    assert_eq!(revenue_count(&server, common::as_of_seq(101)).await, 100);
    server.stop().await;
}
