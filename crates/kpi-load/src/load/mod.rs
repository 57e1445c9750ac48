//! The `kpi-load` tool's library: scenarios that drive a running server over gRPC with the
//! [`workload`](crate::workload), measure throughput and latency, and report them.
//!
//! Each scenario (`generate`, `setup`, `ingest`, `record`, `query`, `watch`, and the
//! `ready` probe that waits for a starting server's first answer) is an async
//! function taking the server address, the workload and its options, and returning
//! [`Report`]s: the binary `src/bin/kpi-load.rs` only parses flags and prints, and the
//! integration test `tests/load_tool.rs` calls the same functions against a test server.
//! The exceptions need no server: `generate` writes CSV files, and `sled` (blocking,
//! [`raw_sled`]) writes the same workload straight into a sled database and scans it, the
//! baseline of the peer comparison.
//!
//! This is a *client* of the server: it uses the generated tonic clients and nothing of
//! the server's internals except the workload, the calendar (to compute a query's range
//! and, for `sled`, its buckets) and the protobuf conversions. The `sled` scenario uses
//! sled directly, not the server's store.

mod args;
mod generate;
mod ingest;
mod query;
mod raw_sled;
mod ready;
mod record;
mod report;
mod watch;

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::transport::{Channel, Endpoint};

use crate::workload::{Workload, WorkloadError};
use kpi_service::proto::kpi_catalog_client::KpiCatalogClient;
use kpi_service::proto::{self, KpiDefinition};

pub use args::{GrainArg, WorkloadArgs};
pub use generate::generate;
pub use ingest::{IngestOptions, ingest};
pub use query::{AggregateQuestion, QueryOptions, query};
pub use raw_sled::{RawSledOptions, raw_sled};
pub use ready::{ReadyOptions, ready};
pub use record::{RecordOptions, record};
pub use report::{Latencies, Report};
pub use watch::{WatchOptions, watch};

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The address is not a URI or the server cannot be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// What went wrong.
        source: tonic::transport::Error,
    },
    /// A call failed in a way the scenario cannot go on from.
    #[error("{call}: {status}")]
    Rpc {
        /// The call, such as `DefineKpi revenue_001`.
        call: String,
        /// The server's answer.
        status: tonic::Status,
    },
    /// The workload's configuration is invalid.
    #[error("workload: {0}")]
    Workload(#[from] WorkloadError),
    /// Writing the generated files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The options make no sense, or the server answered something unexpected.
    #[error("{0}")]
    Invalid(String),
    /// A task of the scenario panicked.
    #[error("scenario task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A thread of the scenario panicked.
    #[error("{0} thread panicked")]
    ThreadPanicked(&'static str),
    /// The raw-sled scenario's database failed.
    #[error("sled database {path}: {source}")]
    Sled {
        /// The database's directory.
        path: String,
        /// What went wrong.
        source: sled::Error,
    },
}

/// A new HTTP/2 connection to `addr` (each call opens its own TCP connection).
pub async fn connect(addr: &str) -> Result<Channel, LoadError> {
    let error = |source| LoadError::Connect {
        addr: addr.to_owned(),
        source,
    };
    Endpoint::from_shared(addr.to_owned())
        .map_err(error)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(error)
}

/// `count` separate connections to `addr`.
pub async fn connect_many(addr: &str, count: usize) -> Result<Vec<Channel>, LoadError> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        channels.push(connect(addr).await?);
    }
    Ok(channels)
}

/// A progress bar on stderr, hidden when `quiet` or when stderr is not a terminal.
/// `len` is the expected total, if known.
pub fn progress_bar(quiet: bool, len: Option<u64>, message: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template(
                    "{msg:8} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {msg:8} [{elapsed_precise}] {human_pos} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Defines the workload's KPIs (in order, so a RATIO follows its parts). A KPI that
/// already exists is fine when its kind and ratio are the workload's (an earlier run);
/// otherwise the run would measure something else, so that is an error. Returns how many
/// were newly defined.
pub async fn setup(addr: &str, workload: &Workload) -> Result<usize, LoadError> {
    let mut catalog = KpiCatalogClient::new(connect(addr).await?);
    let mut defined = 0;
    for definition in workload.definitions() {
        let id = definition.id.clone();
        let answer = catalog
            .define_kpi(proto::DefineKpiRequest {
                definition: Some(definition.clone()),
            })
            .await;
        match answer {
            Ok(_) => defined += 1,
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                let existing = catalog
                    .get_kpi(proto::GetKpiRequest { kpi_id: id.clone() })
                    .await
                    .map_err(|status| LoadError::Rpc {
                        call: format!("GetKpi {id}"),
                        status,
                    })?
                    .into_inner()
                    .kpi
                    .and_then(|kpi| kpi.definition);
                if !same_shape(existing.as_ref(), &definition) {
                    return Err(LoadError::Invalid(format!(
                        "kpi {id} exists with another definition than the workload's; \
                         use a fresh data directory"
                    )));
                }
            }
            Err(status) => {
                return Err(LoadError::Rpc {
                    call: format!("DefineKpi {id}"),
                    status,
                });
            }
        }
    }
    Ok(defined)
}

/// True when `existing` takes the workload's measurements the same way as `wanted`.
fn same_shape(existing: Option<&KpiDefinition>, wanted: &KpiDefinition) -> bool {
    existing.is_some_and(|existing| {
        existing.kind == wanted.kind
            && existing.dimensions == wanted.dimensions
            && existing.timezone == wanted.timezone
            && existing
                .ratio
                .as_ref()
                .map(|r| (&r.numerator_kpi_id, &r.denominator_kpi_id))
                == wanted
                    .ratio
                    .as_ref()
                    .map(|r| (&r.numerator_kpi_id, &r.denominator_kpi_id))
    })
}
