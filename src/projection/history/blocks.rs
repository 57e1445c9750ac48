//! The blocks of the index: a KPI's measurements (a series table, then per measurement
//! its series index, value, occurred_at and subject, LZ4-compressed, with a CRC-32) and
//! the other events' records, as the open part builds them and a read decodes them; and
//! what finds them: a stored part's entry in the tree ([`StoredRef`]) and its directory
//! of measured KPIs.

use foldhash::HashMap;

use super::{FORMAT, MAX_AREA_BYTES, PARTS, Part};
use crate::domain::Measurement;
use crate::domain::query::Labels;
use crate::projection::pages::{PAGE_REF_BYTES, PageRef};
use crate::store;

/// The open area of one KPI's measurements, with the index of its series table.
#[derive(Default)]
pub(super) struct KpiArea {
    pub(super) area: Area,
    pub(super) series: HashMap<Labels, u32>,
}

impl KpiArea {
    pub(super) fn push(&mut self, seq: u64, measurement: &Measurement) {
        let series = match self.series.get(&measurement.labels) {
            Some(&series) => series,
            None => {
                let series = u32::try_from(self.area.series.len()).unwrap_or(u32::MAX);
                self.area.series.push(measurement.labels.clone());
                self.series.insert(measurement.labels.clone(), series);
                series
            }
        };
        let area = &mut self.area;
        area.begin(seq);
        let bytes = &mut area.bytes;
        store::write_varint(bytes, u64::from(series));
        bytes.extend_from_slice(&measurement.value.to_le_bytes());
        let seconds = measurement.occurred_at.timestamp();
        store::write_varint(bytes, zigzag(seconds.wrapping_sub(area.last_seconds)));
        area.last_seconds = seconds;
        store::write_varint(
            bytes,
            u64::from(measurement.occurred_at.timestamp_subsec_nanos()),
        );
        match &measurement.subject {
            Some(subject) => {
                store::write_varint(bytes, widen(subject.len()).saturating_add(1));
                bytes.extend_from_slice(subject.as_bytes());
            }
            None => store::write_varint(bytes, 0),
        }
    }
}

pub(super) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)).cast_unsigned()
}

pub(super) fn unzigzag(value: u64) -> i64 {
    (value >> 1).cast_signed() ^ -((value & 1).cast_signed())
}

/// Entries in seq order (see the module doc).
#[derive(Debug, Default, Clone)]
pub(super) struct Area {
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) count: u32,
    /// The series table (measurements only).
    pub(super) series: Vec<Labels>,
    /// The entries.
    pub(super) bytes: Vec<u8>,
    /// occurred_at's seconds of the last measurement pushed.
    pub(super) last_seconds: i64,
}

impl Area {
    /// Starts the entry of `seq`.
    pub(super) fn begin(&mut self, seq: u64) {
        if self.count == 0 {
            self.first_seq = seq;
        }
        store::write_varint(&mut self.bytes, seq - self.last_seq);
        self.last_seq = seq;
        self.count += 1;
    }

    pub(super) fn push_record(&mut self, seq: u64, record: &[u8]) {
        self.begin(seq);
        store::write_varint(&mut self.bytes, widen(record.len()));
        self.bytes.extend_from_slice(record);
    }

    /// The block stored for this area.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.bytes.len() + 64 * self.series.len() + 8);
        store::write_varint(&mut body, widen(self.series.len()));
        for labels in &self.series {
            store::write_varint(&mut body, widen(labels.len()));
            for (key, value) in labels {
                for text in [key, value] {
                    store::write_varint(&mut body, widen(text.len()));
                    body.extend_from_slice(text.as_bytes());
                }
            }
        }
        body.extend_from_slice(&self.bytes);
        let compressed = lz4_flex::block::compress_prepend_size(&body);
        let mut value = Vec::with_capacity(25 + compressed.len());
        value.push(FORMAT);
        value.extend_from_slice(&self.count.to_le_bytes());
        value.extend_from_slice(&self.first_seq.to_le_bytes());
        value.extend_from_slice(&self.last_seq.to_le_bytes());
        value.extend_from_slice(&compressed);
        let check = crc32fast::hash(&value);
        value.extend_from_slice(&check.to_le_bytes());
        value
    }

    /// Reads a stored block; `None` when it is damaged.
    pub(super) fn decode(value: &[u8]) -> Option<Self> {
        let (value, check) = value.split_at_checked(value.len().checked_sub(4)?)?;
        if crc32fast::hash(value).to_le_bytes() != check {
            return None;
        }
        let (&format, rest) = value.split_first()?;
        if format != FORMAT {
            return None;
        }
        let count = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let first_seq = u64::from_le_bytes(rest.get(4..12)?.try_into().ok()?);
        let last_seq = u64::from_le_bytes(rest.get(12..20)?.try_into().ok()?);
        let compressed = rest.get(20..)?;
        let size = u32::from_le_bytes(compressed.get(..4)?.try_into().ok()?);
        if usize::try_from(size).ok()? > MAX_AREA_BYTES {
            return None;
        }
        let body = lz4_flex::block::decompress_size_prepended(compressed).ok()?;
        let mut reader = Reader {
            bytes: &body,
            pos: 0,
        };
        let series_count = reader.varint()?;
        let mut series = Vec::new();
        for _ in 0..series_count {
            let mut labels = Labels::new();
            for _ in 0..reader.varint()? {
                let key = reader.text()?.to_owned();
                labels.insert(key, reader.text()?.to_owned());
            }
            series.push(labels);
        }
        Some(Self {
            first_seq,
            last_seq,
            count,
            series,
            bytes: body.get(reader.pos..)?.to_vec(),
            last_seconds: 0,
        })
    }
}

