//! `kpi-load`: drives a running kpi-server over gRPC with a reproducible workload and
//! reports throughput and latency (a table on stdout, then one JSON object per line); its
//! `sled` scenario writes the same workload into raw sled instead, as a baseline.
//! The scenarios live in `kpi_load::load`; this file parses flags and prints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kpi_load::load::{
    self, IngestOptions, LoadError, QueryOptions, RawSledOptions, ReadyOptions, RecordOptions,
    Report, WatchOptions, WorkloadArgs,
};
use kpi_load::workload::Workload;

/// Load generator for kpi-server: defines the article's KPIs, streams seeded measurements,
/// and measures ingest, unary record, query and live-watch performance over gRPC; `sled`
/// measures the same workload written into raw sled, as a baseline.
#[derive(Debug, Parser)]
#[command(name = "kpi-load", version)]
struct Cli {
    /// Address of the running server.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the workload as DIR/kpis.csv and DIR/measurements.csv (no server needed).
    Generate {
        /// Directory to write the CSV files into (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Define the workload's KPIs (ones that already exist with the same shape are fine).
    Setup {
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Define the KPIs, then stream all measurements (or --count of them from --first)
    /// through RecordStream from several producers; latency per batch, send to
    /// acknowledgement.
    Ingest {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        options: IngestOptions,
    },
    /// Define the KPIs, then unary Record calls of one measurement each from concurrent
    /// callers for a fixed time; latency per call.
    Record {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        options: RecordOptions,
    },
    /// GetAggregates for the latest buckets of a KPI up to the workload's --end (pass the
    /// --end used for ingest); latency per call until its stream ends.
    Query {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        options: QueryOptions,
    },
    /// Wait until the server answers one GetAggregates (refused connections and a server
    /// still starting are retried); reports the time from the first attempt to the answer.
    Ready {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        options: ReadyOptions,
    },
    /// WatchKpis subscribers on HOUR grain, then a producer recording --rate measurements/s
    /// into the watched KPIs; latency from a batch's acknowledgement to the watchers' update.
    Watch {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        options: WatchOptions,
    },
    /// Baseline without a server: write the ingest workload into a fresh sled database
    /// (one key per measurement, protobuf value, apply_batch + flush per batch from several
    /// threads), then time full scans that sum one KPI per bucket as the query scenario asks.
    Sled {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        options: RawSledOptions,
    },
}

fn workload(args: &WorkloadArgs) -> Result<Arc<Workload>, LoadError> {
    Ok(Arc::new(Workload::new(args.config(chrono::Utc::now()))?))
}

/// Runs the command and returns its reports.
async fn run(cli: Cli) -> Result<Vec<Report>, LoadError> {
    let addr = cli.addr.as_str();
    let quiet = cli.quiet;
    match cli.command {
        Command::Generate {
            out,
            workload: args,
        } => {
            let workload = workload(&args)?;
            let progress = load::progress_bar(quiet, Some(workload.len()), "generate");
            let report =
                tokio::task::spawn_blocking(move || load::generate(&workload, &out, &progress))
                    .await??;
            Ok(vec![report])
        }
        Command::Setup { workload: args } => {
            let workload = workload(&args)?;
            let started = std::time::Instant::now();
            let defined = load::setup(addr, &workload).await?;
            Ok(vec![Report {
                scenario: "setup",
                params: vec![("kpis", workload.kpis().len().into())],
                items: u64::try_from(defined).unwrap_or(0),
                ops: u64::try_from(workload.kpis().len()).unwrap_or(0),
                elapsed: started.elapsed(),
                latencies: load::Latencies::new(),
                extra: Vec::new(),
            }])
        }
        Command::Ingest {
            workload: args,
            options,
        } => {
            let workload = workload(&args)?;
            let piece = options.piece(workload.len())?;
            let progress = load::progress_bar(quiet, Some(piece.end - piece.start), "ingest");
            Ok(vec![
                load::ingest(addr, workload, &options, &progress).await?,
            ])
        }
        Command::Record {
            workload: args,
            options,
        } => {
            let workload = workload(&args)?;
            let progress = load::progress_bar(quiet, None, "record");
            Ok(vec![
                load::record(addr, workload, &options, &progress).await?,
            ])
        }
        Command::Query {
            workload: args,
            options,
        } => {
            let workload = workload(&args)?;
            let progress = load::progress_bar(quiet, Some(options.requests), "query");
            Ok(vec![
                load::query(addr, workload, &options, &progress).await?,
            ])
        }
        Command::Ready {
            workload: args,
            options,
        } => {
            let workload = workload(&args)?;
            Ok(vec![load::ready(&workload, addr, &options).await?])
        }
        Command::Watch {
            workload: args,
            options,
        } => {
            let workload = workload(&args)?;
            let progress = load::progress_bar(quiet, None, "watch");
            load::watch(addr, workload, &options, &progress).await
        }
        Command::Sled {
            workload: args,
            options,
        } => {
            let workload = workload(&args)?;
            let progress = load::progress_bar(quiet, Some(workload.len()), "sled");
            tokio::task::spawn_blocking(move || load::raw_sled(&workload, &options, &progress))
                .await?
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(reports) => {
            for report in &reports {
                print!("{}", report.table());
            }
            for report in &reports {
                println!("{}", report.json_line());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kpi-load: {error}");
            ExitCode::FAILURE
        }
    }
}
