//! The power-cut test of issue 12: a log that never loses an acknowledged event.
//!
//! The real `kpi-server` (`KPI_SERVER_BIN`) runs with its data directory on the power-cut
//! filesystem and small snapshot intervals. Each round, 4 writers (2 with unary `Record`,
//! 2 with `RecordStream`, switching every round) ingest batches of measurements with
//! unique event ids (a few are bulk batches of thousands, large enough for sled to write
//! blob files) and remember every acknowledged (event_id, seq). At a random moment
//! the server is SIGKILLed and reaped, the power is cut (everything not fsynced is lost),
//! and the server restarts on what survived. Then:
//! - every event ever acknowledged is in the log at its seq (ReplayEvents of the whole
//!   log), no seq was acknowledged twice, every acknowledged KPI definition is there, and
//!   what an earlier restart served is unchanged (the hash at its head);
//! - an unacknowledged batch is in the log whole or not at all;
//! - VerifyLog finds the chain intact, and GetLogInfo agrees with it and with the replay;
//! - GetAggregates of every KPI at DAY and MONTH (grouped by channel) equals the answer of
//!   a second server started on a copy of the data directory without `snapshots/`, i.e.
//!   a rebuild from the log;
//! - re-sending acknowledged measurements returns `duplicate` with the original seq and
//!   stores nothing.
//!
//! The data directory `<mount>/data` is created and synced by the test, as an operator's
//! directory would be; everything inside it is the server's to make durable.
//!
//! Seeded: the seed is printed, `POWERCUT_SEED` repeats a run (thread timing still
//! varies), `POWERCUT_ROUNDS` changes the number of rounds (default 20). About 100 seconds
//! on a 2-core machine when nothing fails; every call has a timeout, and every server is
//! SIGKILLed when the test ends, passes or fails.
//!
//! `.ci/power-cut` runs it: `KPI_SERVER_BIN=target/release/kpi-server cargo test --release
//! -p kpi-powercut -- --nocapture` by hand.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::fs::File;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::server::{ServerProcess, server_binary};
use common::workload::{self, BatchKey, EventKey};
use kpi_powercut::{CutReport, PowerCutFs, Stats};
use kpi_service::proto::audit_client::AuditClient;
use kpi_service::proto::event_record::Payload;
use kpi_service::proto::ingest_client::IngestClient;
use kpi_service::proto::kpi_catalog_client::KpiCatalogClient;
use kpi_service::proto::query_client::QueryClient;
use kpi_service::proto::{self, replay_events_response};
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Rounds when `POWERCUT_ROUNDS` is not set.
const DEFAULT_ROUNDS: u64 = 20;

/// Concurrent writers, each with its own connection.
const WRITERS: u8 = 4;

/// `--snapshot-every-events`: a few thousand, so the server (which looks every 5 seconds)
/// writes snapshots during the rounds and some cuts land in one.
const SNAPSHOT_EVERY_EVENTS: u64 = 3_000;

/// When the server is killed, in milliseconds after the writers start. Up to 6 s, so that
/// with the checks before it a server lives past its 5-second snapshot tick in some rounds.
const KILL_AFTER_MS: RangeInclusive<u64> = 200..=6_000;

/// Measurements per batch: from 1 to this many.
const MAX_BATCH: u16 = 24;

/// One batch in this many is a bulk batch of `BULK_BATCH` measurements instead: its
/// segments are large enough that sled stores tree pages in separate blob files.
const BULK_ONE_IN: u32 = 250;

/// The size of a bulk batch.
const BULK_BATCH: RangeInclusive<u16> = 1_000..=4_000;

/// A writer waits up to this many milliseconds between batches, which keeps the log (and
/// so the whole-log checks of every round) small enough for 20 rounds in a few minutes.
const PACE_MS: u64 = 30;

/// Batches a stream writer keeps unacknowledged, so a cut finds several in flight.
const STREAM_WINDOW: usize = 3;

/// The longest any single call may take before the test calls it hung.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the writers may take to notice the kill and stop.
const WRITERS_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Acknowledged events from the whole history re-sent each round, on top of the last
/// acknowledged batch of every writer.
const RESEND_SAMPLE: usize = 300;

