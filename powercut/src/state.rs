//! The filesystem's model, free of FUSE: inodes with a *current* layer (what a process
//! reads back) and a *durable* layer (what a disk would hold after a power cut), the
//! operations that change the current layer, the syncs that copy it to the durable layer,
//! and the cut that throws the difference away.
//!
//! A regular file's contents are 4 KiB pages shared by `Arc` between the two layers, with
//! a set of the pages written since the last `fsync`/`fdatasync`: a sync copies only those
//! pointers, a write to a page still shared copies that one page (`Arc::make_mut`). A
//! directory has current and durable entry maps and the set of names changed since its
//! last `fsyncdir`. Errors are `libc` errno values, which the FUSE adapter passes on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::SystemTime;

/// Bytes per page: the unit of sharing between the layers and of what a cut discards.
/// 4 KiB is the page size of the kernel's page cache and of the disks sled runs on.
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as the type file offsets have.
const PAGE: u64 = PAGE_SIZE as u64;

/// One page of file contents.
type Page = [u8; PAGE_SIZE];

/// An inode number; never reused while the filesystem lives, so a stale kernel reference
/// can never reach a different file.
pub type Ino = u64;

/// The root directory's inode number (fixed by FUSE).
pub const ROOT: Ino = 1;

/// A failure, as the `errno` value the calling process sees.
pub type Errno = i32;

/// What an operation returns: a value or an `errno`.
pub type FsResult<T> = Result<T, Errno>;

/// The kind of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// The attributes of an inode, as `stat` reports them.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    /// Pages held by the current layer (sparse files hold fewer than their size).
    pub pages: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
}

/// The changes of a `setattr` call; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// What `statfs` reports, in pages of `PAGE_SIZE`.
#[derive(Debug, Clone, Copy)]
pub struct FsSpace {
    pub total_pages: u64,
    pub free_pages: u64,
    pub inodes: u64,
}

/// Counters of the syncs a process asked for, and what is not durable right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` calls on regular files.
    pub fsyncs: u64,
    /// `fdatasync` calls on regular files (the kernel also sends these for writes to a
    /// file opened with `O_DSYNC`).
    pub fdatasyncs: u64,
    /// `fsync` calls on directories.
    pub fsyncdirs: u64,
    /// Power cuts so far.
    pub cuts: u64,
    /// Bytes of file pages written since their file's last sync (whole pages).
    pub unsynced_bytes: u64,
    /// Regular files whose size differs from their durable size.
    pub unsynced_sizes: u64,
    /// Directory entries created, removed or replaced since their directory's last sync.
    pub unsynced_entries: u64,
    /// Bytes held by the current layer of every file.
    pub used_bytes: u64,
}

/// What one power cut threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Written pages that were not synced.
    pub pages_discarded: u64,
    /// Files whose size went back to their durable size.
    pub sizes_reverted: u64,
    /// Directory entries that went back to their durable state (a created file gone, a
    /// removed one back, a rename undone).
    pub entries_reverted: u64,
    /// Inodes no longer reachable from the root afterwards (files and directories lost
    /// with the entries that named them).
    pub inodes_lost: u64,
}

/// A file's contents in one layer: pages by index and the size. A page absent below the
/// size reads as zeros (a hole); bytes of the last page past the size are always zero, so
/// growing the file again exposes zeros as POSIX requires.
#[derive(Debug, Clone, Default)]
struct Contents {
    pages: BTreeMap<u64, Arc<Page>>,
    size: u64,
}

/// A regular file: both layers and the pages that differ between them.
#[derive(Debug, Default)]
struct FileData {
    current: Contents,
    durable: Contents,
    /// Indices of pages written, truncated away or zeroed since the last sync. Every page
    /// not in here is the same `Arc` (or the same absence) in both layers.
    dirty: BTreeSet<u64>,
}

