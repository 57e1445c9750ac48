//! The aggregate read model: for every KPI, every series (one per combination of label
//! values) and every grain, the mergeable state of each calendar bucket, folded from the
//! measurements of the log.
//!
//! Queries merge the buckets of the series that match a label filter into one series per
//! group-by combination; a RATIO KPI is answered from its operands' series. Bucket keys are
//! bucket starts in the KPI's timezone, so a late measurement updates its own past bucket.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

// Series and KPIs are found by hash on every measurement: foldhash (randomly seeded) is several
// times faster than SipHash on label maps and ids.
use foldhash::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::aggregate::{
    BucketState, Observation, RatioOperand, Retracted, Summary, ratio_summary,
};
use crate::domain::calendar::{self, Bucket, BucketKey, Calendar};
use crate::domain::query::{AggregateQuery, AnsweredBucket, Fill, Labels};
use crate::domain::{Event, Grain, KpiDefinition, KpiKind, Measurement, Rejection};
use crate::projection::buckets::{BucketMap, PageIo};
use crate::projection::pages::PageStore;
use crate::store::RunMemory;

/// Most series (label combinations) one KPI may have. Each series keeps buckets for six
/// grains, so an unbounded label (a user id as a label value) would grow memory without
/// limit; use `subject` and a DISTINCT KPI for such values.
pub const MAX_SERIES_PER_KPI: usize = 10_000;
/// Most bytes of live pages one compaction step copies (about 0.1 s of disk I/O, under
/// the read model's lock).
const COMPACT_BYTES: u64 = 16 * 1024 * 1024;
/// Most buckets of one series a query may span: two years of hours is 17,520; this leaves
/// room for a decade of hours while bounding the work of one request.
pub const MAX_BUCKETS_PER_QUERY: u64 = 100_000;
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

/// Where buckets beyond the memory budget go.
#[derive(Debug, Clone)]
pub struct Tier {
    /// The page files.
    pub store: std::sync::Arc<PageStore>,
    /// Bytes the buckets may hold in memory; beyond it the oldest leave.
    pub budget: usize,
    /// Memory outside the buckets that their budget also pays for, as it grows and
    /// shrinks: the dedup index's run filters (about a byte per id in the window). The
    /// buckets keep to the budget less it, but to no less than a quarter of the budget:
    /// below that every measurement would wait for buckets read back from their pages.
    pub gives_way_to: Option<RunMemory>,
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
    /// Bytes at which the next eviction runs when the last one could not get below the
    /// budget (so a model that cannot shrink is not walked on every event); 0 otherwise.
    #[serde(skip)]
    evict_above: usize,
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

    /// Gives the model a memory budget for its buckets and the page store the buckets
    /// beyond it go to, and moves buckets out at once if they pass it.
    pub fn set_tier(&mut self, tier: Tier) {
        self.tier = Some(tier);
        self.bytes = self.measured.values().map(KpiAggregates::bytes).sum();
        self.keep_to_budget();
    }

    /// Bytes the buckets hold in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The page files the buckets refer to.
    pub fn page_files(&self) -> std::collections::HashSet<u32> {
        self.page_refs().map(|page| page.file()).collect()
    }

