//! Approximate bucket states from sketch crates: PERCENTILE (DDSketch, relative error 1%)
//! and DISTINCT (HyperLogLog++, precision 14).

use std::fmt;

use cardinality_estimator::CardinalityEstimator;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use sketches_ddsketch::{Config, DDSketch};
use wyhash::WyHash;

use super::compensated::CompensatedSum;
use super::{AggregateError, Detail, PercentileDetail, Summary, to_f64};

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

/// The DDSketch parameters of every PERCENTILE bucket; merging needs them equal.
fn percentile_config() -> Config {
    Config::new(
        PERCENTILE_RELATIVE_ERROR,
        PERCENTILE_MAX_BINS,
        PERCENTILE_MIN_MAGNITUDE,
    )
}

/// PERCENTILE: a DDSketch (sketches-ddsketch) plus a compensated sum.
///
/// DDSketch (Masson, Rim, Lee 2019) puts a value v > 0 in bin ⌊log_γ v⌋ with
/// γ = (1 + α)/(1 - α), α = 0.01, and answers a bin with the value 2γ^(k+1)/(γ + 1),
/// which is within α of everything in it. Bins hold integer counts, so merging two
/// sketches adds counts and is exact (while fewer than [`PERCENTILE_MAX_BINS`] bins are in
/// use). The q-quantile is the value of rank ⌊q (n - 1)⌋ (0-based, sorted ascending),
/// within α; q = 0 and q = 1 give the exact min and max, which the sketch keeps.
///
/// Negative values and zero are accepted (see [`PERCENTILE_MIN_MAGNITUDE`]); nothing
/// panics on them. The sketch keeps its own plain sum; the reported sum comes from the
/// compensated sum beside it.
///
/// Memory: about 200 bytes of fixed state, plus bins allocated 128 at a time (1 KiB)
/// covering the range in use: values spanning one decade need ~116 bins (1 KiB), five
/// decades ~580 bins (5 KiB), at most 16 KiB per sign.
///
/// A retraction would need to take one count out of a bin and to restore min and max;
/// the crate offers neither, so it answers [`AggregateError::NeedsRecompute`].
#[derive(Clone, Serialize, Deserialize)]
pub struct PercentileState {
    /// Boxed: the sketch is ~200 bytes and most buckets are of other kinds.
    #[serde(deserialize_with = "deserialize_percentile_sketch")]
    sketch: Box<DDSketch>,
    sum: CompensatedSum,
}

/// Reads a stored sketch and checks it was made with [`percentile_config`] by merging it
/// into a fresh one (lossless), so that every later merge works.
fn deserialize_percentile_sketch<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Box<DDSketch>, D::Error> {
    let stored = DDSketch::deserialize(deserializer)?;
    let mut sketch = DDSketch::new(percentile_config());
    sketch
        .merge(&stored)
        .map_err(|_| D::Error::custom("percentile sketch has another configuration"))?;
    Ok(Box::new(sketch))
}

impl Default for PercentileState {
    fn default() -> Self {
        Self {
            sketch: Box::new(DDSketch::new(percentile_config())),
            sum: CompensatedSum::ZERO,
        }
    }
}

impl fmt::Debug for PercentileState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PercentileState")
            .field("count", &self.count())
            .field("sum", &self.sum.value())
            .field("min", &self.sketch.min())
            .field("max", &self.sketch.max())
            .field("p50", &self.quantile(0.5))
            .field("bins", &self.sketch.length())
            .finish()
    }
}

impl PercentileState {
    /// Adds one value.
    #[inline]
    pub fn record(&mut self, value: f64) {
        self.sketch.add(value);
        self.sum.add(value);
    }

    /// Adds the other bucket's bins, min, max and sum.
    ///
    /// Every state is made with the same configuration (new ones by construction, stored
    /// ones checked when read), so the error cannot happen in practice; it is still
    /// reported rather than assumed.
    pub fn merge(&mut self, other: &Self) -> Result<(), AggregateError> {
        self.sketch
            .merge(&other.sketch)
            .map_err(|_| AggregateError::IncompatibleSketch)?;
        self.sum.merge(&other.sum);
        Ok(())
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        u64::try_from(self.sketch.count()).unwrap_or(u64::MAX)
    }

    /// The q-quantile (q in 0..=1) within 1%, or `None` when empty or q is out of range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.quantile(q).ok().flatten()
    }

    /// Number of bins in use (8 bytes each), for memory accounting.
    pub fn bins(&self) -> usize {
        self.sketch.length()
    }

    /// value = p50 (the median); sum, exact min and max; detail p50, p90, p95, p99 and the
    /// relative error.
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
            sum: Some(self.sum.value()),
            min: self.sketch.min(),
            max: self.sketch.max(),
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
    subjects: SubjectSketch,
}

impl DistinctState {
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
        let mut state = PercentileState::default();
        for v in [-5.0, -1.0, 0.0, 0.0, 1e-12, 2.0, 3.0] {
            state.record(v);
        }
        let summary = state.summary();
        assert_eq!(summary.min, Some(-5.0));
        assert_eq!(summary.max, Some(3.0));
        // Sorted: -5 -1 0 0 1e-12 2 3; rank ⌊0.5 × 6⌋ = 3 is a zero.
        assert_eq!(summary.value, Some(0.0));
        // Rank ⌊0.1 × 6⌋ = 0: -5 within 1%.
        let p10 = state.quantile(0.1).unwrap();
        assert!((p10 - -5.0).abs() <= 0.05 * (1.0 + 1e-9), "{p10}");
    }

    #[test]
    fn a_stored_sketch_reads_back_and_still_merges() {
        let mut state = PercentileState::default();
        for v in [1.0, 2.0, 3.0, 250.0] {
            state.record(v);
        }
        let json = serde_json::to_string(&state).unwrap();
        let mut restored: PercentileState = serde_json::from_str(&json).unwrap();
        assert_eq!(restored.summary(), state.summary());
        restored.merge(&state).unwrap();
        assert_eq!(restored.count(), 8);

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
            "{{\"sketch\":{},\"sum\":{{\"sum\":1.0,\"compensation\":0.0}}}}",
            serde_json::to_string(&other).unwrap()
        );
        let error = serde_json::from_str::<PercentileState>(&json).unwrap_err();
        assert!(
            error.to_string().contains("another configuration"),
            "{error}"
        );
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