/// A directory: both layers of its entries and the names that may differ between them.
#[derive(Debug)]
struct DirData {
    current: BTreeMap<OsString, Ino>,
    durable: BTreeMap<OsString, Ino>,
    /// Names created, removed or replaced since the last `fsyncdir`.
    changed: BTreeSet<OsString>,
    /// The directory holding this one now, for `..` and for refusing to move a directory
    /// into itself.
    parent: Ino,
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Directory(DirData),
}

#[derive(Debug)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
    /// Current directory entries naming this inode (the root counts one for itself).
    links: u32,
    /// Durable directory entries naming it: a cut may bring those back, so the inode is
    /// kept while any exists even when nothing names it now.
    durable_links: u32,
    /// Open file and directory handles.
    open: u32,
}

impl Inode {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        Self {
            body,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            links: 0,
            durable_links: 0,
            open: 0,
        }
    }

    fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Directory(_) => Kind::Directory,
        }
    }
}

/// An open file or directory.
#[derive(Debug)]
enum Handle {
    File {
        ino: Ino,
    },
    /// A directory's entries as they were at `opendir`, so a listing that spans several
    /// `readdir` calls neither skips nor repeats an entry while others change.
    Directory {
        ino: Ino,
        entries: Vec<(Ino, Kind, OsString)>,
    },
}

/// The whole filesystem.
#[derive(Debug)]
pub struct State {
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    capacity_pages: u64,
    /// Whether writes past the capacity fail with `ENOSPC` (otherwise it is only reported).
    enforce_capacity: bool,
    stats: Stats,
}

/// The longest name a directory entry may have, as on ext4.
const NAME_MAX: usize = 255;

impl State {
    /// An empty filesystem whose root directory is durable; `capacity_bytes` is what
    /// `statfs` reports, and with `enforce_capacity` also the most the files may hold.
    pub fn new(capacity_bytes: u64, enforce_capacity: bool, uid: u32, gid: u32) -> Self {
        let mut root = Inode::new(
            Body::Directory(DirData {
                current: BTreeMap::new(),
                durable: BTreeMap::new(),
                changed: BTreeSet::new(),
                parent: ROOT,
            }),
            0o755,
            uid,
            gid,
        );
        // The root is named by the mount itself, now and after any cut.
        root.links = 1;
        root.durable_links = 1;
        Self {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_handle: 1,
            capacity_pages: capacity_bytes / PAGE,
            enforce_capacity,
            stats: Stats::default(),
        }
    }

    // ---- reading the tree ----

