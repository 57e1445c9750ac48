//! The aggregate read model: for every KPI, every series (one per combination of label
//! values) and every grain, the mergeable state of each calendar bucket, folded from the
//! measurements of the log.
//!
//! Queries merge the buckets of the series that match a label filter into one series per
//! group-by combination; a RATIO KPI is answered from its operands' series. Bucket keys are
//! bucket starts in the KPI's timezone, so a late measurement updates its own past bucket.
//!
//! This file holds the model and its fold; `answer.rs` its answers, `budget.rs` its memory
//! budget (eviction to the page files).
//!
//! Size: about 570 lines: the model's state, its fold of every event and its snapshot
//! encoding, which share the per-KPI state's invariants.

mod answer;
mod budget;

pub use budget::{Footprint, Tier};

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

// Series and KPIs are found by hash on every measurement: foldhash (randomly seeded) is several
// times faster than SipHash on label maps and ids.
use foldhash::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::aggregate::{BucketState, Observation, Retracted};
use crate::domain::calendar::Calendar;
use crate::domain::query::Labels;
use crate::domain::{Event, Grain, KpiDefinition, Measurement, Rejection};
use crate::projection::buckets::{BucketMap, PageIo};
use crate::projection::pages::PageStore;

/// Most series (label combinations) one KPI may have. Each series keeps buckets for six
/// grains, so an unbounded label (a user id as a label value) would grow memory without
/// limit; use `subject` and a DISTINCT KPI for such values.
pub const MAX_SERIES_PER_KPI: usize = 10_000;
/// Most buckets of one series a query may span: two years of hours is 17,520; this leaves
/// room for a decade of hours while bounding the work of one request.
pub const MAX_BUCKETS_PER_QUERY: u64 = 100_000;
// A target's status queries all its periods at once.
const _: () = assert!(crate::domain::target::MAX_TARGET_PERIODS <= MAX_BUCKETS_PER_QUERY);
/// Most buckets one answer may hold over all its groups.
pub const MAX_BUCKETS_PER_ANSWER: usize = 1_000_000;

/// The grains a model folds: every one for the live model; for an as-of fold, only those
/// its question reads (a fold into one grain costs a sixth of a fold into six).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grains([bool; 6]);

impl Default for Grains {
    fn default() -> Self {
        Self([true; 6])
    }
}

impl Grains {
    /// Only `grains`.
    pub fn only(grains: impl IntoIterator<Item = Grain>) -> Self {
        let mut folded = [false; 6];
        for grain in grains {
            folded[grain.slot()] = true;
        }
        Self(folded)
    }

    /// Whether `grain` is folded.
    pub fn contains(self, grain: Grain) -> bool {
        self.0[grain.slot()]
    }
}

/// The buckets of one series of a measured KPI, per grain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Series {
    grains: [BucketMap; 6],
}

/// What the projection keeps of one KPI.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KpiAggregates {
    definition: KpiDefinition,
    version: u64,
    /// A cache of bucket boundaries; not snapshotted, made again from the timezone.
    #[serde(skip, default = "utc_calendar")]
    calendar: Calendar,
    /// The state of a bucket without measurements, cloned for every new bucket.
    empty: BucketState,
    series: HashMap<Labels, Series>,
}

impl KpiAggregates {
    /// `None` for a RATIO KPI, which has no buckets of its own.
    fn new(definition: KpiDefinition, version: u64) -> Option<Self> {
        Some(Self {
            calendar: Calendar::new(definition.timezone),
            empty: BucketState::new(definition.kind)?,
            definition,
            version,
            series: HashMap::default(),
        })
    }

    /// Folds one measurement of the series `labels` into its buckets (the change of their
    /// bytes counted in `io`). Fails when a stored chunk cannot be read back: the KPI must
    /// then be refolded.
    fn observe(
        &mut self,
        labels: &Labels,
        observation: Observation<'_>,
        grains: Grains,
        io: &mut PageIo<'_>,
    ) -> std::io::Result<()> {
        let calendar = &mut self.calendar;
        let series = match self.series.get_mut(labels) {
            Some(series) => series,
            None => self.series.entry(labels.clone()).or_default(),
        };
        for (slot, grain) in Grain::ALL.into_iter().enumerate() {
            if !grains.contains(grain) {
                continue;
            }
            let key = calendar.bucket_of(grain, observation.occurred_at).key();
            series.grains[slot].record(key, observation, &self.empty, io)?;
        }
        Ok(())
    }

