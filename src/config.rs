//! Configuration of the server: command-line flags and `KPI_*` environment variables,
//! validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::TimeDelta;

/// Default gRPC address: loopback, so a fresh start exposes nothing to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./kpi-data";
/// Default allowed future skew of occurred_at, in seconds (SPEC: 5 minutes).
pub const DEFAULT_MAX_FUTURE_SKEW_SECS: u32 = 300;
/// Default deduplication window of event ids, in hours of recorded time (SPEC: at least 24).
pub const DEFAULT_DEDUP_WINDOW_HOURS: u32 = 24;
/// Default memory for the newest event ids of the deduplication index, in KiB.
pub const DEFAULT_DEDUP_MEMORY_KIB: u32 = 16 * 1024;
/// Default most server streams (replays, watchers) open at once; each holds a task and a
/// bounded buffer, so this bounds their memory.
pub const DEFAULT_MAX_STREAMS: u32 = 1024;
/// Default most KPIs the catalog may hold: with at most 10,000 label combinations each,
/// this bounds what one client can make the server keep.
pub const DEFAULT_MAX_KPIS: u32 = 10_000;
/// Default interval of checkpoints and heartbeats on idle streams, in milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u32 = 5000;
/// Default number of new events that makes a read-model snapshot due.
pub const DEFAULT_SNAPSHOT_EVERY_EVENTS: u64 = 1_000_000;
/// Default space kept free on the data directory's file system, in MiB.
pub const DEFAULT_MIN_FREE_DISK_MB: u64 = crate::store::DEFAULT_MIN_FREE_BYTES / (1024 * 1024);
/// Default longest graceful shutdown, in seconds: under systemd's default stop timeout
/// (90 s) and Kubernetes' default grace period (30 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u32 = 20;
/// Default most connections open at once. An idle HTTP/2 connection holds a task and
/// its buffers (tens of KiB), so this bounds their memory; the process needs about this
/// many file descriptors more than the log's (see `nofile` in the README).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Default time after which a connection without a byte either way is closed, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u32 = 120;
/// Default time without a frame from a client after which the server pings it, in seconds
/// (the connection is dropped when the ping is not answered within 20 s).
pub const DEFAULT_KEEPALIVE_SECS: u32 = 60;
/// Default interval of the checks for changed TLS and auth files, in milliseconds.
pub const DEFAULT_RELOAD_CHECK_MS: u32 = 5000;
/// Default memory budget of the whole process, in MiB: the service must fit a small device.
pub const DEFAULT_MEMORY_BUDGET_MIB: u32 = 256;
/// What the budget holds besides the buckets and the event ids, in MiB: the log's sled
/// cache (16 MiB), the history index's (8 MiB), and 152 MiB for the rest, as measured
/// (BENCHMARKS.md, "The whole process within the budget"): sled's own tables and
/// buffers (40-80 MiB, growing slowly with the log), the history index's open part, the
/// live window, request buffers, stacks and code, and the allocator's free space between
/// live blocks, which grows with the buckets that come and go (a bucket share of 120 MiB
/// ended at 310 MiB resident after 20 M measurements, one of 64 MiB at 237 MiB).
const MEMORY_BESIDES_BUCKETS_MIB: u64 = 16 + 8 + 152;
/// The least memory the buckets may be given, in MiB: the newest buckets of a thousand
/// KPIs.
const MIN_BUCKET_MEMORY_MIB: u64 = 16;

