//! Reading the index: a cursor over one prefix (a KPI's measurements or the other events)
//! that merges the stored blocks, the frozen parts and the open part in seq order.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::blocks::{Area, Blocks, Reader, StoredRef, find_in_directory, unzigzag};
use crate::domain::aggregate::Observation;
use crate::domain::query::Labels;
use crate::domain::{Event, Measurement};
use crate::projection::pages::{PageRef, PageStore};
use crate::store::{self, StoreError};

/// Reads the entries of one prefix in seq order (see [`History::cursor`]).
pub(super) struct Cursor {
    /// The index's block files.
    pub(super) pages: Arc<PageStore>,
    pub(super) blocks: Blocks,
    /// The stored parts still to read.
    pub(super) stored: VecDeque<StoredRef>,
    pub(super) stored_to: u64,
    pub(super) memory: VecDeque<Area>,
    pub(super) area: Area,
    /// Entries before this seq are skipped.
    pub(super) from: u64,
    pub(super) from_tree: bool,
    pub(super) pos: usize,
    pub(super) prev: u64,
    pub(super) prev_seconds: i64,
    pub(super) to_seq: u64,
}

/// A decoded entry; a measurement's labels and subject stay in its cursor's area.
pub(super) enum Entry {
    /// Boxed: entries move through the merge by value, most of them measurements.
    Event(u64, DateTime<Utc>, Box<Event>),
    Measurement {
        seq: u64,
        series: usize,
        value: f64,
        occurred_at: DateTime<Utc>,
        subject: Option<(usize, usize)>,
    },
}

impl Entry {
    pub(super) fn seq(&self) -> u64 {
        match self {
            Self::Event(seq, _, _) | Self::Measurement { seq, .. } => *seq,
        }
    }
}

/// An event the history index hands to a visitor.
pub enum Visited<'a> {
    /// An event that is not a measurement, with its recorded_at.
    Event(DateTime<Utc>, Event),
    /// A measurement: its KPI, its series and what a fold takes of it.
    Measurement {
        /// The KPI.
        kpi_id: &'a str,
        /// The series.
        labels: &'a Labels,
        /// Value, occurred_at, seq and subject.
        observation: Observation<'a>,
    },
}

impl Visited<'_> {
    /// The measurement, owned (for a refold, which collects them first).
    pub fn to_measurement(&self) -> Option<Measurement> {
        match self {
            Self::Event(..) => None,
            Self::Measurement {
                kpi_id,
                labels,
                observation,
            } => Some(Measurement {
                kpi_id: (*kpi_id).to_owned(),
                value: observation.value,
                occurred_at: observation.occurred_at,
                labels: (*labels).clone(),
                subject: observation.subject.map(str::to_owned),
                event_id: None,
            }),
        }
    }
}

impl Cursor {
    pub(super) fn next_entry(&mut self) -> Result<Option<Entry>, StoreError> {
        loop {
            if self.pos < self.area.bytes.len() {
                let (entry, end) = self.entry_at(self.pos)?;
                let seq = entry.seq();
                if seq > self.to_seq {
                    self.finish();
                    return Ok(None);
                }
                if self.from_tree && seq > self.stored_to {
                    // The rest is in the copies from memory.
                    self.stored.clear();
                    self.area = Area::default();
                    self.pos = 0;
                    continue;
                }
                self.pos = end;
                self.prev = seq;
                if let Entry::Measurement { occurred_at, .. } = &entry {
                    self.prev_seconds = occurred_at.timestamp();
                }
                if seq < self.from {
                    continue;
                }
                return Ok(Some(entry));
            }
            let next = if let Some(part) = self.stored.pop_front() {
                let Some(page) = self.block_of(&part)? else {
                    // None of these blocks in that part.
                    continue;
                };
                let damaged = |reason: String| StoreError::Corrupt {
                    seq: part.first_seq,
                    reason: format!("damaged history index block {:?}: {reason}", self.blocks),
                };
                let value = self
                    .pages
                    .read_as_is(page)
                    .map_err(|error| damaged(error.to_string()))?;
                let area =
                    Area::decode(&value).ok_or_else(|| damaged("does not decode".to_owned()))?;
                self.from_tree = true;
                area
            } else {
                match self.memory.pop_front() {
                    Some(area) if area.first_seq > self.prev => {
                        self.from_tree = false;
                        area
                    }
                    // Already read from the tree (stored since the copy was taken).
                    Some(_) => continue,
                    None => return Ok(None),
                }
            };
            self.area = next;
            self.pos = 0;
            self.prev = 0;
            self.prev_seconds = 0;
        }
    }

