//! The aggregate model's memory budget: the bytes its buckets hold, the eviction of the
//! chunks that ended longest ago to the page files when a measurement takes them past the
//! budget, the compaction of page files that are mostly garbage, and the footprint a
//! benchmark reads.

use super::{Aggregates, KpiAggregates};
use crate::domain::calendar::BucketKey;
use crate::projection::buckets::BucketMap;
use crate::projection::pages::PageStore;
use crate::store::RunMemory;

impl Aggregates {
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

    /// Evictions run so far: walks of every map that [`Aggregates::keep_to_budget`] makes.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// When the buckets pass the budget, and have grown by a quarter of it since the
    /// last eviction, moves the oldest (by the end of their bucket, against the latest
    /// occurred_at) out of memory until they hold three quarters of it.
    /// Late measurements kept beside stored chunks are written into new pages once they
    /// pass an eighth of the budget, the longest lists first, until half of them are.
    pub(super) fn keep_to_budget(&mut self) {
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
        self.evictions += 1;
        // The parts of the pass are timed only for the debug line (a clock read per map
        // and step: a few milliseconds per pass).
        let timed = tracing::enabled!(tracing::Level::DEBUG);
        let now = || timed.then(std::time::Instant::now);
        let since =
            |from: Option<std::time::Instant>| from.map(|from| from.elapsed()).unwrap_or_default();
        let started = now();
        let cpu_started = if timed { thread_cpu_nanos() } else { 0 };
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
        let (mut maps, mut stored_chunks, mut resident_chunks, mut directory) = (0, 0, 0, 0);
        // Stored chunks per grain, in the order of `Grain::ALL`.
        let mut stored_by_grain = [0usize; 6];
        let mut failed = None;
        // Where the pass's time goes: the walk that picked the age, storing chunks
        // (`evict_below`, merges included), writing late measurements (`flush_late`).
        let walked = since(started);
        let (mut storing, mut flushing) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for kpi in self.measured.values_mut() {
            for series in kpi.series.values_mut() {
                for (slot, buckets) in series.grains.iter_mut().enumerate() {
                    let cutoff = latest
                        .saturating_sub(age)
                        .saturating_sub(NOMINAL_SECONDS[slot]);
                    let before = now();
                    match buckets.evict_below(BucketKey::from_unix_seconds(cutoff), &store) {
                        Ok(bytes) => freed += bytes,
                        Err(error) => failed = Some(error),
                    }
                    storing += since(before);
                    if late_least < usize::MAX {
                        let before = now();
                        match buckets.flush_late(late_least, &store) {
                            Ok(bytes) => late_freed += bytes,
                            Err(error) => failed = Some(error),
                        }
                        flushing += since(before);
                    }
                    held += buckets.bytes();
                    let (stored, resident, bytes) = buckets.census();
                    maps += 1;
                    stored_chunks += stored;
                    stored_by_grain[slot] += stored;
                    resident_chunks += resident;
                    directory += bytes;
                }
            }
        }
        if let Some(error) = failed {
            tracing::error!(%error, "buckets cannot be stored; they stay in memory");
        }
        let compacting = now();
        if let Err(error) = self.compact_pages(&store) {
            tracing::error!(%error, "page files cannot be compacted");
        }
        self.bytes = held;
        if self.bytes > budget {
            tracing::warn!(
                held = self.bytes,
                budget = budget,
                "the newest buckets alone pass the memory budget"
            );
        }
        // Buckets that could not leave (still open, or their maps' directories) would
        // otherwise be walked again after every few new buckets: 385 walks that freed
        // nothing in 5 M measurements once the dedup runs' filters had taken most of the
        // budget.
        self.evict_above = self.bytes + budget / 4;
        if !timed {
            return;
        }
        tracing::debug!(
            before = total,
            freed,
            late,
            late_freed,
            held = self.bytes,
            budget = budget,
            maps,
            stored_chunks,
            ?stored_by_grain,
            resident_chunks,
            directory,
            micros = since(started).as_micros(),
            walk_micros = walked.as_micros(),
            store_micros = storing.as_micros(),
            flush_late_micros = flushing.as_micros(),
            compact_micros = since(compacting).as_micros(),
            cpu_micros = thread_cpu_nanos().saturating_sub(cpu_started) / 1000,
            "buckets moved out of memory"
        );
    }

    /// Once the page files hold more than [`GARBAGE_RATIO`] times the pages the model
    /// refers to, moves the live pages out of the files that are most garbage (at most
    /// [`COMPACT_BYTES`] per call), so that the next snapshot lets those files be deleted:
    /// the page files stay within about that many times what the model refers to, however
    /// long it runs, and no more is copied than that takes.
    fn compact_pages(&mut self, store: &PageStore) -> std::io::Result<()> {
        let mut live: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for page in self.page_refs() {
            *live.entry(page.file()).or_default() += u64::from(page.stored_bytes());
        }
        let sizes = store.file_sizes()?;
        if sizes.values().sum::<u64>() <= GARBAGE_RATIO * live.values().sum::<u64>() {
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
                (live * GARBAGE_RATIO < size).then_some((file, live, size))
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
}

/// Page files are compacted once they hold more than this many times the bytes of the
/// pages the model refers to, and a file is moved when less than this share of it is
/// live. (Three times was tried on the 50 M history run: compactions fell from one per
/// eviction to one in five, but an eviction took as long, 333 ms against 340 ms on
/// average, and the page files grew by 0.5 GB; BENCHMARKS.md.)
const GARBAGE_RATIO: u64 = 2;

/// Most bytes of live pages one compaction step copies (about 0.1 s of disk I/O, under
/// the read model's lock).
const COMPACT_BYTES: u64 = 16 * 1024 * 1024;

/// Counts of what [`Aggregates`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// KPIs, measured and RATIO.
    pub kpis: usize,
    /// Series (label combinations) over all KPIs.
    pub series: usize,
    /// Bucket states per grain, in the order of [`Grain::ALL`](crate::domain::Grain::ALL).
    pub buckets: [usize; 6],
    /// Bytes the buckets of each grain hold (entries and their states' heap).
    pub bytes: [usize; 6],
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

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`), 0 if unknown.
fn thread_cpu_nanos() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|stat| stat.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