/// Reads varints and strings from a block body; `None` when it ends first.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn varint(&mut self) -> Option<u64> {
        let (value, len) = store::read_varint(self.bytes.get(self.pos..)?)?;
        self.pos += len;
        Some(value)
    }

    pub(super) fn take(&mut self, len: u64) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(usize::try_from(len).ok()?)?;
        let taken = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(taken)
    }

    pub(super) fn text(&mut self) -> Option<&'a str> {
        let len = self.varint()?;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

pub(super) fn widen(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Which blocks a cursor reads.
#[derive(Debug, Clone)]
pub(super) enum Blocks {
    /// The other events.
    Others,
    /// The measurements of one KPI.
    Measurements(String),
}

impl Blocks {
    /// This area of `part`.
    pub(super) fn of<'a>(&self, part: &'a Part) -> Option<&'a Area> {
        match self {
            Self::Others => Some(&part.others),
            Self::Measurements(kpi_id) => part.measurements.get(kpi_id).map(|kpi| &kpi.area),
        }
    }
}

/// A stored part as the tree lists it: `p` ‖ first seq (u64 BE) → its directory's page
/// reference, then its other events' block's when it has other events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoredRef {
    pub(super) first_seq: u64,
    /// Where each measured KPI's block is (see [`encode_directory`]).
    pub(super) directory: PageRef,
    /// The block of its other events, when it has some.
    pub(super) others: Option<PageRef>,
}

impl StoredRef {
    /// Its key in the tree.
    pub(super) fn key(&self) -> Vec<u8> {
        part_key(self.first_seq)
    }

    /// Its value in the tree.
    pub(super) fn value(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(2 * PAGE_REF_BYTES);
        value.extend_from_slice(&self.directory.to_bytes());
        if let Some(others) = self.others {
            value.extend_from_slice(&others.to_bytes());
        }
        value
    }

    /// The part a key and value of the tree name; `None` when either is damaged.
    pub(super) fn decode(key: &[u8], value: &[u8]) -> Option<Self> {
        let (&kind, seq) = key.split_first()?;
        if kind != PARTS {
            return None;
        }
        let others = match value.len() {
            PAGE_REF_BYTES => None,
            len if len == 2 * PAGE_REF_BYTES => {
                Some(PageRef::from_bytes(&value[PAGE_REF_BYTES..])?)
            }
            _ => return None,
        };
        Some(Self {
            first_seq: u64::from_be_bytes(seq.try_into().ok()?),
            directory: PageRef::from_bytes(value)?,
            others,
        })
    }
}

/// The key of the part starting at `first_seq`.
pub(super) fn part_key(first_seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(PARTS);
    key.extend_from_slice(&first_seq.to_be_bytes());
    key
}

/// A part's directory: for each KPI measured in it, sorted by id, where its block is.
/// The count (u32 LE), then each entry's offset (u32 LE) from the start, then the
/// entries: the id's length (u8), the id, the block's [`PageRef::to_bytes`]. A reader
/// finds a KPI by binary search without decoding the rest.
pub(super) fn encode_directory(blocks: &[(&str, PageRef)]) -> Vec<u8> {
    let head = 4 + 4 * blocks.len();
    let mut offsets = Vec::with_capacity(head);
    let mut entries = Vec::with_capacity(blocks.len() * (24 + PAGE_REF_BYTES));
    offsets.extend_from_slice(
        &u32::try_from(blocks.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for (kpi_id, page) in blocks {
        let offset = u32::try_from(head + entries.len()).unwrap_or(u32::MAX);
        offsets.extend_from_slice(&offset.to_le_bytes());
        // KPI ids are at most 64 bytes (`domain::kpi::MAX_ID_LEN`).
        entries.push(u8::try_from(kpi_id.len()).unwrap_or(u8::MAX));
        entries.extend_from_slice(kpi_id.as_bytes());
        entries.extend_from_slice(&page.to_bytes());
    }
    offsets.extend_from_slice(&entries);
    offsets
}

/// Where the block of `kpi_id` is in `directory` (`Some(None)`: the KPI has no
/// measurements in the part); `None` when the directory is damaged.
pub(super) fn find_in_directory(directory: &[u8], kpi_id: &str) -> Option<Option<PageRef>> {
    let count = u32::from_le_bytes(directory.get(..4)?.try_into().ok()?);
    let count = usize::try_from(count).ok()?;
    let entry = |index: usize| -> Option<(&[u8], &[u8])> {
        let at = 4 + 4 * index;
        let offset = u32::from_le_bytes(directory.get(at..at + 4)?.try_into().ok()?);
        let offset = usize::try_from(offset).ok()?;
        let len = usize::from(*directory.get(offset)?);
        let id = directory.get(offset + 1..offset + 1 + len)?;
        let page = directory.get(offset + 1 + len..offset + 1 + len + PAGE_REF_BYTES)?;
        Some((id, page))
    };
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = low + (high - low) / 2;
        let (id, page) = entry(middle)?;
        match id.cmp(kpi_id.as_bytes()) {
            std::cmp::Ordering::Less => low = middle + 1,
            std::cmp::Ordering::Greater => high = middle,
            std::cmp::Ordering::Equal => return Some(Some(PageRef::from_bytes(page)?)),
        }
    }
    Some(None)
}
