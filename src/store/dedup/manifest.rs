//! `<log>/dedup/manifest`: which run files make up the spilled part of the dedup index,
//! and how far into the log they reach.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "KPIDDM01"
//!      8    16  the key of the id hash (SipHash-1-3), two u64 LE
//!     24     8  window in seconds the runs were kept for, i64 LE
//!     32     8  covered seq: every id recorded at or before it (and inside the window)
//!               is in a run, u64 LE
//!     40    32  chain hash at the covered seq (recognises the log they belong to)
//!     72     8  number of the next run file, u64 LE
//!     80     4  runs, u32 LE
//!     84  16*n  per run: its number and its file length, u64 LE each
//!    end     4  CRC-32 of everything before, LE
//! ```
//!
//! Written whole (temporary file, fsync, rename, directory fsync), so it always names run
//! files that were complete and synced before it.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use crate::store::chain::Hash;
use crate::store::durability::sync_dir;

/// File name of the manifest inside the dedup directory.
pub const MANIFEST_FILE: &str = "manifest";
const MAGIC: &[u8; 8] = b"KPIDDM01";
const HEADER_BYTES: usize = 84;

/// What the manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The key of the id hash.
    pub key: (u64, u64),
    /// The dedup window (seconds) the runs were kept for: they may lack ids older than it.
    pub window_seconds: i64,
    /// Every id recorded up to this seq is in a run (or outside the window).
    pub covered_seq: u64,
    /// The chain hash at `covered_seq`.
    pub covered_hash: Hash,
    /// The number the next run file gets.
    pub next_run: u64,
    /// (number, file length) of each run, oldest first.
    pub runs: Vec<(u64, u64)>,
}

impl Manifest {
    /// The manifest's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + self.runs.len() * 16 + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.key.0.to_le_bytes());
        bytes.extend_from_slice(&self.key.1.to_le_bytes());
        bytes.extend_from_slice(&self.window_seconds.to_le_bytes());
        bytes.extend_from_slice(&self.covered_seq.to_le_bytes());
        bytes.extend_from_slice(&self.covered_hash);
        bytes.extend_from_slice(&self.next_run.to_le_bytes());
        let runs = u32::try_from(self.runs.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&runs.to_le_bytes());
        for (number, len) in &self.runs {
            bytes.extend_from_slice(&number.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes a manifest; `None` when the bytes do not check out.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32fast::hash(body).to_le_bytes() != crc || body.get(..8)? != MAGIC {
            return None;
        }
        let u64_at = |at: usize| Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?));
        let runs = u32::from_le_bytes(body.get(80..84)?.try_into().ok()?);
        let runs = usize::try_from(runs).ok()?;
        if body.len() != HEADER_BYTES.checked_add(runs.checked_mul(16)?)? {
            return None;
        }
        Some(Self {
            key: (u64_at(8)?, u64_at(16)?),
            window_seconds: i64::from_le_bytes(body.get(24..32)?.try_into().ok()?),
            covered_seq: u64_at(32)?,
            covered_hash: body.get(40..72)?.try_into().ok()?,
            next_run: u64_at(72)?,
            runs: (0..runs)
                .map(|i| {
                    Some((
                        u64_at(HEADER_BYTES + i * 16)?,
                        u64_at(HEADER_BYTES + i * 16 + 8)?,
                    ))
                })
                .collect::<Option<Vec<_>>>()?,
        })
    }

    /// Reads the manifest in `dir`: `Ok(None)` when there is none, `Err` with the reason
    /// when it cannot be used.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        match std::fs::read(dir.join(MANIFEST_FILE)) {
            Ok(bytes) => Self::decode(&bytes)
                .map(Some)
                .ok_or_else(|| "the manifest fails its checksum".to_owned()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(format!("the manifest cannot be read: {error}")),
        }
    }

    /// Writes the manifest into `dir` durably.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let temporary = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let written = File::create(&temporary).and_then(|mut file| {
            file.write_all(&self.encode())?;
            file.sync_all()
        });
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
        std::fs::rename(&temporary, dir.join(MANIFEST_FILE))?;
        sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_every_changed_byte_is_refused() {
        let manifest = Manifest {
            key: (1, 2),
            window_seconds: 86_400,
            covered_seq: 42,
            covered_hash: [9; 32],
            next_run: 7,
            runs: vec![(3, 4096), (6, 81_920)],
        };
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(&bytes), Some(manifest.clone()));
        for byte in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[byte] ^= 0x21;
            assert_eq!(Manifest::decode(&changed), None, "byte {byte}");
        }
        assert_eq!(Manifest::decode(&bytes[..bytes.len() - 1]), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::load(dir.path()), Ok(None));
        manifest.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()), Ok(Some(manifest)));
    }
}
