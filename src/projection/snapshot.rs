//! Snapshots of the read models: the catalog and the aggregates with the seq they cover
//! and the chain hash at that seq, in one file written atomically (temporary file, fsync,
//! rename, fsync of the directory), so a restart replays only the log's tail.
//!
//! The file is the format (u32, little-endian), the measured KPIs' buckets in
//! [`MEASURED_PARTS`] parts (each encoded by `crate::encoding`, postcard, written one at a
//! time so that a snapshot holds only one part's bytes, decoded straight from the file's
//! bytes on all cores), then the encoding of [`Snapshot`] (which holds the parts' lengths),
//! its length (u64),
//! and a CRC-32 of everything before it, little-endian.
//!
//! A snapshot that is missing, unreadable, damaged (its checksum differs), of another
//! format, or that does not match the log (its hash differs from the log's hash at its seq, or it is ahead of the log) is
//! discarded with a warning and the read models are rebuilt from the whole log; so is one
//! that refers to a page file that is missing (`ReadModels::restore_from`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Catalog;
use crate::projection::Aggregates;
use crate::store::{EventLog, Hash};

/// File name of the snapshot inside the snapshot directory.
pub const SNAPSHOT_FILE: &str = "projection.snapshot";
/// Format of the snapshot file; a build reads only its own format (anything else is
/// discarded and rebuilt, which is always correct, only slower). Format 6: the parts follow
/// the encoded snapshot as raw bytes, a checksum ends the file, buckets are stored as
/// sequences (`projection::buckets`), and a PERCENTILE bucket is stored as its exact values
/// (up to 128) or as its sketch, where 5 always stored a sketch. Format 7: no dedup index
/// entries (the log keeps its own, `store/dedup`). Format 8: a bucket map is stored as its
/// chunks (their buckets, or the page a chunk that left memory is stored in,
/// `projection::pages`) then its tail, and the aggregates keep the latest occurred_at; the
/// parts come before the encoded snapshot, the format first as 4 plain bytes; a stored
/// chunk may carry the late measurements kept beside it (a variant added at the end, so
/// earlier format-8 files still read; a build before it refuses such a file and rebuilds).
/// Format 9: the parts and the snapshot are postcard (`crate::encoding`), where 8 was
/// bincode; a format-8 file is discarded and the read models rebuilt from the log.
/// Format 10: a stored chunk names its late page (`projection::buckets`), if any.
const FORMAT: u32 = 10;

/// Parts the measured KPIs' buckets are stored in, so a restart decodes them on every core.
const MEASURED_PARTS: usize = 16;

/// What a snapshot holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    format: u32,
    /// Every event up to this seq is folded in.
    pub seq: u64,
    /// The chain hash at `seq`, to recognise the log the snapshot belongs to.
    pub hash: Hash,
    /// The catalog at `seq`.
    pub catalog: Catalog,
    /// The aggregates at `seq`; their measured KPIs are stored after the snapshot in parts
    /// (see [`Aggregates::encode_measured`]).
    pub aggregates: Aggregates,
    /// Byte length of each part of the measured KPIs after the snapshot in the file.
    parts: Vec<u64>,
}

impl Snapshot {
    /// A snapshot of read models that cover exactly up to `seq`, with `hash` the chain hash
    /// there.
    pub fn new(seq: u64, hash: Hash, catalog: Catalog, aggregates: Aggregates) -> Self {
        Self {
            format: FORMAT,
            seq,
            hash,
            catalog,
            aggregates,
            parts: Vec::new(),
        }
    }
}