/// Examples a violation lists.
const EXAMPLES: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_power_cuts() {
    let binary = server_binary();
    let rounds = env_u64("POWERCUT_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    let seed = env_u64("POWERCUT_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                elapsed.as_secs() ^ u64::from(elapsed.subsec_nanos())
            })
    });
    println!(
        "power-cut test: seed {seed}, {rounds} rounds \
         (POWERCUT_SEED={seed} POWERCUT_ROUNDS={rounds} repeats it)"
    );
    let started = Instant::now();
    let base_seconds = unix_seconds_now() / 3600 * 3600;
    let mut rng = Pcg64Mcg::seed_from_u64(seed);

    // Logs and the rebuild's copies; kept when the test fails, removed when it passes.
    let scratch = tempfile::Builder::new()
        .prefix("powercut-scratch-")
        .tempdir()
        .expect("scratch directory")
        .keep();
    // Declared in this order so that they drop in reverse: servers killed, then the
    // filesystem unmounted, then the mountpoint removed.
    let mountpoint = tempfile::Builder::new()
        .prefix("powercut-mount-")
        .tempdir()
        .expect("mountpoint");
    let mut fs = PowerCutFs::new()
        .mount(mountpoint.path())
        .expect("mount the power-cut filesystem (needs /dev/fuse, and root or fusermount3)");
    let data_dir = fs.path().join("data");
    std::fs::create_dir(&data_dir).expect("create the data directory");
    sync_dir(&data_dir);
    sync_dir(fs.path());

    let server_args = vec![
        "--snapshot-every-events".to_owned(),
        SNAPSHOT_EVERY_EVENTS.to_string(),
    ];
    let context = RunContext {
        binary,
        seed,
        rounds,
        base_seconds,
        server_args,
        scratch,
    };
    let mut server = context
        .start_server("main", &data_dir, 0)
        .await
        .unwrap_or_else(|error| panic!("the first server did not start: {error}"));
    let mut ledger = Ledger::default();
    define_kpis(&server, &mut ledger).await;

    for round in 1..=rounds {
        let round_started = Instant::now();
        let round = u32::try_from(round).expect("fewer than 2^32 rounds");
        let kill_after = Duration::from_millis(rng.random_range(KILL_AFTER_MS));

        // Writes, then the kill at a random moment.
        let killed = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                tokio::spawn(run_writer(WriterPlan {
                    seed,
                    round,
                    writer,
                    base_seconds,
                    uri: server.uri(),
                    killed: Arc::clone(&killed),
                }))
            })
            .collect();
        tokio::time::sleep(kill_after).await;
        killed.store(true, Ordering::SeqCst);
        let before_cut = fs.stats();
        server.kill();
        let mut reports = Vec::new();
        for writer in writers {
            let report = tokio::time::timeout(WRITERS_STOP_TIMEOUT, writer)
                .await
                .expect("the writers stop once the server is gone")
                .expect("a writer task panicked");
            reports.push(report);
        }

        // The power cut, then a restart on what survived and a rebuild beside it.
        let cut = fs.cut().expect("cut the power");
        let survived = list_tree(&data_dir);
        let rebuild_dir = context.scratch.join(format!("rebuild-{round}"));
        copy_without_snapshots(&data_dir, &rebuild_dir);
        let mut round_report = RoundReport {
            round,
            kill_after,
            before_cut,
            cut,
            survived,
            ..RoundReport::default()
        };
        let mut violations = ledger.record_round(&reports, &mut round_report);
        server = match context.start_server("main", &data_dir, round).await {
            Ok(server) => server,
            Err(error) => {
                violations.push(format!("the server did not restart after the cut: {error}"));
                context.fail(&round_report, &violations, None);
            }
        };
        let mut rebuild = match context.start_server("rebuild", &rebuild_dir, round).await {
            Ok(rebuild) => rebuild,
            Err(error) => {
                violations.push(format!(
                    "a server on a copy of the data directory without snapshots/ did not \
                     start: {error}"
                ));
                context.fail(&round_report, &violations, Some(&server));
            }
        };
        let clients = Clients::new(&server);
        let rebuild_clients = Clients::new(&rebuild);
        violations.extend(
            check_after_restart(
                &context,
                &mut ledger,
                &clients,
                &rebuild_clients,
                &mut round_report,
                &mut rng,
            )
            .await,
        );
        rebuild.kill();
        // The copy is only needed while its server runs, unless something is to be looked at.
        if violations.is_empty() {
            let _ = std::fs::remove_dir_all(&rebuild_dir);
        } else {
            context.fail(&round_report, &violations, Some(&server));
        }
        let stats = fs.stats();
        println!(
            "round {round:>2}/{rounds}: killed after {} ms; acknowledged {} batches ({} events), \
             {} in flight ({} kept); cut dropped {} pages, {} sizes, {} entries; head {} \
             (snapshot {} + {} replayed); fsync {} fdatasync {} fsyncdir {}; {:.1} s",
            kill_after.as_millis(),
            round_report.acked_batches,
            round_report.acked_events,
            round_report.in_flight_batches,
            round_report.in_flight_kept,
            round_report.cut.pages_discarded,
            round_report.cut.sizes_reverted,
            round_report.cut.entries_reverted,
            round_report.head_seq,
            round_report.restored_snapshot_seq,
            round_report.replayed_events,
            stats.fsyncs,
            stats.fdatasyncs,
            stats.fsyncdirs,
            round_started.elapsed().as_secs_f64(),
        );
    }
    println!(
        "power-cut test passed: {rounds} rounds, {} acknowledged events, {:.1} s",
        ledger.durable.len(),
        started.elapsed().as_secs_f64()
    );
    drop(server);
    fs.unmount().expect("unmount the power-cut filesystem");
    let _ = std::fs::remove_dir_all(&context.scratch);
}

/// What every round needs to know about the run.
struct RunContext {
    binary: PathBuf,
    seed: u64,
    rounds: u64,
    base_seconds: i64,
    server_args: Vec<String>,
    /// Logs and the rebuild's copies, on an ordinary filesystem.
    scratch: PathBuf,
}

impl RunContext {
    async fn start_server(
        &self,
        name: &str,
        data_dir: &Path,
        round: u32,
    ) -> Result<ServerProcess, String> {
        let log = self.scratch.join(format!("{name}-{round}.log"));
        ServerProcess::start(&self.binary, name, data_dir, &self.server_args, &log).await
    }