    /// When the buckets pass the budget, moves the oldest (by the end of their bucket,
    /// against the latest occurred_at) out of memory until they hold three quarters of it.
    /// Late measurements kept beside stored chunks are written into new pages once they
    /// pass an eighth of the budget, the longest lists first, until half of them are.
    fn keep_to_budget(&mut self) {
        let Some(Tier {
            store,
            budget,
            gives_way_to,
        }) = self.tier.clone()
        else {
            return;
        };
        let budget = match gives_way_to {
            Some(others) => budget.saturating_sub(others.bytes()).max(budget / 4),
            None => budget,
        };
        if self.bytes <= budget.max(self.evict_above) {
            return;
        }
        // Bytes by age class: class 0 has ended at most an hour before the latest, class
        // c between 2^(c-1) and 2^c hours before it.
        const CLASSES: usize = 48;
        let class_of = |age_seconds: i64| -> usize {
            let hours = u64::try_from(age_seconds / 3600).unwrap_or(0);
            usize::try_from(u64::BITS - hours.leading_zeros())
                .unwrap_or(CLASSES - 1)
                .min(CLASSES - 1)
        };
        // Late measurements by the size of their list: class c holds lists of 2^c to
        // 2^(c+1) - 1 bytes.
        let size_class = |bytes: usize| usize::try_from(usize::BITS - 1 - bytes.leading_zeros());
        let latest = self.latest;
        let mut by_class = [0usize; CLASSES];
        let mut late_by_size = [0usize; usize::BITS as usize];
        let mut total = 0;
        for kpi in self.measured.values() {
            for series in kpi.series.values() {
                for (slot, buckets) in series.grains.iter().enumerate() {
                    let length = NOMINAL_SECONDS[slot];
                    total += buckets.bytes();
                    buckets.visit_resident(|key, bytes| {
                        let ended = key.unix_seconds().saturating_add(length);
                        by_class[class_of(latest.saturating_sub(ended))] += bytes;
                    });
                    buckets.visit_late(|bytes| {
                        if let Ok(class) = size_class(bytes) {
                            late_by_size[class] += bytes;
                        }
                    });
                }
            }
        }
        let late: usize = late_by_size.iter().sum();
        // Lists of at least this many bytes are written out (none: usize::MAX).
        let mut late_least = usize::MAX;
        let mut late_freeing = 0;
        if late > budget / 8 {
            let mut class = late_by_size.len();
            while class > 0 && late_freeing < late / 2 {
                class -= 1;
                late_freeing += late_by_size[class];
            }
            late_least = 1 << class;
        }
        let target = budget / 4 * 3;
        let mut freeing = late_freeing;
        let mut class = CLASSES;
        // Class 0 (buckets still open, or ended within the hour) stays: the next
        // measurements go there, and storing them would only have them read back.
        while class > 1 && total.saturating_sub(freeing) > target {
            class -= 1;
            freeing += by_class[class];
        }
        // Buckets that ended more than this before the latest leave memory.
        let age = 3600i64 << (class - 1);
        let (mut freed, mut late_freed, mut held) = (0, 0, 0);
        let mut failed = None;
        for kpi in self.measured.values_mut() {
            for series in kpi.series.values_mut() {
                for (slot, buckets) in series.grains.iter_mut().enumerate() {
                    let cutoff = latest
                        .saturating_sub(age)
                        .saturating_sub(NOMINAL_SECONDS[slot]);
                    match buckets.evict_below(BucketKey::from_unix_seconds(cutoff), &store) {
                        Ok(bytes) => freed += bytes,
                        Err(error) => failed = Some(error),
                    }
                    if late_least < usize::MAX {
                        match buckets.flush_late(late_least, &store) {
                            Ok(bytes) => late_freed += bytes,
                            Err(error) => failed = Some(error),
                        }
                    }
                    held += buckets.bytes();
                }
            }
        }
        if let Some(error) = failed {
            tracing::error!(%error, "buckets cannot be stored; they stay in memory");
        }
        if let Err(error) = self.compact_pages(&store) {
            tracing::error!(%error, "page files cannot be compacted");
        }
        self.bytes = held;
        self.evict_above = if self.bytes > budget {
            tracing::warn!(
                held = self.bytes,
                budget = budget,
                "the newest buckets alone pass the memory budget"
            );
            self.bytes + budget / 4
        } else {
            0
        };
        tracing::debug!(
            before = total,
            freed,
            late,
            late_freed,
            held = self.bytes,
            budget = budget,
            "buckets moved out of memory"
        );
    }