/// What `kpi-server` does; without a command it serves.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Serve kpi.v1 over gRPC (the default).
    Serve,
    /// Repair a data directory the server refuses to open because its log ends before
    /// events that were acknowledged: each lost seq gets an EventsLost event (no seq is
    /// ever reused), a damaged tail segment is moved to <data-dir>/recovered/, and the
    /// read models are rebuilt at the next start. Run it with the server stopped.
    Recover {
        /// Also accept a log whose chain differs from the acknowledged one at the same
        /// seq (another history, not a shorter one), forgetting the old evidence.
        #[arg(long)]
        accept_other_history: bool,
    },
    /// Make a new bearer token: prints the token (give it to the client; the server keeps
    /// only its hash) and the entry to add to the auth file (--auth-file).
    Token {
        /// The principal's name, stored with every event its requests cause.
        #[arg(long)]
        name: String,
        /// A role of the principal (repeat for several).
        #[arg(long = "role", required = true, value_parser = ["reader", "writer", "admin", "auditor"])]
        roles: Vec<String>,
    },
    /// Copy the log of a running server into a new or empty directory, consistently, while
    /// it takes writes: the events up to its head when the backup starts, and a manifest
    /// naming that head. Needs a principal with the auditor role when the server has an
    /// auth file.
    Backup {
        /// The directory to write (new or empty).
        #[arg(long)]
        to: PathBuf,
        /// The server's gRPC URL; https:// for TLS.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// File holding the bearer token to send.
        #[arg(long, env = "KPI_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// PEM file of the CA that signed the server's certificate (for https://).
        #[arg(long)]
        server_ca: Option<PathBuf>,
    },
    /// Make --data-dir (new or empty) from a backup, with the server stopped: the backup
    /// is checked whole (its file against the manifest, the chain against the manifest's
    /// head) before anything is written.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
    },
    /// Print the public key of --signing-key, for auditors who check the heads the server
    /// signs (PEM, then the 32 bytes in hex as SignedHead.public_key carries them).
    PublicKey,
}