/// Why a snapshot was not used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The bytes do not decode.
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    /// The snapshot is from another build's format.
    #[error("snapshot format {found}, this build reads {FORMAT}")]
    Format {
        /// The format found.
        found: u32,
    },
    /// Writing it would leave less space than the log keeps free.
    #[error(
        "no room for a snapshot of {needed} bytes: {available} available, {min_free} kept free"
    )]
    NoSpace {
        /// The snapshot's size.
        needed: u64,
        /// Bytes available on the file system.
        available: u64,
        /// Bytes kept free.
        min_free: u64,
    },
    /// The snapshot does not belong to this log.
    #[error("snapshot at seq {seq} does not match the log: {reason}")]
    Mismatch {
        /// The snapshot's seq.
        seq: u64,
        /// How it differs.
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `snapshot` into `dir` atomically: a reader sees the old file or the new one.
/// Returns the file's size. Refused ([`SnapshotError::NoSpace`]) when it would leave less
/// than `min_free` bytes available: the space the log keeps free is not spent on a
/// snapshot, which only makes restarts faster.
pub fn write(dir: &Path, snapshot: &mut Snapshot, min_free: u64) -> Result<u64, SnapshotError> {
    crate::store::create_dir_durably(dir).map_err(io_error(dir))?;
    let path = dir.join(SNAPSHOT_FILE);
    let temporary = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut file = fs::File::create(&temporary).map_err(io_error(&temporary))?;
    let written = write_parts(dir, &temporary, &mut file, snapshot, min_free);
    let size = match written {
        Ok(size) => size,
        Err(error) => {
            drop(file);
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
    };
    file.sync_all().map_err(io_error(&temporary))?;
    drop(file);
    fs::rename(&temporary, &path).map_err(io_error(&path))?;
    // The rename is durable once the directory entry is.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    Ok(size)
}

/// Writes the snapshot's pieces into `file`, each only while it leaves `min_free` bytes
/// available in `dir`; returns the file's size.
fn write_parts(
    dir: &Path,
    temporary: &Path,
    file: &mut fs::File,
    snapshot: &mut Snapshot,
    min_free: u64,
) -> Result<u64, SnapshotError> {
    let mut checksum = crc32fast::Hasher::new();
    let mut size = 0;
    let mut put = |piece: &[u8]| -> Result<(), SnapshotError> {
        let needed = widen(piece.len());
        let stats = rustix::fs::statvfs(dir).map_err(|e| io_error(dir)(e.into()))?;
        let available = stats.f_bavail.saturating_mul(stats.f_frsize);
        if available < needed.saturating_add(min_free) {
            return Err(SnapshotError::NoSpace {
                needed,
                available,
                min_free,
            });
        }
        checksum.update(piece);
        file.write_all(piece).map_err(io_error(temporary))?;
        size += needed;
        Ok(())
    };
    put(&FORMAT.to_le_bytes())?;
    snapshot.parts.clear();
    for part in 0..MEASURED_PARTS {
        let bytes = snapshot
            .aggregates
            .encode_measured(part, MEASURED_PARTS)
            .map_err(SnapshotError::Decode)?;
        put(&bytes)?;
        snapshot.parts.push(widen(bytes.len()));
    }
    let head = crate::encoding::encode(&*snapshot).map_err(SnapshotError::Decode)?;
    put(&head)?;
    put(&widen(head.len()).to_le_bytes())?;
    let checksum = checksum.finalize().to_le_bytes();
    file.write_all(&checksum).map_err(io_error(temporary))?;
    Ok(size + CHECKSUM_BYTES)
}

/// Removes the snapshot in `dir`, if there is one, durably.
pub fn remove(dir: &Path) -> std::io::Result<()> {
    match fs::remove_file(dir.join(SNAPSHOT_FILE)) {
        Ok(()) => crate::store::sync_dir(dir),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Bytes of the checksum at the end of the file.
const CHECKSUM_BYTES: u64 = 4;

/// A length as u64 (usize is at most 64 bits on every supported target).
fn widen(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Reads the snapshot in `dir` and checks that it belongs to `log`. `Ok(None)` when there
/// is none.
pub fn read(dir: &Path, log: &EventLog) -> Result<Option<Snapshot>, SnapshotError> {
    match load(dir)? {
        Some(snapshot) => check(snapshot, log).map(Some),
        None => Ok(None),
    }
}

/// Reads and decodes the snapshot in `dir`, not yet checked against a log. `Ok(None)` when
/// there is none.
pub fn load(dir: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    load_undecoded(dir)?.map(Undecoded::decode).transpose()
}

/// A snapshot read and checked, decoded but for its measured KPIs' buckets (the bulk of
/// it), which [`Undecoded::decode`] decodes, on other threads while the log opens.
pub struct Undecoded {
    /// The snapshot without its measured KPIs.
    pub snapshot: Snapshot,
    /// The file's bytes.
    file: Vec<u8>,
    /// Where the parts begin in `file`.
    parts_at: usize,
    /// Where they end (the encoded snapshot begins).
    parts_end: usize,
}

/// Reads the snapshot in `dir`, checks its checksum and format, and decodes all but its
/// measured KPIs' buckets. `Ok(None)` when there is none.
pub fn load_undecoded(dir: &Path) -> Result<Option<Undecoded>, SnapshotError> {
    let path = dir.join(SNAPSHOT_FILE);
    let file = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(&path)(error)),
    };
    let damaged = |what: &str| SnapshotError::Decode(format!("damaged snapshot: {what}"));
    // The format comes first: another build's layout is refused before anything else.
    let format = file
        .first_chunk::<4>()
        .map(|bytes| u32::from_le_bytes(*bytes))
        .ok_or_else(|| damaged("shorter than its format"))?;
    if format != FORMAT {
        return Err(SnapshotError::Format { found: format });
    }
    let content_len = file
        .len()
        .checked_sub(4)
        .ok_or_else(|| damaged("shorter than its checksum"))?;
    let (content, stored) = file.split_at(content_len);
    let stored: [u8; 4] = stored.try_into().map_err(|_| damaged("no checksum"))?;
    if crc32fast::hash(content) != u32::from_le_bytes(stored) {
        return Err(damaged("checksum mismatch"));
    }
    let head_len = content
        .last_chunk::<8>()
        .map(|bytes| u64::from_le_bytes(*bytes))
        .and_then(|len| usize::try_from(len).ok())
        .ok_or_else(|| damaged("no length of the snapshot"))?;
    let head_at = content
        .len()
        .checked_sub(8)
        .and_then(|end| end.checked_sub(head_len))
        .filter(|at| *at >= 4)
        .ok_or_else(|| damaged("the snapshot runs past the file"))?;
    let snapshot: Snapshot = crate::encoding::decode(&content[head_at..content.len() - 8])
        .map_err(SnapshotError::Decode)?;
    if snapshot.format != FORMAT {
        return Err(SnapshotError::Format {
            found: snapshot.format,
        });
    }
    Ok(Some(Undecoded {
        snapshot,
        file,
        parts_at: 4,
        parts_end: head_at,
    }))
}

impl Undecoded {
    /// Decodes the measured KPIs' buckets, their parts on all cores, and completes the
    /// snapshot.
    pub fn decode(self) -> Result<Snapshot, SnapshotError> {
        let Undecoded {
            mut snapshot,
            file,
            parts_at,
            parts_end,
        } = self;
        let content = &file[..parts_end];
        let mut parts = Vec::with_capacity(snapshot.parts.len());
        let mut start = parts_at;
        for &len in &snapshot.parts {
            let part = usize::try_from(len)
                .ok()
                .and_then(|len| content.get(start..start.checked_add(len)?))
                .ok_or_else(|| {
                    SnapshotError::Decode("a part of the buckets runs past the file".into())
                })?;
            start += part.len();
            parts.push(part);
        }
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        snapshot
            .aggregates
            .decode_measured(&parts, threads)
            .map_err(SnapshotError::Decode)?;
        Ok(snapshot)
    }
}

/// Checks that `snapshot` belongs to `log`: not past its head, the same chain hash at its
/// seq.
pub fn check(snapshot: Snapshot, log: &EventLog) -> Result<Snapshot, SnapshotError> {
    let head = log.head();
    if snapshot.seq > head.seq {
        return Err(SnapshotError::Mismatch {
            seq: snapshot.seq,
            reason: format!("the log ends at seq {}", head.seq),
        });
    }
    let hash = if snapshot.seq == 0 {
        crate::store::GENESIS_HASH
    } else {
        match log.read(snapshot.seq, snapshot.seq).next() {
            Some(Ok(stored)) => stored.hash,
            Some(Err(error)) => {
                return Err(SnapshotError::Mismatch {
                    seq: snapshot.seq,
                    reason: error.to_string(),
                });
            }
            None => {
                return Err(SnapshotError::Mismatch {
                    seq: snapshot.seq,
                    reason: "the log has no event there".into(),
                });
            }
        }
    };
    if hash != snapshot.hash {
        return Err(SnapshotError::Mismatch {
            seq: snapshot.seq,
            reason: "the chain hash differs".into(),
        });
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::query::{AggregateQuery, Fill};
    use crate::domain::{Direction, Event, Grain, KpiDefinition, KpiKind, Measurement};

    /// Aggregates of one SUM KPI with a few measurements, as a snapshot holds them.
    fn aggregates() -> Aggregates {
        let mut aggregates = Aggregates::default();
        let definition = KpiDefinition {
            id: "revenue".into(),
            name: "Revenue".into(),
            description: String::new(),
            unit: "EUR".into(),
            kind: KpiKind::Sum,
            direction: Direction::HigherIsBetter,
            timezone: chrono_tz::Tz::UTC,
            dimensions: vec!["channel".into()],
            ratio: None,
        };
        aggregates.apply(1, &Event::KpiDefined { definition }, |_| None);
        for (i, value) in [12.5, 7.25, 100.0].into_iter().enumerate() {
            let seq = 2 + u64::try_from(i).expect("small");
            let measurement = Measurement {
                kpi_id: "revenue".into(),
                value,
                occurred_at: Utc
                    .with_ymd_and_hms(2026, 3, 1 + 9 * u32::try_from(i).expect("small"), 10, 0, 0)
                    .unwrap(),
                labels: BTreeMap::from([("channel".into(), "web".into())]),
                subject: None,
                event_id: None,
            };
            aggregates.apply(seq, &Event::MeasurementRecorded(measurement), |_| None);
        }
        aggregates
    }

    fn monthly_sums(aggregates: &Aggregates) -> Vec<Option<f64>> {
        let query = AggregateQuery {
            kpi_id: "revenue".into(),
            grain: Grain::Month,
            start: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
            filter: BTreeMap::new(),
            group_by: Vec::new(),
            fill: Fill::None,
        };
        aggregates
            .query(&query)
            .expect("answers")
            .into_iter()
            .map(|bucket| bucket.summary.sum)
            .collect()
    }

    #[test]
    fn a_snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let aggregates = aggregates();
        let mut snapshot = Snapshot::new(4, [7; 32], Catalog::default(), aggregates.clone());
        write(dir.path(), &mut snapshot, 0).unwrap();
        let loaded = load(dir.path()).unwrap().expect("a snapshot");
        assert_eq!((loaded.seq, loaded.hash), (4, [7; 32]));
        assert_eq!(monthly_sums(&loaded.aggregates), monthly_sums(&aggregates));
        assert_eq!(monthly_sums(&aggregates), vec![Some(119.75)]);
    }

    /// Every single flipped bit anywhere in the file is refused, not decoded into other
    /// numbers (many flips inside a value's bytes would decode fine without the checksum).
    #[test]
    fn every_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut snapshot = Snapshot::new(4, [7; 32], Catalog::default(), aggregates());
        write(dir.path(), &mut snapshot, 0).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = fs::read(&path).unwrap();
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bytes = good.clone();
                bytes[byte] ^= 1 << bit;
                fs::write(&path, &bytes).unwrap();
                assert!(
                    load(dir.path()).is_err(),
                    "a flip of bit {bit} of byte {byte} of {} was accepted",
                    good.len()
                );
            }
        }
    }
}