    /// Takes one recorded measurement back out of its buckets. Returns false when a bucket
    /// cannot subtract it exactly (sketches, extremes, LAST) or cannot be read back: the
    /// KPI must be refolded.
    fn retract(&mut self, measurement: &Measurement, seq: u64, io: &mut PageIo<'_>) -> bool {
        let calendar = &mut self.calendar;
        let Some(series) = self.series.get_mut(&measurement.labels) else {
            return true;
        };
        let observation = Observation::of(measurement, seq);
        let mut exact = true;
        for (slot, grain) in Grain::ALL.into_iter().enumerate() {
            let key = calendar.bucket_of(grain, measurement.occurred_at).key();
            match series.grains[slot].get_mut(&key, io) {
                Ok(Some(state)) => match io.counted(state, |state| state.retract(observation)) {
                    Ok(Retracted::Exact) => {
                        if state.count() == 0 && series.grains[slot].remove(&key, io).is_err() {
                            exact = false;
                        }
                    }
                    Ok(Retracted::MinMaxStale) | Err(_) => exact = false,
                },
                Ok(None) => {}
                Err(_) => exact = false,
            }
        }
        exact
    }

    /// Bytes its buckets hold on the heap.
    fn bytes(&self) -> usize {
        self.series
            .values()
            .flat_map(|series| &series.grains)
            .map(BucketMap::bytes)
            .sum()
    }
}

/// The calendar a deserialised KPI holds until [`Aggregates::restore_calendars`] runs.
fn utc_calendar() -> Calendar {
    Calendar::new(chrono_tz::Tz::UTC)
}

/// The aggregate state of every KPI.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Aggregates {
    /// Not in the derived encoding: a snapshot stores it in parts that decode in parallel
    /// ([`Aggregates::encode_measured`], [`Aggregates::decode_measured`]).
    #[serde(skip)]
    measured: HashMap<String, KpiAggregates>,
    /// RATIO KPIs: their definition and version.
    ratios: HashMap<String, (KpiDefinition, u64)>,
    /// Seqs of retracted measurements, with the seq of the retraction.
    retracted: HashMap<u64, u64>,
    /// Seq of the last event folded in.
    seq: u64,
    /// The grains folded (every one but in as-of folds).
    #[serde(skip)]
    grains: Grains,
    /// The latest occurred_at folded in (Unix seconds): how old a bucket is, for eviction.
    latest: i64,
    /// Where buckets beyond the memory budget go; `None`: every bucket stays in memory.
    #[serde(skip)]
    tier: Option<Tier>,
    /// Bytes the buckets hold in memory (counted exactly at each eviction, followed
    /// approximately between them).
    #[serde(skip)]
    bytes: usize,
    /// Bytes at which the next eviction runs: what the last one left plus a quarter of
    /// the budget, so that a model that cannot shrink to the eviction's target is not
    /// walked again after every few new buckets.
    #[serde(skip)]
    evict_above: usize,
    /// Evictions run since the model was made (see [`Aggregates::evictions`]).
    #[serde(skip)]
    evictions: u64,
    /// KPIs a query found stored buckets of unreadable, for
    /// [`AggregateView::heal`](super::AggregateView::heal) to rebuild (shared by clones).
    #[serde(skip)]
    unreadable: Arc<Mutex<BTreeSet<String>>>,
}

impl Aggregates {
    /// An empty model that folds only `grains` (for an as-of question).
    pub fn folding(grains: Grains) -> Self {
        Self {
            grains,
            ..Self::default()
        }
    }

    /// Seq of the last event folded in.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Gives every KPI the calendar of its timezone again, after deserialisation.
    pub fn restore_calendars(&mut self) {
        for kpi in self.measured.values_mut() {
            kpi.calendar = Calendar::new(kpi.definition.timezone);
        }
    }