/// Everything the server needs to start.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kpi-server",
    version,
    about = "kpi-service: event-sourced KPI tracking over gRPC (package kpi.v1)",
    long_about = "kpi-service: event-sourced KPI tracking over gRPC (package kpi.v1).\n\n\
                  Every flag can also be set through the environment variable shown with it. \
                  Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=kpi_service=debug) for more."
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "KPI_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Directory of the event log; created when missing. One server per directory.
    #[arg(long, env = "KPI_DATA_DIR", default_value = DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,

    /// How far in the future a measurement's occurred_at may be, in seconds.
    #[arg(long, env = "KPI_MAX_FUTURE_SKEW_SECS", default_value_t = DEFAULT_MAX_FUTURE_SKEW_SECS)]
    pub max_future_skew_secs: u32,

    /// How long a measurement's event_id deduplicates retries, in hours of recorded time.
    #[arg(
        long,
        env = "KPI_DEDUP_WINDOW_HOURS",
        default_value_t = DEFAULT_DEDUP_WINDOW_HOURS,
        value_parser = clap::value_parser!(u32).range(1..=24 * 365)
    )]
    pub dedup_window_hours: u32,

    /// Memory for the newest event ids of the deduplication index, in KiB; older ids are
    /// spilled to run files in the log directory (about one byte of memory per id stays).
    /// While the disk is nearly full (less than twice --min-free-disk-mb available), nothing
    /// is spilled: ids stay in memory past this bound until there is room again.
    #[arg(
        long,
        env = "KPI_DEDUP_MEMORY_KIB",
        default_value_t = DEFAULT_DEDUP_MEMORY_KIB,
        value_parser = clap::value_parser!(u32).range(1..=16 * 1024 * 1024)
    )]
    pub dedup_memory_kib: u32,

    /// Memory budget of the whole process, in MiB. The buckets of the read models get
    /// what is left after the event ids (`--dedup-memory-kib`) and 176 MiB reserved for
    /// the rest (sled's caches and tables, buffers, the allocator's free space), less what
    /// the event ids' run files hold in memory as it grows (about a byte per id in the
    /// dedup window); the buckets that ended longest ago are stored in <data-dir>/pages/
    /// beyond that share and read from there when asked. At least 208 MiB with the
    /// default `--dedup-memory-kib`.
    #[arg(
        long,
        env = "KPI_MEMORY_BUDGET",
        default_value_t = DEFAULT_MEMORY_BUDGET_MIB,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub memory_budget: u32,

    /// Most server streams (ReplayEvents, WatchKpis) open at once; more get RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "KPI_MAX_STREAMS",
        default_value_t = DEFAULT_MAX_STREAMS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_streams: u32,

    /// Most KPIs the catalog may hold, retired ones included; DefineKpi beyond it gets
    /// RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "KPI_MAX_KPIS",
        default_value_t = DEFAULT_MAX_KPIS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_kpis: u32,

    /// How often an idle stream gets a checkpoint or heartbeat, in milliseconds.
    #[arg(
        long,
        env = "KPI_HEARTBEAT_MS",
        default_value_t = DEFAULT_HEARTBEAT_MS,
        value_parser = clap::value_parser!(u32).range(10..)
    )]
    pub heartbeat_ms: u32,

    /// How many new events make a read-model snapshot due (also every 5 minutes when any
    /// arrived). A restart after a crash replays at most about this many events; each
    /// snapshot costs time in proportion to the whole state, so a large state under heavy
    /// ingest wants a larger value.
    #[arg(
        long,
        env = "KPI_SNAPSHOT_EVERY_EVENTS",
        default_value_t = DEFAULT_SNAPSHOT_EVERY_EVENTS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub snapshot_every_events: u64,

    /// Space to keep free on the data directory's file system, in MiB: below it writes get
    /// RESOURCE_EXHAUSTED (and are accepted again once space returns), snapshots wait, and
    /// the server does not start.
    #[arg(
        long,
        env = "KPI_MIN_FREE_DISK_MB",
        default_value_t = DEFAULT_MIN_FREE_DISK_MB,
        global = true
    )]
    pub min_free_disk_mb: u64,

    /// Longest graceful shutdown, in seconds: after a signal, requests still running this
    /// long are cut off and the process ends (every acknowledged event is already durable;
    /// only the shutdown snapshot may be skipped, which makes the next start replay more).
    #[arg(
        long,
        env = "KPI_SHUTDOWN_TIMEOUT_SECS",
        default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub shutdown_timeout_secs: u32,

    /// Most connections open at once: at the cap, a new connection closes the one that
    /// has been quiet longest, so idle connections cannot lock out health probes. Needs
    /// about this many file descriptors beyond the log's (the server raises its soft
    /// `nofile` limit towards the hard one, and lowers this cap when it cannot).
    #[arg(
        long,
        env = "KPI_MAX_CONNECTIONS",
        default_value_t = DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// A connection without a byte either way for this many seconds is closed (live HTTP/2
    /// clients answer the keepalive pings, so only dead or silent ones reach it). Must be
    /// longer than --keepalive-secs.
    #[arg(
        long,
        env = "KPI_IDLE_TIMEOUT_SECS",
        default_value_t = DEFAULT_IDLE_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub idle_timeout_secs: u32,

    /// After this many seconds without a frame from a client, the server pings it over
    /// HTTP/2 and drops the connection when no answer comes within 20 seconds.
    #[arg(
        long,
        env = "KPI_KEEPALIVE_SECS",
        default_value_t = DEFAULT_KEEPALIVE_SECS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub keepalive_secs: u32,

    /// PEM file of the server's certificate chain (leaf first): serve gRPC over TLS.
    /// Reloaded when it changes, or on SIGHUP.
    #[arg(long, env = "KPI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file of the private key of --tls-cert.
    #[arg(long, env = "KPI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM file of the CA certificates that sign client certificates: every client must
    /// present one (mutual TLS); its subject's common name names the principal.
    #[arg(long, env = "KPI_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// TOML file of the principals (bearer token hashes or client certificate subjects)
    /// and their roles; every request but health checks must then name one. Reloaded when
    /// it changes, or on SIGHUP. `kpi-server token` makes entries.
    #[arg(long, env = "KPI_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Listen beyond loopback without TLS and authentication (refused otherwise).
    #[arg(long, env = "KPI_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,

    /// Do not serve gRPC server reflection.
    #[arg(long, env = "KPI_NO_REFLECTION", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_reflection: bool,

    /// Do not serve ListStreams (it shows clients' addresses); it answers UNIMPLEMENTED.
    #[arg(long, env = "KPI_NO_LIST_STREAMS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_list_streams: bool,

    /// Serve Prometheus metrics over HTTP on this address (`GET /metrics`); off when unset.
    /// The endpoint has no authentication: keep it on loopback or a private network.
    #[arg(long, env = "KPI_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format on stderr: `text` for people, `json` (one object per line, with the
    /// spans' fields) for log collectors.
    #[arg(long, env = "KPI_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,

    /// Export spans (one per request, with its method, status code and duration) to this
    /// OpenTelemetry collector over OTLP/gRPC (`http://collector:4317`); off when unset.
    #[arg(long, env = "KPI_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// Ed25519 private key (PKCS#8 PEM) with which the server signs the heads it reports
    /// (GetLogInfo, ReplayEvents checkpoints), so auditors hold proof of what it claimed.
    #[arg(long, env = "KPI_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,

    /// Create --signing-key with a new key when the file does not exist (mode 0600).
    #[arg(long, env = "KPI_GENERATE_SIGNING_KEY", requires = "signing_key", value_parser = clap::builder::BoolishValueParser::new())]
    pub generate_signing_key: bool,

    /// How often the TLS and auth files are checked for changes, in milliseconds.
    #[arg(
        long,
        env = "KPI_RELOAD_CHECK_MS",
        default_value_t = DEFAULT_RELOAD_CHECK_MS,
        value_parser = clap::value_parser!(u32).range(10..)
    )]
    pub reload_check_ms: u32,

    /// TOML file of settings: each key a flag's long name (`listen = "127.0.0.1:50051"`,
    /// `memory-budget = 512`, `insecure = true`). Flags and environment variables take
    /// precedence over it; see deploy/kpi.toml.example.
    #[arg(long, env = "KPI_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Config {
    /// The configuration from the process's flags and environment and, under them, the
    /// `--config` file.
    pub fn load() -> Result<Self, clap::Error> {
        Self::load_from(std::env::args_os())
    }

    /// [`Config::load`] from the command line `args` (the program name first). Precedence:
    /// flags, then environment variables, then the file, then the defaults. A key of the
    /// file that is no flag, or a value its flag refuses, is an error naming the file and
    /// the key.
    pub fn load_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        use clap::{CommandFactory, FromArgMatches, Parser};
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let first = Self::try_parse_from(&args)?;
        let Some(path) = &first.config else {
            return Ok(first);
        };
        let invalid = |reason: String| {
            Self::command().error(
                clap::error::ErrorKind::InvalidValue,
                format!("config file {}: {reason}", path.display()),
            )
        };
        let text = std::fs::read_to_string(path).map_err(|error| invalid(error.to_string()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|error| invalid(error.to_string()))?;
        let mut command = Self::command();
        let settable: Vec<String> = command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !matches!(*long, "config" | "help" | "version"))
            .map(str::to_owned)
            .collect();
        for (key, value) in table {
            if !settable.contains(&key) {
                return Err(invalid(format!(
                    "unknown key '{key}'; the keys are: {}",
                    settable.join(", ")
                )));
            }
            let value = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                other => {
                    return Err(invalid(format!(
                        "{key}: a string, an integer or a boolean, not {}",
                        other.type_str()
                    )));
                }
            };
            // The flag's own parser decides, with the file named in the error.
            let Some(arg) = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(key.as_str()))
            else {
                continue;
            };
            let alone = arg
                .clone()
                .required(false)
                .requires(clap::builder::Resettable::Reset)
                .global(false);
            let switch = !arg.get_action().takes_values();
            let line: Vec<String> = match (switch, value.as_str()) {
                (true, "true") => vec![format!("--{key}")],
                (true, "false") => Vec::new(),
                _ => vec![format!("--{key}"), value.clone()],
            };
            let parsed = clap::Command::new("kpi-server")
                .no_binary_name(true)
                .arg(alone)
                .try_get_matches_from(line);
            if let Err(error) = parsed {
                let rendered = error.to_string();
                let reason = rendered.lines().next().unwrap_or_default();
                let reason = reason.trim_start_matches("error: ");
                return Err(invalid(format!("{key}: {reason}")));
            }
            let id = arg.get_id().clone();
            command = command.mut_arg(id, |arg| arg.default_value(value));
        }
        let matches = command.try_get_matches_from(&args)?;
        Self::from_arg_matches(&matches)
    }

    /// The defaults, with the log in `data_dir`; what tests and embedders start from.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50051))),
            data_dir: data_dir.into(),
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
            dedup_window_hours: DEFAULT_DEDUP_WINDOW_HOURS,
            dedup_memory_kib: DEFAULT_DEDUP_MEMORY_KIB,
            memory_budget: DEFAULT_MEMORY_BUDGET_MIB,
            max_streams: DEFAULT_MAX_STREAMS,
            max_kpis: DEFAULT_MAX_KPIS,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            snapshot_every_events: DEFAULT_SNAPSHOT_EVERY_EVENTS,
            min_free_disk_mb: DEFAULT_MIN_FREE_DISK_MB,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            keepalive_secs: DEFAULT_KEEPALIVE_SECS,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth_file: None,
            insecure: false,
            no_reflection: false,
            no_list_streams: false,
            reload_check_ms: DEFAULT_RELOAD_CHECK_MS,
            signing_key: None,
            generate_signing_key: false,
            metrics_listen: None,
            otlp_endpoint: None,
            log_format: "text".into(),
            config: None,
            command: None,
        }
    }

    /// Bytes to keep free on the data directory's file system.
    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_disk_mb.saturating_mul(1024 * 1024)
    }

    /// The longest graceful shutdown.
    pub fn shutdown_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.shutdown_timeout_secs))
    }

    /// The caps on connections: at most `max_connections`, none quiet past the idle
    /// timeout.
    pub fn connection_limits(&self) -> crate::api::connections::ConnectionLimits {
        crate::api::connections::ConnectionLimits {
            max: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            idle_timeout: std::time::Duration::from_secs(u64::from(self.idle_timeout_secs)),
        }
    }

    /// Refuses an idle timeout that is not longer than the keepalive interval: live
    /// clients that wait quietly would be cut off before the ping that shows they live.
    pub fn check_timeouts(&self) -> Result<(), String> {
        if self.idle_timeout_secs <= self.keepalive_secs {
            return Err(format!(
                "--idle-timeout-secs ({}) must be longer than --keepalive-secs ({}): live clients that wait would be cut off",
                self.idle_timeout_secs, self.keepalive_secs
            ));
        }
        Ok(())
    }

    /// How long a client may send no frame before the server pings it.
    pub fn keepalive(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.keepalive_secs))
    }

    /// The allowed future skew of occurred_at.
    pub fn max_future_skew(&self) -> TimeDelta {
        TimeDelta::seconds(i64::from(self.max_future_skew_secs))
    }

    /// The interval of checkpoints and heartbeats on idle streams.
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.heartbeat_ms))
    }

    /// Bytes of memory for the newest event ids of the deduplication index.
    pub fn dedup_memory_bytes(&self) -> usize {
        usize::try_from(u64::from(self.dedup_memory_kib) * 1024).unwrap_or(usize::MAX)
    }

    /// Bytes the read models' buckets may hold in memory: the memory budget less the event
    /// ids and what the rest of the process needs; an error naming the smallest budget
    /// that works when that leaves less than 16 MiB.
    pub fn bucket_memory_bytes(&self) -> Result<usize, String> {
        let dedup_mib = u64::from(self.dedup_memory_kib).div_ceil(1024);
        let least = MEMORY_BESIDES_BUCKETS_MIB + dedup_mib + MIN_BUCKET_MEMORY_MIB;
        let buckets = u64::from(self.memory_budget)
            .checked_sub(MEMORY_BESIDES_BUCKETS_MIB + dedup_mib)
            .filter(|mib| *mib >= MIN_BUCKET_MEMORY_MIB)
            .ok_or_else(|| {
                format!(
                    "--memory-budget {} MiB is too small: with --dedup-memory-kib {} it must be at least {least} MiB",
                    self.memory_budget, self.dedup_memory_kib
                )
            })?;
        Ok(usize::try_from(buckets * 1024 * 1024).unwrap_or(usize::MAX))
    }

    /// How often the TLS and auth files are checked for changes.
    pub fn reload_check(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.reload_check_ms))
    }

    /// The TLS files, when the server serves TLS.
    pub fn tls_files(&self) -> Option<crate::api::tls::TlsFiles> {
        Some(crate::api::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// Why serving on `address` as configured is refused: beyond loopback, everyone who
    /// can reach the port could read and change everything unless TLS carries the traffic
    /// and an auth file or client certificates say who calls. `--insecure` allows it.
    pub fn refuse_insecure(&self, address: std::net::SocketAddr) -> Result<(), String> {
        let secured =
            self.tls_cert.is_some() && (self.auth_file.is_some() || self.tls_client_ca.is_some());
        if address.ip().is_loopback() || secured || self.insecure {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {address} beyond loopback without TLS and authentication: \
             anyone who reaches the port could read and change every KPI; give --tls-cert, \
             --tls-key and --auth-file (or --tls-client-ca), or --insecure to serve anyway"
        ))
    }

    /// The deduplication window of event ids.
    pub fn dedup_window(&self) -> TimeDelta {
        TimeDelta::hours(i64::from(self.dedup_window_hours))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_override_defaults() {
        let config = Config::parse_from([
            "kpi-server",
            "--listen",
            "[::1]:6000",
            "--data-dir",
            "/tmp/x",
            "--dedup-window-hours",
            "48",
        ]);
        assert_eq!(config.listen, "[::1]:6000".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.dedup_window(), TimeDelta::hours(48));
        assert!(Config::try_parse_from(["kpi-server", "--dedup-window-hours", "0"]).is_err());
        let recover = Config::parse_from(["kpi-server", "recover", "--data-dir", "/tmp/y"]);
        assert_eq!(recover.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(
            recover.command,
            Some(Command::Recover {
                accept_other_history: false
            })
        );
    }

    #[test]
    fn the_buckets_get_the_budget_less_the_rest() {
        let config = Config::with_data_dir("/tmp/x");
        assert_eq!(config.bucket_memory_bytes(), Ok((256 - 176 - 16) << 20));
        let small = Config::parse_from(["kpi-server", "--memory-budget", "100"]);
        let error = small.bucket_memory_bytes().expect_err("too small");
        assert!(error.contains("at least 208 MiB"), "{error}");
    }

    #[test]
    fn serving_beyond_loopback_needs_tls_and_authentication_or_insecure() {
        let outside: [SocketAddr; 3] = [
            "0.0.0.0:50051".parse().unwrap(),
            "[::]:50051".parse().unwrap(),
            "192.0.2.7:50051".parse().unwrap(),
        ];
        let flags = |extra: &[&str]| {
            let mut args = vec!["kpi-server"];
            args.extend_from_slice(extra);
            Config::parse_from(args)
        };
        let plain = flags(&[]);
        for address in ["127.0.0.1:50051", "[::1]:50051"] {
            assert!(plain.refuse_insecure(address.parse().unwrap()).is_ok());
        }
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let refused = [
            flags(&[]),
            flags(&tls),
            flags(&["--auth-file", "auth.toml"]),
        ];
        let allowed = [
            flags(&["--insecure"]),
            flags(&[&tls[..], &["--auth-file", "auth.toml"]].concat()),
            flags(&[&tls[..], &["--tls-client-ca", "ca.pem"]].concat()),
        ];
        for address in outside {
            for config in &refused {
                let error = config.refuse_insecure(address).expect_err("refused");
                assert!(error.contains("--insecure"), "{error}");
            }
            for config in &allowed {
                assert!(config.refuse_insecure(address).is_ok(), "{config:?}");
            }
        }
        // A key without its certificate is a flag error, not a silent plaintext server.
        assert!(Config::try_parse_from(["kpi-server", "--tls-key", "k.pem"]).is_err());
        assert!(Config::try_parse_from(["kpi-server", "--tls-client-ca", "ca.pem"]).is_err());
        assert!(flags(&["--insecure"]).insecure);
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    fn load(args: &[&str]) -> Result<Config, String> {
        Config::load_from(std::iter::once("kpi-server").chain(args.iter().copied()))
            .map_err(|error| error.to_string())
    }

    #[test]
    fn a_config_file_sets_what_flags_do_not() {
        let settings = file(
            "listen = \"[::1]:7000\"\nmemory-budget = 512\ninsecure = true\nno-list-streams = false\n\
             data-dir = \"/srv/kpi\"\nauth-file = \"/etc/kpi/auth.toml\"\n",
        );
        let path = settings.path().to_str().unwrap();
        let config = load(&["--config", path]).unwrap();
        assert_eq!(config.listen, "[::1]:7000".parse().unwrap());
        assert_eq!(config.memory_budget, 512);
        assert!(config.insecure);
        assert!(!config.no_list_streams);
        assert_eq!(config.data_dir, PathBuf::from("/srv/kpi"));
        assert_eq!(config.auth_file, Some(PathBuf::from("/etc/kpi/auth.toml")));
        assert_eq!(
            config.heartbeat_ms, DEFAULT_HEARTBEAT_MS,
            "the rest keep their defaults"
        );
        // Flags win over the file, wherever they stand.
        let config = load(&["--memory-budget", "300", "--config", path, "recover"]).unwrap();
        assert_eq!(config.memory_budget, 300);
        assert_eq!(config.listen, "[::1]:7000".parse().unwrap());
        assert!(matches!(config.command, Some(Command::Recover { .. })));
    }

    #[test]
    fn a_bad_config_file_names_the_file_and_the_key() {
        let cases = [
            ("listen = \"nowhere\"", "listen"),
            ("memory-budget = 0", "memory-budget"),
            ("memory_budget = 300", "unknown key 'memory_budget'"),
            ("listen = [1, 2]", "not array"),
            ("listen = ", "config file"),
        ];
        for (text, expected) in cases {
            let settings = file(text);
            let path = settings.path().to_str().unwrap();
            let error = load(&["--config", path]).expect_err(text);
            assert!(
                error.contains(path) && error.contains(expected),
                "{text}: {error}"
            );
        }
        let error = load(&["--config", "/nonexistent/kpi.toml"]).expect_err("missing file");
        assert!(error.contains("/nonexistent/kpi.toml"), "{error}");
    }

    #[test]
    fn the_example_config_file_loads() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kpi.toml.example");
        let config = load(&["--config", example]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:50051".parse().unwrap());
        assert!(
            config.refuse_insecure(config.listen).is_ok(),
            "TLS and auth are set"
        );
    }

    #[test]
    fn the_systemd_unit_starts_the_server_with_flags_it_has() {
        let unit = include_str!("../deploy/kpi-server.service");
        let exec = unit
            .lines()
            .find_map(|line| line.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kpi.toml.example");
        let args: Vec<&str> = exec
            .split_whitespace()
            .map(|arg| {
                if arg == "/etc/kpi-service/kpi.toml" {
                    example
                } else {
                    arg
                }
            })
            .collect();
        let config = Config::load_from(args).expect("the unit's command line parses");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/kpi-service"));
        // The descriptors the default connection cap needs, with room.
        let nofile: u64 = unit
            .lines()
            .find_map(|line| line.strip_prefix("LimitNOFILE="))
            .expect("the unit sets LimitNOFILE")
            .parse()
            .unwrap();
        assert!(nofile >= u64::from(config.max_connections) + 256);
    }

    #[test]
    fn an_idle_timeout_within_the_keepalive_is_refused() {
        let mut config = Config::with_data_dir(DEFAULT_DATA_DIR);
        assert!(config.check_timeouts().is_ok(), "the defaults");
        config.idle_timeout_secs = config.keepalive_secs;
        let error = config.check_timeouts().unwrap_err();
        assert!(error.contains("--idle-timeout-secs"), "{error}");
    }

    #[test]
    fn defaults_match_the_readme() {
        let config = Config::with_data_dir(DEFAULT_DATA_DIR);
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.max_future_skew(), TimeDelta::minutes(5));
    }
}
