//! Run files: immutable, sorted (keyed 64-bit hash, seq) pairs of spilled event ids, with
//! a Bloom filter and a sparse fence index kept in memory.
//!
//! ```text
//! pages     PAGE_BYTES each, in hash order:
//!   offset  size  field
//!        0     4  entries in this page (at most PAGE_ENTRIES), u32 LE
//!        4     4  CRC-32 of the run number (u64 LE), the page index (u64 LE), bytes 0..4
//!                 and bytes 8..PAGE_BYTES of the page
//!        8     8  zero
//!       16  16*n  entries: hash u64 BE, seq u64 BE, sorted by (hash, seq); the rest zero
//! filter    the Bloom filter's words, u64 LE (FILTER_HASHES hashes of the entry's hash)
//! fences    the first hash of each page, u64 LE
//! footer    FOOTER_BYTES (see `Footer`), ending with a CRC-32 of the filter, the fences
//!           and the footer before it
//! ```
//!
//! A lookup asks the filter (no I/O for most new ids), then reads the one or two pages the
//! fences name (`pread`) and checks their checksum. The id itself is not stored: a hash
//! found here is only a candidate, confirmed by reading the event at its seq from the log.
//! Opening reads only the filter, the fences and the footer; pages are checked when read
//! ([`Run::verify`] reads them all).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use fastbloom::BloomFilter;

use crate::store::durability::sync_dir;

/// Bytes of one page: one `pread`.
pub const PAGE_BYTES: usize = 4096;
const PAGE_HEADER: usize = 16;
const ENTRY_BYTES: usize = 16;
/// Entries in a full page.
pub const PAGE_ENTRIES: usize = (PAGE_BYTES - PAGE_HEADER) / ENTRY_BYTES;
/// Bits of filter per entry. With [`FILTER_HASHES`] hashes a new id passes the filter of a
/// run with probability about 3.5 %, and then costs one `pread` of a page (from the page
/// cache, normally). 7 bits keep 50 M ids' filters at about 42 MiB (see ARCHITECTURE.md).
pub const FILTER_BITS_PER_ENTRY: usize = 7;
/// Hashes per entry: the optimum for 7 bits is ln 2 x 7, about 4.9.
pub const FILTER_HASHES: u32 = 5;
const MAGIC: &[u8; 8] = b"KPIDDR01";
const FOOTER_BYTES: usize = 80;
/// Extension of a finished run file.
pub const RUN_EXTENSION: &str = "run";

/// Why a run file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes do not check out.
    #[error("damaged run file: {0}")]
    Damaged(String),
}

/// A run file open for lookups.
#[derive(Debug)]
pub struct Run {
    /// Its number (its name and the manifest say it).
    pub number: u64,
    /// Entries in it.
    pub entries: u64,
    /// The latest recorded_at of an id in it: once it leaves the window, so did every id.
    pub newest: DateTime<Utc>,
    /// Size of the file in bytes.
    pub file_len: u64,
    path: PathBuf,
    file: File,
    /// The first hash of each page.
    fences: Vec<u64>,
    filter: BloomFilter,
}

/// The file name of run `number`.
pub fn file_name(number: u64) -> String {
    format!("{number:016x}.{RUN_EXTENSION}")
}

/// The CRC of page `index` of run `number`.
fn page_crc(number: u64, index: u64, page: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&number.to_le_bytes());
    crc.update(&index.to_le_bytes());
    crc.update(&page[0..4]);
    crc.update(&page[8..]);
    crc.finalize()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

