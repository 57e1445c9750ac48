//! Restart time, resident memory and disk use of a server holding many events (issue 6).
//!
//! Builds (once, then reuses) a data directory of `KPI_RESTART_EVENTS` measurements
//! (default 10,000,000) through `EventLog::append_blocking` in 1000-event appends: 1,000
//! KPIs of mixed kinds (mostly SUM and COUNT, some AVERAGE, PERCENTILE, DISTINCT, NPS and
//! CSAT; timezones UTC, Europe/Amsterdam and America/New_York), a `channel` label with 4
//! values, occurred_at spread uniformly over the two years before the build, recorded
//! now (so every event is inside the 24 h dedup window), 60 % of them with a UUID-like
//! `event_id`. Then, each in a fresh process so that resident memory is its own:
//!
//! 1. `cold`: the start of `kpi_service::run` without a snapshot (open the log, rebuilding
//!    the dedup index; restore the read models from the whole log), then the snapshot a
//!    graceful shutdown writes, and the close;
//! 2. `sled`: sled's own open of the log directory, for comparison, with the service's
//!    cache capacity (16 MiB), then a read of every segment: what sled keeps of a scan
//!    (ReplayEvents or VerifyLog from seq 1) beyond its cache capacity;
//! 3. `warm` (three times): the start with that snapshot.
//!
//! Each prints wall times, VmRSS and VmHWM (`/proc/self/status`) after each step, and the
//! buckets the aggregates hold. Run:
//!
//! ```text
//! KPI_RESTART_EVENTS=10000000 KPI_RESTART_DIR=/tmp/kpi-restart-10m cargo bench --bench restart
//! ```
//!
//! The directory is kept (delete it to build again); the build takes about a minute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use kpi_service::domain::{Direction, Event, Grain, KpiDefinition, KpiKind, Measurement};
use kpi_service::service::{KpiService, ServiceOptions};
use kpi_service::store::{AppendRequest, EventLog, StoreOptions};
use kpi_service::{HISTORY_DIR, LOG_DIR, SNAPSHOT_DIR};

const KPIS: u64 = 1000;
const CHANNELS: [&str; 4] = ["web", "shop", "app", "phone"];
const APPEND_EVENTS: u64 = 1000;
/// Marker file in the data directory: the number of events it was built with.
const BUILT: &str = "restart-bench-built";

fn main() {
    let events: u64 = std::env::var("KPI_RESTART_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let dir = std::env::var_os("KPI_RESTART_DIR").map_or_else(
        || std::env::temp_dir().join(format!("kpi-restart-{events}")),
        PathBuf::from,
    );
    // The start's own log lines (snapshot discarded, dedup seed ignored, timings).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("kpi_service=info"))
        .with_writer(std::io::stderr)
        .init();
    match std::env::var("KPI_RESTART_PHASE").as_deref() {
        Ok("cold") => cold(&dir),
        Ok("warm") => warm(&dir),
        Ok("sled") => sled_only(&dir),
        _ => {
            build(&dir, events);
            for phase in ["cold", "sled", "warm", "warm", "warm"] {
                child(phase, &dir, events);
            }
        }
    }
}

/// Runs this binary again for one phase, with its own address space.
fn child(phase: &str, dir: &Path, events: u64) {
    let status = Command::new(std::env::current_exe().expect("own path"))
        .env("KPI_RESTART_PHASE", phase)
        .env("KPI_RESTART_DIR", dir)
        .env("KPI_RESTART_EVENTS", events.to_string())
        .status()
        .expect("start the phase");
    assert!(status.success(), "phase {phase} failed");
}

/// A small deterministic generator (SplitMix64), so every build holds the same data.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        // 53 random bits: exact in f64.
        f64::from(u32::try_from(self.next() >> 43).unwrap()) / f64::from(1u32 << 21)
    }
}

fn kind_of(kpi: u64) -> KpiKind {
    match kpi % 20 {
        0..=7 => KpiKind::Sum,
        8..=13 => KpiKind::Count,
        14 | 15 => KpiKind::Average,
        16 => KpiKind::Percentile,
        17 => KpiKind::Distinct,
        18 => KpiKind::Nps,
        _ => KpiKind::Csat,
    }
}

