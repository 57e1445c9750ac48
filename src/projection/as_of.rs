//! As-of folds: the aggregates of some KPIs as known at an earlier seq, folded from the
//! history index, and the checkpoints that bound their cost.
//!
//! # Checkpoints
//!
//! A checkpoint is the folded state of one measured KPI (its definition, version and the
//! buckets of [`CHECKPOINT_GRAINS`]) at the last seq of a stored part of the history
//! index. An as-of fold whose grains are all checkpointed starts each KPI from its latest
//! checkpoint at or before the asked seq and folds only what came after it: the KPI's
//! measurements after the checkpoint, and the other events after the earliest of its
//! KPIs' checkpoints. Events about a KPI at or before its checkpoint are in the checkpoint
//! and are skipped, retractions of its measurements included.
//!
//! A checkpoint is itself an as-of fold (from the KPI's checkpoint before it) of the same
//! events, by the same code, in the same order: continuing from it gives the bits a fold
//! from seq 1 gives, not a merge of partial states that could differ in the last bits of
//! a sum. A fold that must refold a KPI (its kind or timezone changed after the
//! checkpoint, or a retraction cannot be subtracted) needs every retraction from seq 1:
//! it starts again without checkpoints.
//!
//! The `kpi-checkpoints` thread makes them, off the commit path: it hears of every part
//! the history writer stores and checkpoints a KPI once the measurements it had since its
//! last checkpoint reach `checkpoint_every` (4,096) and take at least
//! `checkpoint_span_per_byte` (2) times the checkpoint's bytes in the index, so
//! checkpoints add at most half to the index and reading one costs less than folding what
//! it replaces. The thread counts measurements from its start; for a KPI whose last
//! checkpoint is older, it first estimates those since that checkpoint (the same rate per
//! seq as since the start) and folds only once the estimate reaches the checkpoint's
//! bytes; the fold that makes a checkpoint counts them exactly. So after a restart a KPI
//! is weighed against all of them: one with large states is neither declined at every
//! start while its last checkpoint falls behind, nor folded at every start to find out. An as-of fold of one KPI therefore reads at most about twice
//! `checkpoint_every` of its measurements (more for a KPI whose buckets are large, such as
//! PERCENTILE sketches, or that has very many series), wherever in the log the seq is.
//!
//! A checkpoint is a page (LZ4, length and CRC-32 checked, as the read model's pages) in
//! append-only files under `<history dir>/checkpoints/`, found through the index's sled
//! tree `checkpoints` (key: KPI id, a 0 byte, seq as u64 BE; value: the page's place).
//! Its bytes: a format byte, the log's chain hash at its seq, the state (`crate::encoding`). Pages
//! are not synced: a crash may lose the newest while their keys survive, so a fold tries
//! up to four, newest first. One the log does not continue (another hash at its seq, as
//! after `kpi-server recover`), of another format, or damaged is not used.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use std::time::Duration;

use foldhash::HashMap;

use crate::domain::Grain;
use crate::projection::history::{StoredPart, wait_until};
use crate::projection::{Aggregates, Grains, History, Visited, kpi_of, measurement_at};
use crate::store::{LogReader, StoreError};

/// The grains a checkpoint holds: as-of questions about them start from checkpoints.
/// Hours, days and weeks are not in them: their buckets would make a checkpoint many times
/// larger (two years of one series: 105 weeks, 730 days, against 34 months, quarters and
/// years), so it would cover many more measurements.
pub const CHECKPOINT_GRAINS: [Grain; 3] = [Grain::Month, Grain::Quarter, Grain::Year];

/// The format of a checkpoint's bytes; bump it when the encoding of a KPI's state changes.
/// Format 2: the state is postcard (`crate::encoding`), where 1 was bincode.
const FORMAT: u8 = 2;
/// Bytes before the state: the format and the chain hash.
const HEADER: usize = 1 + 32;

/// The aggregates of `kpi_ids` in `grains` as known at `seq`: a fold of their events up
/// to it, read from the history index and started from the KPIs' checkpoints where
/// `grains` allows.
pub fn fold(
    history: &History,
    log: &LogReader,
    seq: u64,
    kpi_ids: &[&str],
    grains: Grains,
) -> Result<Aggregates, StoreError> {
    fold_counted(history, log, seq, kpi_ids, grains).map(|(aggregates, _)| aggregates)
}