fn u64_le_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_le_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn widen(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn narrow(n: u64) -> Result<usize, RunError> {
    usize::try_from(n).map_err(|_| RunError::Damaged(format!("{n} does not fit in memory")))
}

/// The most bytes a run of `entries` ids takes: full pages, the filter, the fences and the
/// footer.
pub fn max_bytes(entries: u64) -> u64 {
    let entry_bytes = ENTRY_BYTES as u64;
    let pages = entries.div_ceil(PAGE_ENTRIES as u64).max(1);
    let filter = entries
        .max(64)
        .saturating_mul(FILTER_BITS_PER_ENTRY as u64)
        .div_ceil(8)
        + 8;
    pages
        .saturating_mul(PAGE_BYTES as u64)
        .saturating_add(filter)
        .saturating_add(pages.saturating_mul(8))
        .saturating_add(FOOTER_BYTES as u64)
        .max(entries.saturating_mul(entry_bytes))
}

/// Writes run `number` into `dir` from `entries` (sorted by (hash, seq); at most
/// `max_entries` of them, which sizes the filter), durably: a temporary file, fsynced,
/// renamed, and the directory fsynced. Returns it open.
pub fn write(
    dir: &Path,
    number: u64,
    max_entries: u64,
    newest: DateTime<Utc>,
    entries: impl IntoIterator<Item = Result<(u64, u64), RunError>>,
) -> Result<Run, RunError> {
    let path = dir.join(file_name(number));
    let temporary = dir.join(format!("{number:016x}.tmp"));
    let written = write_file(&temporary, number, max_entries, newest, entries);
    let run = match written {
        Ok(run) => run,
        Err(error) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
    };
    std::fs::rename(&temporary, &path)?;
    sync_dir(dir)?;
    Ok(Run { path, ..run })
}

fn write_file(
    path: &Path,
    number: u64,
    max_entries: u64,
    newest: DateTime<Utc>,
    entries: impl IntoIterator<Item = Result<(u64, u64), RunError>>,
) -> Result<Run, RunError> {
    let file = File::create(path)?;
    // The file's blocks are reserved before it is written, so the log's free-space guard
    // sees them gone at once: otherwise the log's groups and this run, each checked against
    // the same free space, could together eat into the minimum the log keeps free. The
    // reservation past the written end is released by truncating the file at its length.
    let reserve = max_bytes(max_entries);
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, reserve)
        .map_err(|errno| RunError::Io(errno.into()))?;
    let mut out = BufWriter::with_capacity(256 * 1024, &file);
    let bits = narrow(max_entries.max(1))?.saturating_mul(FILTER_BITS_PER_ENTRY);
    let mut filter = BloomFilter::with_num_bits(bits.max(64)).hashes(FILTER_HASHES);
    let mut fences = Vec::new();
    let mut page = vec![0u8; PAGE_BYTES];
    let mut in_page = 0usize;
    let mut count = 0u64;
    let mut last: Option<(u64, u64)> = None;
    let mut flush_page = |page: &mut Vec<u8>, in_page: usize, out: &mut BufWriter<&File>| {
        let index = widen(fences.len());
        page[0..4].copy_from_slice(&u32::try_from(in_page).unwrap_or(0).to_le_bytes());
        page[8..16].fill(0);
        page[PAGE_HEADER + in_page * ENTRY_BYTES..].fill(0);
        fences.push(u64_at(page, PAGE_HEADER));
        let crc = page_crc(number, index, page);
        page[4..8].copy_from_slice(&crc.to_le_bytes());
        out.write_all(page)
    };
    for entry in entries {
        let (hash, seq) = entry?;
        if last.is_some_and(|last| last >= (hash, seq)) {
            return Err(RunError::Damaged("entries out of order".into()));
        }
        last = Some((hash, seq));
        let at = PAGE_HEADER + in_page * ENTRY_BYTES;
        page[at..at + 8].copy_from_slice(&hash.to_be_bytes());
        page[at + 8..at + 16].copy_from_slice(&seq.to_be_bytes());
        filter.insert_hash(hash);
        in_page += 1;
        count += 1;
        if in_page == PAGE_ENTRIES {
            flush_page(&mut page, in_page, &mut out)?;
            in_page = 0;
        }
    }
    if in_page > 0 {
        flush_page(&mut page, in_page, &mut out)?;
    }
    let mut tail = Vec::with_capacity(filter.as_slice().len() * 8 + fences.len() * 8);
    for word in filter.as_slice() {
        tail.extend_from_slice(&word.to_le_bytes());
    }
    for fence in &fences {
        tail.extend_from_slice(&fence.to_le_bytes());
    }
    let footer = Footer {
        number,
        entries: count,
        pages: widen(fences.len()),
        filter_words: widen(filter.as_slice().len()),
        hashes: filter.num_hashes(),
        newest,
    };
    tail.extend_from_slice(&footer.encode(&tail));
    out.write_all(&tail)?;
    out.flush()?;
    drop(out);
    // Truncating at the length written releases the reserved blocks past it.
    let file_len = file.metadata()?.len();
    file.set_len(file_len)?;
    file.sync_all()?;
    Ok(Run {
        number,
        entries: count,
        newest,
        file_len,
        path: path.to_owned(),
        file: File::open(path)?,
        fences,
        filter,
    })
}

