//! Read models folded from the log: rebuilt from it on start, then kept current by the
//! log's publisher, which hands them each durable group (after the flush, before the
//! acknowledgement, so a client reads its own writes).

pub mod aggregates;
pub mod analysis;
pub mod as_of;
pub mod buckets;
pub mod catalog;
pub mod history;
pub mod live;
pub mod pages;
pub mod snapshot;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};

pub use aggregates::{Aggregates, Footprint, Grains, Tier};
pub use catalog::CatalogView;
pub use history::{History, HistoryOptions, Visited};
pub use snapshot::{Snapshot, SnapshotError};

use crate::domain::{Catalog, Event, Measurement};
use crate::projection::pages::PageStore;
use crate::store::{
    AcknowledgedHead, CommitListener, Committed, EventLog, LogReader, StoreError, StoreOptions,
};

/// The read models of the service and how they were restored.
pub struct ReadModels {
    /// The catalog.
    pub catalog: Arc<CatalogView>,
    /// The aggregates.
    pub aggregates: Arc<AggregateView>,
    /// The durable head and the recent touches, for followers and watchers.
    pub live: Arc<live::LiveFeed>,
    /// Each KPI's measurements and the other events, for as-of questions and refolds.
    pub history: Arc<History>,
    /// Where the buckets beyond the memory budget are; `None` when all stay in memory.
    pub pages: Option<Arc<PageStore>>,
    /// What the start cost.
    pub restored: Restored,
}

/// Where the buckets beyond a memory budget go.
#[derive(Debug, Clone)]
pub struct TierOptions {
    /// The page directory.
    pub pages_dir: std::path::PathBuf,
    /// Bytes the buckets may hold in memory.
    pub budget: usize,
}

/// How the read models were restored at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restored {
    /// The seq of the snapshot loaded (0 when none was usable).
    pub snapshot_seq: u64,
    /// Events of the log's tail folded in after the snapshot.
    pub replayed_events: u64,
    /// Time from the start until the snapshot file is read and decoded ([`open`] only).
    pub snapshot_load: std::time::Duration,
    /// Time from the start until the log is open with its dedup index ([`open`] only; the
    /// log opens beside the buckets' decoding).
    pub log_open: std::time::Duration,
    /// Time to check the snapshot and fold the tail ([`open`] only).
    pub models: std::time::Duration,
}

impl ReadModels {
    /// Loads the snapshot in `snapshot_dir` (when it belongs to `log`), folds the log's
    /// tail after it (and after what `history` covers) in one pass, and registers the
    /// models for committed events. Call before the first append, so no event is missed.
    /// With a `tier`, buckets beyond its budget are stored in its page store (and page
    /// files the snapshot does not refer to are deleted); without, all stay in memory.
    pub fn restore(
        log: &EventLog,
        snapshot_dir: &Path,
        history: History,
        tier: Option<Tier>,
    ) -> Result<Self, StoreError> {
        Self::restore_from(log, snapshot::load(snapshot_dir), history, tier)
    }

