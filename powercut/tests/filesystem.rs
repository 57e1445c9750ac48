//! The power-cut filesystem through a real mount: ordinary POSIX behaviour, what a cut keeps
//! (what was fsynced, and directory entries whose directory was fsynced) and what it loses,
//! and sled 0.34 running on it across cuts.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use kpi_powercut::{Mounted, PowerCutFs};
use tempfile::TempDir;

/// A fresh filesystem mounted on a temporary directory. The directory is declared first
/// so that it outlives the mount (fields drop in order).
struct Fixture {
    fs: Mounted,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self::with(PowerCutFs::new())
    }

    fn with(options: PowerCutFs) -> Self {
        let dir = tempfile::tempdir().expect("temporary mountpoint");
        let fs = options
            .mount(dir.path())
            .expect("mount the power-cut filesystem");
        Self { fs, _dir: dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.fs.path().join(name)
    }

    fn cut(&mut self) -> kpi_powercut::CutReport {
        self.fs.cut().expect("power cut")
    }
}

fn sync_dir(path: &Path) {
    File::open(path)
        .expect("open directory")
        .sync_all()
        .expect("fsync directory");
}

/// Creates `path` with `contents`, fsyncs it and its directory: durable.
fn durable_file(path: &Path, contents: &[u8]) {
    let mut file = File::create(path).expect("create file");
    file.write_all(contents).expect("write file");
    file.sync_all().expect("fsync file");
    sync_dir(path.parent().expect("file has a directory"));
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).expect("read file")
}

#[test]
fn behaves_like_a_filesystem_before_any_cut() {
    let fixture = Fixture::new();
    let dir = fixture.path("a/b");
    fs::create_dir_all(&dir).expect("mkdir -p");
    let path = dir.join("file");
    // Across page boundaries, with a hole.
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    file.write_all(&[7; 5000]).expect("write");
    file.seek(SeekFrom::Start(12_000)).expect("seek");
    file.write_all(b"tail").expect("write after a hole");
    let mut contents = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.read_to_end(&mut contents).expect("read back");
    assert_eq!(contents.len(), 12_004);
    assert!(contents[..5000].iter().all(|b| *b == 7));
    assert!(
        contents[5000..12_000].iter().all(|b| *b == 0),
        "a hole reads as zeros"
    );
    assert_eq!(&contents[12_000..], b"tail");
    // Shrinking zeroes what a later growth exposes.
    file.set_len(100).expect("truncate");
    file.set_len(6000).expect("extend");
    let contents = read(&path);
    assert!(contents[..100].iter().all(|b| *b == 7));
    assert!(contents[100..].iter().all(|b| *b == 0));
    drop(file);

    fs::rename(&path, dir.join("moved")).expect("rename");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("readdir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["moved"]);
    assert!(
        fs::remove_dir(fixture.path("a")).is_err(),
        "rmdir of a non-empty directory"
    );
    fs::remove_file(dir.join("moved")).expect("unlink");
    fs::remove_dir(&dir).expect("rmdir");
    assert!(!dir.exists());

    let statvfs = nix_statvfs(fixture.fs.path());
    assert_eq!(
        statvfs.0 * statvfs.1,
        kpi_powercut::DEFAULT_CAPACITY_BYTES,
        "statfs reports the capacity"
    );
}

/// (blocks, fragment size) of statvfs(3).
fn nix_statvfs(path: &Path) -> (u64, u64) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut buffer = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type, which statvfs
    // fills completely when it returns 0.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), buffer.as_mut_ptr()) };
    assert_eq!(result, 0, "statvfs: {}", std::io::Error::last_os_error());
    // SAFETY: statvfs succeeded, so the buffer is initialised.
    let buffer = unsafe { buffer.assume_init() };
    (buffer.f_blocks, buffer.f_frsize)
}

