//! A full disk is an ordinary, recoverable error (issue 12): the real `kpi-server` on a
//! small tmpfs. Writes get RESOURCE_EXHAUSTED naming the lack of space, reads keep working,
//! nothing acknowledged is lost, writes are accepted again by themselves once space is
//! free, SIGTERM ends the process in bounded time on a full disk, and a start on a full
//! disk fails cleanly and leaves the data directory exactly as it was.
//!
//! Mounting a tmpfs needs root (CI runs as root; `.ci/power-cut` runs this).

// Only the server process of the shared helpers; the power-cut workload is not used here.
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kpi_service::proto::{
    self, audit_client::AuditClient, ingest_client::IngestClient,
    kpi_catalog_client::KpiCatalogClient, query_client::QueryClient,
};
use server::{ServerProcess, server_binary};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Size of the file system: a few thousand batches, quick to fill.
const TMPFS_MIB: u64 = 48;
/// What the server keeps free (`--min-free-disk-mb`).
const MIN_FREE_MIB: u64 = 6;
/// Taken at the start and given back later, so that freeing it lifts free space well above
/// the server's minimum.
const BALLAST_MIB: u64 = 12;
/// Measurements per batch.
const BATCH: usize = 500;
/// A batch larger than what fits can never fill the disk beyond these many.
const MAX_BATCHES: usize = 2_000;
/// How long the server has from SIGTERM to exit (`--shutdown-timeout-secs` plus margin).
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed ({status}): this test needs root, as in CI (.ci/power-cut)"
        );
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

fn channel(server: &ServerProcess) -> Channel {
    Endpoint::from_shared(server.uri())
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_lazy()
}

/// Writes `mib` MiB into `path`, or until the file system is full; returns the bytes written.
fn fill(path: &Path, mib: u64) -> u64 {
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0x5a_u8; 1024 * 1024];
    let mut written = 0;
    for _ in 0..mib {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = file.sync_all();
    written
}

/// Every file under `root` with its size and contents, to tell a directory changed.
fn snapshot_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            if entry.file_type().expect("type").is_dir() {
                files.insert(
                    path.strip_prefix(root).unwrap().to_owned(),
                    b"<dir>".to_vec(),
                );
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                files.insert(path.strip_prefix(root).unwrap().to_owned(), bytes);
            }
        }
    }
    files
}

/// 64 bits mixed from `n` (splitmix64), so that event ids do not compress away and the
/// disk fills in a few hundred batches.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn batch(round: usize, number: usize) -> Vec<proto::Measurement> {
    (0..BATCH)
        .map(|i| {
            let n = u64::try_from((round * MAX_BATCHES + number) * BATCH + i).unwrap_or(0);
            proto::Measurement {
                kpi_id: "revenue".into(),
                value: 1.0,
                occurred_at: None,
                labels: Default::default(),
                subject: String::new(),
                event_id: format!("r{round}-{:016x}{:016x}", mix(n), mix(!n)),
            }
        })
        .collect()
}

/// Records batches until one is refused; returns the last acknowledged seq, the number of
/// acknowledged measurements and the refusal.
async fn record_until_refused(
    ingest: &mut IngestClient<Channel>,
    round: usize,
) -> (u64, u64, tonic::Status) {
    let (mut last, mut count) = (0, 0);
    for number in 0..MAX_BATCHES {
        match ingest
            .record(proto::RecordRequest {
                measurements: batch(round, number),
            })
            .await
        {
            Ok(response) => {
                let results = response.into_inner().results;
                last = results.last().map_or(last, |r| r.seq);
                count += results.len() as u64;
            }
            Err(status) => return (last, count, status),
        }
    }
    panic!("{MAX_BATCHES} batches fitted on a {TMPFS_MIB} MiB file system");
}

