//! `kpi-load sled`: the raw-sled baseline, "what you'd get writing your own code on sled":
//! the ingest workload written straight into a sled database (no server), then the
//! query scenario's monthly sums computed by scanning it.
//!
//! # Ingest
//!
//! One key per measurement, its index in the stream as a big-endian `u64` (so keys sort in
//! stream order), and its protobuf encoding (`proto::Measurement`, prost) as the value. The
//! stream is cut in batches of `batch` measurements as `ingest` cuts it; `producers` threads
//! take batch numbers from a shared counter, and each batch is one `Tree::apply_batch`
//! followed by `Db::flush` (sled's fsync), so a batch is durable before its producer takes
//! the next, as a RecordStream batch is before its acknowledgement. sled is thread-safe and
//! flushes of concurrent producers share its log writes. A batch's latency runs from the
//! end of its generation to the end of its flush (encoding, apply, flush), like `ingest`'s
//! from the send (the client encodes after it) to the acknowledgement. The database uses
//! sled's default configuration, as the service's event log does.
//!
//! Then the database is closed and its directory measured (apparent size: the sum of the
//! file lengths, as the peer comparison measures the service's data directory), reopened,
//! and its keys counted by one untimed scan, which also brings the tree into sled's cache
//! as `pgbench`'s warm-up does for PostgreSQL.
//!
//! # Query
//!
//! The raw-sled answer to the query scenario's GetAggregates: the same range (the latest
//! `buckets` buckets of `grain` in the KPI's timezone up to the workload's end, or up to
//! `end_offset_buckets` buckets before it), computed
//! by a full scan of the tree in key order, decoding every value, keeping the KPI's
//! measurements in the range and adding their values per bucket (a plain `f64` sum, and a
//! count) with the domain's [`Calendar`]. No secondary index: with one, a query would read
//! only the KPI's rows, but that is code the baseline deliberately does not write. The scan
//! runs `queries` times on one thread; each is one latency.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use indicatif::ProgressBar;
use prost::Message;
use serde_json::Value;

use super::query::AggregateQuestion;
use super::{Latencies, LoadError, Report};
use crate::workload::Workload;
use kpi_service::domain::Grain;
use kpi_service::domain::calendar::{BucketKey, Calendar};
use kpi_service::domain::kpi::parse_timezone;
use kpi_service::proto::{self, from_proto};

/// The tree the measurements go into (a named tree rather than sled's default one, so the
/// database says what it holds).
const TREE: &str = "measurements";

/// How long reopening waits for the directory lock: sled's background threads release it
/// shortly after the last handle is dropped, so a reopen right after closing can find it
/// still held for a moment.
const LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// Options of the raw-sled scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct RawSledOptions {
    /// Directory of the sled database: created if missing, refused if not empty (the
    /// figures are those of a fresh database).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Threads writing batches, each taking the next batch number from a shared counter.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Measurements per batch: one apply_batch and one flush (fsync) each.
    #[arg(long, default_value_t = 1000)]
    pub batch: u64,
    /// Full scans to time for the query part (each reads every key); 0 skips it.
    #[arg(long, default_value_t = 3)]
    pub queries: u32,
    /// What the query asks (as the query scenario).
    #[command(flatten)]
    pub question: AggregateQuestion,
}

/// One bucket of the query's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BucketSum {
    sum: f64,
    count: u64,
}

/// What one full scan found.
#[derive(Debug, Clone, PartialEq)]
struct Scan {
    rows: u64,
    matched: u64,
    buckets: BTreeMap<BucketKey, BucketSum>,
}