    /// Where this cursor's block of the stored `part` is, if it has one.
    fn block_of(&self, part: &StoredRef) -> Result<Option<PageRef>, StoreError> {
        let kpi_id = match &self.blocks {
            Blocks::Others => return Ok(part.others),
            Blocks::Measurements(kpi_id) => kpi_id,
        };
        let damaged = |reason: String| StoreError::Corrupt {
            seq: part.first_seq,
            reason: format!("damaged history index directory: {reason}"),
        };
        let directory = self
            .pages
            .read(part.directory)
            .map_err(|error| damaged(error.to_string()))?;
        find_in_directory(&directory, kpi_id).ok_or_else(|| damaged("does not decode".to_owned()))
    }

    /// The entry at `pos` of the current area, and where the next one starts.
    pub(super) fn entry_at(&self, pos: usize) -> Result<(Entry, usize), StoreError> {
        let damaged = |seq| StoreError::Corrupt {
            seq,
            reason: format!("damaged history index entry in {:?}", self.blocks),
        };
        let mut reader = Reader {
            bytes: &self.area.bytes,
            pos,
        };
        let delta = reader.varint().ok_or_else(|| damaged(self.prev))?;
        let seq = self.prev.saturating_add(delta);
        let entry = match self.blocks {
            Blocks::Others => {
                let len = reader.varint().ok_or_else(|| damaged(seq))?;
                let record = reader.take(len).ok_or_else(|| damaged(seq))?;
                let (recorded_at, event) = store::decode_record(seq, record)?;
                Entry::Event(seq, recorded_at, Box::new(event))
            }
            Blocks::Measurements(_) => self
                .measurement_at(&mut reader, seq)
                .ok_or_else(|| damaged(seq))?,
        };
        Ok((entry, reader.pos))
    }

    /// The rest of a measurement's entry.
    pub(super) fn measurement_at(&self, reader: &mut Reader<'_>, seq: u64) -> Option<Entry> {
        let series = usize::try_from(reader.varint()?).ok()?;
        if series >= self.area.series.len() {
            return None;
        }
        let value = f64::from_le_bytes(reader.take(8)?.try_into().ok()?);
        let seconds = self.prev_seconds.wrapping_add(unzigzag(reader.varint()?));
        let nanos = u32::try_from(reader.varint()?).ok()?;
        let occurred_at = DateTime::from_timestamp(seconds, nanos)?;
        let subject = match reader.varint()? {
            0 => None,
            len => {
                let start = reader.pos;
                std::str::from_utf8(reader.take(len - 1)?).ok()?;
                Some((start, reader.pos))
            }
        };
        Some(Entry::Measurement {
            seq,
            series,
            value,
            occurred_at,
            subject,
        })
    }

    pub(super) fn finish(&mut self) {
        self.stored.clear();
        self.memory.clear();
        self.area = Area::default();
        self.pos = 0;
    }
}

/// Visits the entries of `cursors` merged in seq order.
pub(super) fn merge(
    mut cursors: Vec<Cursor>,
    mut visit: impl FnMut(u64, Visited<'_>),
) -> Result<(), StoreError> {
    let mut heads = Vec::with_capacity(cursors.len());
    for cursor in &mut cursors {
        heads.push(cursor.next_entry()?);
    }
    loop {
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.as_ref().map(|entry| (entry.seq(), i)))
            .min();
        let Some((_, i)) = next else {
            return Ok(());
        };
        // The cursor reads its next entry only after the visit: a measurement's labels and
        // subject are still in its area.
        match heads[i].take() {
            Some(Entry::Event(seq, recorded_at, event)) => {
                visit(seq, Visited::Event(recorded_at, *event));
            }
            Some(Entry::Measurement {
                seq,
                series,
                value,
                occurred_at,
                subject,
            }) => {
                let cursor = &cursors[i];
                let Blocks::Measurements(kpi_id) = &cursor.blocks else {
                    continue;
                };
                // Both checked when the entry was decoded.
                let subject = subject
                    .and_then(|(start, end)| cursor.area.bytes.get(start..end))
                    .and_then(|bytes| std::str::from_utf8(bytes).ok());
                if let Some(labels) = cursor.area.series.get(series) {
                    visit(
                        seq,
                        Visited::Measurement {
                            kpi_id,
                            labels,
                            observation: Observation {
                                value,
                                occurred_at,
                                seq,
                                subject,
                            },
                        },
                    );
                }
            }
            None => {}
        }
        heads[i] = cursors[i].next_entry()?;
    }
}