    /// Once the page files hold more than twice the pages the model refers to, moves the
    /// live pages out of the files that are most garbage (at most [`COMPACT_BYTES`] per
    /// call), so that the next snapshot lets those files be deleted: the page files stay
    /// within about twice what the model refers to, however long it runs, and no more is
    /// copied than that takes.
    fn compact_pages(&mut self, store: &PageStore) -> std::io::Result<()> {
        let mut live: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for page in self.page_refs() {
            *live.entry(page.file()).or_default() += u64::from(page.stored_bytes());
        }
        let sizes = store.file_sizes()?;
        if sizes.values().sum::<u64>() <= 2 * live.values().sum::<u64>() {
            return Ok(());
        }
        let appended = store.next_file();
        // Files still referred to, sparsest first; files with nothing live are deleted by
        // the next snapshot as they are.
        let mut sparse: Vec<(u32, u64, u64)> = sizes
            .into_iter()
            .filter(|(file, _)| *file < appended)
            .filter_map(|(file, size)| {
                let live = live.get(&file).copied().filter(|live| *live > 0)?;
                (live * 2 < size).then_some((file, live, size))
            })
            .collect();
        sparse.sort_unstable_by_key(|(file, live, size)| (*live * 1000 / *size, *file));
        let mut moving = std::collections::HashSet::new();
        let mut bytes = 0;
        for (file, live, _) in sparse {
            if bytes + live > COMPACT_BYTES && !moving.is_empty() {
                break;
            }
            bytes += live;
            moving.insert(file);
        }
        if moving.is_empty() {
            return Ok(());
        }
        for kpi in self.measured.values_mut() {
            for series in kpi.series.values_mut() {
                for buckets in &mut series.grains {
                    buckets.move_pages(&moving, store)?;
                }
            }
        }
        tracing::debug!(
            files = moving.len(),
            bytes,
            "live pages moved out of sparse page files"
        );
        Ok(())
    }

    /// Every page the buckets refer to.
    fn page_refs(&self) -> impl Iterator<Item = crate::projection::pages::PageRef> + '_ {
        self.measured
            .values()
            .flat_map(|kpi| kpi.series.values())
            .flat_map(|series| &series.grains)
            .flat_map(BucketMap::pages)
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

