//! Stored pages of the aggregate read model: chunks of buckets that left memory to keep the
//! read model within its memory budget, in append-only files under `<data-dir>/pages/`.
//!
//! A page is written once and never changed: a chunk that is changed after it left memory
//! is read back, and when it leaves memory again it is written as a new page. A page is
//! found by its [`PageRef`] (file, offset, length, CRC-32), which the in-memory model and
//! the read-model snapshot hold. So a snapshot refers only to pages written before it, and
//! [`PageStore::sync`] makes them durable before the snapshot file is written: after a
//! crash the snapshot finds every page it names, and pages written after it are garbage.
//!
//! Files are named by a counter (`00000001.pages`, ...) and rotated at
//! [`MAX_FILE_BYTES`]. A store opened again never appends to a file written before (its
//! end may be torn by a crash): it starts a new one. [`PageStore::retain`] deletes the
//! files no live model and no snapshot refers to any more. Compaction
//! (`Aggregates::compact_pages`), once the files hold more than twice the live pages,
//! copies the live pages of the files that are most garbage to the file appended to
//! ([`PageStore::copy`]), so that the next snapshot's `retain` deletes them.
//!
//! Page bytes are LZ4-compressed. Reads check the length and checksum and never allocate
//! more than a page's recorded length. A page is written only while twice the log's
//! free-space minimum stays free (as the other derived files, `store::room_beside_guard`;
//! the file system is asked once per [`ROOM_CHECK_BYTES`] of pages, not per page);
//! otherwise the write fails and the buckets stay in memory. A failed write ends its file:
//! the next page starts a new one, so a torn page never shifts the pages after it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::num::NonZeroU32;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::store::{create_dir_durably, room_above_guard, sync_dir};

/// A page file is closed for appends once it reaches this size, so that files whose
/// pages are all replaced can be deleted.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Most bytes one page may hold after compression: a chunk of 256 buckets of the largest
/// states (HyperLogLogs of 12 KiB) is about 3 MiB.
const MAX_PAGE_BYTES: u32 = 64 * 1024 * 1024;
/// Most bytes of pages written between two reads of the file system's free space: a
/// `statvfs` per page was 4 % of the fold thread's time at 15 M measurements, an eighth
/// of an eviction (BENCHMARKS.md). Pages may so use up to this much of the space beside
/// twice the log's minimum before they notice it is gone.
const ROOM_CHECK_BYTES: u64 = 8 * 1024 * 1024;
/// Suffix of page file names.
const SUFFIX: &str = ".pages";

/// Where a page is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageRef {
    file: u32,
    /// Below 4 GiB: files are closed for appends at [`MAX_FILE_BYTES`] (so a reference,
    /// held for every stored chunk, takes 16 bytes).
    offset: u32,
    /// Never zero (an empty page is refused), so an `Option<PageRef>` takes no more room.
    len: NonZeroU32,
    crc: u32,
}

impl PageRef {
    /// The file the page is in.
    pub fn file(self) -> u32 {
        self.file
    }

    /// Bytes it takes in its file.
    pub fn stored_bytes(self) -> u32 {
        self.len.get()
    }

    /// Its fixed-size encoding (file, offset, length, CRC-32, little-endian), for
    /// directories that are searched without decoding them.
    pub fn to_bytes(self) -> [u8; PAGE_REF_BYTES] {
        let mut bytes = [0; PAGE_REF_BYTES];
        bytes[..4].copy_from_slice(&self.file.to_le_bytes());
        bytes[4..12].copy_from_slice(&u64::from(self.offset).to_le_bytes());
        bytes[12..16].copy_from_slice(&self.len.get().to_le_bytes());
        bytes[16..].copy_from_slice(&self.crc.to_le_bytes());
        bytes
    }

    /// The reference [`PageRef::to_bytes`] encoded at the start of `bytes`, if they are
    /// long enough.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
        Some(Self {
            file: u32_at(0)?,
            offset: u32::try_from(u64::from_le_bytes(bytes.get(4..12)?.try_into().ok()?)).ok()?,
            len: NonZeroU32::new(u32_at(12)?)?,
            crc: u32_at(16)?,
        })
    }
}

/// Bytes of [`PageRef::to_bytes`].
pub const PAGE_REF_BYTES: usize = 20;

/// The append-only page files of one data directory.
#[derive(Debug)]
pub struct PageStore {
    dir: PathBuf,
    /// The log's free-space minimum; pages leave twice it free.
    min_free: u64,
    /// Files open for reading, by number.
    readers: RwLock<HashMap<u32, Arc<File>>>,
    writer: Mutex<Writer>,
}

/// The file pages are appended to.
#[derive(Debug)]
struct Writer {
    /// Number of the file appended to; `None` until the first page of this open.
    current: Option<(u32, Arc<File>)>,
    /// Number of the next file to create.
    next: u32,
    /// Bytes in the current file.
    size: u64,
    /// Bytes pages may still take before the file system is asked again (0: ask).
    room: u64,
    /// Files written since the last sync, and whether one of them is new.
    unsynced: HashSet<u32>,
    new_file: bool,
}

