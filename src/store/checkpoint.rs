//! The log's own durable record of how far it was acknowledged, independent of sled's
//! recovery.
//!
//! sled treats the first entry of its log that does not check out as the end of the log:
//! one damaged byte, a lost or truncated blob file, or an older `log/` put back beside the
//! rest silently drops every event after it, and the next append would reuse their seqs.
//! So every commit writes its head (seq and chain hash) here, and at open a log that ends
//! before what was acknowledged, or has another hash there, is refused (`EventLog::open`).
//!
//! The record is fdatasynced at the same time as sled's file, not after it, so that it
//! costs no time of its own: each record carries, besides the head being committed, the
//! head of the commit before (its *floor*), which was wholly durable and acknowledged
//! before this commit began. So at open:
//!
//! - the floor is acknowledged for sure: a log that ends before it lost events;
//! - the head may not be (a power cut between the two fsyncs); a log that ends between
//!   the floor and the head lost only a commit nobody heard back from, and one that
//!   reaches the head must have its hash there.
//!
//! A graceful close writes a last record whose floor is its head, so after one the whole
//! log is checked. After a crash, the events of the last commit are checked only against
//! the one before it (damage that cuts the log inside that last commit is not told apart
//! from a power cut during it).
//!
//! The file `<log>/acknowledged` holds two 64-byte slots, written alternately, so that a
//! write torn by a power cut only ever damages the slot being replaced and the other still
//! holds the previous record:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "KPIACK02"
//!      8     8  seq: the head committed, u64 big-endian
//!     16    32  hash_seq
//!     48     8  floor: the head acknowledged before this commit, u64 big-endian
//!     56     4  CRC-32 of bytes 0..56, big-endian
//!     60     4  zero
//! ```
//!
//! The file is created whole (temporary file, fsync, rename, directory fsync), so an
//! existing file always had one valid slot; one with none is damaged.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;

use super::chain::Hash;
use super::durability::sync_dir;

/// The file's name inside the log directory.
pub const CHECKPOINT_FILE: &str = "acknowledged";
const MAGIC: &[u8; 8] = b"KPIACK02";
const SLOT_BYTES: usize = 64;
const CHECKED_BYTES: usize = 56;

/// A head of the log: everything up to `seq`, with the chain hash there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    /// The head seq.
    pub seq: u64,
    /// The chain hash at it.
    pub hash: Hash,
}

/// What the record says at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// Acknowledged for sure: the log must reach it. Its hash is known when the older slot
    /// holds that head.
    pub floor: u64,
    /// The chain hash at `floor`, when known.
    pub floor_hash: Option<Hash>,
    /// The last head committed, maybe not acknowledged: if the log reaches it, it must
    /// have this hash there.
    pub committed: Acknowledged,
}