    /// Fails the test with everything known about the round.
    fn fail(
        &self,
        report: &RoundReport,
        violations: &[String],
        server: Option<&ServerProcess>,
    ) -> ! {
        let mut message = format!(
            "power cut in round {} of {} broke durability (seed {}; POWERCUT_SEED={} repeats \
             the run):\n",
            report.round, self.rounds, self.seed, self.seed
        );
        for violation in violations {
            let _ = writeln!(message, "  - {violation}");
        }
        let _ = writeln!(message, "what happened:\n{}", report.describe());
        if let Some(server) = server {
            let _ = writeln!(
                message,
                "  the restarted server's log:\n{}",
                server.log_tail()
            );
        }
        let _ = writeln!(
            message,
            "  every server's log, and the data directory as the rebuild saw it, are in {}",
            self.scratch.display()
        );
        panic!("{message}");
    }
}

/// How one round went, for the progress line and for a failure's message.
#[derive(Default)]
struct RoundReport {
    round: u32,
    kill_after: Duration,
    before_cut: Stats,
    cut: CutReport,
    /// The data directory after the cut: one "path size" line per entry.
    survived: Vec<String>,
    acked_batches: usize,
    acked_events: usize,
    in_flight_batches: usize,
    in_flight_kept: usize,
    /// The highest seq acknowledged before the cut, over all rounds.
    highest_acked_seq: u64,
    head_seq: u64,
    restored_snapshot_seq: u64,
    replayed_events: u64,
}

impl RoundReport {
    fn describe(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "  the writers ran {} ms; this round {} batches ({} events) were acknowledged and {} \
             were in flight; the highest seq ever acknowledged is {}",
            self.kill_after.as_millis(),
            self.acked_batches,
            self.acked_events,
            self.in_flight_batches,
            self.highest_acked_seq
        );
        let stats = &self.before_cut;
        let _ = writeln!(
            text,
            "  before the cut the server had called fsync {} times, fdatasync {} times and \
             fsync on a directory {} times (whole run); {} bytes of file pages, {} file sizes \
             and {} directory entries were not durable",
            stats.fsyncs,
            stats.fdatasyncs,
            stats.fsyncdirs,
            stats.unsynced_bytes,
            stats.unsynced_sizes,
            stats.unsynced_entries
        );
        let _ = writeln!(
            text,
            "  the cut discarded {} pages, reverted {} file sizes and {} directory entries, and \
             lost {} inodes",
            self.cut.pages_discarded,
            self.cut.sizes_reverted,
            self.cut.entries_reverted,
            self.cut.inodes_lost
        );
        let _ = writeln!(text, "  the data directory after the cut:");
        if self.survived.is_empty() {
            let _ = writeln!(text, "    (empty)");
        }
        for line in &self.survived {
            let _ = writeln!(text, "    {line}");
        }
        let _ = writeln!(
            text,
            "  after the restart: head seq {}, read models from a snapshot at seq {} plus {} \
             replayed events",
            self.head_seq, self.restored_snapshot_seq, self.replayed_events
        );
        text
    }
}

/// What the test knows must be in the log.
#[derive(Default)]
struct Ledger {
    /// Every batch sent, with its size: the only measurements the log may hold.
    sent: HashMap<BatchKey, u16>,
    /// Events that must stay at their seq: acknowledged, or found in the log after a cut.
    durable: BTreeMap<u64, EventKey>,
    /// The same, by key.
    durable_seq: HashMap<EventKey, u64>,
    /// The last acknowledged batch of each writer in the latest round: re-sent every round.
    latest_batches: Vec<(BatchKey, Vec<u64>)>,
    /// Unacknowledged batches of the latest round.
    in_flight: Vec<(BatchKey, u16)>,
    /// KPIs whose DefineKpi was acknowledged.
    kpis: Vec<String>,
    /// The head a restarted server served last: the log up to it must never change.
    served_head: Option<(u64, Vec<u8>)>,
}

impl Ledger {
    /// Notes a stored event; a seq acknowledged for two different events is a violation.
    fn add_durable(&mut self, key: EventKey, seq: u64) -> Option<String> {
        if let Some(previous) = self.durable.insert(seq, key)
            && previous != key
        {
            self.durable.insert(seq, previous);
            return Some(format!(
                "seq {seq} was acknowledged for {key} but earlier for {previous}: a seq was reused"
            ));
        }
        self.durable_seq.insert(key, seq);
        None
    }

    /// Takes in what the writers of a round report; returns the violations they saw.
    fn record_round(&mut self, reports: &[WriterReport], round: &mut RoundReport) -> Vec<String> {
        let mut violations = Vec::new();
        self.latest_batches.clear();
        self.in_flight.clear();
        for report in reports {
            violations.extend(report.unexpected.iter().cloned());
            let mut last_acked = None;
            for batch in &report.batches {
                self.sent.insert(batch.key, batch.len);
                match &batch.acked {
                    Some(seqs) => {
                        round.acked_batches += 1;
                        round.acked_events += seqs.len();
                        for (index, seq) in (0..batch.len).zip(seqs) {
                            let key = EventKey {
                                batch: batch.key,
                                index,
                            };
                            violations.extend(self.add_durable(key, *seq));
                        }
                        last_acked = Some((batch.key, seqs.clone()));
                    }
                    None => self.in_flight.push((batch.key, batch.len)),
                }
            }
            self.latest_batches.extend(last_acked);
        }
        round.in_flight_batches = self.in_flight.len();
        round.highest_acked_seq = self.durable.keys().next_back().copied().unwrap_or(0);
        violations
    }
}

/// The gRPC clients of one server.
struct Clients {
    catalog: KpiCatalogClient<Channel>,
    ingest: IngestClient<Channel>,
    query: QueryClient<Channel>,
    audit: AuditClient<Channel>,
}