    /// [`ReadModels::restore`] from a snapshot already loaded (not yet checked against
    /// `log`), or the error that made it unusable.
    pub fn restore_from(
        log: &EventLog,
        loaded: Result<Option<Snapshot>, SnapshotError>,
        history: History,
        tier: Option<Tier>,
    ) -> Result<Self, StoreError> {
        let checked = loaded
            .and_then(|loaded| loaded.map(|s| snapshot::check(s, log)).transpose())
            .and_then(|checked| match (checked, &tier) {
                (Some(snapshot), Some(tier)) => {
                    let present = tier.store.files();
                    match snapshot
                        .aggregates
                        .page_files()
                        .into_iter()
                        .find(|file| !present.contains(file))
                    {
                        Some(file) => Err(SnapshotError::Mismatch {
                            seq: snapshot.seq,
                            reason: format!("page file {file} it refers to is missing"),
                        }),
                        None => Ok(Some(snapshot)),
                    }
                }
                (checked, _) => Ok(checked),
            });
        let (mut catalog, mut aggregates, snapshot_seq) = match checked {
            Ok(Some(snapshot)) => (snapshot.catalog, snapshot.aggregates, snapshot.seq),
            Ok(None) => (Catalog::default(), Aggregates::default(), 0),
            Err(error) => {
                tracing::warn!(%error, "snapshot discarded; rebuilding the read models from the log");
                (Catalog::default(), Aggregates::default(), 0)
            }
        };
        let pages = tier.as_ref().map(|tier| tier.store.clone());
        if let Some(tier) = tier {
            if let Err(error) = tier
                .store
                .retain(&aggregates.page_files(), tier.store.next_file())
            {
                tracing::warn!(%error, "page files no snapshot refers to could not be deleted");
            }
            aggregates.set_tier(tier);
        }
        let head = log.head().seq;
        let reader = log.reader();
        let history = Arc::new(history);
        // Before the tail: parts it fills are stored while it is read.
        let checkpoints_done = as_of::start_checkpoints(&history, log.reader())?;
        let history_seq = history.seq();
        let mut to_rebuild = BTreeSet::new();
        let mut replayed_events = 0;
        for stored in log.read(snapshot_seq.min(history_seq) + 1, head) {
            let stored = stored?;
            history.fold_in(stored.seq, stored.recorded_at, &stored.event);
            if stored.seq <= snapshot_seq {
                continue;
            }
            replayed_events += 1;
            catalog.apply(stored.seq, stored.recorded_at, &stored.event);
            if let Some(kpi_id) = aggregates.apply(stored.seq, &stored.event, |seq| {
                measurement_at(&reader, seq)
            }) {
                to_rebuild.insert(kpi_id);
            }
        }
        for kpi_id in to_rebuild {
            rebuild_kpi(&history, &mut aggregates, &kpi_id, head)?;
        }
        tracing::info!(
            snapshot_seq,
            replayed_events,
            history_seq,
            head_seq = head,
            "read models restored"
        );
        let catalog = Arc::new(CatalogView::new(catalog));
        let aggregates = Arc::new(AggregateView {
            aggregates: RwLock::new(aggregates),
            log: reader,
            history: history.clone(),
            checkpoints_done,
        });
        let live_feed = Arc::new(live::LiveFeed::new(head));
        // First: a refold of the aggregates reads its own group's events through it.
        log.add_listener(history.clone());
        log.add_listener(catalog.clone());
        log.add_listener(aggregates.clone());
        // Last: followers woken by it find the read models current too.
        log.add_listener(live_feed.clone());
        Ok(Self {
            catalog,
            aggregates,
            live: live_feed,
            history,
            pages,
            restored: Restored {
                snapshot_seq,
                replayed_events,
                ..Restored::default()
            },
        })
    }

    /// Writes a snapshot of both models, taken at one seq, into `snapshot_dir`, unless it
    /// would leave less than `min_free` bytes available there. Blocking.
    pub fn snapshot(
        &self,
        log: &EventLog,
        snapshot_dir: &Path,
        min_free: u64,
    ) -> Result<u64, SnapshotError> {
        let (catalog, aggregates) = loop {
            // The publisher updates the catalog, then the aggregates, for each group: read
            // both when they cover the same seq.
            let catalog = self.catalog.read();
            let aggregates = self.aggregates.read();
            if catalog.seq() == aggregates.seq() {
                break (catalog.clone(), aggregates.clone());
            }
            drop((catalog, aggregates));
            std::thread::yield_now();
        };
        let seq = aggregates.seq();
        let hash = if seq == 0 {
            crate::store::GENESIS_HASH
        } else {
            match log.read(seq, seq).next() {
                Some(Ok(stored)) => stored.hash,
                Some(Err(error)) => {
                    return Err(SnapshotError::Mismatch {
                        seq,
                        reason: error.to_string(),
                    });
                }
                None => {
                    return Err(SnapshotError::Mismatch {
                        seq,
                        reason: "the log has no event there".into(),
                    });
                }
            }
        };
        // Files appended to from here on are kept whatever the snapshot refers to.
        let first_new_file = self.pages.as_ref().map(|pages| pages.next_file());
        let mut referred = aggregates.page_files();
        if let Some(pages) = &self.pages {
            // The snapshot refers to pages written before it was taken: durable first.
            pages.sync().map_err(|source| SnapshotError::Io {
                path: snapshot_dir.to_owned(),
                source,
            })?;
        }
        snapshot::write(
            snapshot_dir,
            &mut Snapshot::new(seq, hash, catalog, aggregates),
            min_free,
        )?;
        if let (Some(pages), Some(first_new_file)) = (&self.pages, first_new_file) {
            referred.extend(self.aggregates.read().page_files());
            if let Err(error) = pages.retain(&referred, first_new_file) {
                tracing::warn!(%error, "page files nothing refers to could not be deleted");
            }
        }
        Ok(seq)
    }
}

