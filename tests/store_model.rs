//! The event log against an in-memory model, in the style of sled's own `tests/tree`:
//! random appends (with duplicate ids and stale guards), reads, verifications and
//! restarts, checked operation by operation. Plus the behaviours a model cannot show:
//! dedup expiry with a controlled clock, group commit, listeners, as-of lookups.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use common::store::{append, measurement_at, read};
use kpi_service::domain::Event;
use kpi_service::store::{
    AppendError, AppendRequest, CommitListener, Committed, EventLog, Outcome, StoreOptions,
    StoredEvent,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn starting_at(at: DateTime<Utc>) -> Self {
        Self(Arc::new(AtomicI64::new(at.timestamp_nanos_opt().unwrap())))
    }

    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.0.load(Ordering::SeqCst))
    }

    fn advance(&self, by: TimeDelta) {
        self.0
            .fetch_add(by.num_nanoseconds().unwrap(), Ordering::SeqCst);
    }

    fn options(&self, dedup_window: TimeDelta) -> StoreOptions {
        let clock = self.clone();
        StoreOptions {
            dedup_window,
            clock: Arc::new(move || clock.now()),
            ..StoreOptions::default()
        }
    }
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap()
}

fn measurement(kpi_id: &str, value: f64, event_id: Option<&str>) -> Event {
    measurement_at(kpi_id, value, event_id, start())
}

// ----- the model test ---------------------------------------------------------------

/// One event of a generated append.
#[derive(Debug, Clone)]
enum EventSpec {
    /// A measurement of one of a few KPIs, with an id from a small pool (so retries
    /// happen) or none.
    Measurement { kpi: u8, value: i16, id: Option<u8> },
    /// An event that affects validation (moves the guard).
    Retire { kpi: u8 },
}

impl EventSpec {
    fn event(&self) -> Event {
        match self {
            Self::Measurement { kpi, value, id } => measurement(
                &format!("kpi_number_{kpi}"),
                f64::from(*value) / 4.0,
                id.map(|id| format!("order-{id}")).as_deref(),
            ),
            Self::Retire { kpi } => Event::KpiRetired {
                kpi_id: format!("kpi_number_{kpi}"),
                reason: "model".into(),
                version: 2,
            },
        }
    }
}

#[derive(Debug, Clone)]
enum Guard {
    None,
    /// The current head: never refused, since appends here are one per group.
    Fresh,
    /// This many seqs before the head: refused if an event that affects validation came
    /// since.
    Stale(u8),
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        events: Vec<EventSpec>,
        guard: Guard,
    },
    Read {
        from: u8,
        len: u8,
    },
    Verify,
    Restart,
    /// Drop every handle without closing, then open again.
    DropAndReopen,
}