impl Clients {
    fn new(server: &ServerProcess) -> Self {
        let channel = channel(&server.uri());
        Self {
            catalog: KpiCatalogClient::new(channel.clone()),
            ingest: IngestClient::new(channel.clone()),
            query: QueryClient::new(channel.clone()),
            audit: AuditClient::new(channel),
        }
    }
}

fn channel(uri: &str) -> Channel {
    Endpoint::from_shared(uri.to_owned())
        .expect("a valid server uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(RPC_TIMEOUT)
        .connect_lazy()
}

async fn define_kpis(server: &ServerProcess, ledger: &mut Ledger) {
    let mut catalog = Clients::new(server).catalog;
    for definition in workload::kpi_definitions() {
        let id = definition.id.clone();
        catalog
            .define_kpi(proto::DefineKpiRequest {
                definition: Some(definition),
            })
            .await
            .unwrap_or_else(|status| panic!("DefineKpi {id}: {status}"));
        ledger.kpis.push(id);
    }
}

// ---- the writers ----

/// How a writer sends its batches.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Unary,
    Stream,
}

/// One batch a writer sent (or was about to send when the server died).
struct SentBatch {
    key: BatchKey,
    len: u16,
    /// The seqs of its measurements, once acknowledged.
    acked: Option<Vec<u64>>,
}

#[derive(Default)]
struct WriterReport {
    batches: Vec<SentBatch>,
    /// Failures while the server was alive: every one is a violation.
    unexpected: Vec<String>,
}

struct WriterPlan {
    seed: u64,
    round: u32,
    writer: u8,
    base_seconds: i64,
    uri: String,
    /// Set just before the server is killed: errors after it are expected.
    killed: Arc<AtomicBool>,
}

impl WriterPlan {
    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// The next batch: its record and its measurements.
    fn batch(&self, rng: &mut Pcg64Mcg, number: u32) -> (SentBatch, Vec<proto::Measurement>) {
        let len = if rng.random_range(0..BULK_ONE_IN) == 0 {
            rng.random_range(BULK_BATCH)
        } else {
            rng.random_range(1..=MAX_BATCH)
        };
        let key = BatchKey {
            round: self.round,
            writer: self.writer,
            batch: number,
        };
        let measurements = (0..len)
            .map(|index| {
                workload::measurement(self.seed, EventKey { batch: key, index }, self.base_seconds)
            })
            .collect();
        let batch = SentBatch {
            key,
            len,
            acked: None,
        };
        (batch, measurements)
    }

    /// Reports a failed call, unless the server was killed (then it is expected).
    fn failed(&self, report: &mut WriterReport, what: String) {
        if !self.killed() {
            report.unexpected.push(format!(
                "writer {} in round {}: {what} while the server was running",
                self.writer, self.round
            ));
        }
    }
}

async fn run_writer(plan: WriterPlan) -> WriterReport {
    let mut rng = Pcg64Mcg::seed_from_u64(
        plan.seed ^ (u64::from(plan.round) << 16) ^ u64::from(plan.writer).wrapping_add(1),
    );
    // Two writers of each kind every round, each writer switching between rounds.
    let mode = if (u32::from(plan.writer) + plan.round).is_multiple_of(2) {
        Mode::Unary
    } else {
        Mode::Stream
    };
    let client = IngestClient::new(channel(&plan.uri));
    match mode {
        Mode::Unary => unary_writer(&plan, client, &mut rng).await,
        Mode::Stream => stream_writer(&plan, client, &mut rng).await,
    }
}

/// Checks an acknowledgement against its batch and records its seqs.
fn accept(
    plan: &WriterPlan,
    report: &mut WriterReport,
    batch: usize,
    results: &[proto::RecordResult],
) {
    let sent = &mut report.batches[batch];
    let duplicates = results.iter().filter(|result| result.duplicate).count();
    if results.len() != usize::from(sent.len) || duplicates > 0 {
        let what = format!(
            "batch {:?} of {} new measurements was acknowledged with {} results, {} of them \
             duplicates",
            sent.key,
            sent.len,
            results.len(),
            duplicates
        );
        report
            .unexpected
            .push(format!("writer {}: {what}", plan.writer));
        return;
    }
    sent.acked = Some(results.iter().map(|result| result.seq).collect());
}

async fn pace(rng: &mut Pcg64Mcg) {
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..=PACE_MS))).await;
}

async fn unary_writer(
    plan: &WriterPlan,
    mut client: IngestClient<Channel>,
    rng: &mut Pcg64Mcg,
) -> WriterReport {
    let mut report = WriterReport::default();
    let mut number = 0;
    // Until the first failure, which the kill causes: a batch sent just before or after
    // it is one in flight.
    loop {
        let (batch, measurements) = plan.batch(rng, number);
        number += 1;
        report.batches.push(batch);
        let index = report.batches.len() - 1;
        let request = proto::RecordRequest { measurements };
        match tokio::time::timeout(RPC_TIMEOUT, client.record(request)).await {
            Ok(Ok(response)) => accept(plan, &mut report, index, &response.into_inner().results),
            Ok(Err(status)) => {
                plan.failed(&mut report, format!("Record failed: {status}"));
                break;
            }
            Err(_) => {
                plan.failed(
                    &mut report,
                    format!("Record got no answer in {RPC_TIMEOUT:?}"),
                );
                break;
            }
        }
        pace(rng).await;
    }
    report
}