    fn inode(&self, ino: Ino) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn inode_mut(&mut self, ino: Ino) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: Ino) -> FsResult<&DirData> {
        match &self.inode(ino)?.body {
            Body::Directory(dir) => Ok(dir),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> FsResult<&mut DirData> {
        match &mut self.inode_mut(ino)?.body {
            Body::Directory(dir) => Ok(dir),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn file(&self, ino: Ino) -> FsResult<&FileData> {
        match &self.inode(ino)?.body {
            Body::File(file) => Ok(file),
            Body::Directory(_) => Err(libc::EISDIR),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> FsResult<&mut FileData> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(file) => Ok(file),
            Body::Directory(_) => Err(libc::EISDIR),
        }
    }

    /// The attributes of `ino`.
    pub fn attr(&self, ino: Ino) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        let (size, pages, nlink) = match &inode.body {
            Body::File(file) => (
                file.current.size,
                len_u64(file.current.pages.len()),
                inode.links,
            ),
            Body::Directory(dir) => {
                // "." and the entry in the parent, plus each subdirectory's "..".
                let subdirectories = dir
                    .current
                    .values()
                    .filter(|child| {
                        self.inodes
                            .get(child)
                            .is_some_and(|c| c.kind() == Kind::Directory)
                    })
                    .count();
                let nlink = 2_u32.saturating_add(u32::try_from(subdirectories).unwrap_or(u32::MAX));
                (PAGE, 1, nlink)
            }
        };
        Ok(Attr {
            ino,
            kind: inode.kind(),
            size,
            pages,
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            crtime: inode.crtime,
        })
    }

    /// The attributes of `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> FsResult<Attr> {
        let child = *self.dir(parent)?.current.get(name).ok_or(libc::ENOENT)?;
        self.attr(child)
    }

    // ---- changing the tree ----

    fn check_name(name: &OsStr) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if name.is_empty() || name == "." || name == ".." {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Adds a new inode named `name` in `parent` (a current entry only: durable once the
    /// parent is synced).
    fn add_child(&mut self, parent: Ino, name: &OsStr, inode: Inode) -> FsResult<Attr> {
        Self::check_name(name)?;
        if self.dir(parent)?.current.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut inode = inode;
        inode.links = 1;
        self.inodes.insert(ino, inode);
        let dir = self.dir_mut(parent)?;
        dir.current.insert(name.to_owned(), ino);
        dir.changed.insert(name.to_owned());
        self.touch(parent);
        self.attr(ino)
    }

    /// Creates an empty regular file `name` in `parent`.
    pub fn create_file(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let inode = Inode::new(Body::File(FileData::default()), perm, uid, gid);
        self.add_child(parent, name, inode)
    }

    /// Creates an empty directory `name` in `parent`.
    pub fn mkdir(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let inode = Inode::new(
            Body::Directory(DirData {
                current: BTreeMap::new(),
                durable: BTreeMap::new(),
                changed: BTreeSet::new(),
                parent,
            }),
            perm,
            uid,
            gid,
        );
        self.add_child(parent, name, inode)
    }

    /// Removes the entry `name` of `parent`, which must be of `kind`.
    fn remove_entry(&mut self, parent: Ino, name: &OsStr, kind: Kind) -> FsResult<()> {
        let child = *self.dir(parent)?.current.get(name).ok_or(libc::ENOENT)?;
        let child_inode = self.inode(child)?;
        match (kind, &child_inode.body) {
            (Kind::File, Body::Directory(_)) => return Err(libc::EISDIR),
            (Kind::Directory, Body::File(_)) => return Err(libc::ENOTDIR),
            (Kind::Directory, Body::Directory(dir)) if !dir.current.is_empty() => {
                return Err(libc::ENOTEMPTY);
            }
            _ => {}
        }
        let dir = self.dir_mut(parent)?;
        dir.current.remove(name);
        dir.changed.insert(name.to_owned());
        self.touch(parent);
        self.unlink_inode(child);
        Ok(())
    }

    /// Removes the regular file `name` of `parent`.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> FsResult<()> {
        self.remove_entry(parent, name, Kind::File)
    }

    /// Removes the empty directory `name` of `parent`.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> FsResult<()> {
        self.remove_entry(parent, name, Kind::Directory)
    }

    /// Moves `parent/name` to `new_parent/new_name`, replacing what was there (unless
    /// `no_replace`) as `rename(2)` does.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> FsResult<()> {
        Self::check_name(new_name)?;
        let source = *self.dir(parent)?.current.get(name).ok_or(libc::ENOENT)?;
        let replaced = self.dir(new_parent)?.current.get(new_name).copied();
        if replaced == Some(source) {
            // Two names of one inode (or the same name): rename(2) does nothing.
            return Ok(());
        }
        let source_kind = self.inode(source)?.kind();
        if let Some(replaced) = replaced {
            if no_replace {
                return Err(libc::EEXIST);
            }
            match (source_kind, &self.inode(replaced)?.body) {
                (Kind::File, Body::Directory(_)) => return Err(libc::EISDIR),
                (Kind::Directory, Body::File(_)) => return Err(libc::ENOTDIR),
                (Kind::Directory, Body::Directory(dir)) if !dir.current.is_empty() => {
                    return Err(libc::ENOTEMPTY);
                }
                _ => {}
            }
        }
        if source_kind == Kind::Directory {
            // A directory cannot move below itself.
            let mut ancestor = new_parent;
            loop {
                if ancestor == source {
                    return Err(libc::EINVAL);
                }
                if ancestor == ROOT {
                    break;
                }
                ancestor = self.dir(ancestor)?.parent;
            }
        }
        let from = self.dir_mut(parent)?;
        from.current.remove(name);
        from.changed.insert(name.to_owned());
        let to = self.dir_mut(new_parent)?;
        to.current.insert(new_name.to_owned(), source);
        to.changed.insert(new_name.to_owned());
        if let Body::Directory(dir) = &mut self.inode_mut(source)?.body {
            dir.parent = new_parent;
        }
        self.inode_mut(source)?.ctime = SystemTime::now();
        self.touch(parent);
        self.touch(new_parent);
        if let Some(replaced) = replaced {
            self.unlink_inode(replaced);
        }
        Ok(())
    }

    /// Drops one current link of `ino` and frees it if nothing can reach it any more.
    fn unlink_inode(&mut self, ino: Ino) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.links = inode.links.saturating_sub(1);
            inode.ctime = SystemTime::now();
        }
        self.free_if_unreachable(ino);
    }

    /// Frees `ino` when no current or durable entry names it and no handle holds it; a
    /// freed directory releases the inodes its durable entries named, recursively.
    fn free_if_unreachable(&mut self, ino: Ino) {
        let mut pending = vec![ino];
        while let Some(ino) = pending.pop() {
            let Some(inode) = self.inodes.get(&ino) else {
                continue;
            };
            if ino == ROOT || inode.links > 0 || inode.durable_links > 0 || inode.open > 0 {
                continue;
            }
            let Some(inode) = self.inodes.remove(&ino) else {
                continue;
            };
            if let Body::Directory(dir) = inode.body {
                // A directory only loses its last link when it is empty now, but its durable
                // entries may still name inodes removed since its last sync.
                for child in dir.durable.values() {
                    if let Some(child_inode) = self.inodes.get_mut(child) {
                        child_inode.durable_links = child_inode.durable_links.saturating_sub(1);
                        pending.push(*child);
                    }
                }
                for child in dir.current.values() {
                    if let Some(child_inode) = self.inodes.get_mut(child) {
                        child_inode.links = child_inode.links.saturating_sub(1);
                        pending.push(*child);
                    }
                }
            }
        }
    }

    /// Marks a directory's contents as changed now.
    fn touch(&mut self, ino: Ino) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            inode.mtime = now;
            inode.ctime = now;
        }
    }

    /// Changes attributes; a new size truncates or extends the file.
    pub fn setattr(&mut self, ino: Ino, change: SetAttr) -> FsResult<Attr> {
        if let Some(size) = change.size {
            self.resize(ino, size)?;
        }
        let inode = self.inode_mut(ino)?;
        let now = SystemTime::now();
        if let Some(perm) = change.perm {
            inode.perm = perm & 0o7777;
            inode.ctime = now;
        }
        if let Some(uid) = change.uid {
            inode.uid = uid;
            inode.ctime = now;
        }
        if let Some(gid) = change.gid {
            inode.gid = gid;
            inode.ctime = now;
        }
        if let Some(atime) = change.atime {
            inode.atime = atime;
            inode.ctime = now;
        }
        if let Some(mtime) = change.mtime {
            inode.mtime = mtime;
            inode.ctime = now;
        }
        self.attr(ino)
    }

    /// Sets a file's size: pages past the new end go, the kept part of the last page past
    /// the end is zeroed; growing adds a hole.
    fn resize(&mut self, ino: Ino, size: u64) -> FsResult<()> {
        let file = self.file_mut(ino)?;
        if size < file.current.size {
            let first_gone = size.div_ceil(PAGE);
            let gone: Vec<u64> = file
                .current
                .pages
                .range(first_gone..)
                .map(|(index, _)| *index)
                .collect();
            for index in gone {
                file.current.pages.remove(&index);
                file.dirty.insert(index);
            }
            let tail = offset_in_page(size);
            if tail != 0 {
                let index = size / PAGE;
                if let Some(page) = file.current.pages.get_mut(&index) {
                    Arc::make_mut(page)[tail..].fill(0);
                    file.dirty.insert(index);
                }
            }
        }
        file.current.size = size;
        let inode = self.inode_mut(ino)?;
        let now = SystemTime::now();
        inode.mtime = now;
        inode.ctime = now;
        Ok(())
    }

    /// Extends a file to at least `end` bytes, as `fallocate` without `KEEP_SIZE` does (no
    /// pages are allocated: the model keeps no reservations).
    pub fn allocate(&mut self, ino: Ino, end: u64) -> FsResult<()> {
        let needed = end.div_ceil(PAGE);
        let file = self.file_mut(ino)?;
        if end <= file.current.size {
            return Ok(());
        }
        let held = len_u64(file.current.pages.range(..needed).count());
        self.check_space(needed.saturating_sub(held))?;
        self.resize(ino, end)
    }

    /// Fails with `ENOSPC` when `new_pages` more would pass an enforced capacity.
    fn check_space(&self, new_pages: u64) -> FsResult<()> {
        if self.enforce_capacity
            && self.used_pages().saturating_add(new_pages) > self.capacity_pages
        {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    /// Pages held by the current layer of every file.
    fn used_pages(&self) -> u64 {
        self.inodes
            .values()
            .map(|inode| match &inode.body {
                Body::File(file) => len_u64(file.current.pages.len()),
                Body::Directory(_) => 0,
            })
            .sum()
    }

    // ---- file contents ----

    /// Opens a file or directory for I/O and returns the handle.
    pub fn open(&mut self, ino: Ino) -> FsResult<u64> {
        let inode = self.inode_mut(ino)?;
        inode.open += 1;
        let handle = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(handle, Handle::File { ino });
        Ok(handle)
    }

    /// Opens a directory and takes the list `readdir` serves.
    pub fn opendir(&mut self, ino: Ino) -> FsResult<u64> {
        let dir = self.dir(ino)?;
        let mut entries = vec![
            (ino, Kind::Directory, OsString::from(".")),
            (dir.parent, Kind::Directory, OsString::from("..")),
        ];
        for (name, child) in &dir.current {
            let kind = self.inode(*child)?.kind();
            entries.push((*child, kind, name.clone()));
        }
        self.inode_mut(ino)?.open += 1;
        let handle = self.next_handle;
        self.next_handle += 1;
        self.handles
            .insert(handle, Handle::Directory { ino, entries });
        Ok(handle)
    }

    /// The entries of an open directory, as taken at `opendir`.
    pub fn readdir(&self, handle: u64) -> FsResult<&[(Ino, Kind, OsString)]> {
        match self.handles.get(&handle) {
            Some(Handle::Directory { entries, .. }) => Ok(entries),
            _ => Err(libc::EBADF),
        }
    }

    /// Closes a handle; an inode nothing names any more goes with its last handle.
    pub fn release(&mut self, handle: u64) {
        let ino = match self.handles.remove(&handle) {
            Some(Handle::File { ino } | Handle::Directory { ino, .. }) => ino,
            None => return,
        };
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.open = inode.open.saturating_sub(1);
        }
        self.free_if_unreachable(ino);
    }

    /// Up to `size` bytes of a file from `offset` (fewer at the end).
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = self.file(ino)?;
        let end = offset
            .saturating_add(u64::from(size))
            .min(file.current.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut data = Vec::with_capacity(usize::try_from(end - offset).map_err(|_| libc::EINVAL)?);
        let mut position = offset;
        while position < end {
            let index = position / PAGE;
            let start = offset_in_page(position);
            let stop = if index == (end - 1) / PAGE {
                offset_in_page(end - 1) + 1
            } else {
                PAGE_SIZE
            };
            match file.current.pages.get(&index) {
                Some(page) => data.extend_from_slice(&page[start..stop]),
                None => data.resize(data.len() + (stop - start), 0),
            }
            position = (index + 1) * PAGE;
        }
        Ok(data)
    }

    /// Writes `data` at `offset`, growing the file as needed.
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<u32> {
        let written = u32::try_from(data.len()).map_err(|_| libc::EINVAL)?;
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset.checked_add(u64::from(written)).ok_or(libc::EFBIG)?;
        let first = offset / PAGE;
        let last = (end - 1) / PAGE;
        let file = self.file_mut(ino)?;
        let held = len_u64(file.current.pages.range(first..=last).count());
        self.check_space((last - first + 1) - held)?;
        let file = self.file_mut(ino)?;
        let mut source = data;
        let mut position = offset;
        while !source.is_empty() {
            let index = position / PAGE;
            let start = offset_in_page(position);
            let length = (PAGE_SIZE - start).min(source.len());
            let page = file
                .current
                .pages
                .entry(index)
                .or_insert_with(|| Arc::new([0; PAGE_SIZE]));
            // Copies the page first if the durable layer still shares it.
            Arc::make_mut(page)[start..start + length].copy_from_slice(&source[..length]);
            file.dirty.insert(index);
            source = &source[length..];
            position += u64::try_from(length).map_err(|_| libc::EINVAL)?;
        }
        if end > file.current.size {
            file.current.size = end;
        }
        let inode = self.inode_mut(ino)?;
        let now = SystemTime::now();
        inode.mtime = now;
        inode.ctime = now;
        Ok(written)
    }

    // ---- durability ----

    /// `fsync` (or with `data_only`, `fdatasync`) of a file: its written pages and its size
    /// become durable. Both make the size durable, as Linux's `fdatasync` does when the
    /// size changed. A directory's `fsync` is its `fsyncdir`.
    pub fn fsync(&mut self, ino: Ino, data_only: bool) -> FsResult<()> {
        if self.inode(ino)?.kind() == Kind::Directory {
            return self.fsyncdir(ino);
        }
        let file = self.file_mut(ino)?;
        for index in std::mem::take(&mut file.dirty) {
            match file.current.pages.get(&index) {
                Some(page) => {
                    file.durable.pages.insert(index, Arc::clone(page));
                }
                None => {
                    file.durable.pages.remove(&index);
                }
            }
        }
        file.durable.size = file.current.size;
        if data_only {
            self.stats.fdatasyncs += 1;
        } else {
            self.stats.fsyncs += 1;
        }
        Ok(())
    }

    /// `fsync` of a directory: its changed entries become durable.
    pub fn fsyncdir(&mut self, ino: Ino) -> FsResult<()> {
        let dir = self.dir_mut(ino)?;
        let mut dropped = Vec::new();
        let mut added = Vec::new();
        for name in std::mem::take(&mut dir.changed) {
            let now = dir.current.get(&name).copied();
            let before = match now {
                Some(child) => dir.durable.insert(name, child),
                None => dir.durable.remove(&name),
            };
            if before == now {
                continue;
            }
            dropped.extend(before);
            added.extend(now);
        }
        for child in added {
            if let Some(inode) = self.inodes.get_mut(&child) {
                inode.durable_links += 1;
            }
        }
        for child in dropped {
            if let Some(inode) = self.inodes.get_mut(&child) {
                inode.durable_links = inode.durable_links.saturating_sub(1);
            }
            self.free_if_unreachable(child);
        }
        self.stats.fsyncdirs += 1;
        Ok(())
    }

    /// The power cut: every file's pages and size and every directory's entries go back to
    /// their durable layer, every handle is gone (no process survives a power cut), and
    /// whatever the root no longer reaches is lost.
    pub fn power_cut(&mut self) -> CutReport {
        let mut report = CutReport::default();
        self.handles.clear();
        for inode in self.inodes.values_mut() {
            inode.open = 0;
            match &mut inode.body {
                Body::File(file) => {
                    report.pages_discarded += len_u64(file.dirty.len());
                    for index in std::mem::take(&mut file.dirty) {
                        match file.durable.pages.get(&index) {
                            Some(page) => {
                                file.current.pages.insert(index, Arc::clone(page));
                            }
                            None => {
                                file.current.pages.remove(&index);
                            }
                        }
                    }
                    if file.current.size != file.durable.size {
                        report.sizes_reverted += 1;
                        file.current.size = file.durable.size;
                    }
                }
                Body::Directory(dir) => {
                    for name in std::mem::take(&mut dir.changed) {
                        let durable = dir.durable.get(&name).copied();
                        let current = match durable {
                            Some(child) => dir.current.insert(name, child),
                            None => dir.current.remove(&name),
                        };
                        if current != durable {
                            report.entries_reverted += 1;
                        }
                    }
                }
            }
        }
        // Now every layer is its durable one: recount the links from the root and drop
        // what it does not reach.
        let mut links: HashMap<Ino, u32> = HashMap::from([(ROOT, 1)]);
        let mut visited = HashSet::from([ROOT]);
        let mut pending = vec![ROOT];
        let mut parents = Vec::new();
        while let Some(ino) = pending.pop() {
            let Some(Inode {
                body: Body::Directory(dir),
                ..
            }) = self.inodes.get(&ino)
            else {
                continue;
            };
            for child in dir.current.values() {
                *links.entry(*child).or_default() += 1;
                if visited.insert(*child) {
                    pending.push(*child);
                    parents.push((*child, ino));
                }
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| visited.contains(ino));
        report.inodes_lost = len_u64(before - self.inodes.len());
        for (ino, inode) in &mut self.inodes {
            let count = links.get(ino).copied().unwrap_or(0);
            inode.links = count;
            inode.durable_links = count;
        }
        for (child, parent) in parents {
            if let Some(Inode {
                body: Body::Directory(dir),
                ..
            }) = self.inodes.get_mut(&child)
            {
                dir.parent = parent;
            }
        }
        self.stats.cuts += 1;
        report
    }

    // ---- reporting ----

    /// Space as `statfs` reports it.
    pub fn space(&self) -> FsSpace {
        let used = self.used_pages();
        FsSpace {
            total_pages: self.capacity_pages,
            free_pages: self.capacity_pages.saturating_sub(used),
            inodes: len_u64(self.inodes.len()),
        }
    }

    /// The sync counters and what is not durable now.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats;
        for inode in self.inodes.values() {
            match &inode.body {
                Body::File(file) => {
                    stats.unsynced_bytes += len_u64(file.dirty.len()) * PAGE;
                    if file.current.size != file.durable.size {
                        stats.unsynced_sizes += 1;
                    }
                    stats.used_bytes += len_u64(file.current.pages.len()) * PAGE;
                }
                Body::Directory(dir) => {
                    stats.unsynced_entries += dir
                        .changed
                        .iter()
                        .filter(|name| dir.current.get(*name) != dir.durable.get(*name))
                        .count()
                        .try_into()
                        .unwrap_or(u64::MAX);
                }
            }
        }
        stats
    }
}

