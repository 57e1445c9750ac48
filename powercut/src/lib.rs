//! kpi-powercut: a test-only, in-memory FUSE filesystem that simulates power cuts (in the
//! spirit of Jepsen's LazyFS), used by `tests/power_cut.rs` to cut power under a running
//! `kpi-server`.
//!
//! To the processes using it, the mount is an ordinary POSIX filesystem. Underneath it
//! remembers, per file, what was written since the file's last `fsync`/`fdatasync`, and per
//! directory which entries changed (create, unlink, mkdir, rmdir, rename) since the
//! directory's last `fsync`. [`Mounted::cut`] throws exactly that away.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let mut mounted = kpi_powercut::PowerCutFs::new().mount("/tmp/mnt")?;
//! // ... run a process on /tmp/mnt, SIGKILL it and reap it ...
//! let lost = mounted.cut()?;
//! println!("{lost:?}, {:?}", mounted.stats());
//! # Ok(())
//! # }
//! ```
//!
//! # Durability model
//! - A file's contents and size become durable at `fsync` or `fdatasync` of that file
//!   (`fdatasync` makes the size durable too, as Linux does when the size changed); a
//!   write with `O_SYNC`/`O_DSYNC` is durable because the kernel follows it with one.
//!   Nothing else makes file data durable: `close`, `sync_file_range` (never reaches a
//!   FUSE filesystem) and `msync` do not.
//! - A directory's entries become durable at `fsync` of that directory (strict POSIX): a
//!   file created and fsynced in a directory that was never fsynced is gone after a cut; an
//!   unlink or rename not followed by an `fsync` of its directory (both directories, for a
//!   move) is undone. A new directory's own entries need an `fsync` of it as well.
//! - A cut keeps the durable state and drops the rest whole; whatever the root no longer
//!   reaches afterwards is lost with the entries that named it.
//! - Contents are 4 KiB pages shared by `Arc` between the durable and the current layer,
//!   with a set of dirty pages per file, so a sync costs O(dirty pages) and a write to a
//!   shared page copies that page.
//!
//! # Page cache
//! No writeback cache is negotiated, so every `write` reaches the filesystem before it
//! returns and the kernel never holds dirty data of its own. A cut unmounts, reverts and
//! mounts again at the same path, which also drops every page, name and attribute the
//! kernel cached: nothing from before the cut can be read after it. That is why a cut
//! needs the mount to be unused (the caller reaps the process first).
//!
//! # Known gaps versus a real disk
//! - A cut loses *all* unsynced data. A real disk may also have written some of it, in
//!   any order and torn at sector boundaries; those intermediate states are not explored.
//! - Metadata other than size and names (mode, owner, times) is durable at once.
//! - Each directory is synced on its own, so a move between two directories of which only
//!   one was synced can leave the inode under both names or neither; journaling
//!   filesystems make a rename atomic.
//! - No hard links, symlinks, special files, extended attributes or POSIX locks (`flock`
//!   is left to the kernel); `fallocate` only extends the size.
//!
//! # Layout
//! - `state`: the model (layers, syncs, the cut), free of FUSE.
//! - `fuse`: the `fuser::Filesystem` adapter over the model.
//! - `mount`: [`PowerCutFs`] and [`Mounted`]: mount, cut, counters, unmount on drop.

mod fuse;
mod mount;
mod state;

pub use mount::{DEFAULT_CAPACITY_BYTES, DEFAULT_UNMOUNT_PATIENCE, FS_NAME, Mounted, PowerCutFs};
pub use state::{CutReport, PAGE_SIZE, Stats};