    /// Part `part` of `parts` of the measured KPIs' buckets, an independently decodable
    /// byte string (`crate::encoding`), for a snapshot: most of a restart is decoding them, and parts
    /// decode on all cores. Encoded one at a time, so a snapshot holds one part's bytes.
    pub fn encode_measured(&self, part: usize, parts: usize) -> Result<Vec<u8>, String> {
        let parts = parts.max(1);
        let share: Vec<(&String, &KpiAggregates)> = self
            .measured
            .iter()
            .enumerate()
            .filter(|(i, _)| i % parts == part)
            .map(|(_, entry)| entry)
            .collect();
        crate::encoding::encode(&share)
    }

    /// Decodes parts written by [`Aggregates::encode_measured`] on up to `threads`
    /// threads into this (otherwise decoded) model, and makes the KPIs' calendars.
    pub fn decode_measured(&mut self, parts: &[&[u8]], threads: usize) -> Result<(), String> {
        type Part = Vec<(String, KpiAggregates)>;
        let decode = |bytes: &&[u8]| -> Result<Part, String> { crate::encoding::decode(bytes) };
        let threads = threads.clamp(1, parts.len().max(1));
        let chunk = parts.len().div_ceil(threads).max(1);
        let decoded: Vec<Result<Vec<Part>, String>> = std::thread::scope(|scope| {
            let workers: Vec<_> = parts
                .chunks(chunk)
                .map(|chunk| scope.spawn(move || chunk.iter().map(decode).collect()))
                .collect();
            workers
                .into_iter()
                .map(|worker| {
                    worker
                        .join()
                        .unwrap_or_else(|_| Err("a snapshot decoder panicked".to_owned()))
                })
                .collect()
        });
        for part in decoded {
            for entries in part? {
                self.measured.extend(entries);
            }
        }
        self.restore_calendars();
        Ok(())
    }

    /// The state of the measured KPI `kpi_id` (definition, version and the buckets of the
    /// grains this model folds), an independently decodable byte string (`crate::encoding`) for an
    /// as-of checkpoint, with the number of buckets in it; `None` when the model does not
    /// measure the KPI.
    pub fn encode_kpi(&self, kpi_id: &str) -> Option<Result<(Vec<u8>, usize), String>> {
        let kpi = self.measured.get(kpi_id)?;
        let buckets = kpi
            .series
            .values()
            .flat_map(|series| &series.grains)
            .map(BucketMap::len)
            .sum();
        Some(crate::encoding::encode(kpi).map(|bytes| (bytes, buckets)))
    }

    /// Puts a KPI state written by [`Aggregates::encode_kpi`] into this model as the state
    /// of `kpi_id`, keeping the buckets of the grains this model folds only. Refuses a
    /// state of another KPI or one that refers to stored pages (a fold has none).
    pub fn install_kpi(&mut self, kpi_id: &str, bytes: &[u8]) -> Result<(), String> {
        let mut kpi: KpiAggregates = crate::encoding::decode(bytes)?;
        if kpi.definition.id != kpi_id {
            return Err(format!("a state of kpi '{}'", kpi.definition.id));
        }
        for series in kpi.series.values_mut() {
            for (slot, grain) in Grain::ALL.into_iter().enumerate() {
                let map = &mut series.grains[slot];
                if map.pages().next().is_some() {
                    return Err("a state that refers to stored pages".to_owned());
                }
                if !self.grains.contains(grain) {
                    *map = BucketMap::default();
                }
            }
        }
        kpi.calendar = Calendar::new(kpi.definition.timezone);
        self.ratios.remove(kpi_id);
        self.bytes = self.bytes.saturating_add(kpi.bytes());
        if let Some(old) = self.measured.insert(kpi_id.to_owned(), kpi) {
            self.bytes = self.bytes.saturating_sub(old.bytes());
        }
        Ok(())
    }