#[test]
fn an_unsynced_write_is_lost() {
    let mut fixture = Fixture::new();
    let path = fixture.path("file");
    durable_file(&path, b"synced");
    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(b" and more").expect("write");
    file.flush().expect("flush");
    drop(file);
    assert_eq!(read(&path), b"synced and more");
    assert!(fixture.fs.stats().unsynced_bytes > 0);

    let report = fixture.cut();
    assert_eq!(read(&path), b"synced");
    assert!(
        report.pages_discarded >= 1 && report.sizes_reverted == 1,
        "{report:?}"
    );
    assert_eq!(fixture.fs.stats().unsynced_bytes, 0);
}

#[test]
fn an_fsynced_write_is_kept() {
    let mut fixture = Fixture::new();
    let path = fixture.path("file");
    durable_file(&path, b"first");
    let mut file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all(b"FIRST, then second").expect("overwrite");
    file.sync_all().expect("fsync");
    drop(file);
    let before = fixture.fs.stats();
    let report = fixture.cut();
    assert_eq!(read(&path), b"FIRST, then second");
    assert_eq!(report.pages_discarded, 0, "{report:?}");
    assert_eq!(before.fsyncs, 2);
    assert_eq!(before.fsyncdirs, 1);
}

#[test]
fn fdatasync_keeps_the_grown_size() {
    let mut fixture = Fixture::new();
    let path = fixture.path("file");
    durable_file(&path, b"");
    let mut file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all(&[1; 10_000]).expect("append");
    file.sync_data().expect("fdatasync");
    drop(file);
    assert_eq!(fixture.fs.stats().fdatasyncs, 1);
    fixture.cut();
    assert_eq!(read(&path), vec![1; 10_000]);
}

#[test]
fn sync_file_range_makes_nothing_durable_but_o_dsync_does() {
    let mut fixture = Fixture::new();
    let ranged = fixture.path("ranged");
    let dsync = fixture.path("dsync");
    durable_file(&ranged, b"");
    durable_file(&dsync, b"");

    let mut file = OpenOptions::new().write(true).open(&ranged).expect("open");
    file.write_all(b"written, range-synced").expect("write");
    // What sled 0.34's flush calls.
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor and a range inside the file.
    let result = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 21, flags) };
    assert_eq!(
        result,
        0,
        "sync_file_range: {}",
        std::io::Error::last_os_error()
    );
    drop(file);

    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&dsync)
        .expect("open O_DSYNC");
    file.write_all(b"written with O_DSYNC").expect("write");
    drop(file);

    fixture.cut();
    assert_eq!(read(&ranged), b"", "sync_file_range is not a sync");
    assert_eq!(read(&dsync), b"written with O_DSYNC");
}

#[test]
fn a_new_file_needs_its_directory_synced() {
    let mut fixture = Fixture::new();
    for dir in ["unsynced", "synced"] {
        fs::create_dir(fixture.path(dir)).expect("mkdir");
    }
    sync_dir(fixture.fs.path());
    let lost = fixture.path("unsynced/lost");
    let mut file = File::create(&lost).expect("create");
    file.write_all(b"synced data, unsynced name")
        .expect("write");
    file.sync_all().expect("fsync file only");
    drop(file);

    let kept = fixture.path("synced/kept");
    durable_file(&kept, b"both synced");

    let report = fixture.cut();
    assert!(
        !lost.exists(),
        "created and fsynced, directory never fsynced"
    );
    assert_eq!(read(&kept), b"both synced");
    assert!(report.inodes_lost >= 1, "{report:?}");
}

#[test]
fn a_synced_name_of_an_unsynced_file_keeps_the_durable_size() {
    let mut fixture = Fixture::new();
    let path = fixture.path("empty");
    let mut file = File::create(&path).expect("create");
    sync_dir(fixture.fs.path());
    file.write_all(b"never synced").expect("write");
    drop(file);
    fixture.cut();
    assert_eq!(read(&path), b"", "the name survived, the data did not");
}