/// One slot as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    head: Acknowledged,
    floor: u64,
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
    /// (as acknowledged) when there is none: a new log, or one written before the record
    /// existed.
    pub fn open(log_dir: &Path, head: Acknowledged) -> Result<(Self, Evidence), CheckpointError> {
        let path = log_dir.join(CHECKPOINT_FILE);
        if !path.exists() {
            let temporary = log_dir.join(format!("{CHECKPOINT_FILE}.tmp"));
            let mut file = File::create(&temporary)?;
            let mut bytes = vec![0; 2 * SLOT_BYTES];
            bytes[..SLOT_BYTES].copy_from_slice(&encode(Slot {
                head,
                floor: head.seq,
            }));
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
        let (newest, older, slot) = match slots {
            [Some(a), Some(b)] if b.head.seq > a.head.seq => (b, Some(a), 1),
            [Some(a), b] => (a, b, 0),
            [None, Some(b)] => (b, None, 1),
            [None, None] => return Err(CheckpointError::Damaged),
        };
        let floor_hash = if newest.floor == newest.head.seq {
            Some(newest.head.hash)
        } else {
            older
                .filter(|older| older.head.seq == newest.floor)
                .map(|older| older.head.hash)
        };
        Ok((
            Self {
                file,
                next_slot: 1 - slot,
            },
            Evidence {
                floor: newest.floor,
                floor_hash,
                committed: newest.head,
            },
        ))
    }

    /// Records `head` as being committed, with `floor` acknowledged before it: written into
    /// the older slot and fdatasynced.
    pub fn record(&mut self, head: Acknowledged, floor: u64) -> io::Result<()> {
        let offset = self.next_slot * SLOT_BYTES as u64;
        self.file
            .write_all_at(&encode(Slot { head, floor }), offset)?;
        self.file.sync_data()?;
        self.next_slot = 1 - self.next_slot;
        Ok(())
    }

    /// Moves the record to a thread of its own, so that a commit's record is synced at
    /// the same time as sled's file.
    pub fn spawn(self) -> io::Result<CheckpointWorker> {
        let (requests, received) = std::sync::mpsc::sync_channel::<(Acknowledged, u64)>(1);
        let (reply, replies) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("kpi-log-ack".into())
            .spawn(move || {
                let mut checkpoint = self;
                for (head, floor) in received {
                    if reply.send(checkpoint.record(head, floor)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(CheckpointWorker {
            requests: Some(requests),
            replies,
            thread: Some(thread),
        })
    }
}

/// The record on its own thread: [`CheckpointWorker::start`] a record, do the other
/// syncs, then [`CheckpointWorker::finish`].
pub struct CheckpointWorker {
    requests: Option<SyncSender<(Acknowledged, u64)>>,
    replies: Receiver<io::Result<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointWorker {
    /// Starts recording `head` (with `floor` acknowledged before it).
    pub fn start(&self, head: Acknowledged, floor: u64) -> io::Result<()> {
        self.requests
            .as_ref()
            .and_then(|requests| requests.send((head, floor)).ok())
            .ok_or_else(|| io::Error::other("the acknowledgement record's thread is gone"))
    }

    /// Waits until the record started last is durable.
    pub fn finish(&self) -> io::Result<()> {
        self.replies.recv().unwrap_or_else(|_| {
            Err(io::Error::other(
                "the acknowledgement record's thread is gone",
            ))
        })
    }
}

impl Drop for CheckpointWorker {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn encode(slot: Slot) -> [u8; SLOT_BYTES] {
    let mut bytes = [0; SLOT_BYTES];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..16].copy_from_slice(&slot.head.seq.to_be_bytes());
    bytes[16..48].copy_from_slice(&slot.head.hash);
    bytes[48..56].copy_from_slice(&slot.floor.to_be_bytes());
    let crc = crc32fast::hash(&bytes[..CHECKED_BYTES]);
    bytes[56..60].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Option<Slot> {
    let checked = bytes.get(..CHECKED_BYTES)?;
    let crc = u32::from_be_bytes(bytes.get(56..60)?.try_into().ok()?);
    if &checked[..8] != MAGIC || crc32fast::hash(checked) != crc {
        return None;
    }
    let seq = u64::from_be_bytes(checked[8..16].try_into().ok()?);
    let floor = u64::from_be_bytes(checked[48..56].try_into().ok()?);
    (floor <= seq).then_some(Slot {
        head: Acknowledged {
            seq,
            hash: checked[16..48].try_into().ok()?,
        },
        floor,
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
    fn the_floor_is_the_previous_commit_and_a_close_makes_the_head_sure() {
        let dir = tempfile::tempdir().unwrap();
        let (mut checkpoint, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!((found.floor, found.committed), (0, head(0)));
        for seq in 1..=5 {
            checkpoint.record(head(seq), seq - 1).unwrap();
        }
        drop(checkpoint);
        let (mut checkpoint, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!(found.floor, 4);
        assert_eq!(found.floor_hash, Some(head(4).hash));
        assert_eq!(found.committed, head(5));
        // A close records the head as its own floor.
        checkpoint.record(head(5), 5).unwrap();
        drop(checkpoint);
        let (_, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!((found.floor, found.floor_hash), (5, Some(head(5).hash)));
    }

    #[test]
    fn the_newest_record_survives_a_torn_write_of_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut checkpoint, _) = Checkpoint::open(dir.path(), head(0)).unwrap();
        for seq in 1..=5 {
            checkpoint.record(head(seq), seq - 1).unwrap();
        }
        drop(checkpoint);
        // A torn write of seq 6 lands in the slot of seq 4, never in that of seq 5.
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let newest = usize::from(decode(&bytes[..SLOT_BYTES]).map(|s| s.head) != Some(head(5)));
        bytes[(1 - newest) * SLOT_BYTES + 20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, found) = Checkpoint::open(dir.path(), head(0)).unwrap();
        assert_eq!((found.floor, found.committed), (4, head(5)));
        assert_eq!(found.floor_hash, None, "the slot of seq 4 is gone");
        // Both slots damaged: refused, never read as "nothing acknowledged".
        bytes[newest * SLOT_BYTES + 9] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path(), head(0)),
            Err(CheckpointError::Damaged)
        ));
    }
}