    /// Folds one committed event. `measurement_at` finds a stored measurement by seq (a
    /// retraction names only the seq it withdraws). Returns the id of a KPI whose buckets
    /// are no longer valid (its kind or timezone changed, or a retraction cannot be
    /// subtracted): the caller must rebuild it with [`Aggregates::rebuild_kpi`] from the log.
    pub fn apply(
        &mut self,
        seq: u64,
        event: &Event,
        measurement_at: impl FnOnce(u64) -> Option<Measurement>,
    ) -> Option<String> {
        self.seq = seq;
        match event {
            Event::MeasurementRetracted { retracted_seq, .. } => {
                self.retracted.insert(*retracted_seq, seq);
                let measurement = measurement_at(*retracted_seq)?;
                let kpi = self.measured.get_mut(&measurement.kpi_id)?;
                let mut io = PageIo::new(self.tier.as_ref().map(|tier| &*tier.store));
                let exact = kpi.retract(&measurement, *retracted_seq, &mut io);
                self.bytes = self.bytes.saturating_add_signed(io.delta);
                (!exact).then(|| measurement.kpi_id.clone())
            }
            Event::MeasurementRecorded(measurement) => self.observe(
                &measurement.kpi_id,
                &measurement.labels,
                Observation::of(measurement, seq),
            ),
            Event::KpiDefined { definition } => {
                self.define(definition.clone(), 1);
                None
            }
            Event::KpiUpdated {
                definition,
                version,
            } => {
                let previous = self
                    .measured
                    .get(&definition.id)
                    .map(|kpi| (kpi.definition.kind, kpi.definition.timezone));
                match previous {
                    Some((kind, timezone))
                        if kind == definition.kind && timezone == definition.timezone =>
                    {
                        if let Some(kpi) = self.measured.get_mut(&definition.id) {
                            kpi.definition = definition.clone();
                            kpi.version = *version;
                        }
                        None
                    }
                    _ => {
                        // New kind or timezone: the old buckets mean nothing any more.
                        self.define(definition.clone(), *version);
                        self.measured
                            .contains_key(&definition.id)
                            .then(|| definition.id.clone())
                    }
                }
            }
            Event::KpiRetired {
                kpi_id, version, ..
            } => {
                if let Some(kpi) = self.measured.get_mut(kpi_id) {
                    kpi.version = *version;
                }
                if let Some((_, v)) = self.ratios.get_mut(kpi_id) {
                    *v = *version;
                }
                None
            }
            Event::TargetSet { .. } | Event::TargetRemoved { .. } | Event::EventsLost { .. } => {
                None
            }
        }
    }

    /// Folds one measurement of `kpi_id`'s series `labels`, as [`Aggregates::apply`] folds a
    /// `MeasurementRecorded` (for a fold that reads measurements without their events).
    pub fn record(&mut self, kpi_id: &str, labels: &Labels, observation: Observation<'_>) {
        self.seq = observation.seq;
        if let Some(kpi_id) = self.observe(kpi_id, labels, observation) {
            tracing::error!(
                kpi_id,
                "stored buckets cannot be read back in an as-of fold"
            );
        }
    }

    /// Folds one measurement into its buckets, then moves the oldest buckets out of memory
    /// when they pass the budget. Returns the KPI to refold when one of its stored chunks
    /// cannot be read back.
    fn observe(
        &mut self,
        kpi_id: &str,
        labels: &Labels,
        observation: Observation<'_>,
    ) -> Option<String> {
        let kpi = self.measured.get_mut(kpi_id)?;
        self.latest = self.latest.max(observation.occurred_at.timestamp());
        let mut io = PageIo::new(self.tier.as_ref().map(|tier| &*tier.store));
        let folded = kpi.observe(labels, observation, self.grains, &mut io);
        self.bytes = self.bytes.saturating_add_signed(io.delta);
        if let Err(error) = folded {
            tracing::error!(%error, kpi_id, "stored buckets cannot be read back; refolding the kpi");
            return Some(kpi_id.to_owned());
        }
        self.keep_to_budget();
        None
    }

    /// Replaces the buckets of `kpi_id` by a fold of `measurements` (its stored
    /// measurements in seq order, up to the current seq); retracted ones are skipped.
    pub fn rebuild_kpi<'a>(
        &mut self,
        kpi_id: &str,
        measurements: impl IntoIterator<Item = (u64, &'a Measurement)>,
    ) {
        let Some(kpi) = self.measured.get_mut(kpi_id) else {
            return;
        };
        self.bytes = self.bytes.saturating_sub(kpi.bytes());
        kpi.series.clear();
        for (seq, measurement) in measurements {
            if !self.retracted.contains_key(&seq) {
                let observation = Observation::of(measurement, seq);
                if self
                    .observe(kpi_id, &measurement.labels, observation)
                    .is_some()
                {
                    // A chunk written during this refold cannot be read back: the page
                    // store fails; what was folded so far stays.
                    return;
                }
            }
        }
    }