fn event_spec() -> impl Strategy<Value = EventSpec> {
    prop_oneof![
        9 => (0_u8..3, any::<i16>(), proptest::option::weighted(0.7, 0_u8..8))
            .prop_map(|(kpi, value, id)| EventSpec::Measurement { kpi, value, id }),
        1 => (0_u8..3).prop_map(|kpi| EventSpec::Retire { kpi }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let guard = prop_oneof![
        2 => Just(Guard::None),
        1 => Just(Guard::Fresh),
        1 => (0_u8..6).prop_map(Guard::Stale),
    ];
    prop_oneof![
        8 => (proptest::collection::vec(event_spec(), 0..12), guard)
            .prop_map(|(events, guard)| Op::Append { events, guard }),
        3 => (0_u8..40, 0_u8..20).prop_map(|(from, len)| Op::Read { from, len }),
        1 => Just(Op::Verify),
        1 => Just(Op::Restart),
        1 => Just(Op::DropAndReopen),
    ]
}

/// What the log should hold.
#[derive(Default)]
struct Model {
    events: Vec<Event>,
    ids: HashMap<String, u64>,
    /// Seq of the last event that affects validation appended since the log was (re)opened.
    last_validation_change_seq: u64,
}

impl Model {
    fn head(&self) -> u64 {
        u64::try_from(self.events.len()).unwrap()
    }

    fn append(&mut self, events: &[Event], guard: Option<u64>) -> Result<Vec<Outcome>, ()> {
        if guard.is_some_and(|since| self.last_validation_change_seq > since) {
            return Err(());
        }
        let mut outcomes = Vec::new();
        for event in events {
            if let Some(seq) = event.event_id().and_then(|id| self.ids.get(id)) {
                outcomes.push(Outcome::Duplicate { seq: *seq });
                continue;
            }
            self.events.push(event.clone());
            let seq = self.head();
            if let Some(id) = event.event_id() {
                self.ids.insert(id.to_owned(), seq);
            }
            if event.affects_validation() {
                self.last_validation_change_seq = seq;
            }
            outcomes.push(Outcome::Appended { seq });
        }
        Ok(outcomes)
    }
}

/// Checks that `events` are `from..` of the model and that their hashes chain with
/// SHA-256 from the stored prev_hash.
fn check_read(model: &Model, from: u64, events: &[StoredEvent]) {
    let mut prev_hash = events.first().map(|event| event.prev_hash);
    for (seq, event) in (from..).zip(events) {
        assert_eq!(event.seq, seq);
        assert_eq!(
            &event.event,
            &model.events[usize::try_from(seq - 1).unwrap()]
        );
        assert_eq!(Some(event.prev_hash), prev_hash, "prev_hash of seq {seq}");
        let mut hasher = Sha256::new();
        hasher.update(event.prev_hash);
        hasher.update(seq.to_be_bytes());
        hasher.update(&event.record);
        let hash: [u8; 32] = hasher.finalize().into();
        assert_eq!(event.hash, hash, "hash of seq {seq}");
        prev_hash = Some(event.hash);
    }
    if let (1, Some(first)) = (from, events.first()) {
        assert_eq!(first.prev_hash, [0; 32]);
    }
    for pair in events.windows(2) {
        assert!(pair[0].recorded_at <= pair[1].recorded_at);
    }
}

fn run_model(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::starting_at(start());
    let open = |dir: &Path| EventLog::open(dir, clock.options(TimeDelta::hours(24))).unwrap();
    let mut log = open(dir.path());
    let mut model = Model::default();

    for op in ops {
        // Time moves on between operations, as it does between requests.
        clock.advance(TimeDelta::milliseconds(7));
        match op {
            Op::Append { events, guard } => {
                let events: Vec<Event> = events.iter().map(EventSpec::event).collect();
                let guard = match guard {
                    Guard::None => None,
                    Guard::Fresh => Some(model.head()),
                    Guard::Stale(back) => Some(model.head().saturating_sub(u64::from(back))),
                };
                let expected = model.append(&events, guard);
                let actual = log.append_blocking(AppendRequest {
                    events,
                    validation_unchanged_since: guard,
                    ..Default::default()
                });
                match (expected, actual) {
                    (Ok(expected), Ok(actual)) => assert_eq!(actual, expected),
                    (Err(()), Err(AppendError::ValidationStale { .. })) => {}
                    (expected, actual) => panic!("expected {expected:?}, got {actual:?}"),
                }
            }
            Op::Read { from, len } => {
                let from = u64::from(from);
                let to = from + u64::from(len);
                let events = read(&log, from, to);
                let first = from.max(1);
                let expected = to.min(model.head()).saturating_sub(first - 1);
                assert_eq!(
                    events.len(),
                    usize::try_from(expected).unwrap(),
                    "read {from}..={to}"
                );
                check_read(&model, first, &events);
            }
            Op::Verify => {
                let verification = log.verify().unwrap();
                assert_eq!(verification.result, Ok(log.head().hash));
                assert_eq!(verification.checked_events, model.head());
                assert_eq!(verification.head_seq, model.head());
            }
            Op::Restart => {
                let head = log.head();
                log.close().unwrap();
                log = open(dir.path());
                assert_eq!(log.head(), head);
                model.last_validation_change_seq = 0;
            }
            Op::DropAndReopen => {
                let head = log.head();
                drop(log);
                log = open(dir.path());
                assert_eq!(log.head(), head);
                model.last_validation_change_seq = 0;
            }
        }
        assert_eq!(log.head().seq, model.head());
        for id in 0..8 {
            let id = format!("order-{id}");
            assert_eq!(log.find_event_id(&id), model.ids.get(&id).copied(), "{id}");
        }
    }

    let all = read(&log, 1, u64::MAX);
    assert_eq!(all.len(), model.events.len());
    check_read(&model, 1, &all);
    if let Some(last) = all.last() {
        assert_eq!(last.hash, log.head().hash);
    }
    log.close().unwrap();
}

proptest! {
    // Each case opens a fresh sled directory and every append is an fsync, so a few dozen
    // cases of up to 40 operations keep this to a few seconds.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_log_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(ops);
    }
}

// ----- what the model cannot show -----------------------------------------------------

#[test]
fn dedup_ids_expire_after_the_window_and_survive_restarts_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::starting_at(start());
    let window = TimeDelta::hours(1);
    let open = || EventLog::open(dir.path(), clock.options(window)).unwrap();

    let log = open();
    assert_eq!(
        append(&log, vec![measurement("signups", 1.0, Some("a"))]),
        [Outcome::Appended { seq: 1 }]
    );
    clock.advance(TimeDelta::minutes(30));
    log.close().unwrap();

    // Inside the window, after a restart: the index was rebuilt from the log.
    let log = open();
    assert_eq!(log.find_event_id("a"), Some(1));
    assert_eq!(
        append(&log, vec![measurement("signups", 1.0, Some("a"))]),
        [Outcome::Duplicate { seq: 1 }]
    );
    // Exactly the window after it: still a duplicate.
    clock.advance(TimeDelta::minutes(30));
    assert_eq!(
        append(
            &log,
            vec![
                measurement("signups", 1.0, Some("a")),
                measurement("signups", 1.0, Some("b")),
            ]
        ),
        [Outcome::Duplicate { seq: 1 }, Outcome::Appended { seq: 2 }]
    );
    // Past it: the id is new again.
    clock.advance(TimeDelta::seconds(1));
    assert_eq!(
        append(&log, vec![measurement("signups", 1.0, Some("a"))]),
        [Outcome::Appended { seq: 3 }]
    );
    assert_eq!(log.find_event_id("a"), Some(3));
    log.close().unwrap();

    // The rebuild takes the ids inside the window before the head (recorded at
    // 09:00:01): "b" (seq 2, 09:00:00) and the second "a", not the first.
    clock.advance(TimeDelta::hours(1));
    let log = open();
    assert_eq!(log.find_event_id("a"), Some(3));
    assert_eq!(log.find_event_id("b"), Some(2));
    assert_eq!(
        append(&log, vec![measurement("signups", 1.0, Some("b"))]),
        [Outcome::Appended { seq: 4 }],
        "b was recorded 1 h 1 s ago"
    );
    log.close().unwrap();

    let log = open();
    assert_eq!(log.find_event_id("b"), Some(4));
    log.close().unwrap();
}