/// Writes the workload into a fresh sled database in `options.data_dir`, then (unless
/// `options.queries` is 0) times the full-scan query. Returns the `sled` report and, with
/// queries, the `sled_query` report, whose `answer` extra holds the buckets found (start,
/// sum, count each) so that they can be checked against the service's.
pub fn raw_sled(
    workload: &Workload,
    options: &RawSledOptions,
    progress: &ProgressBar,
) -> Result<Vec<Report>, LoadError> {
    if options.producers == 0 || options.batch == 0 {
        return Err(LoadError::Invalid(
            "producers and batch must be at least 1".into(),
        ));
    }
    // Checked before writing anything, so a wrong --kpi costs no ingest.
    let query_kpi = if options.queries > 0 {
        let kpi = workload
            .kpis()
            .iter()
            .find(|kpi| kpi.id == options.question.kpi)
            .ok_or_else(|| {
                LoadError::Invalid(format!(
                    "kpi {} is not in the workload",
                    options.question.kpi
                ))
            })?;
        let tz = parse_timezone(kpi.timezone, "timezone")
            .map_err(|rejection| LoadError::Invalid(rejection.to_string()))?;
        Some(tz)
    } else {
        None
    };
    let dir = options.data_dir.as_path();
    prepare_dir(dir)?;

    let db = open(dir)?;
    let tree = db.open_tree(TREE).map_err(sled_error(dir))?;
    let next_batch = AtomicU64::new(0);
    let started = Instant::now();
    let produced = std::thread::scope(|scope| {
        let producers: Vec<_> = (0..options.producers)
            .map(|_| {
                scope.spawn(|| {
                    produce(
                        workload,
                        &db,
                        &tree,
                        options.batch,
                        &next_batch,
                        progress,
                        dir,
                    )
                })
            })
            .collect();
        let mut total = Produced::default();
        for producer in producers {
            let produced = producer
                .join()
                .map_err(|_| LoadError::ThreadPanicked("a sled producer"))??;
            total.written += produced.written;
            total.batches += produced.batches;
            total.latencies.merge(&produced.latencies);
        }
        Ok::<_, LoadError>(total)
    })?;
    let elapsed = started.elapsed();
    progress.finish_and_clear();

    // Closed before measuring, so the directory is what a later process would find.
    drop(tree);
    drop(db);
    let disk_bytes = directory_bytes(dir)?;
    let opened = Instant::now();
    let db = open(dir)?;
    let tree = db.open_tree(TREE).map_err(sled_error(dir))?;
    let open_seconds = opened.elapsed().as_secs_f64();
    let keys = u64::try_from(tree.len()).unwrap_or(u64::MAX);

    let mut reports = vec![Report {
        scenario: "sled",
        params: vec![
            ("producers", Value::from(options.producers)),
            ("batch", Value::from(options.batch)),
            ("kpis", Value::from(workload.kpis().len())),
            ("measurements", Value::from(workload.len())),
            ("event_ids", Value::from(workload.config().event_ids)),
        ],
        items: produced.written,
        ops: produced.batches,
        elapsed,
        latencies: produced.latencies,
        extra: vec![
            ("data_dir", Value::from(dir.display().to_string())),
            ("keys", Value::from(keys)),
            ("disk_bytes", Value::from(disk_bytes)),
            (
                "disk_bytes_per_measurement",
                Value::from(per_item(disk_bytes, produced.written)),
            ),
        ],
    }];
    if let Some(tz) = query_kpi {
        reports.push(query(&tree, dir, workload, options, tz, open_seconds)?);
    }
    Ok(reports)
}

/// What one producer wrote.
#[derive(Default)]
struct Produced {
    written: u64,
    batches: u64,
    latencies: Latencies,
}

/// One producer: takes batch numbers until none is left; each batch is applied and
/// flushed before the next is taken.
fn produce(
    workload: &Workload,
    db: &sled::Db,
    tree: &sled::Tree,
    size: u64,
    next_batch: &AtomicU64,
    progress: &ProgressBar,
    dir: &Path,
) -> Result<Produced, LoadError> {
    let batches = workload.batch_count(size);
    let mut produced = Produced::default();
    loop {
        let index = next_batch.fetch_add(1, Ordering::Relaxed);
        if index >= batches {
            return Ok(produced);
        }
        let first = index.saturating_mul(size);
        let measurements = workload.batch(index, size);
        let began = Instant::now();
        let mut batch = sled::Batch::default();
        let mut written = 0_u64;
        for (key, measurement) in (first..).zip(&measurements) {
            batch.insert(&key.to_be_bytes()[..], measurement.encode_to_vec());
            written += 1;
        }
        tree.apply_batch(batch).map_err(sled_error(dir))?;
        db.flush().map_err(sled_error(dir))?;
        produced.latencies.record(began.elapsed());
        produced.written += written;
        produced.batches += 1;
        progress.inc(written);
    }
}

/// Times `options.queries` full scans and reports the last one's buckets (every scan must
/// find the same, or the database changed under the run).
fn query(
    tree: &sled::Tree,
    dir: &Path,
    workload: &Workload,
    options: &RawSledOptions,
    tz: chrono_tz::Tz,
    open_seconds: f64,
) -> Result<Report, LoadError> {
    let grain = Grain::from(options.question.grain);
    let (start, end) = options.question.range(tz, workload.end());
    let mut latencies = Latencies::new();
    let mut rows = 0_u64;
    let mut answer: Option<Scan> = None;
    let started = Instant::now();
    for _ in 0..options.queries {
        let began = Instant::now();
        let scan = scan(
            tree,
            dir,
            &options.question.kpi,
            grain,
            Calendar::new(tz),
            (start, end),
        )?;
        latencies.record(began.elapsed());
        rows += scan.rows;
        if answer.as_ref().is_some_and(|previous| *previous != scan) {
            return Err(LoadError::Invalid(
                "two scans of the same sled database gave different answers".into(),
            ));
        }
        answer = Some(scan);
    }
    let elapsed = started.elapsed();
    let answer = answer.unwrap_or(Scan {
        rows: 0,
        matched: 0,
        buckets: BTreeMap::new(),
    });
    let buckets: Vec<Value> = answer
        .buckets
        .iter()
        .map(|(key, bucket)| {
            serde_json::json!({
                "start": key.start().to_rfc3339(),
                "sum": bucket.sum,
                "count": bucket.count,
            })
        })
        .collect();
    Ok(Report {
        scenario: "sled_query",
        params: vec![("queries", Value::from(options.queries))]
            .into_iter()
            .chain(options.question.params())
            .collect(),
        items: rows,
        ops: u64::from(options.queries),
        elapsed,
        latencies,
        extra: vec![
            ("rows_per_query", Value::from(answer.rows)),
            ("measurements_in_range", Value::from(answer.matched)),
            ("range_start", Value::from(start.to_rfc3339())),
            ("range_end", Value::from(end.to_rfc3339())),
            (
                "open_seconds",
                Value::from((open_seconds * 1000.0).round() / 1000.0),
            ),
            ("answer", Value::from(buckets)),
        ],
    })
}