/// [`fold`], and how many measurements it folded (those in checkpoints not counted).
fn fold_counted(
    history: &History,
    log: &LogReader,
    seq: u64,
    kpi_ids: &[&str],
    grains: Grains,
) -> Result<(Aggregates, u64), StoreError> {
    let checkpointed = Grain::ALL
        .into_iter()
        .all(|grain| !grains.contains(grain) || CHECKPOINT_GRAINS.contains(&grain));
    let starts = if checkpointed {
        latest_checkpoints(history, log, seq, kpi_ids)?
    } else {
        HashMap::default()
    };
    let (mut aggregates, mut to_rebuild, mut folded) =
        fold_from(history, log, seq, kpi_ids, grains, &starts)?;
    if !to_rebuild.is_empty() && !starts.is_empty() {
        // A refold skips every retracted measurement: it needs the retractions from seq 1.
        (aggregates, to_rebuild, folded) =
            fold_from(history, log, seq, kpi_ids, grains, &HashMap::default())?;
    }
    // KPIs whose kind or timezone changed: refolded once at the end, under their final
    // definition, which is what the incremental path arrives at too.
    for kpi_id in to_rebuild {
        super::rebuild_kpi(history, &mut aggregates, &kpi_id, seq)?;
    }
    Ok((aggregates, folded))
}

/// The fold of `kpi_ids` up to `seq`, each measured KPI of `starts` from its checkpoint
/// (seq and encoded state); the KPIs to refold; the measurements folded.
fn fold_from(
    history: &History,
    log: &LogReader,
    seq: u64,
    kpi_ids: &[&str],
    grains: Grains,
    starts: &HashMap<String, (u64, Vec<u8>)>,
) -> Result<(Aggregates, BTreeSet<String>, u64), StoreError> {
    let mut aggregates = Aggregates::folding(grains);
    let mut folded = 0u64;
    let mut covered: HashMap<&str, u64> = HashMap::default();
    for (kpi_id, (at, state)) in starts {
        match aggregates.install_kpi(kpi_id, state) {
            Ok(()) => {
                covered.insert(kpi_id, *at);
            }
            Err(reason) => {
                tracing::warn!(
                    kpi_id,
                    at,
                    reason,
                    "as-of checkpoint unusable; folding without it"
                );
            }
        }
    }
    let from = |kpi_id: &str| covered.get(kpi_id).map_or(1, |at| at + 1);
    // The other events from the earliest point a KPI of the question needs them.
    let others_from = kpi_ids.iter().map(|id| from(id)).min().unwrap_or(1);
    let kpis: Vec<(&str, u64)> = kpi_ids.iter().map(|id| (*id, from(id))).collect();
    let in_checkpoint = |kpi_id: &str, seq: u64| covered.get(kpi_id).is_some_and(|&at| seq <= at);
    let mut to_rebuild = BTreeSet::new();
    history.visit(others_from, &kpis, seq, |seq, visited| match visited {
        Visited::Event(_, event) => {
            let about = kpi_of(&event);
            if about.is_some_and(|id| !kpi_ids.contains(&id) || in_checkpoint(id, seq)) {
                return;
            }
            let refold = aggregates.apply(seq, &event, |retracted| {
                // A retraction a checkpoint holds is not subtracted again.
                measurement_at(log, retracted).filter(|m| !in_checkpoint(&m.kpi_id, seq))
            });
            if let Some(kpi_id) = refold {
                to_rebuild.insert(kpi_id);
            }
        }
        Visited::Measurement {
            kpi_id,
            labels,
            observation,
        } => {
            folded += 1;
            aggregates.record(kpi_id, labels, observation);
        }
    })?;
    Ok((aggregates, to_rebuild, folded))
}

/// The latest usable checkpoint at or before `seq` of each of `kpi_ids` that has one.
fn latest_checkpoints(
    history: &History,
    log: &LogReader,
    seq: u64,
    kpi_ids: &[&str],
) -> Result<HashMap<String, (u64, Vec<u8>)>, StoreError> {
    let mut starts = HashMap::default();
    for kpi_id in kpi_ids {
        let usable = |at, bytes: &[u8]| decode(bytes, log, at).map(|_| ());
        if let Some((at, mut bytes)) = history.checkpoint(kpi_id, seq, usable)? {
            bytes.drain(..HEADER);
            starts.insert((*kpi_id).to_owned(), (at, bytes));
        }
    }
    Ok(starts)
}