async fn stream_writer(
    plan: &WriterPlan,
    mut client: IngestClient<Channel>,
    rng: &mut Pcg64Mcg,
) -> WriterReport {
    let mut report = WriterReport::default();
    let (requests, receiver) = mpsc::channel::<proto::RecordStreamRequest>(STREAM_WINDOW);
    let call = client.record_stream(ReceiverStream::new(receiver));
    let mut responses = match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            plan.failed(&mut report, format!("RecordStream failed: {status}"));
            return report;
        }
        Err(_) => {
            plan.failed(
                &mut report,
                format!("RecordStream got no answer in {RPC_TIMEOUT:?}"),
            );
            return report;
        }
    };
    // Indices into report.batches of the sent, unacknowledged batches, oldest first.
    let mut window = VecDeque::new();
    let mut number = 0;
    loop {
        while window.len() < STREAM_WINDOW {
            let (batch, measurements) = plan.batch(rng, number);
            number += 1;
            report.batches.push(batch);
            let request = proto::RecordStreamRequest {
                batch_id: (number - 1).to_string(),
                measurements,
            };
            if requests.send(request).await.is_err() {
                // The call is over; its status arrives on the response side.
                break;
            }
            window.push_back(report.batches.len() - 1);
        }
        let Some(&oldest) = window.front() else {
            // Nothing could be sent: the call is over.
            plan.failed(&mut report, "RecordStream closed its requests".to_owned());
            break;
        };
        match tokio::time::timeout(RPC_TIMEOUT, responses.message()).await {
            Ok(Ok(Some(ack))) => {
                window.pop_front();
                let expected = report.batches[oldest].key.batch.to_string();
                if ack.batch_id != expected {
                    plan.failed(
                        &mut report,
                        format!(
                            "RecordStream acknowledged batch {} before {expected}",
                            ack.batch_id
                        ),
                    );
                    break;
                }
                if let Some(rejection) = ack.rejection {
                    plan.failed(
                        &mut report,
                        format!(
                            "RecordStream rejected batch {expected}: {}",
                            rejection.message
                        ),
                    );
                    break;
                }
                accept(plan, &mut report, oldest, &ack.results);
            }
            Ok(Ok(None)) => {
                plan.failed(&mut report, "RecordStream ended".to_owned());
                break;
            }
            Ok(Err(status)) => {
                plan.failed(&mut report, format!("RecordStream failed: {status}"));
                break;
            }
            Err(_) => {
                plan.failed(
                    &mut report,
                    format!("RecordStream got no answer in {RPC_TIMEOUT:?}"),
                );
                break;
            }
        }
        pace(rng).await;
    }
    report
}

// ---- the checks after a restart ----

/// One event of the replayed log.
struct Logged {
    seq: u64,
    hash: Vec<u8>,
    what: LoggedEvent,
}

enum LoggedEvent {
    /// A measurement, with its event id.
    Measurement(String),
    KpiDefined(String),
    Other,
}

/// Every envelope of the log, seq 1 to the head.
async fn replay(audit: &mut AuditClient<Channel>) -> Result<Vec<Logged>, String> {
    let call = audit.replay_events(proto::ReplayEventsRequest::default());
    let mut stream = tokio::time::timeout(RPC_TIMEOUT, call)
        .await
        .map_err(|_| "ReplayEvents got no answer".to_owned())?
        .map_err(|status| format!("ReplayEvents failed: {status}"))?
        .into_inner();
    let mut log = Vec::new();
    loop {
        let item = tokio::time::timeout(RPC_TIMEOUT, stream.message())
            .await
            .map_err(|_| "ReplayEvents stalled".to_owned())?
            .map_err(|status| {
                format!("ReplayEvents failed after {} events: {status}", log.len())
            })?;
        let Some(item) = item else { break };
        let Some(replay_events_response::Item::Event(envelope)) = item.item else {
            continue;
        };
        let what = match envelope.event.and_then(|event| event.payload) {
            Some(Payload::MeasurementRecorded(recorded)) => LoggedEvent::Measurement(
                recorded
                    .measurement
                    .map(|measurement| measurement.event_id)
                    .unwrap_or_default(),
            ),
            Some(Payload::KpiDefined(defined)) => LoggedEvent::KpiDefined(
                defined
                    .definition
                    .map(|definition| definition.id)
                    .unwrap_or_default(),
            ),
            _ => LoggedEvent::Other,
        };
        log.push(Logged {
            seq: envelope.seq,
            hash: envelope.hash,
            what,
        });
    }
    Ok(log)
}

