//! Mounting: [`PowerCutFs`] (the options) mounts the filesystem and hands back a
//! [`Mounted`], which cuts power (unmount, revert to the durable state, mount again),
//! reports the sync counters, and unmounts when dropped.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};

use crate::fuse::PowerCutAdapter;
use crate::state::{CutReport, State, Stats};

/// What `statfs` reports by default: plenty for any test, small enough to look like a disk.
pub const DEFAULT_CAPACITY_BYTES: u64 = 16 << 30;

/// The source name of the mount in `/proc/mounts`, so a leftover mount of a killed test can
/// be recognised (and removed with `umount -l`).
pub const FS_NAME: &str = "kpi-powercut";

/// How long `cut` and `unmount` wait by default for the kernel to let go of the mount. The
/// caller promises that no process uses it, but the kernel may still be releasing the files
/// of a process that was just reaped.
pub const DEFAULT_UNMOUNT_PATIENCE: Duration = Duration::from_secs(5);

/// How to build the filesystem; [`PowerCutFs::mount`] mounts it.
#[derive(Debug, Clone)]
pub struct PowerCutFs {
    capacity_bytes: u64,
    enforce_capacity: bool,
    unmount_patience: Duration,
}

impl Default for PowerCutFs {
    fn default() -> Self {
        Self {
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            enforce_capacity: false,
            unmount_patience: DEFAULT_UNMOUNT_PATIENCE,
        }
    }
}

impl PowerCutFs {
    /// The defaults: an empty filesystem of `DEFAULT_CAPACITY_BYTES` that never fills up.
    pub fn new() -> Self {
        Self::default()
    }

    /// The capacity `statfs` reports.
    pub fn capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// Makes writes (and `fallocate`) that would hold more than the capacity fail with
    /// `ENOSPC`, as a full disk does.
    pub fn fail_writes_past_capacity(mut self) -> Self {
        self.enforce_capacity = true;
        self
    }

    /// How long a cut waits for a busy mount to become free before it fails.
    pub fn unmount_patience(mut self, patience: Duration) -> Self {
        self.unmount_patience = patience;
        self
    }

    /// Mounts an empty filesystem on `mountpoint` (an existing directory). Its root
    /// directory belongs to the owner of `mountpoint` and is durable from the start.
    pub fn mount(self, mountpoint: impl AsRef<Path>) -> io::Result<Mounted> {
        let mountpoint = mountpoint.as_ref().canonicalize()?;
        let owner = std::fs::metadata(&mountpoint)?;
        let state = State::new(
            self.capacity_bytes,
            self.enforce_capacity,
            owner.uid(),
            owner.gid(),
        );
        let state = Arc::new(Mutex::new(state));
        let session = spawn_session(&mountpoint, &state)?;
        Ok(Mounted {
            mountpoint,
            state,
            session: Some(session),
            unmount_patience: self.unmount_patience,
        })
    }
}

