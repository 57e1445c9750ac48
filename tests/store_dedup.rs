//! The dedup index in bounded memory: with a tiny in-memory bound every few ids are
//! spilled to run files and merged, and the answers must stay those of a map of
//! id -> (seq, recorded_at) with the window, across restarts, crashes and damaged runs.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use common::copy_dir;
use common::store::{append, measurement_at};
use kpi_service::store::{DedupStats, EventLog, Outcome, StoreOptions};
use proptest::prelude::*;

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn new() -> Self {
        let start = Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap();
        Self(Arc::new(AtomicI64::new(
            start.timestamp_nanos_opt().unwrap(),
        )))
    }

    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.0.load(Ordering::SeqCst))
    }

    fn advance(&self, by: TimeDelta) {
        self.0
            .fetch_add(by.num_nanoseconds().unwrap(), Ordering::SeqCst);
    }
}

const WINDOW_MINUTES: i64 = 60;

fn options(clock: &TestClock) -> StoreOptions {
    let clock = clock.clone();
    StoreOptions {
        dedup_window: TimeDelta::minutes(WINDOW_MINUTES),
        clock: Arc::new(move || clock.now()),
        // A part is frozen at half of this: a few dozen ids.
        dedup_memory_bytes: 4 * 1024,
        ..StoreOptions::default()
    }
}

fn dedup_dir(dir: &Path) -> PathBuf {
    dir.join("dedup")
}

fn run_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dedup_dir(dir))
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "run"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Waits until the background threads have spilled (and merged) what `done` asks for.
fn wait_for(log: &EventLog, done: impl Fn(&DedupStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = log.dedup_stats();
        if done(&stats) {
            return;
        }
        assert!(Instant::now() < deadline, "not spilled in time: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the index must answer: id -> (seq, recorded_at) of its last append.
#[derive(Default)]
struct Model {
    ids: HashMap<String, (u64, DateTime<Utc>)>,
    head: u64,
}

impl Model {
    /// The outcomes of appending `ids` (each a measurement, `None` without an id) at `now`.
    fn append(&mut self, ids: &[Option<String>], now: DateTime<Utc>) -> Vec<Outcome> {
        ids.iter()
            .map(|id| {
                if let Some(id) = id
                    && let Some((seq, at)) = self.ids.get(id)
                    && now - *at <= TimeDelta::minutes(WINDOW_MINUTES)
                {
                    return Outcome::Duplicate { seq: *seq };
                }
                self.head += 1;
                if let Some(id) = id {
                    self.ids.insert(id.clone(), (self.head, now));
                }
                Outcome::Appended { seq: self.head }
            })
            .collect()
    }
}

fn events(ids: &[Option<String>], at: DateTime<Utc>) -> Vec<kpi_service::domain::Event> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| measurement_at("revenue", i as f64, id.as_deref(), at))
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Append measurements with these ids (from a small pool, so retries are common).
    Append(Vec<Option<u16>>),
    /// Move the clock.
    Advance(u16),
    /// Close and open again.
    Restart,
    /// Open a copy of the directory taken while the log is open, as a kill -9 leaves it.
    Crash,
    /// Close, delete one run file, open again.
    DeleteRun(usize),
    /// Close, change one byte of one run file or of the manifest, open again.
    DamageRun(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => proptest::collection::vec(proptest::option::weighted(0.9, 0u16..120), 1..40)
            .prop_map(Op::Append),
        3 => (1u16..40).prop_map(Op::Advance),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => any::<usize>().prop_map(Op::DeleteRun),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(f, b)| Op::DamageRun(f, b)),
    ]
}

