//! Bucket states that keep their inputs exactly while they are few and become sketches
//! from crates beyond that: PERCENTILE (up to 128 values, then a DDSketch with relative
//! error 1%) and DISTINCT (up to 128 hashes, then a HyperLogLog++ with precision 14).

use std::fmt;

use cardinality_estimator::CardinalityEstimator;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use sketches_ddsketch::{Config, DDSketch};
use wyhash::WyHash;

use super::compensated::CompensatedSum;
use super::{AggregateError, Detail, PercentileDetail, Retracted, Summary, to_f64};
use crate::domain::KpiKind;

/// Relative error of every PERCENTILE quantile: the reported q-quantile v̂ of a value v
/// satisfies |v̂ - v| <= 0.01 |v| (SPEC: at most 1%).
pub const PERCENTILE_RELATIVE_ERROR: f64 = 0.01;

/// Most bins per sign a PERCENTILE sketch keeps (8 bytes each). With relative error 1%
/// a bin spans a factor γ = 1.01/0.99 ≈ 1.0202, so 2048 bins cover values within a factor
/// γ^2048 ≈ 6·10^17 of each other: nanoseconds to centuries. Past that the sketch folds
/// its lowest bins together, which keeps the upper quantiles (the ones a latency KPI
/// watches) within the bound and makes the lowest ones coarser.
pub const PERCENTILE_MAX_BINS: u32 = 2048;

/// Magnitude at or below which a PERCENTILE value counts as zero. DDSketch maps values
/// through a logarithm, so it keeps separate bins for positive and negative values and a
/// plain counter for values in [-1e-9, 1e-9], which it reports as 0: for those values the
/// error is absolute (at most 1e-9), not relative.
pub const PERCENTILE_MIN_MAGNITUDE: f64 = 1e-9;

/// Precision `p` of the DISTINCT sketch: 2^14 = 16384 registers once it is a full
/// HyperLogLog, standard error 1.04 / sqrt(2^14) ≈ 0.81% (SPEC: at most 2%).
pub const DISTINCT_PRECISION: usize = 14;

/// Bits per HyperLogLog register (enough for ranks up to 63).
pub const DISTINCT_REGISTER_WIDTH: usize = 6;

/// Standard error of a DISTINCT estimate in the HyperLogLog range: 1.04 / sqrt(2^14).
pub const DISTINCT_STANDARD_ERROR: f64 = 1.04 / 128.0;

/// Most values a PERCENTILE bucket keeps exactly; the next one turns it into a sketch.
///
/// 128 values take 1 KiB (8 bytes each), while a sketch holding any value away from zero
/// takes its fixed state (192 bytes) plus at least one chunk of 128 bins (1 KiB), and a
/// chunk covers about one decade: the exact form is never larger than the sketch it
/// replaces, except in a bucket whose values all lie within [`PERCENTILE_MIN_MAGNITUDE`] of
/// zero (a sketch counts those in one counter). DAY and WEEK buckets, which hold a few to
/// a few dozen values, stay exact.
pub const PERCENTILE_EXACT_LIMIT: usize = 128;

/// The DDSketch parameters of every PERCENTILE bucket; merging needs them equal.
fn percentile_config() -> Config {
    Config::new(
        PERCENTILE_RELATIVE_ERROR,
        PERCENTILE_MAX_BINS,
        PERCENTILE_MIN_MAGNITUDE,
    )
}