async fn revenue_total(server: &ServerProcess) -> u64 {
    let mut query = QueryClient::new(channel(server));
    let mut stream = query
        .get_aggregates(proto::GetAggregatesRequest {
            kpi_id: "revenue".into(),
            grain: proto::Grain::Year.into(),
            start: Some(prost_types::Timestamp::default()),
            end: Some(prost_types::Timestamp {
                seconds: 4_102_444_800,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("GetAggregates while the disk is full")
        .into_inner();
    let mut count = 0;
    while let Some(response) = stream.message().await.expect("bucket") {
        count += response.bucket.expect("bucket").count;
    }
    count
}

async fn head(server: &ServerProcess) -> u64 {
    AuditClient::new(channel(server))
        .get_log_info(proto::GetLogInfoRequest {})
        .await
        .expect("GetLogInfo")
        .into_inner()
        .head_seq
}

fn args() -> Vec<String> {
    vec![
        "--min-free-disk-mb".into(),
        MIN_FREE_MIB.to_string(),
        "--shutdown-timeout-secs".into(),
        (SHUTDOWN_TIMEOUT_SECS - 2).to_string(),
    ]
}

#[tokio::test]
async fn a_full_disk_refuses_writes_serves_reads_recovers_and_stops_cleanly() {
    let binary = server_binary();
    let scratch = tempfile::tempdir().expect("scratch");
    let tmpfs = Tmpfs::mount(&scratch.path().join("mnt"));
    let data = tmpfs.path.join("data");
    let ballast = tmpfs.path.join("ballast");
    let filler = tmpfs.path.join("filler");
    let log = |name: &str| scratch.path().join(format!("{name}.log"));
    assert_eq!(fill(&ballast, BALLAST_MIB), BALLAST_MIB << 20);

    let mut server = ServerProcess::start(&binary, "main", &data, &args(), &log("main"))
        .await
        .expect("server starts");
    KpiCatalogClient::new(channel(&server))
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(proto::KpiDefinition {
                id: "revenue".into(),
                name: "Revenue".into(),
                kind: proto::KpiKind::Sum.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("define");
    let mut ingest = IngestClient::new(channel(&server));

    // Our own writes fill the disk: refused with RESOURCE_EXHAUSTED, nothing partial.
    let (mut acknowledged, mut count, refused) = record_until_refused(&mut ingest, 1).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("no space left on device"),
        "{refused:?}"
    );
    assert!(count > 0, "some batches fitted");
    assert_eq!(head(&server).await, acknowledged);
    assert_eq!(revenue_total(&server).await, count);

    // Another process takes the rest: still refused, reads still answered.
    fill(&filler, TMPFS_MIB);
    let refused = ingest
        .record(proto::RecordRequest {
            measurements: batch(2, 0),
        })
        .await
        .expect_err("no room");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(revenue_total(&server).await, count);

    // Space returns: writes are accepted again by themselves, no restart.
    std::fs::remove_file(&filler).expect("free the filler");
    std::fs::remove_file(&ballast).expect("free the ballast");
    let results = ingest
        .record(proto::RecordRequest {
            measurements: batch(3, 0),
        })
        .await
        .expect("accepted again once space returned")
        .into_inner()
        .results;
    assert_eq!(results[0].seq, acknowledged + 1, "no seq skipped or reused");
    acknowledged = results.last().expect("results").seq;
    count += results.len() as u64;

    // Fill it again, this time completely, and stop the server on the full disk.
    let (last, more, _) = record_until_refused(&mut ingest, 4).await;
    if more > 0 {
        acknowledged = last;
        count += more;
    }
    fill(&filler, TMPFS_MIB);
    let (status, took) = server
        .terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 10))
        .expect("SIGTERM ends the server on a full disk");
    assert!(
        took < Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 5),
        "stopped in {took:?} ({status})"
    );

    // A start on the full disk fails cleanly and changes nothing in the data directory.
    let before = snapshot_tree(&data);
    let failed = ServerProcess::start(&binary, "full", &data, &args(), &log("full"))
        .await
        .err()
        .expect("no start on a full disk");
    assert!(failed.contains("no space left on device"), "{failed}");
    assert!(
        snapshot_tree(&data) == before,
        "a failed start changed the data directory"
    );

    // With space back, every acknowledged event is there and the chain verifies.
    std::fs::remove_file(&filler).expect("free the filler");
    let server = ServerProcess::start(&binary, "after", &data, &args(), &log("after"))
        .await
        .expect("starts once space returned");
    assert_eq!(head(&server).await, acknowledged);
    assert_eq!(revenue_total(&server).await, count);
    let verified = AuditClient::new(channel(&server))
        .verify_log(proto::VerifyLogRequest {})
        .await
        .expect("VerifyLog")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    drop(server);
    drop(tmpfs);
}