/// A checkpoint's bytes: the format byte, then the log's chain hash at its seq, then the
/// state.
fn encode(hash: &[u8; 32], state: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + state.len());
    bytes.push(FORMAT);
    bytes.extend_from_slice(hash);
    bytes.extend_from_slice(state);
    bytes
}

/// The state in a checkpoint's bytes taken at `at`, if it is of this format and the log
/// has its chain hash there.
fn decode<'a>(bytes: &'a [u8], log: &LogReader, at: u64) -> Result<&'a [u8], String> {
    let (&format, rest) = bytes.split_first().ok_or("empty")?;
    if format != FORMAT {
        return Err(format!("format {format}, this build reads {FORMAT}"));
    }
    let (hash, state) = rest.split_at_checked(32).ok_or("short")?;
    let found = log.hash_at(at).map_err(|error| error.to_string())?;
    if found != hash {
        return Err(format!("the log has another hash at seq {at}"));
    }
    Ok(state)
}

/// The `kpi-checkpoints` thread's bookkeeping (see the module doc).
struct Maker {
    log: LogReader,
    /// Measurements of each KPI since its last checkpoint (or the start, until a declined
    /// fold counted those before it): their count and bytes in the history index (before
    /// compression).
    since: HashMap<String, (u64, u64)>,
    /// Bytes of measurements each KPI needs since its last checkpoint before the next is
    /// tried: the last checkpoint's bytes times `checkpoint_span_per_byte`, and after a
    /// checkpoint was declined (it would have taken more), also half as many again as
    /// when it was tried, so that a KPI whose state grows with its measurements is not
    /// folded again at every part.
    needed: HashMap<String, u64>,
    /// The last seq of the last part handled.
    done: Arc<AtomicU64>,
    /// The last seq of the index's stored parts when the thread started: the measurements
    /// it counts are those after it.
    started: u64,
}

impl Maker {
    fn on_stored(&mut self, history: &History, part: StoredPart) {
        let (every, span_per_byte) = history.checkpoint_cadence();
        for (kpi_id, count, bytes) in part.measured {
            if every == 0 || history.closing() {
                break;
            }
            let since = self.since.entry(kpi_id.clone()).or_default();
            *since = (since.0.saturating_add(count), since.1.saturating_add(bytes));
            let (count, bytes) = *since;
            let needed = self.needed.get(&kpi_id).copied().unwrap_or(0);
            if count < every || bytes < needed {
                continue;
            }
            if !self.needed.contains_key(&kpi_id)
                && let Some(estimate) =
                    self.estimate(history, &kpi_id, part.last_seq, (count, bytes))
            {
                // Not enough since the last checkpoint by the estimate: wait for it
                // without folding (the fold that tries it counts exactly).
                let needed = estimate.size.saturating_mul(span_per_byte);
                if estimate.span.1 < needed {
                    self.since.insert(kpi_id.clone(), estimate.span);
                    self.needed.insert(kpi_id, needed);
                    continue;
                }
            }
            match self.make(
                history,
                &kpi_id,
                part.last_seq,
                (count, bytes),
                span_per_byte,
            ) {
                Ok(Some(made)) => {
                    let mut needed = made.size.saturating_mul(span_per_byte);
                    if made.stored {
                        self.since.insert(kpi_id.clone(), (0, 0));
                    } else {
                        needed = needed.max(made.span.1.saturating_add(made.span.1 / 2));
                        self.since.insert(kpi_id.clone(), made.span);
                    }
                    self.needed.insert(kpi_id, needed);
                }
                // Not measured (any more): nothing to checkpoint until it is again.
                Ok(None) => {
                    self.since.insert(kpi_id, (0, 0));
                }
                Err(error) => {
                    tracing::warn!(%error, kpi_id, "cannot make an as-of checkpoint");
                }
            }
        }
        self.done.store(part.last_seq, Ordering::Release);
    }