fn run_model(ops: Vec<Op>) {
    let root = tempfile::tempdir().unwrap();
    let mut dir = root.path().join("log-0");
    let clock = TestClock::new();
    let mut log = EventLog::open(&dir, options(&clock)).unwrap();
    let mut model = Model::default();
    let mut crashes = 0;
    for op in ops {
        match op {
            Op::Append(ids) => {
                let ids: Vec<Option<String>> = ids
                    .into_iter()
                    .map(|id| id.map(|n| format!("id-{n}")))
                    .collect();
                let now = clock.now();
                let outcomes = append(&log, events(&ids, now));
                assert_eq!(outcomes, model.append(&ids, now), "ids {ids:?}");
            }
            Op::Advance(minutes) => clock.advance(TimeDelta::minutes(i64::from(minutes))),
            Op::Restart => {
                log.close().unwrap();
                log = EventLog::open(&dir, options(&clock)).unwrap();
            }
            Op::Crash => {
                crashes += 1;
                let copy = root.path().join(format!("log-{crashes}"));
                copy_dir(&dir, &copy);
                log.close().unwrap();
                dir = copy;
                log = EventLog::open(&dir, options(&clock)).unwrap();
            }
            Op::DeleteRun(pick) => {
                log.close().unwrap();
                let files = run_files(&dir);
                if !files.is_empty() {
                    std::fs::remove_file(&files[pick % files.len()]).unwrap();
                }
                log = EventLog::open(&dir, options(&clock)).unwrap();
            }
            Op::DamageRun(pick, byte) => {
                log.close().unwrap();
                let mut files = run_files(&dir);
                files.push(dedup_dir(&dir).join("manifest"));
                let file = &files[pick % files.len()];
                if let Ok(mut bytes) = std::fs::read(file)
                    && !bytes.is_empty()
                {
                    let at = byte % bytes.len();
                    bytes[at] ^= 0x40;
                    std::fs::write(file, &bytes).unwrap();
                }
                log = EventLog::open(&dir, options(&clock)).unwrap();
            }
        }
    }
    // Every id of the model answers as the model says, through a retry.
    let ids: Vec<Option<String>> = model.ids.keys().cloned().map(Some).collect();
    let now = clock.now();
    let outcomes = append(&log, events(&ids, now));
    assert_eq!(outcomes, model.append(&ids, now));
    log.close().unwrap();
}

proptest! {
    // Every case opens sled directories and fsyncs each append: a few dozen cases.
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn the_index_answers_like_a_map_through_spills_merges_restarts_and_damage(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        run_model(ops);
    }
}

fn ids(range: std::ops::Range<u32>) -> Vec<Option<String>> {
    range.map(|n| Some(format!("order-{n:06}"))).collect()
}

/// Appends measurements with the ids of `range`, 100 a call; each must be new.
fn append_new_ids(log: &EventLog, clock: &TestClock, range: std::ops::Range<u32>) {
    for start in range.clone().step_by(100) {
        let batch = ids(start..(start + 100).min(range.end));
        let outcomes = append(log, events(&batch, clock.now()));
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Appended { .. }))
        );
    }
}

/// Fills a log with 3,000 ids through a tiny in-memory bound; returns it.
fn spilled_log(dir: &Path, clock: &TestClock) -> EventLog {
    let log = EventLog::open(dir, options(clock)).unwrap();
    append_new_ids(&log, clock, 0..3_000);
    // The spill thread catches up (4 fsyncs a spill) and the merge thread keeps few runs.
    wait_for(&log, |stats| stats.spilled_ids > 2_000 && stats.runs <= 6);
    log
}

/// Retries the first `count` ids, appended in order from seq 1: each is a duplicate.
fn assert_all_duplicates(log: &EventLog, clock: &TestClock, count: u32) {
    let outcomes = append(log, events(&ids(0..count), clock.now()));
    let expected: Vec<Outcome> = (1..=u64::from(count))
        .map(|seq| Outcome::Duplicate { seq })
        .collect();
    assert_eq!(outcomes, expected);
}

