//! Reloads of the TLS files and the auth file: when one of them changes (checked every
//! `--reload-check-ms`) or on SIGHUP. A file that does not load leaves the server as it
//! was (the error is logged) until it changes again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::auth::Gate;
use super::tls::ServerTls;

/// What identifies a version of a file: its modification time, size and inode (`None`
/// while it cannot be read).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

/// Files and the stamps they had when last read.
struct Watched {
    paths: Vec<PathBuf>,
    stamps: Vec<Stamp>,
}

impl Watched {
    fn new(paths: Vec<PathBuf>) -> Self {
        let stamps = paths.iter().map(|path| stamp(path)).collect();
        Self { paths, stamps }
    }

    /// Whether any changed since the last call (or since `new`); takes the new stamps.
    fn changed(&mut self) -> bool {
        let stamps: Vec<Stamp> = self.paths.iter().map(|path| stamp(path)).collect();
        let changed = stamps != self.stamps;
        self.stamps = stamps;
        changed
    }
}

/// Watches the files of `tls` and `gate` until `stop` is cancelled.
pub async fn watch(
    tls: Option<Arc<ServerTls>>,
    gate: Arc<Gate>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tls_files = tls.as_ref().map(|tls| Watched::new(tls.files().paths()));
    let mut auth_file = gate.path().map(|path| Watched::new(vec![path.to_owned()]));
    if tls_files.is_none() && auth_file.is_none() {
        return;
    }
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; files are reloaded when they change");
            None
        }
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => false,
            Some(()) = async { hangups.as_mut()?.recv().await } => true,
        };
        if let (Some(tls), Some(files)) = (&tls, &mut tls_files)
            && (files.changed() || forced)
        {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                Err(error) => {
                    tracing::error!(%error, "TLS files not reloaded; the old ones stay in use")
                }
            }
        }
        if let Some(file) = &mut auth_file
            && (file.changed() || forced)
        {
            match gate.reload() {
                Ok(count) => tracing::info!(principals = count, "auth file reloaded"),
                Err(error) => {
                    tracing::error!(%error, "auth file not reloaded; the old one stays in use")
                }
            }
        }
    }
}