/// Opens the event log in `log_dir` and restores the read models, using the snapshot in
/// `snapshot_dir` (the log must reach its seq with its hash, the read models take their
/// state from it), the history index in `history_dir`, and the page store and memory
/// budget of `tier`. What `run` does before serving.
pub fn open(
    log_dir: &Path,
    snapshot_dir: &Path,
    history_dir: &Path,
    tier: TierOptions,
    options: StoreOptions,
) -> Result<(EventLog, ReadModels), StoreError> {
    let history_options = HistoryOptions {
        min_free_bytes: options.min_free_bytes,
        ..HistoryOptions::default()
    };
    let started = std::time::Instant::now();
    let mut loaded = snapshot::load_undecoded(snapshot_dir);
    let acknowledged = match &mut loaded {
        Ok(Some(undecoded)) => Some(AcknowledgedHead {
            seq: undecoded.snapshot.seq,
            hash: undecoded.snapshot.hash,
            evidence: "the read-model snapshot".to_owned(),
        }),
        _ => None,
    };
    // The buckets decode while the log opens with its dedup index: the two
    // biggest costs of a restart, independent of each other.
    let (log, (loaded, loaded_after), opened_after) = std::thread::scope(|scope| {
        let decoder = scope.spawn(|| {
            let decoded =
                loaded.and_then(|loaded| loaded.map(snapshot::Undecoded::decode).transpose());
            (decoded, started.elapsed())
        });
        let log = EventLog::open_checked(log_dir, options, acknowledged);
        let opened_after = started.elapsed();
        let decoded = decoder.join().unwrap_or_else(|_| {
            let error = SnapshotError::Decode("the snapshot decoder panicked".into());
            (Err(error), started.elapsed())
        });
        (log, decoded, opened_after)
    });
    let log = log?;
    let history = History::open(history_dir, &log, history_options)?;
    let store =
        PageStore::open(&tier.pages_dir, history_options.min_free_bytes).map_err(|source| {
            StoreError::Io {
                path: tier.pages_dir.clone(),
                source,
            }
        })?;
    let tier = Tier {
        store: Arc::new(store),
        budget: tier.budget,
        gives_way_to: Some(log.dedup_run_memory()),
    };
    let ready_after = started.elapsed();
    let mut models = ReadModels::restore_from(&log, loaded, history, Some(tier))?;
    models.restored.snapshot_load = loaded_after;
    models.restored.log_open = opened_after;
    models.restored.models = started.elapsed() - ready_after;
    tracing::info!(
        snapshot_load_ms = loaded_after.as_millis(),
        log_open_ms = models.restored.log_open.as_millis(),
        models_ms = models.restored.models.as_millis(),
        "started from the snapshot and the log"
    );
    Ok((log, models))
}

/// The aggregate read model, shared by request handlers and kept current by the writer.
pub struct AggregateView {
    aggregates: RwLock<Aggregates>,
    /// For retractions; does not keep the log open (the log holds this view).
    log: LogReader,
    /// For as-of questions and refolds.
    history: Arc<History>,
    /// The last seq the `kpi-checkpoints` thread has handled.
    checkpoints_done: Arc<std::sync::atomic::AtomicU64>,
}

impl AggregateView {
    /// A read guard on the current aggregates. Hold it only for synchronous work, never
    /// across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, Aggregates> {
        // `apply` leaves the state consistent between events, so a poisoned lock still
        // holds a usable projection.
        self.aggregates
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rebuilds from the history index the KPIs whose stored buckets a query found
    /// unreadable (a damaged page file); whether there were any. Runs after every commit,
    /// and from the query that found them so that its retry can be answered at once.
    pub fn heal(&self) -> bool {
        let kpi_ids = self.read().take_unreadable();
        if kpi_ids.is_empty() {
            return false;
        }
        let mut aggregates = self
            .aggregates
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        heal(&self.history, &mut aggregates, kpi_ids);
        true
    }

