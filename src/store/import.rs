//! Writing a whole log into an empty directory from events read elsewhere (a backup):
//! every record is checked before it is stored (its seq is the next one, its chain hash is
//! the one given, it decodes to a valid event, and recorded_at never goes back), so the
//! log that results is the one that was backed up, byte for byte in its records, or
//! nothing is claimed.

use std::path::Path;

use super::chain::Hash;
use super::checkpoint::Acknowledged;
use super::open::Opened;
use super::reader::decode_record;
use super::segment::{SegmentBuilder, segment_key};
use super::{LogHead, StoreError, StoreOptions};

/// Records per segment an import writes: segments of about the size the writer builds
/// under load.
const RECORDS_PER_SEGMENT: u32 = 1024;
/// Segments written between two sled flushes, to bound sled's unflushed memory.
const SEGMENTS_PER_FLUSH: u32 = 64;

/// One event to import: its seq, its record bytes as the log stores them, and the chain
/// hash after it that the source claims.
#[derive(Debug, Clone)]
pub struct ImportedEvent {
    /// Its seq.
    pub seq: u64,
    /// The stored `EventRecord` bytes.
    pub record: Vec<u8>,
    /// The chain hash after it.
    pub hash: Hash,
}

/// Writes `events` (seqs 1, 2, ... in order) as the log in `dir`, which must hold no log
/// yet, and makes it durable. Returns the head. Any event whose seq, hash, record or
/// recorded_at does not check out stops the import with [`StoreError::Corrupt`] naming
/// it; the caller removes what was written.
pub fn import(
    dir: &Path,
    options: &StoreOptions,
    events: impl IntoIterator<Item = Result<ImportedEvent, StoreError>>,
) -> Result<LogHead, StoreError> {
    let mut opened = Opened::open(dir, options)?;
    if opened.head.seq != 0 {
        return Err(StoreError::Corrupt {
            seq: opened.head.seq,
            reason: format!(
                "{} already holds a log; import needs an empty one",
                dir.display()
            ),
        });
    }
    let mut head = LogHead::EMPTY;
    let mut segment: Option<SegmentBuilder> = None;
    let mut unflushed = 0;
    for event in events {
        let event = event?;
        let corrupt = |reason: String| StoreError::Corrupt {
            seq: event.seq,
            reason,
        };
        if event.seq != head.seq + 1 {
            return Err(corrupt(format!("expected seq {} next", head.seq + 1)));
        }
        let (recorded_at, _) = decode_record(event.seq, &event.record)?;
        if head.recorded_at.is_some_and(|before| recorded_at < before) {
            return Err(corrupt("recorded_at goes back in time".into()));
        }
        let builder =
            segment.get_or_insert_with(|| SegmentBuilder::new(event.seq, head.hash, 64 * 1024));
        let hash = builder.push(&[&event.record]);
        if hash != event.hash {
            return Err(corrupt(
                "its chain hash is not the one recomputed from the records".into(),
            ));
        }
        head = LogHead {
            seq: event.seq,
            hash,
            recorded_at: Some(recorded_at),
        };
        if builder.count() >= RECORDS_PER_SEGMENT {
            write_segment(&opened, segment.take())?;
            unflushed += 1;
            if unflushed >= SEGMENTS_PER_FLUSH {
                opened.db.flush()?;
                unflushed = 0;
            }
        }
    }
    write_segment(&opened, segment.take())?;
    opened.db.flush()?;
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    opened.disk.sync().map_err(io)?;
    opened
        .checkpoint
        .record(
            Acknowledged {
                seq: head.seq,
                hash: head.hash,
            },
            head.seq,
        )
        .map_err(io)?;
    Ok(head)
}

fn write_segment(opened: &Opened, segment: Option<SegmentBuilder>) -> Result<(), StoreError> {
    if let Some(segment) = segment.filter(|segment| segment.count() > 0) {
        let key = segment_key(segment.first_seq());
        opened.segments.insert(key, segment.finish())?;
    }
    Ok(())
}