/// Everything checked after a restart; returns the violations.
async fn check_after_restart(
    context: &RunContext,
    ledger: &mut Ledger,
    clients: &Clients,
    rebuild: &Clients,
    report: &mut RoundReport,
    rng: &mut Pcg64Mcg,
) -> Vec<String> {
    let mut violations = Vec::new();
    let mut audit = clients.audit.clone();
    let log = match replay(&mut audit).await {
        Ok(log) => log,
        Err(error) => return vec![error],
    };
    let info = match audit.get_log_info(proto::GetLogInfoRequest {}).await {
        Ok(info) => info.into_inner(),
        Err(status) => return vec![format!("GetLogInfo failed: {status}")],
    };
    report.head_seq = info.head_seq;
    report.restored_snapshot_seq = info.restored_snapshot_seq;
    report.replayed_events = info.replayed_events;

    // The log's own shape, and which test events it holds where.
    if let Some((position, logged)) = log
        .iter()
        .enumerate()
        .find(|(position, logged)| u64::try_from(position + 1).ok() != Some(logged.seq))
    {
        violations.push(format!(
            "the replayed seqs are not 1, 2, 3, ...: position {} holds seq {}",
            position + 1,
            logged.seq
        ));
    }
    let mut in_log: HashMap<EventKey, u64> = HashMap::new();
    let mut strangers = Vec::new();
    let mut repeated = Vec::new();
    let mut defined = HashSet::new();
    for logged in &log {
        match &logged.what {
            LoggedEvent::Measurement(event_id) => {
                let known = EventKey::parse(event_id).filter(|key| {
                    ledger
                        .sent
                        .get(&key.batch)
                        .is_some_and(|len| key.index < *len)
                });
                match known {
                    Some(key) => {
                        if let Some(first) = in_log.insert(key, logged.seq) {
                            repeated.push(format!("{key} at seqs {first} and {}", logged.seq));
                        }
                    }
                    None => strangers.push(format!("{event_id:?} at seq {}", logged.seq)),
                }
            }
            LoggedEvent::KpiDefined(id) => {
                defined.insert(id.clone());
            }
            LoggedEvent::Other => {}
        }
    }
    if !strangers.is_empty() {
        violations.push(format!(
            "{} measurements in the log were never sent, e.g. {}",
            strangers.len(),
            examples(&strangers)
        ));
    }
    if !repeated.is_empty() {
        violations.push(format!(
            "{} event ids are in the log twice, e.g. {}",
            repeated.len(),
            examples(&repeated)
        ));
    }
    let missing_kpis: Vec<String> = ledger
        .kpis
        .iter()
        .filter(|id| !defined.contains(*id))
        .cloned()
        .collect();
    if !missing_kpis.is_empty() {
        violations.push(format!(
            "{} of {} acknowledged KPI definitions are not in the log: {}",
            missing_kpis.len(),
            ledger.kpis.len(),
            examples(&missing_kpis)
        ));
    }

    // Every acknowledged event at its seq.
    let mut lost = Vec::new();
    let mut moved = Vec::new();
    for (seq, key) in &ledger.durable {
        match in_log.get(key) {
            Some(found) if found == seq => {}
            Some(found) => moved.push(format!("{key} acknowledged at seq {seq}, now at {found}")),
            None => lost.push((*seq, *key)),
        }
    }
    if !lost.is_empty() {
        let rounds: BTreeSet<u32> = lost.iter().map(|(_, key)| key.batch.round).collect();
        let reused = lost
            .iter()
            .filter(|(seq, _)| usize::try_from(*seq).is_ok_and(|seq| seq <= log.len()))
            .count();
        let lines: Vec<String> = lost
            .iter()
            .map(|(seq, key)| format!("{key} (seq {seq})"))
            .collect();
        violations.push(format!(
            "{} of {} acknowledged events are missing from the log (acknowledged in rounds {:?}, \
             seqs {} to {}; {} of those seqs now hold other events), e.g. {}",
            lost.len(),
            ledger.durable.len(),
            rounds,
            lost.first().map_or(0, |(seq, _)| *seq),
            lost.last().map_or(0, |(seq, _)| *seq),
            reused,
            examples(&lines)
        ));
    }
    if !moved.is_empty() {
        violations.push(format!(
            "{} acknowledged events are at another seq than acknowledged, e.g. {}",
            moved.len(),
            examples(&moved)
        ));
    }

    // What the previous restart served must be unchanged.
    if let Some((seq, hash)) = &ledger.served_head {
        let at = usize::try_from(*seq)
            .ok()
            .and_then(|seq| seq.checked_sub(1))
            .and_then(|position| log.get(position));
        match at {
            Some(logged) if logged.hash == *hash => {}
            Some(logged) => violations.push(format!(
                "history changed: seq {seq} hashed {} when the previous restart served it, now {}",
                hex(hash),
                hex(&logged.hash)
            )),
            None => violations.push(format!(
                "the previous restart served the log up to seq {seq}; now it ends at seq {}",
                log.len()
            )),
        }
    }

    // Unacknowledged batches: all or nothing; what survived is durable from now on.
    let mut partial = Vec::new();
    for (batch, len) in std::mem::take(&mut ledger.in_flight) {
        let seqs: Vec<(EventKey, u64)> = (0..len)
            .filter_map(|index| {
                let key = EventKey { batch, index };
                in_log.get(&key).map(|seq| (key, *seq))
            })
            .collect();
        if seqs.is_empty() {
            continue;
        }
        if seqs.len() != usize::from(len) {
            partial.push(format!("{batch:?}: {} of {len}", seqs.len()));
            continue;
        }
        report.in_flight_kept += 1;
        for (key, seq) in seqs {
            violations.extend(ledger.add_durable(key, seq));
        }
    }
    if !partial.is_empty() {
        violations.push(format!(
            "{} unacknowledged batches are in the log only in part, e.g. {}",
            partial.len(),
            examples(&partial)
        ));
    }

    // The chain and the log's own account of itself.
    violations.extend(check_chain(&mut audit, &info, &log).await);

    // The read models against a rebuild from the log.
    violations.extend(compare_with_rebuild(context, ledger, clients, rebuild, &info).await);

    // Re-sent acknowledged measurements are duplicates of their original seq.
    let lost_keys: HashSet<EventKey> = lost.iter().map(|(_, key)| *key).collect();
    violations.extend(resend(context, ledger, clients, &info, &lost_keys, rng).await);

    ledger.served_head = Some((info.head_seq, info.head_hash.clone()));
    violations
}