#[test]
fn rename_and_unlink_revert_without_a_directory_sync() {
    let mut fixture = Fixture::new();
    let old = fixture.path("snapshot.tmp");
    let new = fixture.path("snapshot");
    let gone = fixture.path("gone");
    durable_file(&new, b"old snapshot");
    durable_file(&old, b"new snapshot");
    durable_file(&gone, b"unlinked");

    fs::rename(&old, &new).expect("rename over");
    fs::remove_file(&gone).expect("unlink");
    assert!(!gone.exists() && !old.exists());
    let report = fixture.cut();
    assert_eq!(read(&new), b"old snapshot");
    assert_eq!(read(&old), b"new snapshot");
    assert_eq!(read(&gone), b"unlinked");
    assert_eq!(report.entries_reverted, 3, "{report:?}");

    fs::rename(&old, &new).expect("rename over again");
    fs::remove_file(&gone).expect("unlink again");
    sync_dir(fixture.fs.path());
    fixture.cut();
    assert_eq!(read(&new), b"new snapshot");
    assert!(!old.exists() && !gone.exists());
}

#[test]
fn directories_follow_the_same_rules() {
    let mut fixture = Fixture::new();
    let parent = fixture.path("parent");
    fs::create_dir(&parent).expect("mkdir");
    sync_dir(fixture.fs.path());
    let child = parent.join("child");
    fs::create_dir(&child).expect("mkdir child");
    durable_file(&child.join("file"), b"in an unsynced directory");

    fixture.cut();
    assert!(parent.is_dir(), "its parent was synced");
    assert!(!child.exists(), "the entry in `parent` was never synced");

    fs::create_dir(&child).expect("mkdir child again");
    sync_dir(&parent);
    fs::remove_dir(&child).expect("rmdir");
    fixture.cut();
    assert!(child.is_dir(), "rmdir undone");
    assert_eq!(fs::read_dir(&child).expect("readdir").count(), 0);
}

#[test]
fn writes_past_an_enforced_capacity_fail_with_enospc() {
    let fixture = Fixture::with(
        PowerCutFs::new()
            .capacity_bytes(64 * 1024)
            .fail_writes_past_capacity(),
    );
    let mut file = File::create(fixture.path("big")).expect("create");
    file.write_all(&[0; 60 * 1024]).expect("fits");
    let error = file
        .write_all(&[0; 8 * 1024])
        .expect_err("past the capacity");
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    drop(file);
    fs::remove_file(fixture.path("big")).expect("unlink frees the space");
    fs::write(fixture.path("small"), [0; 8 * 1024]).expect("fits again");
}

#[test]
fn a_cut_refuses_a_busy_mount_and_leaves_it_usable() {
    let mut fixture = Fixture::with(PowerCutFs::new().unmount_patience(Duration::from_millis(300)));
    let path = fixture.path("open");
    durable_file(&path, b"x");
    let file = File::open(&path).expect("open");
    let error = fixture
        .fs
        .cut()
        .expect_err("a process still uses the mount");
    assert!(error.to_string().contains("still using"), "{error}");
    assert_eq!(read(&path), b"x");
    drop(file);
    fixture.cut();
    assert_eq!(read(&path), b"x");
}

#[test]
fn sled_runs_on_it_across_cuts() {
    let mut fixture = Fixture::new();
    let data = fixture.path("data");
    fs::create_dir(&data).expect("mkdir");
    sync_dir(fixture.fs.path());
    let sled_dir = data.join("sled");
    let mut next_key = 0_u32;
    for round in 0..3 {
        let db = sled::open(&sled_dir).expect("sled opens after a cut");
        // Whatever sled lost is fine here; what it kept must be what was written.
        for item in db.iter() {
            let (key, value) = item.expect("sled reads what survived");
            assert_eq!(&*key, &*value, "a value survived under another key");
        }
        for _ in 0..2000 {
            let key = next_key.to_be_bytes();
            db.insert(key, &key[..]).expect("insert");
            next_key += 1;
        }
        db.flush().expect("flush");
        if round == 1 {
            // What a store that syncs its directories would do.
            sync_dir(&data);
            sync_dir(&sled_dir);
        }
        drop(db);
        fixture.cut();
    }
    let stats = fixture.fs.stats();
    assert_eq!(stats.cuts, 3);
    assert!(
        stats.fsyncs > 0,
        "sled fsyncs its log file now and then: {stats:?}"
    );
}