fn kpi_id(kpi: u64) -> String {
    format!(
        "kpi_{kpi:04}_{}",
        format!("{:?}", kind_of(kpi)).to_lowercase()
    )
}

fn definition(kpi: u64) -> KpiDefinition {
    KpiDefinition {
        id: kpi_id(kpi),
        name: format!("KPI {kpi}"),
        description: String::new(),
        unit: String::new(),
        kind: kind_of(kpi),
        direction: Direction::HigherIsBetter,
        timezone: [Tz::UTC, Tz::Europe__Amsterdam, Tz::America__New_York]
            [usize::try_from(kpi % 3).unwrap()],
        dimensions: vec!["channel".into()],
        ratio: None,
    }
}

fn measurement(random: &mut Random, ids: &[String], end: DateTime<Utc>) -> Event {
    const TWO_YEARS_MS: u64 = 730 * 24 * 3600 * 1000;
    let kpi = random.below(KPIS);
    let cents = || f64::from(u32::try_from(1 + random.below(50_000)).unwrap()) / 100.0;
    let mut cents = cents;
    let (value, subject) = match kind_of(kpi) {
        KpiKind::Count => (1.0, None),
        KpiKind::Percentile => (0.1 * 10f64.powf(3.0 * random.unit()), None),
        KpiKind::Distinct => (1.0, Some(format!("visitor-{}", random.below(100_000)))),
        KpiKind::Nps => (f64::from(u32::try_from(random.below(11)).unwrap()), None),
        KpiKind::Csat => (f64::from(u32::try_from(1 + random.below(5)).unwrap()), None),
        _ => (cents(), None),
    };
    let ago = i64::try_from(random.below(TWO_YEARS_MS)).unwrap();
    let channel = CHANNELS[usize::try_from(random.below(4)).unwrap()];
    let event_id = (random.below(10) < 6).then(|| {
        let (a, b) = (random.next(), random.next());
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    });
    Event::MeasurementRecorded(Measurement {
        kpi_id: ids[usize::try_from(kpi).unwrap()].clone(),
        value,
        occurred_at: end - TimeDelta::milliseconds(ago),
        labels: BTreeMap::from([("channel".into(), channel.into())]),
        subject,
        event_id,
    })
}

/// Builds the data directory unless it holds this many events already.
fn build(dir: &Path, events: u64) {
    let marker = dir.join(BUILT);
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&events.to_string()) {
        println!("data directory {} reused ({events} events)", dir.display());
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let log = EventLog::open(&dir.join(LOG_DIR), StoreOptions::default()).unwrap();
    log.append_blocking(AppendRequest {
        events: (0..KPIS)
            .map(|kpi| Event::KpiDefined {
                definition: definition(kpi),
            })
            .collect(),
        validation_unchanged_since: None,
        ..Default::default()
    })
    .unwrap();
    let ids: Vec<String> = (0..KPIS).map(kpi_id).collect();
    let end = Utc::now() - TimeDelta::hours(1);
    let mut random = Random(6);
    let mut appended = 0;
    while appended < events {
        let count = APPEND_EVENTS.min(events - appended);
        let batch = (0..count)
            .map(|_| measurement(&mut random, &ids, end))
            .collect();
        log.append_blocking(AppendRequest {
            events: batch,
            validation_unchanged_since: None,
            ..Default::default()
        })
        .unwrap();
        appended += count;
    }
    log.close().unwrap();
    std::fs::write(&marker, events.to_string()).unwrap();
    let bytes = dir_bytes(&dir.join(LOG_DIR));
    println!(
        "built {events} events + {KPIS} definitions in {:.1} s: log {bytes} bytes, {:.1} bytes/measurement",
        started.elapsed().as_secs_f64(),
        bytes as f64 / events as f64
    );
}

fn options(dir: &Path) -> ServiceOptions {
    ServiceOptions {
        snapshot_dir: dir.join(SNAPSHOT_DIR),
        max_future_skew: TimeDelta::minutes(5),
        max_streams: 1024,
        max_kpis: 10_000,
        heartbeat: Duration::from_secs(5),
        min_free_bytes: kpi_service::store::DEFAULT_MIN_FREE_BYTES,
        signing_key: None,
    }
}