async fn check_chain(
    audit: &mut AuditClient<Channel>,
    info: &proto::GetLogInfoResponse,
    log: &[Logged],
) -> Vec<String> {
    let mut violations = Vec::new();
    let verify = match audit.verify_log(proto::VerifyLogRequest {}).await {
        Ok(verify) => verify.into_inner(),
        Err(status) => return vec![format!("VerifyLog failed: {status}")],
    };
    if !verify.ok {
        let reason = verify
            .chain_break
            .map(|chain_break| format!("seq {}: {}", chain_break.seq, chain_break.reason))
            .unwrap_or_default();
        violations.push(format!("VerifyLog finds the chain broken at {reason}"));
    }
    let replayed = u64::try_from(log.len()).unwrap_or(u64::MAX);
    let last_hash = log
        .last()
        .map_or_else(|| vec![0; 32], |logged| logged.hash.clone());
    if info.head_seq != replayed
        || info.event_count != replayed
        || info.head_hash != last_hash
        || verify.head_seq != info.head_seq
        || verify.checked_events != info.head_seq
        || (verify.ok && verify.head_hash != info.head_hash)
    {
        violations.push(format!(
            "the log's accounts disagree: GetLogInfo head {} ({} events, hash {}), VerifyLog head \
             {} ({} checked, hash {}), ReplayEvents {} events ending in hash {}",
            info.head_seq,
            info.event_count,
            hex(&info.head_hash),
            verify.head_seq,
            verify.checked_events,
            hex(&verify.head_hash),
            replayed,
            hex(&last_hash)
        ));
    }
    violations
}

/// The buckets of `kpi_id` at `grain`, grouped by channel, over the workload's range.
async fn aggregates(
    query: &mut QueryClient<Channel>,
    kpi_id: &str,
    grain: proto::Grain,
    base_seconds: i64,
) -> Result<Vec<proto::Bucket>, String> {
    let (start, end) = workload::query_range(base_seconds);
    let request = proto::GetAggregatesRequest {
        kpi_id: kpi_id.to_owned(),
        grain: grain.into(),
        start: Some(start),
        end: Some(end),
        group_by: vec!["channel".to_owned()],
        ..proto::GetAggregatesRequest::default()
    };
    let mut stream = query
        .get_aggregates(request)
        .await
        .map_err(|status| status.to_string())?
        .into_inner();
    let mut buckets = Vec::new();
    while let Some(response) = tokio::time::timeout(RPC_TIMEOUT, stream.message())
        .await
        .map_err(|_| "GetAggregates stalled".to_owned())?
        .map_err(|status| status.to_string())?
    {
        buckets.extend(response.bucket);
    }
    Ok(buckets)
}

async fn compare_with_rebuild(
    context: &RunContext,
    ledger: &Ledger,
    clients: &Clients,
    rebuild: &Clients,
    info: &proto::GetLogInfoResponse,
) -> Vec<String> {
    let mut violations = Vec::new();
    match rebuild
        .audit
        .clone()
        .get_log_info(proto::GetLogInfoRequest {})
        .await
    {
        Ok(rebuilt) => {
            let rebuilt = rebuilt.into_inner();
            if rebuilt.head_seq != info.head_seq || rebuilt.head_hash != info.head_hash {
                violations.push(format!(
                    "a server on a copy of the data directory sees head {} but the restarted \
                     server {}",
                    rebuilt.head_seq, info.head_seq
                ));
            }
            assert_eq!(
                rebuilt.restored_snapshot_seq, 0,
                "the rebuild server must fold the whole log, not a snapshot"
            );
        }
        Err(status) => violations.push(format!("GetLogInfo of the rebuild failed: {status}")),
    }
    let mut failures = Vec::new();
    let mut differences = Vec::new();
    let mut query = clients.query.clone();
    let mut rebuilt_query = rebuild.query.clone();
    for kpi_id in &ledger.kpis {
        for grain in [proto::Grain::Day, proto::Grain::Month] {
            let ours = aggregates(&mut query, kpi_id, grain, context.base_seconds).await;
            let rebuilt = aggregates(&mut rebuilt_query, kpi_id, grain, context.base_seconds).await;
            match (ours, rebuilt) {
                (Ok(ours), Ok(rebuilt)) => {
                    if ours != rebuilt {
                        differences.push(describe_difference(kpi_id, grain, &ours, &rebuilt));
                    }
                }
                (Err(error), _) => {
                    failures.push(format!(
                        "{kpi_id} {grain:?} on the restarted server: {error}"
                    ));
                }
                (_, Err(error)) => {
                    failures.push(format!("{kpi_id} {grain:?} on the rebuild: {error}"));
                }
            }
        }
    }
    if !failures.is_empty() {
        violations.push(format!(
            "{} GetAggregates calls failed, e.g. {}",
            failures.len(),
            examples(&failures)
        ));
    }
    if !differences.is_empty() {
        violations.push(format!(
            "{} aggregates differ from a rebuild from the log (a server on a copy without \
             snapshots/): {}",
            differences.len(),
            examples(&differences)
        ));
    }
    violations
}

fn describe_difference(
    kpi_id: &str,
    grain: proto::Grain,
    ours: &[proto::Bucket],
    rebuilt: &[proto::Bucket],
) -> String {
    let first = ours
        .iter()
        .zip(rebuilt)
        .position(|(a, b)| a != b)
        .unwrap_or(ours.len().min(rebuilt.len()));
    format!(
        "{kpi_id} {grain:?}: {} buckets vs {} rebuilt; first difference at bucket {first}: \
         restarted {:?} vs rebuilt {:?}",
        ours.len(),
        rebuilt.len(),
        ours.get(first).map(summary),
        rebuilt.get(first).map(summary)
    )
}