/// One full scan: every value decoded, the KPI's measurements in `[start, end)` summed per
/// bucket of `grain`.
fn scan(
    tree: &sled::Tree,
    dir: &Path,
    kpi: &str,
    grain: Grain,
    mut calendar: Calendar,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
) -> Result<Scan, LoadError> {
    let mut scan = Scan {
        rows: 0,
        matched: 0,
        buckets: BTreeMap::new(),
    };
    for entry in tree.iter() {
        let (key, value) = entry.map_err(sled_error(dir))?;
        scan.rows += 1;
        let damaged = |what: String| {
            LoadError::Invalid(format!("{}: key {:?}: {what}", dir.display(), key.as_ref()))
        };
        let measurement = proto::Measurement::decode(value.as_ref())
            .map_err(|error| damaged(format!("not a Measurement: {error}")))?;
        if measurement.kpi_id != kpi {
            continue;
        }
        let occurred_at = measurement
            .occurred_at
            .as_ref()
            .ok_or_else(|| damaged("measurement without occurred_at".into()))
            .and_then(|ts| {
                from_proto::timestamp(ts, "occurred_at")
                    .map_err(|rejection| damaged(rejection.to_string()))
            })?;
        if occurred_at < start || occurred_at >= end {
            continue;
        }
        scan.matched += 1;
        let bucket = scan
            .buckets
            .entry(calendar.bucket_of(grain, occurred_at).key())
            .or_insert(BucketSum { sum: 0.0, count: 0 });
        bucket.sum += measurement.value;
        bucket.count += 1;
    }
    Ok(scan)
}

/// Creates `dir`, or checks that it is empty.
fn prepare_dir(dir: &Path) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    if std::fs::read_dir(dir).map_err(io)?.next().is_some() {
        return Err(LoadError::Invalid(format!(
            "{} is not empty; the sled scenario needs a fresh directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Opens the sled database in `dir` with the default configuration, waiting up to
/// [`LOCK_PATIENCE`] for the lock that a just-closed handle still holds.
fn open(dir: &Path) -> Result<sled::Db, LoadError> {
    if !wait_for_sled_lock(dir)? {
        return Err(LoadError::Invalid(format!(
            "{} is in use: another sled handle holds its lock",
            dir.display()
        )));
    }
    sled::Config::new()
        .path(dir)
        .open()
        .map_err(sled_error(dir))
}

/// Waits up to [`LOCK_PATIENCE`] until sled's lock on its data file in `dir` is free (or
/// there is no data file yet); whether it is. sled 0.34 locks `<dir>/db` with `flock`;
/// the same lock tried without blocking reports a holder as a typed `EWOULDBLOCK`, where
/// sled itself reports it only as an error message.
fn wait_for_sled_lock(dir: &Path) -> Result<bool, LoadError> {
    let path = dir.join("db");
    let io = |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(error) => return Err(io(error)),
    };
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            // Free; closing `file` releases this probe's lock before sled takes its own.
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(errno) => return Err(io(errno.into())),
        }
    }
}

fn sled_error(dir: &Path) -> impl Fn(sled::Error) -> LoadError + '_ {
    move |source| LoadError::Sled {
        path: dir.display().to_string(),
        source,
    }
}

/// Apparent size of everything under `dir` (the sum of the file lengths).
fn directory_bytes(dir: &Path) -> Result<u64, LoadError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| LoadError::Io { path, source }
    };
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).map_err(io(&path))? {
            let entry = entry.map_err(io(&path))?;
            let metadata = entry.metadata().map_err(io(&entry.path()))?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    Ok(total)
}

/// `bytes / items` rounded to one decimal place (0 without items), computed in integers so
/// that no count is cast to a float.
fn per_item(bytes: u64, items: u64) -> f64 {
    if items == 0 {
        return 0.0;
    }
    let tenths = (u128::from(bytes) * 10 + u128::from(items) / 2) / u128::from(items);
    // A measurement takes hundreds of bytes; u32::MAX tenths (400 MB each) is never reached.
    f64::from(u32::try_from(tenths).unwrap_or(u32::MAX)) / 10.0
}