#[test]
fn spilled_ids_are_found_in_bounded_memory_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let log = spilled_log(dir.path(), &clock);
    assert!(log.dedup_stats().memory_ids < 1_000);
    assert_all_duplicates(&log, &clock, 3_000);
    assert_eq!(log.find_event_id("order-000007"), Some(8));
    log.close().unwrap();
    // After a graceful close everything is in runs: the open reads no log.
    let log = EventLog::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(log.dedup_stats().memory_ids, 0);
    assert_all_duplicates(&log, &clock, 3_000);
    // Out of the window, the ids are forgotten even while their run files remain.
    clock.advance(TimeDelta::minutes(WINDOW_MINUTES) + TimeDelta::seconds(1));
    let outcomes = append(&log, events(&ids(0..2), clock.now()));
    assert_eq!(
        outcomes,
        vec![
            Outcome::Appended { seq: 3_001 },
            Outcome::Appended { seq: 3_002 }
        ]
    );
    log.close().unwrap();
}

#[test]
fn deleted_or_damaged_runs_are_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    spilled_log(dir.path(), &clock).close().unwrap();
    let files = run_files(dir.path());
    assert!(!files.is_empty());
    std::fs::remove_file(&files[0]).unwrap();
    let log = EventLog::open(dir.path(), options(&clock)).unwrap();
    assert_all_duplicates(&log, &clock, 3_000);
    log.close().unwrap();
    // A changed byte in a page (found only when the page is read), with the log open: the
    // lookups that need it read the log instead, and the next open rebuilds.
    let log = EventLog::open(dir.path(), options(&clock)).unwrap();
    damage_every_page(dir.path());
    assert_all_duplicates(&log, &clock, 3_000);
    // The merge thread removes the manifest; the parts spilled after that are still
    // written, and found, until the next open.
    let manifest = dedup_dir(dir.path()).join("manifest");
    let deadline = Instant::now() + Duration::from_secs(30);
    while manifest.exists() {
        assert!(Instant::now() < deadline, "the manifest is still there");
        std::thread::sleep(Duration::from_millis(5));
    }
    append_new_ids(&log, &clock, 3_000..4_000);
    wait_for(&log, |stats| stats.memory_ids < 500);
    assert_all_duplicates(&log, &clock, 4_000);
    log.close().unwrap();
    let log = EventLog::open(dir.path(), options(&clock)).unwrap();
    assert_all_duplicates(&log, &clock, 4_000);
    log.close().unwrap();
}

/// Changes a byte in every page of every run file of the log in `dir` (a page is checked
/// only when it is read); the damaged files' bytes.
fn damage_every_page(dir: &Path) -> Vec<Vec<u8>> {
    run_files(dir)
        .iter()
        .map(|file| {
            let mut bytes = std::fs::read(file).unwrap();
            for page in 0..bytes.len() / 4096 {
                bytes[page * 4096 + 100] ^= 1;
            }
            std::fs::write(file, &bytes).unwrap();
            bytes
        })
        .collect()
}

#[test]
fn a_damaged_run_met_by_a_merge_at_start_makes_the_start_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    spilled_log(dir.path(), &clock).close().unwrap();
    let damaged = damage_every_page(dir.path());
    assert!(!damaged.is_empty());
    // 3,000 more ids that no part freezes for (a bound far above them), left to a start
    // by a crash: it reads them in parts of a few dozen, spills and merges them, and the
    // merges reach the damaged runs.
    let roomy = StoreOptions {
        dedup_memory_bytes: 64 << 20,
        ..options(&clock)
    };
    let log = EventLog::open(dir.path(), roomy).unwrap();
    append_new_ids(&log, &clock, 3_000..6_000);
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crashed.path());
    log.close().unwrap();
    let log = EventLog::open(crashed.path(), options(&clock)).unwrap();
    let left: Vec<PathBuf> = run_files(crashed.path())
        .into_iter()
        .filter(|file| damaged.contains(&std::fs::read(file).unwrap()))
        .collect();
    assert!(left.is_empty(), "damaged runs kept: {left:?}");
    assert_all_duplicates(&log, &clock, 6_000);
    log.close().unwrap();
}