    /// Whether a measurement may be stored without passing the KPI's series limit: its
    /// series exists already, or there is room for a new one.
    pub fn check_series(&self, measurement: &Measurement) -> Result<(), Rejection> {
        match self.measured.get(&measurement.kpi_id) {
            Some(kpi)
                if kpi.series.len() >= MAX_SERIES_PER_KPI
                    && !kpi.series.contains_key(&measurement.labels) =>
            {
                Err(Rejection::ResourceExhausted {
                    field: "labels".into(),
                    reason: format!(
                        "kpi '{}' has reached its limit of {MAX_SERIES_PER_KPI} label combinations",
                        measurement.kpi_id
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// Answers a GetAggregates question.
    pub fn query(&self, query: &AggregateQuery) -> Result<Vec<AnsweredBucket>, Rejection> {
        if !self.grains.contains(query.grain) {
            debug_assert!(false, "a question about a grain this fold left out");
            return Err(Rejection::precondition(
                "grain",
                "not folded in this as-of answer",
            ));
        }
        let (definition, version) = self.definition(&query.kpi_id)?;
        check_labels(definition, query)?;
        let tz = definition.timezone;
        if query.end <= query.start {
            return Err(Rejection::invalid("end", "must be after start"));
        }
        let buckets = calendar::count_buckets(query.grain, tz, query.start, query.end);
        if buckets > MAX_BUCKETS_PER_QUERY {
            return Err(Rejection::invalid(
                "grain",
                format!(
                    "the range spans {buckets} {:?} buckets, at most {MAX_BUCKETS_PER_QUERY} per request: use a coarser grain or a shorter range",
                    query.grain
                ),
            ));
        }
        let groups = match &definition.ratio {
            None => self
                .merged(&query.kpi_id, query)?
                .into_iter()
                .map(|(labels, buckets)| {
                    let summaries = buckets
                        .into_iter()
                        .map(|(key, bucket)| (key, bucket.summary))
                        .collect::<BTreeMap<_, _>>();
                    (labels, summaries)
                })
                .collect(),
            Some(ratio) => {
                let numerator = self.merged(&ratio.numerator_kpi_id, query)?;
                let denominator = self.merged(&ratio.denominator_kpi_id, query)?;
                ratio_groups(numerator, denominator, ratio.scale)
            }
        };
        let mut groups = groups;
        if query.group_by.is_empty() && query.fill != Fill::None {
            // Without group-by the answer is one series: filled even when nothing (or
            // nothing matching the filter) was ever measured, so a dashboard still gets a
            // continuous series.
            groups.entry(Labels::new()).or_default();
        }
        let kind = definition.kind;
        let mut answer = Vec::new();
        for (labels, by_start) in groups {
            for bucket in calendar::buckets_in(query.grain, tz, query.start, query.end) {
                let summary = match by_start.get(&bucket.key()) {
                    Some(summary) => summary.clone(),
                    None => match empty_summary(kind, query.fill) {
                        Some(summary) => summary,
                        None => continue,
                    },
                };
                if answer.len() >= MAX_BUCKETS_PER_ANSWER {
                    return Err(Rejection::ResourceExhausted {
                        field: "group_by".into(),
                        reason: format!(
                            "the answer would hold more than {MAX_BUCKETS_PER_ANSWER} buckets: group by fewer dimensions, filter, or shorten the range"
                        ),
                    });
                }
                answer.push(AnsweredBucket {
                    labels: labels.clone(),
                    bucket,
                    summary,
                    definition_version: version,
                });
            }
        }
        Ok(answer)
    }

    /// The label combinations of a measured KPI (none for RATIO or unknown KPIs).
    pub fn series_of<'a>(&'a self, kpi_id: &str) -> impl Iterator<Item = &'a Labels> + 'a {
        self.measured
            .get(kpi_id)
            .into_iter()
            .flat_map(|kpi| kpi.series.keys())
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

    /// The buckets of every series of a RATIO KPI in `bucket` (empty ones too): one per
    /// combination of the ratio's dimensions among its operands' series (the groups of
    /// GetAggregates grouped by all of the ratio's dimensions).
    pub fn ratio_series_buckets(
        &self,
        kpi_id: &str,
        grain: Grain,
        bucket: Bucket,
    ) -> Vec<AnsweredBucket> {
        let Some((definition, _)) = self.ratios.get(kpi_id) else {
            return Vec::new();
        };
        // Like a measured KPI, a ratio has no series before its operands have one.
        if !self.stored_use(kpi_id).measured {
            return Vec::new();
        }
        self.query(&AggregateQuery {
            kpi_id: kpi_id.to_owned(),
            grain,
            start: bucket.start,
            end: bucket.end,
            filter: Labels::new(),
            group_by: definition.dimensions.clone(),
            fill: Fill::Absent,
        })
        .unwrap_or_default()
    }

    /// One bucket of one series of a KPI, as it is now; an empty bucket when nothing is in
    /// it. A series of a RATIO KPI is a combination of values of the ratio's dimensions
    /// (see [`Aggregates::ratio_series_buckets`]).
    pub fn series_bucket(
        &self,
        kpi_id: &str,
        labels: &Labels,
        grain: Grain,
        bucket: Bucket,
    ) -> Option<AnsweredBucket> {
        if let Some((definition, version)) = self.ratios.get(kpi_id) {
            let answer = self
                .query(&AggregateQuery {
                    kpi_id: kpi_id.to_owned(),
                    grain,
                    start: bucket.start,
                    end: bucket.end,
                    filter: labels.clone(),
                    group_by: definition.dimensions.clone(),
                    fill: Fill::None,
                })
                .ok()?;
            let summary = answer
                .into_iter()
                .find(|answered| answered.labels == *labels && answered.bucket == bucket)
                .map_or_else(
                    || empty_summary(definition.kind, Fill::Absent),
                    |answered| Some(answered.summary),
                )?;
            return Some(AnsweredBucket {
                labels: labels.clone(),
                bucket,
                summary,
                definition_version: *version,
            });
        }
        let kpi = self.measured.get(kpi_id)?;
        let summary = kpi
            .series
            .get(labels)
            .map(|series| {
                series.grains[slot(grain)]
                    .get(&bucket.key(), self.store())
                    .map_err(|error| self.unreadable(kpi_id, &error))
            })
            .transpose()
            .ok()?
            .flatten()
            .map_or_else(
                || empty_summary(kpi.definition.kind, Fill::Absent),
                |state| Some(state.summary()),
            )?;
        Some(AnsweredBucket {
            labels: labels.clone(),
            bucket,
            summary,
            definition_version: kpi.version,
        })
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

    /// What the aggregates hold, for memory accounting (restart benchmark, logs).
    pub fn footprint(&self) -> Footprint {
        let mut footprint = Footprint {
            kpis: self.measured.len() + self.ratios.len(),
            ..Footprint::default()
        };
        for kpi in self.measured.values() {
            footprint.series += kpi.series.len();
            for series in kpi.series.values() {
                for (slot, buckets) in series.grains.iter().enumerate() {
                    footprint.buckets[slot] += buckets.len();
                    footprint.bytes[slot] += buckets.bytes();
                }
            }
        }
        footprint
    }

    /// The definition and version of a KPI, measured or RATIO.
    pub fn definition(&self, kpi_id: &str) -> Result<(&KpiDefinition, u64), Rejection> {
        if let Some(kpi) = self.measured.get(kpi_id) {
            return Ok((&kpi.definition, kpi.version));
        }
        self.ratios
            .get(kpi_id)
            .map(|(definition, version)| (definition, *version))
            .ok_or_else(|| Rejection::not_found("kpi_id", format!("kpi '{kpi_id}'")))
    }

    /// The buckets of a measured KPI in the query's range, merged per group, as summaries
    /// (and, for ratio operands, their sums).
    fn merged(
        &self,
        kpi_id: &str,
        query: &AggregateQuery,
    ) -> Result<BTreeMap<Labels, BTreeMap<BucketKey, MergedBucket>>, Rejection> {
        let Some(kpi) = self.measured.get(kpi_id) else {
            return Ok(BTreeMap::new());
        };
        let slot = slot(query.grain);
        let first = calendar::bucket_of(query.grain, kpi.definition.timezone, query.start).key();
        let mut groups: BTreeMap<Labels, BTreeMap<BucketKey, BucketState>> = BTreeMap::new();
        for (labels, series) in &kpi.series {
            if !query
                .filter
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
            {
                continue;
            }
            let group_labels: Labels = query
                .group_by
                .iter()
                .filter_map(|key| labels.get(key).map(|value| (key.clone(), value.clone())))
                .collect();
            let group = groups.entry(group_labels).or_default();
            let mut merge_error = None;
            series.grains[slot]
                .visit_from(first, self.store(), |key, state| {
                    if key.start() >= query.end {
                        return ControlFlow::Break(());
                    }
                    match group.get_mut(key) {
                        Some(merged) => {
                            if let Err(error) = merged.merge(state) {
                                merge_error = Some(error);
                                return ControlFlow::Break(());
                            }
                        }
                        None => {
                            group.insert(*key, state.clone());
                        }
                    }
                    ControlFlow::Continue(())
                })
                .map_err(|error| self.unreadable(kpi_id, &error))?;
            if let Some(error) = merge_error {
                return Err(Rejection::precondition(
                    "kpi_id",
                    format!("buckets do not merge: {error}"),
                ));
            }
        }
        Ok(groups
            .into_iter()
            .map(|(labels, buckets)| {
                let buckets = buckets
                    .into_iter()
                    .map(|(key, state)| {
                        (
                            key,
                            MergedBucket {
                                summary: state.summary(),
                                operand: state.ratio_operand(),
                            },
                        )
                    })
                    .collect();
                (labels, buckets)
            })
            .collect())
    }
}

/// Counts of what [`Aggregates`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// KPIs, measured and RATIO.
    pub kpis: usize,
    /// Series (label combinations) over all KPIs.
    pub series: usize,
    /// Bucket states per grain, in the order of [`Grain::ALL`].
    pub buckets: [usize; 6],
    /// Bytes the buckets of each grain hold (entries and their states' heap).
    pub bytes: [usize; 6],
}

/// A merged bucket: its summary, and its sum when it can be a ratio operand.
#[derive(Debug, Clone)]
struct MergedBucket {
    summary: Summary,
    operand: Option<RatioOperand>,
}

/// Groups of a ratio: for every group and bucket of either operand,
/// scale x sum(numerator) / sum(denominator).
fn ratio_groups(
    numerator: BTreeMap<Labels, BTreeMap<BucketKey, MergedBucket>>,
    denominator: BTreeMap<Labels, BTreeMap<BucketKey, MergedBucket>>,
    scale: f64,
) -> BTreeMap<Labels, BTreeMap<BucketKey, Summary>> {
    let mut groups: BTreeMap<Labels, BTreeMap<BucketKey, (RatioOperand, RatioOperand)>> =
        BTreeMap::new();
    for (labels, buckets) in numerator {
        let group = groups.entry(labels).or_default();
        for (key, bucket) in buckets {
            group.entry(key).or_default().0 = bucket.operand.unwrap_or_default();
        }
    }
    for (labels, buckets) in denominator {
        let group = groups.entry(labels).or_default();
        for (key, bucket) in buckets {
            group.entry(key).or_default().1 = bucket.operand.unwrap_or_default();
        }
    }
    groups
        .into_iter()
        .map(|(labels, buckets)| {
            let buckets = buckets
                .into_iter()
                .map(|(key, (num, den))| (key, ratio_summary(num, den, scale)))
                .collect();
            (labels, buckets)
        })
        .collect()
}

/// Checks that filter keys and group-by dimensions are declared dimensions.
fn check_labels(definition: &KpiDefinition, query: &AggregateQuery) -> Result<(), Rejection> {
    let declared = |key: &str| definition.dimensions.iter().any(|d| d == key);
    for key in query.filter.keys() {
        if !declared(key) {
            return Err(Rejection::invalid(
                format!("filter[{key:?}]"),
                format!(
                    "'{key}' is not a declared dimension of kpi '{}' (declared: [{}])",
                    definition.id,
                    definition.dimensions.join(", ")
                ),
            ));
        }
    }
    for (i, key) in query.group_by.iter().enumerate() {
        if !declared(key) {
            return Err(Rejection::invalid(
                format!("group_by[{i}]"),
                format!(
                    "'{key}' is not a declared dimension of kpi '{}' (declared: [{}])",
                    definition.id,
                    definition.dimensions.join(", ")
                ),
            ));
        }
        if query.group_by[..i].contains(key) {
            return Err(Rejection::invalid(
                format!("group_by[{i}]"),
                format!("'{key}' is listed twice"),
            ));
        }
    }
    Ok(())
}

/// What an empty bucket answers under `fill`, or `None` to leave it out.
fn empty_summary(kind: KpiKind, fill: Fill) -> Option<Summary> {
    let absent = Summary {
        value: None,
        count: 0,
        sum: None,
        min: None,
        max: None,
        detail: None,
    };
    match fill {
        Fill::None => None,
        Fill::Absent => Some(absent),
        Fill::Zero => Some(Summary {
            value: Some(0.0),
            sum: matches!(kind, KpiKind::Sum | KpiKind::Count | KpiKind::Average).then_some(0.0),
            ..absent
        }),
    }
}

/// The nominal length of a bucket of each grain, in the order of [`Grain::ALL`] (the
/// longest month, quarter and year): a bucket with key k has ended by k plus this.
const NOMINAL_SECONDS: [i64; 6] = [
    3600,
    86_400,
    7 * 86_400,
    31 * 86_400,
    92 * 86_400,
    366 * 86_400,
];

/// Index of a grain in `Series::grains`.
fn slot(grain: Grain) -> usize {
    Grain::ALL
        .iter()
        .position(|g| *g == grain)
        .unwrap_or_default()
}