/// The position of `offset` inside its page.
fn offset_in_page(offset: u64) -> usize {
    // The remainder is below PAGE_SIZE, a usize.
    usize::try_from(offset % PAGE).unwrap_or(0)
}

/// A count as u64 (usize is at most 64 bits on every platform Rust supports).
fn len_u64(count: usize) -> u64 {
    u64::try_from(count).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(1 << 30, false, 0, 0)
    }

    fn name(text: &str) -> &OsStr {
        OsStr::new(text)
    }

    fn file_data(state: &State, ino: Ino) -> &FileData {
        match &state.inodes[&ino].body {
            Body::File(file) => file,
            Body::Directory(_) => panic!("inode {ino} is a directory"),
        }
    }

    #[test]
    fn a_sync_shares_pages_and_copies_only_dirty_ones() {
        let mut state = state();
        let ino = state
            .create_file(ROOT, name("f"), 0o644, 0, 0)
            .expect("create")
            .ino;
        state.write(ino, 0, &[1; 3 * PAGE_SIZE]).expect("write");
        state.fsync(ino, false).expect("fsync");
        let file = file_data(&state, ino);
        assert!(file.dirty.is_empty());
        for index in 0..3 {
            assert!(Arc::ptr_eq(
                &file.current.pages[&index],
                &file.durable.pages[&index]
            ));
        }
        // One byte in the middle page: only that page is copied and dirty.
        state
            .write(ino, u64::try_from(PAGE_SIZE).expect("fits") + 5, &[2])
            .expect("write");
        let file = file_data(&state, ino);
        assert_eq!(file.dirty.iter().copied().collect::<Vec<_>>(), [1]);
        assert!(Arc::ptr_eq(
            &file.current.pages[&0],
            &file.durable.pages[&0]
        ));
        assert!(!Arc::ptr_eq(
            &file.current.pages[&1],
            &file.durable.pages[&1]
        ));
        assert_eq!(state.stats().unsynced_bytes, PAGE);
    }

    #[test]
    fn an_unlinked_file_stays_while_a_durable_entry_names_it() {
        let mut state = state();
        let ino = state
            .create_file(ROOT, name("f"), 0o644, 0, 0)
            .expect("create")
            .ino;
        state.write(ino, 0, b"durable").expect("write");
        state.fsync(ino, true).expect("fdatasync");
        state.fsyncdir(ROOT).expect("fsyncdir");
        state.write(ino, 0, b"DURABLE, then lost").expect("write");
        state.unlink(ROOT, name("f")).expect("unlink");
        assert!(state.inodes.contains_key(&ino), "a cut could bring it back");

        let report = state.power_cut();
        assert_eq!(report.entries_reverted, 1);
        let attr = state.lookup(ROOT, name("f")).expect("back after the cut");
        assert_eq!(state.read(attr.ino, 0, 100).expect("read"), b"durable");

        state.unlink(ROOT, name("f")).expect("unlink");
        state.fsyncdir(ROOT).expect("fsyncdir");
        assert!(
            !state.inodes.contains_key(&ino),
            "nothing names it any more"
        );
    }

    #[test]
    fn an_open_unlinked_file_goes_with_its_last_handle() {
        let mut state = state();
        let ino = state
            .create_file(ROOT, name("f"), 0o644, 0, 0)
            .expect("create")
            .ino;
        let handle = state.open(ino).expect("open");
        state.unlink(ROOT, name("f")).expect("unlink");
        state
            .write(ino, 0, b"still writable")
            .expect("write to an open unlinked file");
        assert!(state.inodes.contains_key(&ino));
        state.release(handle);
        assert!(!state.inodes.contains_key(&ino));
    }

    #[test]
    fn a_removed_directory_releases_what_its_durable_entries_named() {
        let mut state = state();
        let dir = state
            .mkdir(ROOT, name("d"), 0o755, 0, 0)
            .expect("mkdir")
            .ino;
        let file = state
            .create_file(dir, name("f"), 0o644, 0, 0)
            .expect("create")
            .ino;
        state.fsyncdir(dir).expect("fsyncdir d");
        state.fsyncdir(ROOT).expect("fsyncdir root");
        state.unlink(dir, name("f")).expect("unlink");
        state.rmdir(ROOT, name("d")).expect("rmdir");
        assert!(state.inodes.contains_key(&file));
        state.fsyncdir(ROOT).expect("fsyncdir root");
        assert!(!state.inodes.contains_key(&dir) && !state.inodes.contains_key(&file));
    }

    #[test]
    fn a_directory_cannot_move_below_itself() {
        let mut state = state();
        let outer = state
            .mkdir(ROOT, name("a"), 0o755, 0, 0)
            .expect("mkdir")
            .ino;
        state.mkdir(outer, name("b"), 0o755, 0, 0).expect("mkdir");
        let inner = state.lookup(outer, name("b")).expect("lookup").ino;
        assert_eq!(
            state.rename(ROOT, name("a"), inner, name("c"), false),
            Err(libc::EINVAL)
        );
    }
}