/// A mounted power-cut filesystem. Dropping it unmounts (lazily if something still uses
/// the mount), also while a test unwinds from a panic.
pub struct Mounted {
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    /// The FUSE session; `None` only while a cut remounts, or after a failed remount.
    session: Option<BackgroundSession>,
    unmount_patience: Duration,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl Mounted {
    /// Where the filesystem is mounted (canonical).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The sync counters and what would be lost by a cut now.
    pub fn stats(&self) -> Stats {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats()
    }

    /// Cuts power: everything not made durable by `fsync`/`fdatasync` (file pages and
    /// sizes) or `fsync` of a directory (its entries) is lost, then the filesystem is
    /// mounted again at the same path with what survived.
    ///
    /// The caller guarantees that no process uses the mount any more (e.g. the server
    /// was SIGKILLed and reaped); a mount still busy after the `unmount_patience` is an error and
    /// stays mounted, uncut. The unmount also empties the kernel's caches of this mount
    /// (pages, names, attributes), so nothing from before the cut can be read after it.
    pub fn cut(&mut self) -> io::Result<CutReport> {
        let session = self
            .session
            .take()
            .ok_or_else(|| io::Error::other("the power-cut filesystem is not mounted"))?;
        if let Err(error) = unmount_waiting(&self.mountpoint, self.unmount_patience) {
            self.session = Some(session);
            return Err(error);
        }
        // The kernel has ended the connection, so the session's loop ends too. (Not
        // `umount_and_join`: it would try to unmount the path a second time.)
        join_ended(session)?;
        let report = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .power_cut();
        self.session = Some(spawn_session(&self.mountpoint, &self.state)?);
        Ok(report)
    }

    /// Unmounts, waiting up to the `unmount_patience` for the mount to be free; an error
    /// leaves it to the lazy unmount of `drop`.
    pub fn unmount(mut self) -> io::Result<()> {
        if let Some(session) = self.session.take() {
            unmount_waiting(&self.mountpoint, self.unmount_patience)?;
            join_ended(session)?;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if unmount_path(&self.mountpoint, false).is_ok() {
            let _ = join_ended(session);
            return;
        }
        // Something still uses the mount (a test failed with a server still running):
        // detach it so the mountpoint can go, and let the session end when its last user
        // does rather than block the unwinding test.
        if let Err(error) = unmount_path(&self.mountpoint, true) {
            eprintln!(
                "kpi-powercut: cannot unmount {}: {error}; remove it with `umount -l`",
                self.mountpoint.display()
            );
        }
        drop(session);
    }
}

/// Waits for the loop of a session whose mount was removed. The loop ends with ENODEV
/// (fuser's normal end), or with ECONNABORTED when the kernel ended the connection while
/// the loop was reading from or replying to it: both are the end the unmount asked for.
fn join_ended(session: BackgroundSession) -> io::Result<()> {
    match session.join() {
        Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => Ok(()),
        ended => ended,
    }
}

/// Starts a FUSE session serving `state` on `mountpoint`.
fn spawn_session(mountpoint: &Path, state: &Arc<Mutex<State>>) -> io::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(FS_NAME.to_owned()),
        MountOption::RW,
        // Times of reads do not matter to durability; not tracking them saves requests.
        MountOption::NoAtime,
        // The kernel checks permissions against the reported modes, as a disk fs does.
        MountOption::DefaultPermissions,
    ];
    // One thread: the state is behind one lock anyway, and requests then reach it in the
    // order the kernel sends them.
    config.n_threads = Some(1);
    let adapter = PowerCutAdapter {
        state: Arc::clone(state),
    };
    fuser::spawn_mount(adapter, mountpoint, &config).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "mounting the power-cut filesystem on {}: {error}",
                mountpoint.display()
            ),
        )
    })
}

/// Unmounts `mountpoint`, retrying while the kernel reports it busy.
fn unmount_waiting(mountpoint: &Path, patience: Duration) -> io::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match unmount_path(mountpoint, false) {
            Ok(()) => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => {
                return Err(io::Error::new(
                    error.kind(),
                    format!(
                        "unmounting {} (is a process still using it?): {error}",
                        mountpoint.display()
                    ),
                ));
            }
        }
    }
}

/// Unmounts `mountpoint` with umount2(2), `lazy` detaching it even while in use; without
/// the privilege for that (not root), through the setuid `fusermount3 -u`, as libfuse does.
fn unmount_path(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `path` is a NUL-terminated string that outlives the call; umount2 reads it
    // and nothing else of this process.
    let result = unsafe { libc::umount2(path.as_ptr(), flags) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EPERM) {
        return Err(error);
    }
    let mut last = error;
    for helper in ["fusermount3", "fusermount"] {
        let mut command = Command::new(helper);
        command.arg("-u").arg("-q");
        if lazy {
            command.arg("-z");
        }
        match command.arg("--").arg(mountpoint).output() {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => {
                let message = String::from_utf8_lossy(&output.stderr);
                // fusermount reports a busy mount only in words.
                if message.contains("busy") {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                return Err(io::Error::other(format!("{helper} -u: {}", message.trim())));
            }
            Err(error) => last = error,
        }
    }
    Err(last)
}