/// The start without a snapshot, then the graceful shutdown's snapshot and close.
fn cold(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join(SNAPSHOT_DIR));
    let (service, log) = start("restart_without_snapshot", dir);
    let started = Instant::now();
    let seq = service.snapshot().unwrap();
    let snapshot = dir_bytes(&dir.join(SNAPSHOT_DIR));
    println!(
        "  snapshot at seq {seq}: written in {:.2} s, {snapshot} bytes ({:.1} bytes/event); {}",
        started.elapsed().as_secs_f64(),
        snapshot as f64 / seq as f64,
        memory()
    );
    let started = Instant::now();
    log.close().unwrap();
    println!("  log closed in {:.2} s", started.elapsed().as_secs_f64());
}

/// The start with the snapshot the cold phase wrote.
fn warm(dir: &Path) {
    let (service, log) = start("restart_with_snapshot", dir);
    assert_eq!(
        service.restored().replayed_events,
        0,
        "a snapshot at the head"
    );
    log.close().unwrap();
}

/// What `kpi_service::run` does before it serves: open the log, restore the read models.
/// Returns the service and its log (to close it).
fn start(name: &str, dir: &Path) -> (KpiService, EventLog) {
    println!("{name}: {}", memory());
    let started = Instant::now();
    let (log, models) = kpi_service::projection::open(
        &dir.join(LOG_DIR),
        &dir.join(SNAPSHOT_DIR),
        &dir.join(HISTORY_DIR),
        kpi_service::projection::TierOptions {
            pages_dir: dir.join(kpi_service::PAGES_DIR),
            budget: kpi_service::config::Config::with_data_dir(dir)
                .bucket_memory_bytes()
                .unwrap(),
        },
        StoreOptions::default(),
    )
    .unwrap();
    let opened = started.elapsed();
    let aggregates = models.aggregates.clone();
    let service = KpiService::with_models(log.clone(), models, options(dir));
    let total = started.elapsed();
    let restored = service.restored();
    let footprint = aggregates.read().footprint();
    println!(
        "  snapshot read+decode done after {:.2} s, log open with dedup index done after \
         {:.2} s (side by side), read models (snapshot at {}, {} replayed) {:.2} s; {:.2} s \
         in all; {}",
        restored.snapshot_load.as_secs_f64(),
        restored.log_open.as_secs_f64(),
        restored.snapshot_seq,
        restored.replayed_events,
        restored.models.as_secs_f64(),
        opened.as_secs_f64(),
        memory()
    );
    let buckets: usize = footprint.buckets.iter().sum();
    println!(
        "  total {:.2} s; {} series, {buckets} buckets ({})",
        total.as_secs_f64(),
        footprint.series,
        Grain::ALL
            .iter()
            .zip(footprint.buckets)
            .map(|(grain, n)| format!("{grain:?} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    (service, log)
}

/// sled's own open of the log, with the tree's last key read, then a read of every
/// segment.
fn sled_only(dir: &Path) {
    let started = Instant::now();
    let db = sled::Config::new()
        .path(dir.join(LOG_DIR))
        .cache_capacity(16 * 1024 * 1024)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let tree = db.open_tree("segments").unwrap();
    let last = tree.last().unwrap().map(|(key, _)| key.len());
    let elapsed = started.elapsed();
    println!(
        "sled open alone: {:.2} s (last key {last:?}); {}",
        elapsed.as_secs_f64(),
        memory()
    );
    let started = Instant::now();
    let (mut keys, mut bytes) = (0u64, 0u64);
    for entry in tree.iter() {
        let (_, value) = entry.unwrap();
        keys += 1;
        bytes += value.len() as u64;
    }
    println!(
        "sled read of every segment ({keys} keys, {bytes} bytes, cache 16 MiB): {:.2} s; {}",
        started.elapsed().as_secs_f64(),
        memory()
    );
}

/// VmRSS and VmHWM of this process.
fn memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map_or("?".into(), |rest| {
                let kib: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                format!("{:.0} MiB", kib as f64 / 1024.0)
            })
    };
    format!("RSS {} (peak {})", field("VmRSS:"), field("VmHWM:"))
}

/// Bytes of the files under `path`.
fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
