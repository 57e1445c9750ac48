//! Black-box tests of `kpi-server backup` and `kpi-server restore`, run as processes: a
//! backup taken while writers keep recording restores into a server whose every aggregate
//! equals the original's as of the backup's head, and a backup that does not match its
//! manifest is refused without writing anything.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{TestServer, as_of_seq, kpi, measurement};
use kpi_service::proto::{self, Grain, KpiKind};

const KPIS: [(&str, KpiKind); 3] = [
    ("orders", KpiKind::Sum),
    ("latency", KpiKind::Max),
    ("visits", KpiKind::Count),
];

fn kpi_server(args: &[&str], dirs: &[(&str, &Path)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kpi-server"));
    command.args(args);
    for (flag, dir) in dirs {
        command.arg(flag).arg(dir);
    }
    command.output().expect("kpi-server runs")
}

/// Runs `kpi-server backup` of `server` into `to`, off the test's runtime.
async fn take_backup(server: &TestServer, to: &Path) {
    let url = format!("http://{}", server.addr);
    let to = to.to_owned();
    let backup = tokio::task::spawn_blocking(move || {
        kpi_server(&["backup", "--server", &url], &[("--to", &to)])
    })
    .await
    .unwrap();
    assert!(backup.status.success(), "backup: {backup:?}");
}

/// Every KPI's daily buckets by channel, as of `seq` (now when `None`).
async fn aggregates(
    server: &TestServer,
    seq: Option<u64>,
) -> Vec<Vec<proto::GetAggregatesResponse>> {
    // From two days ago to tomorrow, whole days.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let window_start = (now / 86_400 - 2) * 86_400;
    let mut all = Vec::new();
    for (id, _) in KPIS {
        let mut stream = server
            .query()
            .get_aggregates(proto::GetAggregatesRequest {
                kpi_id: id.into(),
                grain: Grain::Day.into(),
                group_by: vec!["channel".into()],
                start: Some(prost_types::Timestamp {
                    seconds: window_start,
                    nanos: 0,
                }),
                end: Some(prost_types::Timestamp {
                    seconds: window_start + 3 * 86_400,
                    nanos: 0,
                }),
                as_of: seq.and_then(as_of_seq),
                ..Default::default()
            })
            .await
            .expect("aggregates")
            .into_inner();
        let mut answers = Vec::new();
        while let Some(answer) = stream.message().await.expect("an answer") {
            answers.push(answer);
        }
        all.push(answers);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_every_aggregate() {
    let dir = tempfile::tempdir().unwrap();
    let original = TestServer::start(&dir.path().join("original")).await;
    for (id, kind) in KPIS {
        original.define(kpi(id, kind)).await;
    }
    // Writers that keep recording until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..2_u32 {
        let ingest = original.ingest();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut ingest = ingest;
            let mut batch = 0_u32;
            while !stop.load(Ordering::Relaxed) || batch < 5 {
                let measurements = (0..200_u32)
                    .map(|i| proto::Measurement {
                        labels: [("channel".to_owned(), format!("c{}", i % 7))].into(),
                        ..measurement(
                            KPIS[(i % 3) as usize].0,
                            f64::from(writer * 1000 + batch + i),
                        )
                    })
                    .collect();
                ingest
                    .record(proto::RecordRequest { measurements })
                    .await
                    .expect("record");
                batch += 1;
            }
            batch
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let backup_dir = dir.path().join("backup");
    take_backup(&original, &backup_dir).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let manifest = kpi_service::backup::read_manifest(&backup_dir).unwrap();
    let later = original.log_info().await;
    assert!(manifest.head_seq > 3, "the backup holds events");
    assert!(
        later.head_seq > manifest.head_seq,
        "writes went on after the backup's head"
    );

    let restored_dir = dir.path().join("restored");
    let restore = kpi_server(
        &["restore"],
        &[("--from", &backup_dir), ("--data-dir", &restored_dir)],
    );
    assert!(restore.status.success(), "restore: {restore:?}");
    let restored = TestServer::start(&restored_dir).await;
    let info = restored.log_info().await;
    assert_eq!(info.head_seq, manifest.head_seq);
    assert_eq!(hex::encode(&info.head_hash), manifest.head_hash);
    assert!(
        restored
            .audit()
            .verify_log(proto::VerifyLogRequest {})
            .await
            .unwrap()
            .into_inner()
            .ok
    );
    let expected = aggregates(&original, Some(manifest.head_seq)).await;
    let got = aggregates(&restored, None).await;
    assert!(expected.iter().all(|answers| !answers.is_empty()));
    assert_eq!(got, expected, "every aggregate as of the backup's head");
    restored.stop().await;
    original.stop().await;
}

#[tokio::test]
async fn a_backup_that_does_not_match_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let original = TestServer::start(&dir.path().join("original")).await;
    original.define(kpi("orders", KpiKind::Sum)).await;
    original
        .record(vec![measurement("orders", 1.0), measurement("orders", 2.0)])
        .await
        .unwrap();
    let backup_dir = dir.path().join("backup");
    take_backup(&original, &backup_dir).await;
    original.stop().await;

    let manifest_path = backup_dir.join(kpi_service::backup::MANIFEST_FILE);
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let events_path = backup_dir.join(kpi_service::backup::EVENTS_FILE);
    let events = std::fs::read(&events_path).unwrap();
    let refused = |name: &str| {
        let target = dir.path().join(name);
        let restore = kpi_server(
            &["restore"],
            &[("--from", &backup_dir), ("--data-dir", &target)],
        );
        assert!(
            !restore.status.success(),
            "{name}: restored a changed backup"
        );
        assert!(
            !target.exists(),
            "{name}: the refused restore left {}",
            target.display()
        );
        String::from_utf8_lossy(&restore.stderr).into_owned()
    };

    // A manifest whose head hash is not the events' (its file hash still matching).
    let info = kpi_service::backup::read_manifest(&backup_dir).unwrap();
    std::fs::write(
        &manifest_path,
        manifest.replace(&info.head_hash, &"ab".repeat(32)),
    )
    .unwrap();
    let error = refused("wrong-head");
    assert!(error.contains("manifest names seq"), "{error}");
    std::fs::write(&manifest_path, &manifest).unwrap();

    // An event changed after the backup was taken.
    let mut changed = events.clone();
    let last = changed.len() - 3;
    changed[last] ^= 0x01;
    std::fs::write(&events_path, &changed).unwrap();
    let error = refused("changed-event");
    assert!(error.contains("SHA-256"), "{error}");
    std::fs::write(&events_path, &events).unwrap();

    // The untouched backup restores, into an empty directory only.
    let target = dir.path().join("restored");
    let restore = kpi_server(
        &["restore"],
        &[("--from", &backup_dir), ("--data-dir", &target)],
    );
    assert!(restore.status.success(), "{restore:?}");
    let again = kpi_server(
        &["restore"],
        &[("--from", &backup_dir), ("--data-dir", &target)],
    );
    assert!(
        !again.status.success(),
        "restored over an existing data directory"
    );
    let restored = TestServer::start(&target).await;
    assert_eq!(restored.log_info().await.head_seq, info.head_seq);
    restored.stop().await;
}