/// PERCENTILE: the values themselves while there are at most [`PERCENTILE_EXACT_LIMIT`]
/// of them, then a DDSketch (sketches-ddsketch) plus a compensated sum.
///
/// The q-quantile is the value of rank ⌊q (n - 1)⌋ (0-based, sorted ascending). The exact
/// form keeps the values sorted and answers with that value itself; min and max are its
/// first and last value, the sum is their compensated sum (computed when asked, so taking
/// a value back leaves nothing else to correct). Which form a bucket has depends
/// only on its count (a sketch never goes back), so two buckets holding the same values
/// answer the same whatever order they were recorded and merged in.
///
/// The sketch (Masson, Rim, Lee 2019) puts a value v > 0 in bin ⌊log_γ v⌋ with
/// γ = (1 + α)/(1 - α), α = 0.01, and answers a bin with the value 2γ^(k+1)/(γ + 1),
/// which is within α of everything in it. Bins hold integer counts, so merging two
/// sketches adds counts and is exact (while fewer than [`PERCENTILE_MAX_BINS`] bins are in
/// use), and adding an exact bucket's values to a sketch gives the bins of recording them.
/// q = 0 and q = 1 give the exact min and max, which the sketch keeps.
///
/// Negative values and zero are accepted (see [`PERCENTILE_MIN_MAGNITUDE`]); nothing
/// panics on them. The sketch keeps its own plain sum; the reported sum comes from the
/// compensated sum beside it.
///
/// Memory, in a [`super::BucketState`] (which keeps one value inline, without any of
/// this): the exact form is this 16-byte state plus 8 bytes per value, 40 bytes for 3
/// values, 208 for 24, 1040 for 128. The sketch is this state, 192 bytes of fixed state
/// and bins allocated 128 at a time (1 KiB) covering the range in use: values spanning
/// one decade need ~116 bins (1 KiB), three decades ~350 bins (3 KiB), at most 16 KiB per
/// sign.
///
/// A value is taken back exactly from the exact form. A sketch would need to take one
/// count out of a bin and to restore min and max; the crate offers neither, so it answers
/// [`AggregateError::NeedsRecompute`].
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct PercentileState(PercentileForm);

/// How a [`PercentileState`] holds its values; see there.
#[derive(Clone, Serialize, Deserialize)]
enum PercentileForm {
    /// At most [`PERCENTILE_EXACT_LIMIT`] values, sorted by `f64::total_cmp`. A boxed
    /// slice, not a `Vec`: no spare capacity and no capacity field.
    Exact(#[serde(deserialize_with = "deserialize_exact_values")] Box<[f64]>),
    /// More values than that. Boxed: the sketch is 192 bytes and most buckets are exact.
    Sketch(Box<PercentileSketch>),
}

impl Default for PercentileForm {
    fn default() -> Self {
        Self::Exact(Box::default())
    }
}

/// The sketch form of a PERCENTILE bucket.
#[derive(Clone, Serialize, Deserialize)]
struct PercentileSketch {
    #[serde(deserialize_with = "deserialize_percentile_sketch")]
    sketch: DDSketch,
    sum: CompensatedSum,
}

/// Reads stored exact values and checks what the exact form relies on: at most
/// [`PERCENTILE_EXACT_LIMIT`] of them, sorted.
fn deserialize_exact_values<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Box<[f64]>, D::Error> {
    let values = Box::<[f64]>::deserialize(deserializer)?;
    if values.len() > PERCENTILE_EXACT_LIMIT {
        return Err(D::Error::custom("too many exact percentile values"));
    }
    if !values.is_sorted_by(|a, b| a.total_cmp(b).is_le()) {
        return Err(D::Error::custom("exact percentile values are not sorted"));
    }
    Ok(values)
}

/// Reads a stored sketch and checks it was made with [`percentile_config`] by merging it
/// into a fresh one (lossless), so that every later merge works.
fn deserialize_percentile_sketch<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<DDSketch, D::Error> {
    let stored = DDSketch::deserialize(deserializer)?;
    let mut sketch = DDSketch::new(percentile_config());
    sketch
        .merge(&stored)
        .map_err(|_| D::Error::custom("percentile sketch has another configuration"))?;
    Ok(sketch)
}

impl PercentileSketch {
    /// A sketch of `values`.
    fn of(values: &[f64]) -> Box<Self> {
        let mut sketch = Box::new(Self {
            sketch: DDSketch::new(percentile_config()),
            sum: CompensatedSum::ZERO,
        });
        sketch.add_all(values);
        sketch
    }

    /// Adds one value.
    #[inline]
    fn add(&mut self, value: f64) {
        self.sketch.add(value);
        self.sum.add(value);
    }