    /// For a KPI first tried since the thread started, whose last checkpoint is older
    /// than that: the measurements since that checkpoint (count, bytes) estimated from
    /// `since`, those the thread counted, as if they came at the same rate per seq before
    /// it started, and that checkpoint's size. `None` when it has no checkpoint or it
    /// cannot be read (the fold then decides).
    fn estimate(
        &self,
        history: &History,
        kpi_id: &str,
        at: u64,
        since: (u64, u64),
    ) -> Option<Made> {
        let (checkpoint, bytes) = history.checkpoint(kpi_id, at, |_, _| Ok(())).ok()??;
        let counted = at.checked_sub(self.started).filter(|seqs| *seqs > 0)?;
        let seqs = at
            .checked_sub(checkpoint)
            .filter(|_| checkpoint < self.started)?;
        let scale = |n: u64| {
            u64::try_from(u128::from(n) * u128::from(seqs) / u128::from(counted))
                .unwrap_or(u64::MAX)
        };
        Some(Made {
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            stored: false,
            span: (scale(since.0), scale(since.1)),
        })
    }

    /// Folds `kpi_id` up to `at` and stores it as a checkpoint unless its bytes times
    /// `span_per_byte` pass the bytes of the measurements it follows (since its last
    /// checkpoint); `None` when the KPI is not measured. `since` is what the thread
    /// counted of them (count, bytes); it misses those before the process started, which
    /// the fold counts: the span is `since`'s bytes scaled to the measurements folded, so
    /// a KPI is not declined at every start while its last checkpoint falls behind.
    fn make(
        &self,
        history: &History,
        kpi_id: &str,
        at: u64,
        since: (u64, u64),
        span_per_byte: u64,
    ) -> Result<Option<Made>, StoreError> {
        let (aggregates, folded) = fold_counted(
            history,
            &self.log,
            at,
            &[kpi_id],
            Grains::only(CHECKPOINT_GRAINS),
        )?;
        let Some(encoded) = aggregates.encode_kpi(kpi_id) else {
            return Ok(None);
        };
        let (state, _) = encoded.map_err(|reason| StoreError::Corrupt {
            seq: at,
            reason: format!("cannot encode the state of kpi '{kpi_id}': {reason}"),
        })?;
        let bytes = encode(&self.log.hash_at(at)?, &state);
        let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let (count, counted_bytes) = since;
        let span = if folded > count && count > 0 {
            let scaled = u128::from(counted_bytes) * u128::from(folded) / u128::from(count);
            (folded, u64::try_from(scaled).unwrap_or(u64::MAX))
        } else {
            since
        };
        let stored = size.saturating_mul(span_per_byte) <= span.1;
        if stored {
            history.put_checkpoint(kpi_id, at, &bytes)?;
        }
        tracing::debug!(
            kpi_id,
            at,
            size,
            folded,
            span = span.1,
            stored,
            "as-of checkpoint"
        );
        Ok(Some(Made { size, stored, span }))
    }
}

/// What [`Maker::make`] did: the checkpoint's size, whether it stored it, and the
/// measurements since the last checkpoint (count, bytes) it weighed it against.
struct Made {
    size: u64,
    stored: bool,
    span: (u64, u64),
}

/// The `kpi-checkpoints` thread: makes the checkpoints of the parts `history` stores
/// from now on, until its writer stops. Returns the last seq of the last part it handled
/// (starting at what `history` had stored), for [`wait_checkpoints`].
pub fn start_checkpoints(
    history: &Arc<History>,
    log: LogReader,
) -> Result<Arc<AtomicU64>, StoreError> {
    let parts = history.subscribe_stored();
    let started = history.stored_seq();
    let done = Arc::new(AtomicU64::new(started));
    let mut maker = Maker {
        log,
        since: HashMap::default(),
        needed: HashMap::default(),
        done: done.clone(),
        started,
    };
    // Not an `Arc`: the thread must not keep the index (and its directory lock) open.
    let path = history.dir().to_owned();
    let history: Weak<History> = Arc::downgrade(history);
    std::thread::Builder::new()
        .name("kpi-checkpoints".into())
        .spawn(move || run(&history, &parts, &mut maker))
        .map_err(|source| StoreError::Io { path, source })?;
    Ok(done)
}

fn run(history: &Weak<History>, parts: &Receiver<StoredPart>, maker: &mut Maker) {
    while let Ok(part) = parts.recv() {
        let Some(history) = history.upgrade() else {
            return;
        };
        if history.closing() {
            return;
        }
        maker.on_stored(&history, part);
    }
}

/// Waits up to `patience` until the checkpoint thread `done` has handled every part
/// `history` has stored; whether it has.
pub fn wait_checkpoints(history: &History, done: &AtomicU64, patience: Duration) -> bool {
    wait_until(patience, || {
        done.load(Ordering::Acquire) >= history.stored_seq()
    })
}