    /// The aggregates of the KPIs `kpi_ids` in `grains` as known at `seq`: a fold of their
    /// events up to it, read from the history index, from the KPIs' checkpoints when
    /// `grains` are all checkpointed ([`as_of`]). Questions about other grains are refused.
    pub fn as_of(
        &self,
        seq: u64,
        kpi_ids: &[&str],
        grains: Grains,
    ) -> Result<Aggregates, StoreError> {
        as_of::fold(&self.history, &self.log, seq, kpi_ids, grains)
    }

    /// Waits up to `patience` until the as-of checkpoints of every stored part of the
    /// history index are made; whether they are.
    pub fn wait_checkpoints(&self, patience: std::time::Duration) -> bool {
        as_of::wait_checkpoints(&self.history, &self.checkpoints_done, patience)
    }
}

/// Refolds `kpi_ids` up to the seq `aggregates` are at.
fn heal(history: &History, aggregates: &mut Aggregates, kpi_ids: BTreeSet<String>) {
    let to_seq = aggregates.seq();
    for kpi_id in kpi_ids {
        match rebuild_kpi(history, aggregates, &kpi_id, to_seq) {
            Ok(()) => tracing::info!(
                kpi_id,
                to_seq,
                "rebuilt the buckets of a kpi whose stored buckets could not be read"
            ),
            Err(error) => {
                tracing::error!(%error, kpi_id, "cannot rebuild the buckets of a kpi whose stored buckets could not be read")
            }
        }
    }
}

/// Refolds the measurements of one KPI up to `to_seq`, read from the history index.
fn rebuild_kpi(
    history: &History,
    aggregates: &mut Aggregates,
    kpi_id: &str,
    to_seq: u64,
) -> Result<(), StoreError> {
    let mut measurements = Vec::new();
    history.visit_measurements(kpi_id, to_seq, |seq, visited| {
        if let Some(m) = visited.to_measurement() {
            measurements.push((seq, m));
        }
    })?;
    aggregates.rebuild_kpi(kpi_id, measurements.iter().map(|(seq, m)| (*seq, m)));
    Ok(())
}

/// The measurement stored at `seq`, if the event there is one.
fn measurement_at(log: &LogReader, seq: u64) -> Option<Measurement> {
    match log.read(seq, seq).next() {
        Some(Ok(stored)) => match stored.event {
            Event::MeasurementRecorded(measurement) => Some(measurement),
            _ => None,
        },
        Some(Err(error)) => {
            tracing::error!(%error, seq, "cannot read a retracted measurement");
            None
        }
        None => None,
    }
}

/// The KPI an event is about, if any.
fn kpi_of(event: &Event) -> Option<&str> {
    match event {
        Event::KpiDefined { definition } | Event::KpiUpdated { definition, .. } => {
            Some(&definition.id)
        }
        Event::KpiRetired { kpi_id, .. } => Some(kpi_id),
        Event::MeasurementRecorded(m) => Some(&m.kpi_id),
        Event::TargetSet { target, .. } => Some(&target.kpi_id),
        Event::TargetRemoved { .. }
        | Event::MeasurementRetracted { .. }
        | Event::EventsLost { .. } => None,
    }
}

impl CommitListener for AggregateView {
    fn committed(&self, events: &[Committed<'_>]) {
        let mut aggregates = self
            .aggregates
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for committed in events {
            if let Some(kpi_id) = aggregates.apply(committed.seq, committed.event, |seq| {
                measurement_at(&self.log, seq)
            }) {
                // A KPI's kind or timezone changed: refold its measurements. Rare (an
                // operator's change), and it must finish before anyone reads the KPI.
                let to_seq = committed.seq;
                if let Err(error) = rebuild_kpi(&self.history, &mut aggregates, &kpi_id, to_seq) {
                    tracing::error!(%error, kpi_id, "cannot rebuild the buckets of a changed kpi");
                }
            }
        }
        let unreadable = aggregates.take_unreadable();
        if !unreadable.is_empty() {
            heal(&self.history, &mut aggregates, unreadable);
        }
    }
}
