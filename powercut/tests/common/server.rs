//! A `kpi-server` process for the power-cut test: started from the binary named by
//! `KPI_SERVER_BIN` on loopback port 0, its address read from its log, SIGKILLed and
//! reaped on request, and always when dropped (also while a failing test unwinds).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long a server may take to open its log and start listening. A restart replays the
/// log's tail (or all of it, for the rebuild), which takes well under a second at the
/// test's sizes; the margin is for a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of a server's log shown when something goes wrong.
const LOG_TAIL_LINES: usize = 25;

/// What the server logs once it accepts connections; the line also names the address.
const SERVING_LINE: &str = "serving kpi.v1 over gRPC";

/// The `kpi-server` binary under test, from `KPI_SERVER_BIN`.
pub fn server_binary() -> PathBuf {
    let Some(path) = std::env::var_os("KPI_SERVER_BIN") else {
        panic!(
            "KPI_SERVER_BIN is not set: build the server (cargo build --release --bin \
             kpi-server) and set KPI_SERVER_BIN to the binary, or run .ci/power-cut"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "KPI_SERVER_BIN={} is not a file",
        path.display()
    );
    path
}

/// A running `kpi-server`.
pub struct ServerProcess {
    /// A short name for messages ("main", "rebuild").
    name: String,
    child: Option<Child>,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Its stderr (the tracing log), without colour codes.
    log_path: PathBuf,
}

impl ServerProcess {
    /// Starts `binary` on `data_dir` with `extra_args`, logging to `log_path`, and waits
    /// until it serves. An `Err` says why it did not (with the end of its log); the process
    /// is gone by then.
    ///
    /// Call it from the test's own thread (not from a spawned task): the child is killed
    /// when the thread that started it ends, so no server outlives a test killed from
    /// outside.
    pub async fn start(
        binary: &Path,
        name: &str,
        data_dir: &Path,
        extra_args: &[String],
        log_path: &Path,
    ) -> Result<Self, String> {
        let mut log = File::create(log_path)
            .map_err(|error| format!("{name}: cannot create {}: {error}", log_path.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                // If the test process dies without unwinding (killed by a CI timeout), the
                // kernel kills the server too instead of leaving it on the mount.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|error| format!("{name}: cannot start {}: {error}", binary.display()))?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name}: no stderr pipe"));
        };
        let (address_sender, address) = oneshot::channel::<SocketAddr>();
        // A thread copies the log until the process ends, reporting the address once.
        std::thread::spawn(move || {
            let mut address_sender = Some(address_sender);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                let _ = writeln!(log, "{line}");
                if line.contains(SERVING_LINE)
                    && let Some(addr) = parse_address(&line)
                    && let Some(sender) = address_sender.take()
                {
                    let _ = sender.send(addr);
                }
            }
        });
        let mut server = Self {
            name: name.to_owned(),
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path: log_path.to_owned(),
        };
        match tokio::time::timeout(START_TIMEOUT, address).await {
            Ok(Ok(addr)) => {
                server.addr = addr;
                Ok(server)
            }
            Ok(Err(_)) => {
                // The log ended without the line: the process exited.
                let status = server.reap();
                Err(format!(
                    "{name} exited ({status}) before serving; its log ends:\n{}",
                    server.log_tail()
                ))
            }
            Err(_) => {
                server.kill();
                Err(format!(
                    "{name} did not serve within {START_TIMEOUT:?}; its log ends:\n{}",
                    server.log_tail()
                ))
            }
        }
    }

    /// SIGKILLs the server and reaps it: after this no process of it uses the data directory.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Fails only if it already exited, which `wait` then reaps.
            let _ = child.kill();
        }
        self.reap();
    }

    /// Sends SIGTERM and waits up to `patience` for the process to end; returns how it
    /// ended and how long that took, or `Err` (after a SIGKILL) when it did not end in time.
    // Used by disk_full.rs; power_cut.rs compiles this module too.
    #[allow(dead_code)]
    pub fn terminate(
        &mut self,
        patience: Duration,
    ) -> Result<(std::process::ExitStatus, Duration), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{}: already reaped", self.name));
        };
        let started = std::time::Instant::now();
        let pid = libc::pid_t::try_from(child.id()).map_err(|error| error.to_string())?;
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(format!("{}: SIGTERM failed", self.name));
        }
        while started.elapsed() < patience {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Ok((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "{} did not end within {patience:?} of SIGTERM; its log ends:\n{}",
            self.name,
            self.log_tail()
        ))
    }

    /// Waits for the process to end; returns how it ended.
    fn reap(&mut self) -> String {
        match self.child.take() {
            Some(mut child) => match child.wait() {
                Ok(status) => status.to_string(),
                Err(error) => format!("wait failed: {error}"),
            },
            None => "already reaped".to_owned(),
        }
    }

    /// The last lines of the server's log, indented.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        let mut tail = format!("    ({} log: {})\n", self.name, self.log_path.display());
        for line in &lines[start..] {
            tail.push_str("    ");
            tail.push_str(line);
            tail.push('\n');
        }
        tail
    }

    /// The gRPC endpoint, for clients.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`), in case the server colours
/// its log despite `NO_COLOR`.
fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The `address=...` field of the serving line.
fn parse_address(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("address=")?;
    rest.split_whitespace().next()?.parse().ok()
}