#[test]
fn a_request_dedups_within_itself() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let outcomes = append(
        &log,
        vec![
            measurement("signups", 1.0, Some("x")),
            measurement("signups", 1.0, None),
            measurement("signups", 2.0, Some("x")),
            measurement("signups", 1.0, None),
        ],
    );
    assert_eq!(
        outcomes,
        [
            Outcome::Appended { seq: 1 },
            Outcome::Appended { seq: 2 },
            Outcome::Duplicate { seq: 1 },
            Outcome::Appended { seq: 3 },
        ]
    );
    log.close().unwrap();
}

/// Records what it is told, and the committed head it sees while being told.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(u64, DateTime<Utc>, Event)>>,
}

impl CommitListener for Recorder {
    fn committed(&self, events: &[Committed<'_>]) {
        let mut seen = self.seen.lock().unwrap();
        for committed in events {
            seen.push((
                committed.seq,
                committed.recorded_at,
                committed.event.clone(),
            ));
        }
    }
}

#[test]
fn concurrent_appends_share_flushes_and_stay_atomic() {
    const THREADS: u64 = 8;
    const APPENDS: u64 = 25;
    const EVENTS: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let recorder = Arc::new(Recorder::default());
    log.add_listener(recorder.clone());
    let barrier = Barrier::new(usize::try_from(THREADS).unwrap());

    let outcomes: Vec<Vec<Vec<Outcome>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (log, barrier) = (&log, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    (0..APPENDS)
                        .map(|append_index| {
                            let events = (0..EVENTS)
                                .map(|event| {
                                    let id = format!("t{thread}-a{append_index}-e{event}");
                                    measurement("page_views", 1.0, Some(&id))
                                })
                                .collect();
                            append(log, events)
                        })
                        .collect()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    });

    let requests = THREADS * APPENDS;
    let total = requests * EVENTS;
    let mut seqs: Vec<u64> = Vec::new();
    for request in outcomes.iter().flatten() {
        let request_seqs: Vec<u64> = request.iter().map(|outcome| outcome.seq()).collect();
        // A request's events are contiguous: nothing of another request in between.
        let first = request_seqs[0];
        assert_eq!(request_seqs, (first..first + EVENTS).collect::<Vec<_>>());
        seqs.extend(request_seqs);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "gap-free seqs");

    let stats = log.stats();
    assert_eq!(stats.events, total);
    assert!(
        stats.flushes < requests,
        "{requests} concurrent appends took {} flushes",
        stats.flushes
    );

    // Listeners saw every event once, in seq order, as stored.
    let seen = recorder.seen.lock().unwrap().clone();
    let stored = read(&log, 1, total);
    assert_eq!(seen.len(), stored.len());
    for ((seq, recorded_at, event), stored) in seen.iter().zip(&stored) {
        assert_eq!(
            (*seq, *recorded_at, event),
            (stored.seq, stored.recorded_at, &stored.event)
        );
    }
    log.close().unwrap();
}