    /// Adds every value of `values`.
    fn add_all(&mut self, values: &[f64]) {
        for &value in values {
            self.add(value);
        }
    }
}

/// The compensated sum of `values`.
fn sum_of(values: &[f64]) -> CompensatedSum {
    let mut sum = CompensatedSum::ZERO;
    for &value in values {
        sum.add(value);
    }
    sum
}

/// The value of rank ⌊q (n - 1)⌋ in ascending `values`; `None` when empty or q is out of
/// range.
fn quantile_of_sorted(values: &[f64], q: f64) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let last = values.len().checked_sub(1)?;
    let rank = (q * to_f64(u64::try_from(last).ok()?)).floor();
    // Not lossy: `rank` is an integer in 0..=last, as 0 <= q <= 1.
    values.get(rank as usize).copied()
}

impl fmt::Debug for PercentileState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form = match &self.0 {
            PercentileForm::Exact(_) => "exact",
            PercentileForm::Sketch(_) => "sketch",
        };
        f.debug_struct("PercentileState")
            .field("form", &form)
            .field("count", &self.count())
            .field("sum", &self.sum().value())
            .field("min", &self.min())
            .field("max", &self.max())
            .field("p50", &self.quantile(0.5))
            .field("bins", &self.bins())
            .finish()
    }
}