    /// The seq of the retraction that withdrew the measurement at `seq`, if one did.
    pub fn retracted_by(&self, seq: u64) -> Option<u64> {
        self.retracted.get(&seq).copied()
    }

    fn define(&mut self, definition: KpiDefinition, version: u64) {
        let id = definition.id.clone();
        if let Some(kpi) = self.measured.remove(&id) {
            self.bytes = self.bytes.saturating_sub(kpi.bytes());
        }
        self.ratios.remove(&id);
        match KpiAggregates::new(definition.clone(), version) {
            Some(kpi) => {
                self.measured.insert(id, kpi);
            }
            None => {
                self.ratios.insert(id, (definition, version));
            }
        }
    }

    /// How many series (label combinations) the measured KPI `kpi_id` has; `None` for a
    /// KPI this model does not measure (unknown, or RATIO).
    pub fn series_count(&self, kpi_id: &str) -> Option<usize> {
        self.measured.get(kpi_id).map(|kpi| kpi.series.len())
    }

    /// Whether the measured KPI `kpi_id` has the series `labels`.
    pub fn has_series(&self, kpi_id: &str, labels: &Labels) -> bool {
        self.measured
            .get(kpi_id)
            .is_some_and(|kpi| kpi.series.contains_key(labels))
    }

    /// What the log holds of a KPI: whether it (or, for a RATIO, an operand) has
    /// measurements, and the label keys its series use.
    pub fn stored_use(&self, kpi_id: &str) -> crate::domain::StoredUse {
        let has_series = |id: &str| {
            self.measured
                .get(id)
                .is_some_and(|kpi| !kpi.series.is_empty())
        };
        let mut dimensions: Vec<String> = self
            .series_of(kpi_id)
            .flat_map(|labels| labels.keys().cloned())
            .collect();
        dimensions.sort_unstable();
        dimensions.dedup();
        let measured = match self.ratios.get(kpi_id).and_then(|(d, _)| d.ratio.as_ref()) {
            Some(ratio) => {
                has_series(&ratio.numerator_kpi_id) || has_series(&ratio.denominator_kpi_id)
            }
            None => has_series(kpi_id),
        };
        crate::domain::StoredUse {
            measured,
            dimensions,
        }
    }

    /// Ids of the measured KPIs.
    pub fn measured_kpis(&self) -> impl Iterator<Item = &str> {
        self.measured.keys().map(String::as_str)
    }

    /// The RATIO KPIs: id and definition.
    pub fn ratio_kpis(&self) -> impl Iterator<Item = (&str, &KpiDefinition)> {
        self.ratios
            .iter()
            .map(|(id, (definition, _))| (id.as_str(), definition))
    }

    /// The page store stored chunks are read from.
    /// Notes that stored buckets of `kpi_id` cannot be read, for
    /// [`AggregateView::heal`](super::AggregateView::heal); the rejection to answer with.
    fn unreadable(&self, kpi_id: &str, error: &std::io::Error) -> Rejection {
        tracing::error!(%error, kpi_id, "stored buckets cannot be read back; the kpi is rebuilt from the log");
        self.unreadable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(kpi_id.to_owned());
        Rejection::Unavailable {
            field: "kpi_id".to_owned(),
            reason: format!(
                "stored buckets of kpi '{kpi_id}' cannot be read ({error}); they are being rebuilt from the log, retry"
            ),
        }
    }

    /// The KPIs whose stored buckets a query found unreadable since the last call.
    pub fn take_unreadable(&self) -> BTreeSet<String> {
        std::mem::take(
            &mut *self
                .unreadable
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn store(&self) -> Option<&PageStore> {
        self.tier.as_ref().map(|tier| &*tier.store)
    }
}

/// Index of a grain in `Series::grains`.
fn slot(grain: Grain) -> usize {
    Grain::ALL
        .iter()
        .position(|g| *g == grain)
        .unwrap_or_default()
}
