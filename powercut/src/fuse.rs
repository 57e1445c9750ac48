//! The FUSE adapter: turns the kernel's requests into calls on the shared [`State`] and
//! its answers into replies. No filesystem logic lives here.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::state::{Attr, FsResult, Kind, PAGE_SIZE, SetAttr, State};

/// How long the kernel may cache attributes and names. Only the kernel changes the
/// filesystem between cuts and every cut remounts, so any cached answer stays true; a
/// second keeps the kernel from asking again for every `stat`.
const TTL: Duration = Duration::from_secs(1);

/// Inodes `statfs` reports as the most the filesystem can hold; the model has no limit.
const MAX_INODES: u64 = 1 << 24;

/// The longest name, as `statfs` reports it.
const NAME_MAX: u32 = 255;

/// The block size `stat` and `statfs` report: one page (4096 fits in u32).
const BLOCK_SIZE: u32 = PAGE_SIZE as u32;

/// `stat` counts blocks of 512 bytes.
const SECTORS_PER_PAGE: u64 = PAGE_SIZE as u64 / 512;

/// The filesystem as the FUSE session sees it: a handle on the state it shares with
/// [`crate::Mounted`].
pub(crate) struct PowerCutAdapter {
    pub(crate) state: Arc<Mutex<State>>,
}

impl PowerCutAdapter {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug of this crate that has already failed
        // the test; serving the state as it is beats hanging the kernel's requests.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.pages * SECTORS_PER_PAGE,
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.crtime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Directory => FileType::Directory,
    }
}

fn time(value: TimeOrNow) -> SystemTime {
    match value {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// The permission bits of a new inode: `mode` less the caller's umask.
fn permissions(mode: u32, umask: u32) -> u16 {
    u16::try_from(mode & !umask & 0o7777).unwrap_or(0o644)
}

fn reply_entry(reply: ReplyEntry, result: FsResult<Attr>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
        Err(code) => reply.error(errno(code)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(code) => reply.error(errno(code)),
    }
}

impl Filesystem for PowerCutAdapter {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.state().lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            perm: mode.map(|mode| permissions(mode, 0)),
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        match self.state().setattr(ino.0, change) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.state().mkdir(
            parent.0,
            name,
            permissions(mode, umask),
            req.uid(),
            req.gid(),
        );
        reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.state().unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.state().rmdir(parent.0, name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            // Neither sled nor std uses them; refusing beats modelling them wrongly.
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let result = self
            .state()
            .rename(parent.0, name, newparent.0, newname, no_replace);
        reply_empty(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC arrives as a setattr before the open, and the kernel never sends a
        // write-back of cached pages (no writeback cache is negotiated), so the flags
        // need no handling here.
        match self.state().open(ino.0) {
            Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let created = match state.create_file(
            parent.0,
            name,
            permissions(mode, umask),
            req.uid(),
            req.gid(),
        ) {
            // The kernel normally asks only for names it just found missing; should another
            // request have created it in between, open it as open(O_CREAT) would.
            Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => {
                state.lookup(parent.0, name).and_then(|attr| {
                    if flags & libc::O_TRUNC != 0 {
                        state.setattr(
                            attr.ino,
                            SetAttr {
                                size: Some(0),
                                ..SetAttr::default()
                            },
                        )
                    } else {
                        Ok(attr)
                    }
                })
            }
            other => other,
        };
        match created.and_then(|attr| state.open(attr.ino).map(|handle| (attr, handle))) {
            Ok((attr, handle)) => reply.created(
                &TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(handle),
                FopenFlags::empty(),
            ),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // O_SYNC / O_DSYNC need nothing here: the kernel follows such a write with an
        // fsync request of its own.
        match self.state().write(ino.0, offset, data) {
            Ok(written) => reply.written(written),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.state().fsync(ino.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().opendir(ino.0) {
            Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.state();
        let entries = match state.readdir(fh.0) {
            Ok(entries) => entries,
            Err(code) => {
                reply.error(errno(code));
                return;
            }
        };
        // The offset the kernel passes back is the position after the last entry it got.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (position, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            let next = u64::try_from(position + 1).unwrap_or(u64::MAX);
            if reply.add(INodeNo(*ino), next, file_type(*kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.state().fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let space = self.state().space();
        reply.statfs(
            space.total_pages,
            space.free_pages,
            space.free_pages,
            MAX_INODES,
            MAX_INODES.saturating_sub(space.inodes),
            BLOCK_SIZE,
            NAME_MAX,
            BLOCK_SIZE,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = match mode {
            0 => match offset.checked_add(length) {
                Some(end) => self.state().allocate(ino.0, end),
                None => Err(libc::EFBIG),
            },
            // Reserving space without changing the size: the model keeps no reservations.
            libc::FALLOC_FL_KEEP_SIZE => self.state().attr(ino.0).map(|_| ()),
            // Punching or zeroing ranges: nothing this harness runs uses them.
            _ => Err(libc::EOPNOTSUPP),
        };
        reply_empty(reply, result);
    }
}