impl PercentileState {
    /// Bytes its values or its sketch take on the heap.
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            PercentileForm::Exact(values) => std::mem::size_of_val::<[f64]>(values),
            PercentileForm::Sketch(sketch) => {
                std::mem::size_of::<PercentileSketch>()
                    + sketch.sketch.length() * std::mem::size_of::<u64>()
            }
        }
    }

    /// Adds one value. The value after [`PERCENTILE_EXACT_LIMIT`] turns the exact form
    /// into a sketch of all of them.
    #[inline]
    pub fn record(&mut self, value: f64) {
        match &mut self.0 {
            PercentileForm::Exact(values) if values.len() < PERCENTILE_EXACT_LIMIT => {
                let at = values.partition_point(|v| v.total_cmp(&value).is_le());
                let mut grown = std::mem::take(values).into_vec();
                // Exactly one more slot: the boxed slice below keeps no spare capacity.
                grown.reserve_exact(1);
                grown.insert(at, value);
                *values = grown.into_boxed_slice();
            }
            PercentileForm::Exact(values) => {
                let mut sketch = PercentileSketch::of(values);
                sketch.add(value);
                self.0 = PercentileForm::Sketch(sketch);
            }
            PercentileForm::Sketch(sketch) => sketch.add(value),
        }
    }

    /// Adds the other bucket's values: two exact buckets stay exact while they hold at most
    /// [`PERCENTILE_EXACT_LIMIT`] values together, otherwise the result is a sketch (the
    /// exact values are added to it one by one; two sketches add their bins, min, max and
    /// sums).
    ///
    /// Every sketch is made with the same configuration (new ones by construction, stored
    /// ones checked when read), so the error cannot happen in practice; it is still
    /// reported rather than assumed.
    pub fn merge(&mut self, other: &Self) -> Result<(), AggregateError> {
        match (&mut self.0, &other.0) {
            (PercentileForm::Exact(ours), PercentileForm::Exact(theirs))
                if ours.len() + theirs.len() <= PERCENTILE_EXACT_LIMIT =>
            {
                let mut all = Vec::with_capacity(ours.len() + theirs.len());
                all.extend_from_slice(ours);
                all.extend_from_slice(theirs);
                // Two sorted runs, which the stable sort finds and merges.
                all.sort_by(f64::total_cmp);
                *ours = all.into_boxed_slice();
            }
            (PercentileForm::Exact(ours), PercentileForm::Exact(theirs)) => {
                let mut sketch = PercentileSketch::of(ours);
                sketch.add_all(theirs);
                self.0 = PercentileForm::Sketch(sketch);
            }
            (PercentileForm::Exact(ours), PercentileForm::Sketch(theirs)) => {
                let mut sketch = theirs.clone();
                sketch.add_all(ours);
                self.0 = PercentileForm::Sketch(sketch);
            }
            (PercentileForm::Sketch(ours), PercentileForm::Exact(theirs)) => {
                ours.add_all(theirs);
            }
            (PercentileForm::Sketch(ours), PercentileForm::Sketch(theirs)) => {
                ours.sketch
                    .merge(&theirs.sketch)
                    .map_err(|_| AggregateError::IncompatibleSketch)?;
                ours.sum.merge(&theirs.sum);
            }
        }
        Ok(())
    }

    /// Takes one recorded value back: exact in the exact form, where the value equal to it
    /// bit for bit is removed ([`AggregateError::NothingToRetract`] when there is none);
    /// [`AggregateError::NeedsRecompute`] from a sketch. The bucket is unchanged on error.
    pub fn retract(&mut self, value: f64) -> Result<Retracted, AggregateError> {
        let kind = KpiKind::Percentile;
        match &mut self.0 {
            PercentileForm::Exact(values) => {
                // total_cmp orders distinct bit patterns apart, so a match is bit-for-bit.
                let at = values
                    .binary_search_by(|v| v.total_cmp(&value))
                    .map_err(|_| AggregateError::NothingToRetract { kind })?;
                let mut kept = std::mem::take(values).into_vec();
                kept.remove(at);
                *values = kept.into_boxed_slice();
                Ok(Retracted::Exact)
            }
            PercentileForm::Sketch(_) => Err(AggregateError::NeedsRecompute { kind }),
        }
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        let count = match &self.0 {
            PercentileForm::Exact(values) => values.len(),
            PercentileForm::Sketch(sketch) => sketch.sketch.count(),
        };
        u64::try_from(count).unwrap_or(u64::MAX)
    }

    /// The q-quantile (q in 0..=1): exact in the exact form, within 1% in a sketch; `None`
    /// when empty or q is out of range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        match &self.0 {
            PercentileForm::Exact(values) => quantile_of_sorted(values, q),
            PercentileForm::Sketch(sketch) => sketch.sketch.quantile(q).ok().flatten(),
        }
    }

    /// Number of bins in use (8 bytes each; none in the exact form), for memory accounting.
    pub fn bins(&self) -> usize {
        match &self.0 {
            PercentileForm::Exact(_) => 0,
            PercentileForm::Sketch(sketch) => sketch.sketch.length(),
        }
    }

    /// The compensated sum of the values.
    fn sum(&self) -> CompensatedSum {
        match &self.0 {
            PercentileForm::Exact(values) => sum_of(values),
            PercentileForm::Sketch(sketch) => sketch.sum,
        }
    }

    /// The smallest value, exact in both forms.
    fn min(&self) -> Option<f64> {
        match &self.0 {
            PercentileForm::Exact(values) => values.first().copied(),
            PercentileForm::Sketch(sketch) => sketch.sketch.min(),
        }
    }

    /// The largest value, exact in both forms.
    fn max(&self) -> Option<f64> {
        match &self.0 {
            PercentileForm::Exact(values) => values.last().copied(),
            PercentileForm::Sketch(sketch) => sketch.sketch.max(),
        }
    }

    /// value = p50 (the median); sum, exact min and max; detail p50, p90, p95, p99 and the
    /// relative error bound (1%, also for the exact form, whose quantiles are within it).
    pub fn summary(&self) -> Summary {
        let count = self.count();
        let (Some(p50), Some(p90), Some(p95), Some(p99)) = (
            self.quantile(0.50),
            self.quantile(0.90),
            self.quantile(0.95),
            self.quantile(0.99),
        ) else {
            return Summary::empty(0);
        };
        Summary {
            value: Some(p50),
            count,
            sum: Some(self.sum().value()),
            min: self.min(),
            max: self.max(),
            detail: Some(Detail::Percentile(PercentileDetail {
                p50,
                p90,
                p95,
                p99,
                relative_error: PERCENTILE_RELATIVE_ERROR,
            })),
        }
    }
}