#[test]
fn the_guard_refuses_requests_validated_before_a_definition_change() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    append(&log, vec![measurement("signups", 1.0, None)]);
    let validated_at = log.head().seq;
    append(
        &log,
        vec![Event::KpiRetired {
            kpi_id: "signups".into(),
            reason: "replaced".into(),
            version: 2,
        }],
    );
    let stale = log.append_blocking(AppendRequest {
        events: vec![measurement("signups", 1.0, Some("late"))],
        validation_unchanged_since: Some(validated_at),
        ..Default::default()
    });
    assert!(
        matches!(stale, Err(AppendError::ValidationStale { .. })),
        "{stale:?}"
    );
    assert_eq!(log.head().seq, 2, "nothing of a refused request is stored");
    assert_eq!(log.find_event_id("late"), None);

    let fresh = log.append_blocking(AppendRequest {
        events: vec![measurement("signups", 1.0, Some("late"))],
        validation_unchanged_since: Some(log.head().seq),
        ..Default::default()
    });
    assert_eq!(fresh.unwrap(), [Outcome::Appended { seq: 3 }]);
    log.close().unwrap();
}

#[test]
fn seq_at_finds_the_last_event_recorded_at_or_before_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::starting_at(start());
    let log = EventLog::open(dir.path(), clock.options(TimeDelta::hours(24))).unwrap();
    assert_eq!(log.seq_at(start()).unwrap(), 0);

    // 60 appends of 1 to 5 events, 10 s apart: many segments for the binary search.
    let mut recorded: Vec<(DateTime<Utc>, u64)> = Vec::new();
    for append_index in 0..60_u64 {
        let events = (0..append_index % 5 + 1)
            .map(|_| measurement("signups", 1.0, None))
            .collect();
        append(&log, events);
        recorded.push((clock.now(), log.head().seq));
        clock.advance(TimeDelta::seconds(10));
    }
    for event in read(&log, 1, u64::MAX) {
        assert!(log.seq_at(event.recorded_at).unwrap() >= event.seq);
    }
    for (at, head) in &recorded {
        assert_eq!(log.seq_at(*at).unwrap(), *head, "at {at}");
        assert_eq!(log.seq_at(*at + TimeDelta::seconds(5)).unwrap(), *head);
        let before = *at - TimeDelta::nanoseconds(1);
        let expected = recorded
            .iter()
            .filter(|(other, _)| *other <= before)
            .map(|(_, seq)| *seq)
            .max()
            .unwrap_or(0);
        assert_eq!(log.seq_at(before).unwrap(), expected);
    }
    assert_eq!(log.seq_at(start() - TimeDelta::days(1)).unwrap(), 0);
    assert_eq!(
        log.seq_at(DateTime::<Utc>::MAX_UTC).unwrap(),
        log.head().seq
    );
    log.close().unwrap();
}

#[test]
fn recorded_at_never_goes_back_when_the_clock_does() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::starting_at(start());
    let log = EventLog::open(dir.path(), clock.options(TimeDelta::hours(24))).unwrap();
    append(&log, vec![measurement("signups", 1.0, None)]);
    clock.advance(TimeDelta::minutes(-5));
    append(&log, vec![measurement("signups", 1.0, None)]);
    let events = read(&log, 1, 2);
    assert_eq!(events[0].recorded_at, start());
    assert_eq!(events[1].recorded_at, start());
    log.close().unwrap();
}

#[test]
fn async_appends_from_many_tasks_are_all_durable() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    let head = runtime.block_on(async {
        let tasks: Vec<_> = (0..20_u32)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    // Every fifth task sends a large request, prepared on the blocking pool.
                    let size = if task % 5 == 0 { 200 } else { 3 };
                    let events = (0..size)
                        .map(|event| {
                            let id = format!("task{task}-{event}");
                            measurement("page_views", 1.0, Some(&id))
                        })
                        .collect();
                    log.append(AppendRequest {
                        events,
                        validation_unchanged_since: None,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .len()
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += u64::try_from(task.await.unwrap()).unwrap();
        }
        total
    });
    assert_eq!(log.head().seq, head);
    assert_eq!(head, 4 * 200 + 16 * 3);
    // Dropping the last handle without close keeps every acknowledged event.
    drop(log);
    let log = EventLog::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(log.head().seq, head);
    assert_eq!(log.verify().unwrap().result, Ok(log.head().hash));
    log.close().unwrap();
}
