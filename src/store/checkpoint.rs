//! The log's own durable record of how far it was acknowledged, independent of sled's
//! recovery.
//!
//! sled treats the first entry of its log that does not check out as the end of the log:
//! one damaged byte, a lost or truncated blob file, or an older `log/` put back beside the
//! rest silently drops every event after it, and the next append would reuse their seqs.
//! So before any group is acknowledged, the committer writes the group's head (seq and
//! chain hash) here and fdatasyncs it; at open, a log that ends before this record, or has
//! another hash at its seq, is refused (`EventLog::open`).
//!
//! The file `<log>/acknowledged` holds two 64-byte slots, written alternately, so that a
//! write torn by a power cut only ever damages the slot being replaced and the other still
//! holds the previous acknowledged head:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "KPIACK01"
//!      8     8  seq, u64 big-endian
//!     16    32  hash_seq
//!     48     4  CRC-32 of bytes 0..48, big-endian
//!     52    12  zero
//! ```
//!
//! The file is created whole (temporary file, fsync, rename, directory fsync), so an
//! existing file always had one valid slot; one with none is damaged.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::chain::Hash;
use super::durability::sync_dir;

/// The file's name inside the log directory.
pub const CHECKPOINT_FILE: &str = "acknowledged";
const MAGIC: &[u8; 8] = b"KPIACK01";
const SLOT_BYTES: usize = 64;
const CHECKED_BYTES: usize = 48;

/// The last acknowledged head: everything up to `seq` was acknowledged, and the chain
/// hash there was `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    /// The acknowledged head seq.
    pub seq: u64,
    /// The chain hash at it.
    pub hash: Hash,
}

/// The open record file.
pub struct Checkpoint {
    file: File,
    /// The slot the next record goes to: never the one holding the newest record.
    next_slot: u64,
}

/// Why the record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing it failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Neither slot checks out.
    #[error("neither slot of the acknowledgement record holds a valid record")]
    Damaged,
}

impl Checkpoint {
    /// Opens the record in `log_dir` and returns what it holds; creates it holding `head`
    /// when there is none (a new log, or one written before this record existed).
    pub fn open(
        log_dir: &Path,
        head: Acknowledged,
    ) -> Result<(Self, Acknowledged), CheckpointError> {
        let path = log_dir.join(CHECKPOINT_FILE);
        if !path.exists() {
            let temporary = log_dir.join(format!("{CHECKPOINT_FILE}.tmp"));
            let mut file = File::create(&temporary)?;
            let mut bytes = vec![0; 2 * SLOT_BYTES];
            bytes[..SLOT_BYTES].copy_from_slice(&encode(head));
            file.write_all(&bytes)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&temporary, &path)?;
            sync_dir(log_dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut bytes = [0; 2 * SLOT_BYTES];
        file.read_exact_at(&mut bytes, 0)?;
        let slots = [decode(&bytes[..SLOT_BYTES]), decode(&bytes[SLOT_BYTES..])];
        let (newest, slot) = match slots {
            [Some(a), Some(b)] if b.seq > a.seq => (b, 1),
            [Some(a), _] => (a, 0),
            [None, Some(b)] => (b, 1),
            [None, None] => return Err(CheckpointError::Damaged),
        };
        Ok((
            Self {
                file,
                next_slot: 1 - slot,
            },
            newest,
        ))
    }

    /// Makes `head` the acknowledged head: written into the older slot and fdatasynced.
    pub fn record(&mut self, head: Acknowledged) -> io::Result<()> {
        let offset = self.next_slot * SLOT_BYTES as u64;
        self.file.write_all_at(&encode(head), offset)?;
        self.file.sync_data()?;
        self.next_slot = 1 - self.next_slot;
        Ok(())
    }
}

fn encode(head: Acknowledged) -> [u8; SLOT_BYTES] {
    let mut slot = [0; SLOT_BYTES];
    slot[..8].copy_from_slice(MAGIC);
    slot[8..16].copy_from_slice(&head.seq.to_be_bytes());
    slot[16..48].copy_from_slice(&head.hash);
    let crc = crc32fast::hash(&slot[..CHECKED_BYTES]);
    slot[48..52].copy_from_slice(&crc.to_be_bytes());
    slot
}

fn decode(slot: &[u8]) -> Option<Acknowledged> {
    let checked = slot.get(..CHECKED_BYTES)?;
    let crc = u32::from_be_bytes(slot.get(48..52)?.try_into().ok()?);
    if &checked[..8] != MAGIC || crc32fast::hash(checked) != crc {
        return None;
    }
    Some(Acknowledged {
        seq: u64::from_be_bytes(checked[8..16].try_into().ok()?),
        hash: checked[16..48].try_into().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: u64) -> Acknowledged {
        Acknowledged {
            seq,
            hash: [u8::try_from(seq % 256).unwrap_or(0); 32],
        }
    }

    #[test]
    fn the_newest_record_survives_a_torn_write_of_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut checkpoint, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!(found, head(0));
        for seq in 1..=5 {
            checkpoint.record(head(seq)).unwrap();
        }
        drop(checkpoint);
        let (_, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!(found, head(5));
        // A torn write of seq 6 lands in the slot of seq 4, never in that of seq 5.
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let newest_slot = usize::from(decode(&bytes[..SLOT_BYTES]) != Some(head(5)));
        let other = 1 - newest_slot;
        bytes[other * SLOT_BYTES + 20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!(found, head(5));
        // Both slots damaged: refused, never read as "nothing acknowledged".
        bytes[newest_slot * SLOT_BYTES + 9] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path(), head(0)),
            Err(CheckpointError::Damaged)
        ));
    }
}