/// The DISTINCT sketch: cardinality-estimator's HyperLogLog++ over the subject strings,
/// hashed with WyHash (seedless, so the same subject hashes the same in every process and
/// in a stored snapshot; the hash is part of the snapshot format).
type SubjectSketch = CardinalityEstimator<str, WyHash, DISTINCT_PRECISION, DISTINCT_REGISTER_WIDTH>;

/// DISTINCT: the number of measurements and a sketch of their distinct subjects.
///
/// The sketch (cardinality-estimator, Cloudflare) grows with what it holds: up to 2
/// distinct subjects it lives in its 8-byte handle, up to 128 it keeps their 32-bit
/// encoded hashes in an array (at most 520 bytes; exact up to hash collisions), and past
/// that it becomes a HyperLogLog++ of 16384 six-bit registers (12,300 bytes) with
/// standard error 0.81% ([`DISTINCT_STANDARD_ERROR`]). Most hourly and daily buckets of a
/// visitor KPI stay in the small forms. Merging takes the register-wise maximum and is
/// exact as a set union of hashes.
///
/// A measurement without a subject is counted but adds nothing to the sketch (ingest
/// requires a subject for DISTINCT; older measurements of a KPI whose kind changed may
/// have none). A subject cannot be taken out of a HyperLogLog, so a retraction answers
/// [`AggregateError::NeedsRecompute`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DistinctState {
    count: u64,
    #[serde(deserialize_with = "deserialize_subjects")]
    subjects: SubjectSketch,
}

/// Most distinct subjects the DISTINCT sketch keeps as an array of hashes before it turns
/// into a HyperLogLog (cardinality-estimator's own limit, not a setting).
const DISTINCT_ARRAY_LIMIT: usize = 128;

/// Reads a stored DISTINCT sketch without the spare capacity the crate would give it.
///
/// cardinality-estimator reads an array of n hashes into a `Vec` of capacity n and then
/// grows it to the power-of-two capacity the array form needs, which reallocates it to 2n:
/// 100 subjects would take 800 bytes instead of 512 (+56%), 24 take 192 instead of 128. A
/// clone inserts the hashes again into a fresh estimator, whose arrays grow by doubling
/// from 4 exactly as recording did; the read one is dropped. Only the array form with a
/// count that is not a power of two is affected (the small and HyperLogLog forms are read
/// at their exact size), and below 9 hashes the difference is at most 16 bytes of one
/// small allocation, not worth a second one in the many DAY buckets that hold a few
/// subjects: so only arrays of 9 to 127 hashes are cloned.
fn deserialize_subjects<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<SubjectSketch, D::Error> {
    let stored = SubjectSketch::deserialize(deserializer)?;
    // The handle alone is the small form; a HyperLogLog is larger than the largest array.
    let handle = std::mem::size_of::<usize>();
    let array_form = (handle + 1..=handle + 4 * DISTINCT_ARRAY_LIMIT).contains(&stored.size_of());
    // The estimate of the array form is its number of hashes.
    let hashes = stored.estimate();
    Ok(if array_form && hashes > 8 && !hashes.is_power_of_two() {
        stored.clone()
    } else {
        stored
    })
}

impl DistinctState {
    /// Bytes its sketch takes on the heap beyond its handle.
    pub fn heap_bytes(&self) -> usize {
        self.subjects
            .size_of()
            .saturating_sub(std::mem::size_of::<usize>())
    }

    /// Counts one measurement and adds its subject.
    #[inline]
    pub fn record(&mut self, subject: Option<&str>) {
        self.count += 1;
        if let Some(subject) = subject {
            self.subjects.insert(subject);
        }
    }