#[test]
fn a_crash_keeps_the_runs_and_reads_only_the_log_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let log = spilled_log(dir.path(), &clock);
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    log.close().unwrap();
    let log = EventLog::open(copy.path(), options(&clock)).unwrap();
    let stats = log.dedup_stats();
    assert!(stats.spilled_ids > 2_000, "{stats:?}");
    assert!(stats.memory_ids < 1_000, "{stats:?}");
    assert_all_duplicates(&log, &clock, 3_000);
    log.close().unwrap();
}

/// The files under `<log>/dedup/` (the runs and their manifest), each with a hash of its
/// bytes.
fn dedup_files(dir: &Path) -> BTreeMap<PathBuf, u64> {
    std::fs::read_dir(dedup_dir(dir))
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let mut hasher = DefaultHasher::new();
            std::fs::read(&path).unwrap().hash(&mut hasher);
            (path, hasher.finish())
        })
        .collect()
}

/// A free-space minimum for a log in `dir` between half of what its file system has
/// available and all of it: the log opens and takes appends (it needs the minimum
/// available), but the dedup index has no room to spill or merge (it needs twice the
/// minimum beside the run).
///
/// Other processes fill and free space while the test runs: it goes wrong only if they
/// fill a quarter of what was available within its few seconds (the log then refuses
/// writes) or free half of it (runs are then written). The log's own writes take from
/// that quarter too: sled's file is preallocated 16 MiB ahead of its end, and the test
/// appends some hundred KiB. Below 256 MiB available a quarter is too close to that, so
/// the test asks for more rather than fail at random.
fn min_free_without_room_to_spill(dir: &Path) -> u64 {
    let stats = rustix::fs::statvfs(dir).unwrap();
    let available = stats.f_bavail.saturating_mul(stats.f_frsize);
    assert!(
        available >= 256 << 20,
        "this test needs 256 MiB available on the file system of {} (see TMPDIR); it has {available} bytes",
        dir.display()
    );
    available / 4 * 3
}

#[test]
fn without_room_for_runs_ids_stay_in_memory_and_a_start_does_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    // With room, the ids go to runs: the unchanged files below are not for want of ids.
    spilled_log(dir.path(), &clock).close().unwrap();
    let spilled = dedup_files(dir.path());
    assert!(!run_files(dir.path()).is_empty());
    let no_room = StoreOptions {
        min_free_bytes: min_free_without_room_to_spill(dir.path()),
        ..options(&clock)
    };
    // The writer freezes parts as before; the spill (and merge) thread finds no room, so
    // they stay in memory and are consulted. A close waits for the spill thread, which
    // tries once more before it ends.
    let log = EventLog::open(dir.path(), no_room.clone()).unwrap();
    append_new_ids(&log, &clock, 3_000..4_000);
    assert_all_duplicates(&log, &clock, 4_000);
    log.close().unwrap();
    assert_eq!(dedup_files(dir.path()), spilled);
    // A start without room reads the ids after the runs into memory, far past the bound
    // (a part is frozen at a few dozen), and opens.
    let log = EventLog::open(dir.path(), no_room).unwrap();
    let stats = log.dedup_stats();
    assert_eq!((stats.memory_ids, stats.spilled_ids), (1_000, 3_000));
    assert_all_duplicates(&log, &clock, 4_000);
    log.close().unwrap();
    assert_eq!(dedup_files(dir.path()), spilled);
    // With room again, the next start spills them.
    let log = EventLog::open(dir.path(), options(&clock)).unwrap();
    let stats = log.dedup_stats();
    assert!(stats.memory_ids < 1_000, "{stats:?}");
    assert_eq!(stats.memory_ids + stats.spilled_ids, 4_000);
    assert_all_duplicates(&log, &clock, 4_000);
    log.close().unwrap();
}
