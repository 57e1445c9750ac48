//! Verification of the whole stored chain against the committed head.

use chrono::{DateTime, Utc};

use super::chain::{GENESIS_HASH, Hash};
use super::reader::{LoadedSegment, decode_record};
use super::segment::{describe_key, key_seq, segment_key};

/// Entries after an unreadable segment that are tried before its range is taken to run to
/// the head.
const MAX_UNREADABLE_PROBES: usize = 1024;
use super::{ChainBreak, LogHead, StoreError, Verification};

/// Walks every segment up to `head` and checks: keys equal first seqs, seqs are
/// contiguous from 1, each prev_hash equals the hash before it, every record decodes,
/// recorded_at never decreases, each segment hashes to its stored head hash, and the
/// last one ends at the committed head with its hash. Segments appended after `head` was
/// taken are not looked at, so this runs while the writer continues.
pub fn verify(tree: &sled::Tree, head: &LogHead) -> Result<Verification, StoreError> {
    let mut walk = Walk {
        next_seq: 1,
        hash: GENESIS_HASH,
        recorded_at: None,
    };
    let result = walk.run(tree, head)?;
    Ok(Verification {
        checked_events: walk.next_seq - 1,
        head_seq: head.seq,
        result,
    })
}

/// Where the walk is: everything before `next_seq` has checked out.
struct Walk {
    next_seq: u64,
    /// Chain hash after `next_seq - 1`.
    hash: Hash,
    recorded_at: Option<DateTime<Utc>>,
}

impl Walk {
    fn run(
        &mut self,
        tree: &sled::Tree,
        head: &LogHead,
    ) -> Result<Result<Hash, ChainBreak>, StoreError> {
        for item in tree.iter() {
            if self.next_seq > head.seq {
                break;
            }
            let (key, value) = match item {
                Ok(entry) => entry,
                // A missing or damaged blob file, or damage in sled's own pages.
                Err(error) => {
                    return Ok(Err(self.unreadable(tree, head, &error.to_string())));
                }
            };
            let Some(key_first) = key_seq(&key) else {
                return Ok(Err(self.simple_break(format!(
                    "segment key {} is not 8 bytes",
                    describe_key(&key)
                ))));
            };
            if key_first > head.seq {
                break;
            }
            if key_first > self.next_seq {
                return Ok(Err(self.simple_break(format!(
                    "seqs {}..={} are missing: the next segment starts at seq {key_first}",
                    self.next_seq,
                    key_first - 1
                ))));
            }
            if key_first != self.next_seq {
                return Ok(Err(self.simple_break(format!(
                    "expected the segment starting at seq {}, found one starting at seq {key_first}",
                    self.next_seq
                ))));
            }
            let segment = match LoadedSegment::load(&key, value) {
                Ok(segment) => segment,
                Err(error) => return Ok(Err(self.unreadable(tree, head, &error.to_string()))),
            };
            if let Err(chain_break) = self.check_segment(&segment) {
                return Ok(Err(chain_break));
            }
        }
        if self.next_seq <= head.seq {
            return Ok(Err(self.simple_break(format!(
                "the segments end at seq {}, before the head seq {}",
                self.next_seq - 1,
                head.seq
            ))));
        }
        if self.hash != head.hash {
            return Ok(Err(ChainBreak {
                seq: head.seq,
                reason: "the stored chain does not end at the head hash this log committed".into(),
                expected_hash: Some(self.hash),
                stored_hash: Some(head.hash),
            }));
        }
        Ok(Ok(self.hash))
    }

    /// Checks one segment that starts at `next_seq`, and moves past it.
    fn check_segment(&mut self, loaded: &LoadedSegment) -> Result<(), ChainBreak> {
        let segment = &loaded.segment;
        let (first, last) = (segment.first_seq, segment.last_seq());
        if segment.prev_hash != self.hash {
            return Err(ChainBreak {
                seq: first,
                reason: format!(
                    "the segment's prev_hash is not the hash of seq {}",
                    first - 1
                ),
                expected_hash: Some(self.hash),
                stored_hash: Some(segment.prev_hash),
            });
        }
        let mut recorded_at = self.recorded_at;
        for (seq, record) in loaded.records() {
            let (at, _) = decode_record(seq, record).map_err(|error| ChainBreak {
                seq,
                reason: error.to_string(),
                expected_hash: None,
                stored_hash: None,
            })?;
            if recorded_at.is_some_and(|previous| at < previous) {
                return Err(ChainBreak {
                    seq,
                    reason: "recorded_at is before that of the previous event".into(),
                    expected_hash: None,
                    stored_hash: None,
                });
            }
            recorded_at = Some(at);
        }
        let recomputed = *loaded
            .hashes()
            .last()
            .unwrap_or_else(|| unreachable!("a parsed segment has a record"));
        if recomputed != segment.head_hash {
            return Err(ChainBreak {
                seq: first,
                reason: format!(
                    "the records of seqs {first}..={last} do not hash to the segment's stored \
                     head hash"
                ),
                expected_hash: Some(recomputed),
                stored_hash: Some(segment.head_hash),
            });
        }
        self.next_seq = last + 1;
        self.hash = recomputed;
        self.recorded_at = recorded_at;
        Ok(())
    }

    /// The break at a segment starting at `next_seq` that cannot be read, with the range of
    /// seqs it takes away: up to the next segment that can be read, or the head.
    fn unreadable(&self, tree: &sled::Tree, head: &LogHead, error: &str) -> ChainBreak {
        let next_readable = tree
            .range(segment_key(self.next_seq.saturating_add(1))..)
            .take(MAX_UNREADABLE_PROBES)
            .find_map(|item| item.ok().and_then(|(key, _)| key_seq(&key)));
        let last = next_readable
            .map_or(head.seq, |next| next - 1)
            .min(head.seq);
        self.simple_break(format!(
            "seqs {}..={last} cannot be read: {error}",
            self.next_seq
        ))
    }

    fn simple_break(&self, reason: String) -> ChainBreak {
        ChainBreak {
            seq: self.next_seq,
            reason,
            expected_hash: None,
            stored_hash: None,
        }
    }
}