    /// Adds the other bucket's count and subjects.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.subjects.merge(&other.subjects);
    }

    /// Number of measurements.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Estimated number of distinct subjects.
    pub fn estimate(&self) -> u64 {
        u64::try_from(self.subjects.estimate()).unwrap_or(u64::MAX)
    }

    /// Bytes the sketch occupies (handle plus heap), for memory accounting.
    pub fn sketch_bytes(&self) -> usize {
        self.subjects.size_of()
    }

    /// value = the distinct estimate; no sum, min or max.
    pub fn summary(&self) -> Summary {
        Summary {
            value: (self.count > 0).then(|| to_f64(self.estimate())),
            ..Summary::empty(self.count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::laws::exact_quantile;
    use super::*;

    #[test]
    fn percentiles_of_reply_times_are_within_one_percent() {
        // Reply times 1 ms .. 100 s on a geometric grid: 20,001 values, five decades.
        let values: Vec<f64> = (0..=20_000)
            .map(|i| 0.001 * 10f64.powf(5.0 * f64::from(i) / 20_000.0))
            .collect();
        let mut state = PercentileState::default();
        for &v in &values {
            state.record(v);
        }
        for q in [0.5, 0.9, 0.95, 0.99] {
            let exact = exact_quantile(&values, q);
            let estimate = state.quantile(q).unwrap();
            assert!(
                (estimate - exact).abs() <= PERCENTILE_RELATIVE_ERROR * exact * (1.0 + 1e-9),
                "q={q} exact={exact} estimate={estimate}"
            );
        }
        let summary = state.summary();
        assert_eq!(summary.count, 20_001);
        assert_eq!(summary.min, Some(0.001));
        assert_eq!(summary.max, Some(values[20_000]));
        // Five decades at γ ≈ 1.0202: ln(1e5) / ln(γ) ≈ 576 bins, allocated 128 at a time.
        assert_eq!(state.bins(), 640);
    }

    #[test]
    fn negative_and_zero_values_do_not_panic() {
        // Seven values (exact form), then each of them 20 times (140 values: a sketch).
        let values = [-5.0, -1.0, 0.0, 0.0, 1e-12, 2.0, 3.0];
        for copies in [1, 20] {
            let mut state = PercentileState::default();
            for _ in 0..copies {
                for v in values {
                    state.record(v);
                }
            }
            assert_eq!(state.bins() > 0, copies > 1);
            let summary = state.summary();
            assert_eq!(summary.min, Some(-5.0));
            assert_eq!(summary.max, Some(3.0));
            // Sorted: -5 -1 0 0 1e-12 2 3; rank ⌊0.5 × 6⌋ = 3 is a zero (and with 20 copies
            // of each, rank ⌊0.5 × 139⌋ = 69 is one of the 40 zeros at ranks 40..79).
            assert_eq!(summary.value, Some(0.0));
            // Rank ⌊0.1 × 6⌋ = 0 (⌊0.1 × 139⌋ = 13 with copies): -5 within 1%.
            let p10 = state.quantile(0.1).unwrap();
            assert!((p10 - -5.0).abs() <= 0.05 * (1.0 + 1e-9), "{p10}");
        }
    }

    /// The state after recording `values` in order.
    fn recorded(values: &[f64]) -> PercentileState {
        let mut state = PercentileState::default();
        for &v in values {
            state.record(v);
        }
        state
    }

    /// `n` reply times from 0.1 to 100 (three decades, as in benches/restart.rs), from a
    /// fixed xorshift sequence.
    fn reply_times(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let unit = f64::from(u32::try_from(x >> 40).unwrap()) / f64::from(1_u32 << 24);
                0.1 * 1000_f64.powf(unit)
            })
            .collect()
    }

    #[test]
    fn the_exact_form_becomes_a_sketch_after_the_limit() {
        let values = reply_times(PERCENTILE_EXACT_LIMIT + 1, 7);
        let mut state = recorded(&values[..PERCENTILE_EXACT_LIMIT]);
        let mut sorted = values[..PERCENTILE_EXACT_LIMIT].to_vec();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(state.bins(), 0);
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0] {
            assert_eq!(state.quantile(q), Some(exact_quantile(&sorted, q)), "q={q}");
        }
        assert_eq!(state.quantile(1.5), None);

        state.record(values[PERCENTILE_EXACT_LIMIT]);
        assert!(state.bins() > 0, "a sketch after {} values", values.len());
        assert_eq!(state.count(), u64::try_from(values.len()).unwrap());
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.95, 0.99] {
            let exact = exact_quantile(&sorted, q);
            let estimate = state.quantile(q).unwrap();
            assert!(
                (estimate - exact).abs() <= PERCENTILE_RELATIVE_ERROR * exact * (1.0 + 1e-9),
                "q={q} exact={exact} estimate={estimate}"
            );
        }
        let summary = state.summary();
        assert_eq!(summary.min, sorted.first().copied());
        assert_eq!(summary.max, sorted.last().copied());
    }

    #[test]
    fn merging_exact_buckets_stays_exact_up_to_the_limit() {
        let values = reply_times(2 * PERCENTILE_EXACT_LIMIT, 11);
        let half = PERCENTILE_EXACT_LIMIT / 2;
        // 64 + 64 values: exact, and the same answers as recording all of them.
        let mut merged = recorded(&values[..half]);
        merged.merge(&recorded(&values[half..2 * half])).unwrap();
        assert_eq!(merged.bins(), 0);
        assert_eq!(merged.summary(), recorded(&values[..2 * half]).summary());
        // One more value in the other bucket: a sketch, with the bins of recording them.
        for (left, right) in [(half, half + 1), (half + 1, half), (3, 2 * half - 2)] {
            let mut merged = recorded(&values[..left]);
            merged
                .merge(&recorded(&values[left..left + right]))
                .unwrap();
            assert!(merged.bins() > 0);
            let whole = recorded(&values[..left + right]).summary();
            let summary = merged.summary();
            assert_eq!(summary.detail, whole.detail, "{left} + {right}");
            assert_eq!((summary.min, summary.max), (whole.min, whole.max));
            assert_eq!(summary.count, whole.count);
        }
        // A sketch merged with an exact bucket, either way round.
        let sketch = recorded(&values[..=PERCENTILE_EXACT_LIMIT]);
        let exact = recorded(&values[PERCENTILE_EXACT_LIMIT + 1..PERCENTILE_EXACT_LIMIT + 10]);
        let whole = recorded(&values[..PERCENTILE_EXACT_LIMIT + 10]).summary();
        let mut a = sketch.clone();
        a.merge(&exact).unwrap();
        let mut b = exact.clone();
        b.merge(&sketch).unwrap();
        for merged in [a, b] {
            let summary = merged.summary();
            assert_eq!(summary.detail, whole.detail);
            assert_eq!((summary.min, summary.max), (whole.min, whole.max));
            assert_eq!(summary.count, whole.count);
        }
    }

    #[test]
    fn the_exact_form_takes_back_equal_bits_only() {
        let mut state = recorded(&[2.0, 0.0, 1.0, 2.0]);
        assert_eq!(
            state.retract(-0.0),
            Err(AggregateError::NothingToRetract {
                kind: KpiKind::Percentile
            })
        );
        assert_eq!(state.retract(2.0), Ok(Retracted::Exact));
        assert_eq!(state.summary(), recorded(&[0.0, 1.0, 2.0]).summary());
        assert_eq!(state.retract(0.0), Ok(Retracted::Exact));
        assert_eq!(state.summary(), recorded(&[1.0, 2.0]).summary());
        assert_eq!(state.count(), 2);
    }

    #[test]
    fn both_forms_read_back_and_still_merge() {
        for n in [
            1,
            4,
            PERCENTILE_EXACT_LIMIT,
            PERCENTILE_EXACT_LIMIT + 1,
            1000,
        ] {
            let state = recorded(&reply_times(n, 3));
            let bytes = crate::encoding::encode(&state).unwrap();
            let mut restored: PercentileState = crate::encoding::decode(&bytes).unwrap();
            assert_eq!(restored.summary(), state.summary(), "{n}");
            assert_eq!(restored.bins(), state.bins(), "{n}");
            restored.merge(&state).unwrap();
            assert_eq!(restored.count(), 2 * u64::try_from(n).unwrap());
        }
        let mut distinct = DistinctState::default();
        for i in 0..500 {
            distinct.record(Some(&format!("visitor-{i}")));
        }
        let json = serde_json::to_string(&distinct).unwrap();
        let restored: DistinctState = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, distinct);
    }

    #[test]
    fn a_sketch_with_another_configuration_is_refused() {
        let mut other = DDSketch::new(Config::new(0.02, 2048, 1e-9));
        other.add(1.0);
        let json = format!(
            "{{\"Sketch\":{{\"sketch\":{},\"sum\":{{\"sum\":1.0,\"compensation\":0.0}}}}}}",
            serde_json::to_string(&other).unwrap()
        );
        let error = serde_json::from_str::<PercentileState>(&json).unwrap_err();
        assert!(
            error.to_string().contains("another configuration"),
            "{error}"
        );
    }

    #[test]
    fn stored_exact_values_must_be_sorted_and_few() {
        assert_eq!(
            serde_json::from_str::<PercentileState>(r#"{"Exact":[1.0,2.0]}"#)
                .unwrap()
                .count(),
            2
        );
        let error = serde_json::from_str::<PercentileState>(r#"{"Exact":[2.0,1.0]}"#).unwrap_err();
        assert!(error.to_string().contains("not sorted"), "{error}");
        let too_many = serde_json::to_string(&vec![1.0; PERCENTILE_EXACT_LIMIT + 1]).unwrap();
        let error = serde_json::from_str::<PercentileState>(&format!(r#"{{"Exact":{too_many}}}"#))
            .unwrap_err();
        assert!(error.to_string().contains("too many"), "{error}");
    }

    #[test]
    fn the_percentile_state_is_two_words() {
        // Boxed in a `BucketState`: a fat pointer to the exact values, or a thin one to
        // the sketch, in the same 16 bytes.
        assert_eq!(std::mem::size_of::<PercentileState>(), 16);
        // The fixed part of a sketch, as the memory figures in the docs say.
        assert_eq!(std::mem::size_of::<PercentileSketch>(), 192);
    }

    #[test]
    fn distinct_counts_within_two_percent_at_every_scale() {
        // Deterministic: WyHash has no seed, so these estimates are the same on every run.
        let mut state = DistinctState::default();
        let mut next = 0_u64;
        for target in [1_u64, 2, 100, 128, 1_000, 10_000, 100_000, 1_000_000] {
            while next < target {
                state.record(Some(&format!("visitor-{next:08}")));
                next += 1;
            }
            let estimate = to_f64(state.estimate());
            let exact = to_f64(target);
            assert!(
                (estimate - exact).abs() <= 0.02 * exact,
                "{target} distinct, estimate {estimate}"
            );
            if target <= 128 {
                assert_eq!(state.estimate(), target, "exact in the small forms");
            }
        }
        // Recording the same subjects again changes the count, not the estimate.
        let estimate = state.estimate();
        state.record(Some("visitor-00000007"));
        assert_eq!(state.estimate(), estimate);
        assert_eq!(state.count(), 1_000_001);
    }

    #[test]
    fn distinct_sketches_read_back_in_every_form() {
        for n in [0, 1, 3, 24, 100, 128, 130] {
            let mut state = DistinctState::default();
            for i in 0..n {
                state.record(Some(&format!("visitor-{i}")));
            }
            let bytes = crate::encoding::encode(&state).unwrap();
            let restored: DistinctState = crate::encoding::decode(&bytes).unwrap();
            assert_eq!(restored, state, "{n}");
            assert_eq!(restored.estimate(), state.estimate(), "{n}");
            assert_eq!(restored.sketch_bytes(), state.sketch_bytes(), "{n}");
        }
    }

    #[test]
    fn distinct_sketch_memory_grows_with_the_subjects() {
        let mut state = DistinctState::default();
        let mut sizes = Vec::new();
        for i in 0..1000 {
            if [0, 2, 16, 128, 129].contains(&i) {
                sizes.push((i, state.sketch_bytes()));
            }
            state.record(Some(&format!("s{i}")));
        }
        // 8-byte handle; array of 4-byte hashes with power-of-two capacity; 16384 × 6 bits
        // = 12,288 bytes of registers + 12 bytes of header + the handle.
        assert_eq!(
            sizes,
            vec![(0, 8), (2, 8), (16, 72), (128, 520), (129, 12_308)]
        );
    }
}