impl PageStore {
    /// Opens (creating it durably) the page directory `dir`, whose pages leave twice
    /// `min_free` bytes free on its file system. Appends go to a new file.
    pub fn open(dir: &Path, min_free: u64) -> io::Result<Self> {
        create_dir_durably(dir)?;
        let mut readers = HashMap::new();
        let mut last = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let Some(number) = file_number(&entry.path()) else {
                continue;
            };
            last = last.max(number);
            readers.insert(number, Arc::new(File::open(entry.path())?));
        }
        Ok(Self {
            dir: dir.to_owned(),
            min_free,
            readers: RwLock::new(readers),
            writer: Mutex::new(Writer {
                current: None,
                next: last + 1,
                size: 0,
                room: 0,
                unsynced: HashSet::new(),
                new_file: false,
            }),
        })
    }

    /// Appends one page (compressed) and returns where it is. Not durable until
    /// [`PageStore::sync`].
    pub fn write(&self, bytes: &[u8]) -> io::Result<PageRef> {
        self.append(&lz4_flex::compress_prepend_size(bytes))
    }

    /// Appends `bytes` as they are (already compressed and checked by their writer, like
    /// the history index's blocks); read them with [`PageStore::read_as_is`]. Not durable
    /// until [`PageStore::sync`].
    pub fn write_as_is(&self, bytes: &[u8]) -> io::Result<PageRef> {
        self.append(bytes)
    }

    /// Appends a copy of `page` (as stored, checked) to the file appended to, for
    /// compaction; returns where the copy is. Not durable until [`PageStore::sync`].
    pub fn copy(&self, page: PageRef) -> io::Result<PageRef> {
        self.append(&self.read_compressed(page)?)
    }

    /// Bytes of each page file.
    pub fn file_sizes(&self) -> io::Result<HashMap<u32, u64>> {
        self.readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(number, file)| Ok((*number, file.metadata()?.len())))
            .collect()
    }

    /// Appends compressed page bytes.
    fn append(&self, compressed: &[u8]) -> io::Result<PageRef> {
        let len = u32::try_from(compressed.len())
            .ok()
            .filter(|len| *len <= MAX_PAGE_BYTES)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "page empty or too large")
            })?;
        let bytes = u64::from(len.get());
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if writer.room < bytes {
            writer.room =
                room_above_guard(&self.dir, self.min_free).min(ROOM_CHECK_BYTES.max(bytes));
            if writer.room < bytes {
                writer.room = 0;
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no room for a page beside twice the free-space minimum",
                ));
            }
        }
        writer.room -= bytes;
        if writer.current.is_none() || writer.size >= MAX_FILE_BYTES {
            let number = writer.next;
            let path = self.path(number);
            let file = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create_new(true)
                    .open(&path)?,
            );
            writer.next += 1;
            writer.size = 0;
            writer.new_file = true;
            writer.current = Some((number, file.clone()));
            self.readers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(number, file);
        }
        let (number, file) = match &writer.current {
            Some((number, file)) => (*number, file.clone()),
            None => unreachable!("a file was opened above"),
        };
        let offset = u32::try_from(writer.size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "page file too large"))?;
        if let Err(error) = (&*file).write_all(compressed) {
            // Part of the page may be in the file: the next page goes to a new one.
            writer.current = None;
            writer.unsynced.insert(number);
            return Err(error);
        }
        writer.size += u64::from(len.get());
        writer.unsynced.insert(number);
        Ok(PageRef {
            file: number,
            offset,
            len,
            crc: crc32fast::hash(compressed),
        })
    }

    /// Reads the page at `page`, checking its checksum.
    pub fn read(&self, page: PageRef) -> io::Result<Vec<u8>> {
        lz4_flex::decompress_size_prepended(&self.read_compressed(page)?)
            .map_err(|error| damaged(format!("page does not decompress: {error}")))
    }

    /// The bytes of a page written by [`PageStore::write_as_is`], checksum checked.
    pub fn read_as_is(&self, page: PageRef) -> io::Result<Vec<u8>> {
        self.read_compressed(page)
    }

    /// The stored (compressed) bytes of `page`, checksum checked.
    fn read_compressed(&self, page: PageRef) -> io::Result<Vec<u8>> {
        let file = self
            .readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&page.file)
            .cloned()
            .ok_or_else(|| damaged(format!("page file {} is missing", page.file)))?;
        if page.len.get() > MAX_PAGE_BYTES {
            return Err(damaged(format!("page of {} bytes", page.len)));
        }
        let mut compressed = vec![0; page.len.get() as usize];
        file.read_exact_at(&mut compressed, u64::from(page.offset))?;
        if crc32fast::hash(&compressed) != page.crc {
            return Err(damaged(format!(
                "page at {} of file {} has another checksum",
                page.offset, page.file
            )));
        }
        Ok(compressed)
    }

    /// Makes every page written so far durable (and the names of new files).
    pub fn sync(&self) -> io::Result<()> {
        let (files, new_file) = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let files: Vec<u32> = writer.unsynced.drain().collect();
            (files, std::mem::take(&mut writer.new_file))
        };
        let readers = self.readers.read().unwrap_or_else(PoisonError::into_inner);
        for number in files {
            if let Some(file) = readers.get(&number) {
                file.sync_data()?;
            }
        }
        drop(readers);
        if new_file {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The number the next page file will have: files created from now on number at
    /// least this.
    pub fn next_file(&self) -> u32 {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        writer
            .current
            .as_ref()
            .map_or(writer.next, |(number, _)| *number)
    }

    /// Deletes every file numbered below `below` but those in `live` and the one appended
    /// to.
    pub fn retain(&self, live: &HashSet<u32>, below: u32) -> io::Result<()> {
        let current = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .current
            .as_ref()
            .map(|(number, _)| *number);
        let dead: Vec<u32> = self
            .readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .filter(|number| *number < below && !live.contains(number) && Some(*number) != current)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        for number in &dead {
            self.readers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(number);
            match fs::remove_file(self.path(*number)) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        sync_dir(&self.dir)
    }

    /// Numbers of the page files there are.
    pub fn files(&self) -> HashSet<u32> {
        self.readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    fn path(&self, number: u32) -> PathBuf {
        self.dir.join(format!("{number:08}{SUFFIX}"))
    }
}

/// The number of a page file, from its name.
fn file_number(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

fn damaged(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_read_back_across_files_and_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = PageStore::open(dir.path(), 0).unwrap();
        let big = vec![7u8; 1000];
        let first = store.write(&big).unwrap();
        let second = store.write(b"second page").unwrap();
        assert_eq!(store.read(first).unwrap(), big);
        assert_eq!(store.read(second).unwrap(), b"second page");
        store.sync().unwrap();
        drop(store);

        let store = PageStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.read(second).unwrap(), b"second page");
        let third = store.write(b"third").unwrap();
        assert_ne!(
            third.file(),
            first.file(),
            "a new open appends to a new file"
        );
        assert_eq!(store.read(third).unwrap(), b"third");
        assert_eq!(store.read(first).unwrap(), big);
    }

    #[test]
    fn a_copied_page_reads_the_same_from_the_file_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = PageStore::open(dir.path(), 0).unwrap();
        let old = store.write(b"bucket bytes").unwrap();
        drop(store);
        let store = PageStore::open(dir.path(), 0).unwrap();
        let copy = store.copy(old).unwrap();
        assert_ne!(copy.file(), old.file());
        assert_eq!(copy.file(), store.next_file());
        assert_eq!(store.read(copy).unwrap(), b"bucket bytes");
        assert_eq!(copy.stored_bytes(), old.stored_bytes());
        let sizes = store.file_sizes().unwrap();
        assert_eq!(sizes[&old.file()], u64::from(old.stored_bytes()));
        assert_eq!(sizes[&copy.file()], u64::from(copy.stored_bytes()));
    }

    /// Pages leave twice the log's free-space minimum free: with a minimum of all the free
    /// space there is, every page is refused (and nothing is written); with room, pages are
    /// written though the file system is asked only once per ROOM_CHECK_BYTES.
    #[test]
    fn pages_are_refused_without_room_beside_twice_the_minimum() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let free = crate::store::room_above_guard(dir.path(), 0);
        let full = PageStore::open(&dir.path().join("full"), free).expect("page store");
        for _ in 0..3 {
            let refused = full.write(b"a page").expect_err("no room");
            assert_eq!(refused.kind(), io::ErrorKind::StorageFull);
        }
        assert!(
            full.file_sizes().expect("sizes").is_empty(),
            "nothing written"
        );
        let roomy = PageStore::open(&dir.path().join("roomy"), 0).expect("page store");
        let pages: Vec<PageRef> = (0..100u32)
            .map(|i| roomy.write(&i.to_le_bytes()).expect("room"))
            .collect();
        for (i, page) in (0..100u32).zip(pages) {
            assert_eq!(roomy.read(page).expect("reads"), i.to_le_bytes());
        }
    }

    #[test]
    fn a_damaged_page_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = PageStore::open(dir.path(), 0).unwrap();
        let page = store.write(b"some bucket bytes").unwrap();
        store.sync().unwrap();
        let path = store.path(page.file());
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let error = store.read(page).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let wrong_length = PageRef {
            len: page.len.saturating_add(1),
            ..page
        };
        assert!(store.read(wrong_length).is_err());
    }

    #[test]
    fn retain_deletes_only_files_nothing_refers_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = PageStore::open(dir.path(), 0).unwrap();
        let old = store.write(b"old").unwrap();
        drop(store);
        let store = PageStore::open(dir.path(), 0).unwrap();
        let kept = store.write(b"kept").unwrap();
        drop(store);
        let store = PageStore::open(dir.path(), 0).unwrap();
        let current = store.write(b"current").unwrap();
        store
            .retain(&HashSet::from([kept.file()]), store.next_file() + 1)
            .unwrap();
        assert!(store.read(old).is_err(), "nothing referred to it");
        assert!(!store.path(old.file()).exists());
        assert_eq!(store.read(kept).unwrap(), b"kept");
        assert_eq!(store.read(current).unwrap(), b"current", "appended to");
        assert_eq!(store.files(), HashSet::from([kept.file(), current.file()]));
    }
}