/// The part of a bucket that tells a difference.
fn summary(bucket: &proto::Bucket) -> String {
    format!(
        "{{start {:?}, labels {:?}, count {}, value {:?}, sum {:?}}}",
        bucket.start.as_ref().map(|start| start.seconds),
        bucket.labels,
        bucket.count,
        bucket.value,
        bucket.sum
    )
}

async fn resend(
    context: &RunContext,
    ledger: &Ledger,
    clients: &Clients,
    info: &proto::GetLogInfoResponse,
    lost: &HashSet<EventKey>,
    rng: &mut Pcg64Mcg,
) -> Vec<String> {
    // The latest acknowledged batch of every writer (the likeliest to be lost), and a
    // sample of the whole history.
    let mut sample: Vec<(EventKey, u64)> = Vec::new();
    for (batch, seqs) in &ledger.latest_batches {
        for (index, seq) in (0..).zip(seqs) {
            sample.push((
                EventKey {
                    batch: *batch,
                    index,
                },
                *seq,
            ));
        }
    }
    let everything: Vec<(&u64, &EventKey)> = ledger.durable.iter().collect();
    for _ in 0..RESEND_SAMPLE.min(everything.len()) {
        let (seq, key) = everything[rng.random_range(0..everything.len())];
        sample.push((*key, *seq));
    }
    // A lost event would be stored again; it is already reported.
    sample.retain(|(key, _)| !lost.contains(key));
    let mut seen = HashSet::new();
    sample.retain(|(key, _)| seen.insert(*key));
    if sample.is_empty() {
        return Vec::new();
    }
    let measurements = sample
        .iter()
        .map(|(key, _)| workload::measurement(context.seed, *key, context.base_seconds))
        .collect();
    let mut ingest = clients.ingest.clone();
    let results = match ingest.record(proto::RecordRequest { measurements }).await {
        Ok(response) => response.into_inner().results,
        Err(status) => {
            return vec![format!(
                "re-sending acknowledged measurements failed: {status}"
            )];
        }
    };
    let mut wrong = Vec::new();
    for ((key, seq), result) in sample.iter().zip(&results) {
        if !result.duplicate || result.seq != *seq {
            wrong.push(format!(
                "{key} (seq {seq}) came back as seq {} with duplicate={}",
                result.seq, result.duplicate
            ));
        }
    }
    let mut violations = Vec::new();
    if results.len() != sample.len() {
        violations.push(format!(
            "re-sending {} measurements returned {} results",
            sample.len(),
            results.len()
        ));
    }
    if !wrong.is_empty() {
        violations.push(format!(
            "{} of {} re-sent acknowledged measurements were not recognised as duplicates of \
             their seq, e.g. {}",
            wrong.len(),
            sample.len(),
            examples(&wrong)
        ));
    }
    match clients
        .audit
        .clone()
        .get_log_info(proto::GetLogInfoRequest {})
        .await
    {
        Ok(after) if after.get_ref().head_seq == info.head_seq => {}
        Ok(after) => violations.push(format!(
            "re-sending acknowledged measurements moved the head from {} to {}",
            info.head_seq,
            after.get_ref().head_seq
        )),
        Err(status) => violations.push(format!("GetLogInfo failed: {status}")),
    }
    violations
}

// ---- small helpers ----

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

fn unix_seconds_now() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(elapsed.as_secs()).expect("the clock is before the year 292 billion")
}

fn sync_dir(path: &Path) {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .unwrap_or_else(|error| panic!("fsync {}: {error}", path.display()));
}

/// Every file and directory under `root`, as "relative/path size" lines.
fn list_tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, lines: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            lines.push(format!("{} (unreadable)", dir.display()));
            return;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            match entry.metadata() {
                Ok(metadata) if metadata.is_dir() => {
                    lines.push(format!("{relative}/"));
                    walk(root, &path, lines);
                }
                Ok(metadata) => lines.push(format!("{relative} {} bytes", metadata.len())),
                Err(error) => lines.push(format!("{relative} ({error})")),
            }
        }
    }
    let mut lines = Vec::new();
    walk(root, root, &mut lines);
    lines
}

/// Copies the data directory but its `snapshots/`, so a server started on the copy
/// rebuilds its read models from the log alone.
fn copy_without_snapshots(from: &Path, to: &Path) {
    fn copy(from: &Path, to: &Path, top: bool) {
        std::fs::create_dir_all(to)
            .unwrap_or_else(|error| panic!("create {}: {error}", to.display()));
        let entries = std::fs::read_dir(from)
            .unwrap_or_else(|error| panic!("list {}: {error}", from.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|error| panic!("list {}: {error}", from.display()));
            let source = entry.path();
            let target = to.join(entry.file_name());
            if top && entry.file_name() == kpi_service::SNAPSHOT_DIR {
                continue;
            }
            if source.is_dir() {
                copy(&source, &target, false);
            } else {
                std::fs::copy(&source, &target)
                    .unwrap_or_else(|error| panic!("copy {}: {error}", source.display()));
            }
        }
    }
    copy(from, to, true);
}

fn examples(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(EXAMPLES)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > EXAMPLES {
        let _ = write!(text, "; and {} more", items.len() - EXAMPLES);
    }
    text
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::new();
    for byte in bytes.iter().take(8) {
        let _ = write!(text, "{byte:02x}");
    }
    if bytes.len() > 8 {
        text.push('…');
    }
    text
}