/// The fixed end of a run file.
struct Footer {
    number: u64,
    entries: u64,
    pages: u64,
    filter_words: u64,
    hashes: u32,
    newest: DateTime<Utc>,
}

impl Footer {
    /// The footer's bytes, its CRC covering `before` (the filter and fences) too.
    fn encode(&self, before: &[u8]) -> [u8; FOOTER_BYTES] {
        let mut bytes = [0u8; FOOTER_BYTES];
        bytes[0..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&self.number.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.entries.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.pages.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.filter_words.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.hashes.to_le_bytes());
        bytes[44..52].copy_from_slice(&self.newest.timestamp().to_le_bytes());
        bytes[52..56].copy_from_slice(&self.newest.timestamp_subsec_nanos().to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(before);
        crc.update(&bytes[..FOOTER_BYTES - 4]);
        let crc = crc.finalize();
        bytes[FOOTER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }
}

impl Run {
    /// Opens run `number` in `dir`: reads and checks its footer, filter and fences.
    pub fn open(dir: &Path, number: u64) -> Result<Self, RunError> {
        let damaged = |reason: &str| RunError::Damaged(reason.to_owned());
        let path = dir.join(file_name(number));
        let file = File::open(&path)?;
        let file_len = file.metadata()?.len();
        let footer_at = file_len
            .checked_sub(widen(FOOTER_BYTES))
            .ok_or_else(|| damaged("shorter than its footer"))?;
        let mut footer = [0u8; FOOTER_BYTES];
        file.read_exact_at(&mut footer, footer_at)?;
        if &footer[0..8] != MAGIC {
            return Err(damaged("no run footer"));
        }
        let stored_number = u64_le_at(&footer, 8);
        let entries = u64_le_at(&footer, 16);
        let pages = u64_le_at(&footer, 24);
        let filter_words = u64_le_at(&footer, 32);
        let hashes = u32_le_at(&footer, 40);
        let seconds = i64::from_le_bytes(footer[44..52].try_into().unwrap_or([0; 8]));
        let nanos = u32_le_at(&footer, 52);
        let pages_bytes = pages.checked_mul(widen(PAGE_BYTES));
        let tail_len = filter_words
            .checked_add(pages)
            .and_then(|words| words.checked_mul(8));
        let (Some(pages_bytes), Some(tail_len)) = (pages_bytes, tail_len) else {
            return Err(damaged("impossible sizes"));
        };
        if stored_number != number
            || pages_bytes.checked_add(tail_len) != Some(footer_at)
            || entries.div_ceil(widen(PAGE_ENTRIES)) != pages
            || filter_words == 0
            || !(1..=32).contains(&hashes)
        {
            return Err(damaged("its footer does not fit its size"));
        }
        let mut tail = vec![0u8; narrow(tail_len)?];
        file.read_exact_at(&mut tail, pages_bytes)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&tail);
        crc.update(&footer[..FOOTER_BYTES - 4]);
        if crc.finalize() != u32_le_at(&footer, FOOTER_BYTES - 4) {
            return Err(damaged("its filter, fences or footer fail their checksum"));
        }
        let words = narrow(filter_words)?;
        let filter_bits: Vec<u64> = (0..words).map(|i| u64_le_at(&tail, i * 8)).collect();
        let fences: Vec<u64> = (0..narrow(pages)?)
            .map(|i| u64_le_at(&tail, (words + i) * 8))
            .collect();
        let newest = DateTime::from_timestamp(seconds, nanos)
            .ok_or_else(|| damaged("its newest recorded_at is out of range"))?;
        Ok(Self {
            number,
            entries,
            newest,
            file_len,
            path,
            file,
            fences,
            filter: BloomFilter::from_vec(filter_bits).hashes(hashes),
        })
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an entry with `hash` may be here (no I/O).
    pub fn may_contain(&self, hash: u64) -> bool {
        self.filter.contains_hash(hash)
    }

    /// Bytes of memory the run holds (filter and fences).
    pub fn memory_bytes(&self) -> usize {
        (self.filter.as_slice().len() + self.fences.len()) * 8
    }

    /// Reads and checks page `index` into `page`; returns its entry count.
    fn read_page(&self, index: usize, page: &mut [u8; PAGE_BYTES]) -> Result<usize, RunError> {
        self.file
            .read_exact_at(page, widen(index) * widen(PAGE_BYTES))?;
        let count = narrow(u64::from(u32_le_at(page, 0)))?;
        let full = index + 1 < self.fences.len();
        if page_crc(self.number, widen(index), page) != u32_le_at(page, 4)
            || count == 0
            || count > PAGE_ENTRIES
            || (full && count != PAGE_ENTRIES)
            || u64_at(page, PAGE_HEADER) != self.fences[index]
        {
            return Err(RunError::Damaged(format!(
                "page {index} of {} fails its checksum",
                self.path.display()
            )));
        }
        Ok(count)
    }

    /// The seqs stored with `hash`, in order (reads the pages that can hold it).
    pub fn seqs_of(&self, hash: u64) -> Result<Vec<u64>, RunError> {
        let mut seqs = Vec::new();
        let mut page = [0u8; PAGE_BYTES];
        let first = self
            .fences
            .partition_point(|fence| *fence < hash)
            .saturating_sub(1);
        for index in first..self.fences.len() {
            if self.fences[index] > hash {
                break;
            }
            let count = self.read_page(index, &mut page)?;
            for entry in 0..count {
                let at = PAGE_HEADER + entry * ENTRY_BYTES;
                let stored = u64_at(&page, at);
                if stored == hash {
                    seqs.push(u64_at(&page, at + 8));
                } else if stored > hash {
                    return Ok(seqs);
                }
            }
        }
        Ok(seqs)
    }

    /// Every entry in order, each page checked as it is read.
    pub fn iter(&self) -> impl Iterator<Item = Result<(u64, u64), RunError>> + '_ {
        let mut page = Box::new([0u8; PAGE_BYTES]);
        (0..self.fences.len()).flat_map(move |index| {
            let read = self.read_page(index, &mut page).map(|count| {
                (0..count)
                    .map(|entry| {
                        let at = PAGE_HEADER + entry * ENTRY_BYTES;
                        (u64_at(&page[..], at), u64_at(&page[..], at + 8))
                    })
                    .collect::<Vec<_>>()
            });
            let items: Vec<Result<(u64, u64), RunError>> = match read {
                Ok(entries) => entries.into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            };
            items
        })
    }

    /// Reads every page: the checksums, the order and the count.
    #[cfg(test)]
    pub fn verify(&self) -> Result<(), RunError> {
        let mut count = 0u64;
        let mut last = None;
        for entry in self.iter() {
            let entry = entry?;
            if last.is_some_and(|last| last >= entry) {
                return Err(RunError::Damaged("entries out of order".into()));
            }
            last = Some(entry);
            count += 1;
        }
        if count != self.entries {
            return Err(RunError::Damaged(
                "fewer entries than its footer says".into(),
            ));
        }
        Ok(())
    }
}

/// The entries of `runs` merged in (hash, seq) order, leaving out those with a seq at or
/// below `drop_through` (recorded before the window) and repeats.
pub fn merged<'a>(
    runs: &'a [std::sync::Arc<Run>],
    drop_through: u64,
) -> impl Iterator<Item = Result<(u64, u64), RunError>> + 'a {
    let mut sources: Vec<_> = runs.iter().map(|run| run.iter().peekable()).collect();
    let mut last: Option<(u64, u64)> = None;
    std::iter::from_fn(move || {
        loop {
            let mut best: Option<(usize, (u64, u64))> = None;
            for (index, source) in sources.iter_mut().enumerate() {
                match source.peek() {
                    Some(Ok(entry)) if best.is_none_or(|(_, b)| *entry < b) => {
                        best = Some((index, *entry));
                    }
                    Some(Err(_)) => return source.next(),
                    _ => {}
                }
            }
            let (index, entry) = best?;
            sources[index].next();
            if entry.1 <= drop_through || last == Some(entry) {
                continue;
            }
            last = Some(entry);
            return Some(Ok(entry));
        }
    })
}

#[cfg(test)]
mod tests;
