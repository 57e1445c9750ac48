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
mod tests;
