//! Bucket states that can subtract: COUNT, SUM and AVERAGE (count, compensated sum,
//! min/max and a mergeable variance).

use serde::{Deserialize, Serialize};

use super::compensated::CompensatedSum;
use super::{AggregateError, AverageDetail, Detail, RatioOperand, Retracted, Summary, to_f64};
use crate::domain::KpiKind;

/// Smallest and largest value of a bucket that SUM and AVERAGE also report.
///
/// A retraction can subtract a value from a sum but not from a minimum: when the value
/// taken back was the minimum or the maximum, the next one is unknown without the
/// remaining values. The bounds are then kept (they still bound what is left: the true
/// minimum is at least `min`) but marked `stale`; summaries leave them out and the caller
/// that needs them rebuilds the bucket from the log.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Extremes {
    /// Smallest value recorded; +infinity when empty.
    min: f64,
    /// Largest value recorded; -infinity when empty.
    max: f64,
    /// A retraction removed a value at (or beyond) a bound, so the bounds may be too wide.
    stale: bool,
}

impl Extremes {
    const EMPTY: Self = Self {
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        stale: false,
    };

    #[inline]
    fn record(&mut self, value: f64) {
        if value < self.min {
            self.min = value;
        }
        if value > self.max {
            self.max = value;
        }
    }

    /// Takes `value` out; whether the bounds are still exact.
    fn retract(&mut self, value: f64) -> Retracted {
        // A value strictly inside (min, max) was neither bound, so both stay exact.
        if value <= self.min || value >= self.max {
            self.stale = true;
        }
        if self.stale {
            Retracted::MinMaxStale
        } else {
            Retracted::Exact
        }
    }

    fn merge(&mut self, other: &Self) {
        // The empty sentinels (+inf, -inf) are neutral for min and max.
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.stale |= other.stale;
    }

    /// `(min, max)` for a summary of a non-empty bucket: absent when stale.
    fn reported(&self) -> (Option<f64>, Option<f64>) {
        if self.stale {
            (None, None)
        } else {
            (Some(self.min), Some(self.max))
        }
    }
}

/// COUNT: the number of measurements; values are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CountState {
    count: u64,
}

impl CountState {
    /// Counts one measurement.
    #[inline]
    pub fn record(&mut self) {
        self.count += 1;
    }

    /// Takes one measurement back; always exact.
    pub fn retract(&mut self) -> Result<Retracted, AggregateError> {
        self.count = self
            .count
            .checked_sub(1)
            .ok_or(AggregateError::NothingToRetract {
                kind: KpiKind::Count,
            })?;
        Ok(Retracted::Exact)
    }

    /// Adds the other bucket's count.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
    }

    /// Number of measurements.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// What a RATIO divides: the count.
    pub fn ratio_operand(&self) -> RatioOperand {
        RatioOperand {
            sum: to_f64(self.count),
            count: self.count,
        }
    }

    /// value = count; no sum, min or max (the values are not part of a COUNT).
    pub fn summary(&self) -> Summary {
        Summary {
            value: (self.count > 0).then(|| to_f64(self.count)),
            ..Summary::empty(self.count)
        }
    }
}

/// SUM: count, compensated sum, min and max.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SumState {
    count: u64,
    sum: CompensatedSum,
    extremes: Extremes,
}

impl Default for SumState {
    fn default() -> Self {
        Self {
            count: 0,
            sum: CompensatedSum::ZERO,
            extremes: Extremes::EMPTY,
        }
    }
}

impl SumState {
    /// Adds one value.
    #[inline]
    pub fn record(&mut self, value: f64) {
        self.count += 1;
        self.sum.add(value);
        self.extremes.record(value);
    }

    /// Takes one value back: count and sum exactly, min/max flagged when they may have moved.
    /// Emptying the bucket resets it, bounds included.
    pub fn retract(&mut self, value: f64) -> Result<Retracted, AggregateError> {
        match self.count {
            0 => Err(AggregateError::NothingToRetract { kind: KpiKind::Sum }),
            1 => {
                *self = Self::default();
                Ok(Retracted::Exact)
            }
            _ => {
                self.count -= 1;
                self.sum.add(-value);
                Ok(self.extremes.retract(value))
            }
        }
    }

    /// Adds the other bucket: counts, compensated sums (compensation kept), bounds.
    pub fn merge(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count += other.count;
        self.sum.merge(&other.sum);
        self.extremes.merge(&other.extremes);
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The compensated sum of the values (0 when empty).
    pub fn sum(&self) -> f64 {
        self.sum.value()
    }

    /// What a RATIO divides: the sum.
    pub fn ratio_operand(&self) -> RatioOperand {
        RatioOperand {
            sum: self.sum(),
            count: self.count,
        }
    }

    /// value = sum; sum, min and max (min/max absent while stale after a retraction).
    pub fn summary(&self) -> Summary {
        if self.count == 0 {
            return Summary::empty(0);
        }
        let (min, max) = self.extremes.reported();
        Summary {
            value: Some(self.sum()),
            count: self.count,
            sum: Some(self.sum()),
            min,
            max,
            detail: None,
        }
    }
}

/// AVERAGE: count, compensated sum, min, max and the sum of squared deviations from the
/// mean (`m2`) for the population standard deviation.
///
/// The variance is kept with Welford's update, which never subtracts two large nearly
/// equal sums of squares (the textbook `Σx² - (Σx)²/n` loses every digit when the values
/// are large and close together):
///
/// ```text
/// record x:  n' = n + 1;  δ = x - mean;  mean' = mean + δ / n';  m2' = m2 + δ (x - mean')
/// ```
///
/// and two buckets merge with the parallel formula of Chan, Golub and LeVeque (1979):
///
/// ```text
/// n = na + nb;  δ = mean_b - mean_a;  mean = mean_a + δ nb / n;
/// m2 = m2a + m2b + δ² na nb / n
/// ```
///
/// Population variance = m2 / n, stddev = sqrt(m2 / n). The reported average is the
/// compensated sum / n (SPEC: sum / count); the Welford mean only feeds `m2`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AverageState {
    count: u64,
    sum: CompensatedSum,
    /// Running mean for the variance update (not the reported average).
    mean: f64,
    /// Sum of squared deviations from `mean`.
    m2: f64,
    extremes: Extremes,
}

impl Default for AverageState {
    fn default() -> Self {
        Self {
            count: 0,
            sum: CompensatedSum::ZERO,
            mean: 0.0,
            m2: 0.0,
            extremes: Extremes::EMPTY,
        }
    }
}

impl AverageState {
    /// Adds one value (Welford's update, see the type's documentation).
    #[inline]
    pub fn record(&mut self, value: f64) {
        self.count += 1;
        self.sum.add(value);
        self.extremes.record(value);
        let delta = value - self.mean;
        self.mean += delta / to_f64(self.count);
        self.m2 += delta * (value - self.mean);
    }

    /// Takes one value back: count, sum and variance exactly (up to rounding), min/max
    /// flagged when they may have moved. Emptying the bucket resets it.
    ///
    /// Welford's update run backwards, from n to n' = n - 1:
    ///
    /// ```text
    /// mean' = mean - (x - mean) / n';   m2' = m2 - (x - mean)(x - mean')
    /// ```
    ///
    /// Rounding can push `m2'` a hair below zero when the remaining values are (nearly)
    /// equal; it is clamped at 0, and with one value left it is 0 by definition.
    pub fn retract(&mut self, value: f64) -> Result<Retracted, AggregateError> {
        match self.count {
            0 => Err(AggregateError::NothingToRetract {
                kind: KpiKind::Average,
            }),
            1 => {
                *self = Self::default();
                Ok(Retracted::Exact)
            }
            _ => {
                self.count -= 1;
                self.sum.add(-value);
                let old_mean = self.mean;
                if self.count == 1 {
                    // The one value left is exactly the remaining sum.
                    self.mean = self.sum.value();
                    self.m2 = 0.0;
                } else {
                    self.mean = old_mean - (value - old_mean) / to_f64(self.count);
                    self.m2 = (self.m2 - (value - old_mean) * (value - self.mean)).max(0.0);
                }
                Ok(self.extremes.retract(value))
            }
        }
    }

    /// Adds the other bucket (Chan's parallel formula, see the type's documentation).
    pub fn merge(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let na = to_f64(self.count);
        let nb = to_f64(other.count);
        let n = na + nb;
        let delta = other.mean - self.mean;
        self.mean += delta * nb / n;
        self.m2 += other.m2 + delta * delta * na * nb / n;
        self.count += other.count;
        self.sum.merge(&other.sum);
        self.extremes.merge(&other.extremes);
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Population standard deviation sqrt(m2 / n); `None` when empty.
    pub fn stddev(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2 / to_f64(self.count)).sqrt())
    }

    /// value = sum / count; sum, min, max and the stddev detail.
    pub fn summary(&self) -> Summary {
        let Some(stddev) = self.stddev() else {
            return Summary::empty(0);
        };
        let sum = self.sum.value();
        let (min, max) = self.extremes.reported();
        Summary {
            value: Some(sum / to_f64(self.count)),
            count: self.count,
            sum: Some(sum),
            min,
            max,
            detail: Some(Detail::Average(AverageDetail { stddev })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn average_of(values: &[f64]) -> AverageState {
        let mut state = AverageState::default();
        for &v in values {
            state.record(v);
        }
        state
    }

    #[test]
    fn average_and_population_stddev_of_a_textbook_set() {
        // 2 4 4 4 5 5 7 9: n = 8, sum = 40, mean = 5.
        // Squared deviations 9 1 1 1 0 0 4 16 sum to 32; population variance 32 / 8 = 4,
        // stddev 2.
        let summary = average_of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).summary();
        assert_eq!(summary.value, Some(5.0));
        assert_eq!(summary.count, 8);
        assert_eq!(summary.sum, Some(40.0));
        assert_eq!(summary.min, Some(2.0));
        assert_eq!(summary.max, Some(9.0));
        assert_eq!(
            summary.detail,
            Some(Detail::Average(AverageDetail { stddev: 2.0 }))
        );
    }

    #[test]
    fn variance_survives_a_large_offset() {
        // The same set shifted by 1e9: the stddev is still 2. The textbook formula
        // Σx²/n - mean² would subtract two numbers near 1e18 whose ulp is 128.
        let shifted: Vec<f64> = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
            .iter()
            .map(|v| v + 1e9)
            .collect();
        let stddev = average_of(&shifted).stddev().unwrap();
        assert!((stddev - 2.0).abs() < 1e-6, "{stddev}");
    }

    #[test]
    fn merged_halves_give_the_whole_variance() {
        // Halves 2 4 4 4 (mean 3.5, m2 3) and 5 5 7 9 (mean 6.5, m2 11):
        // δ = 3, m2 = 3 + 11 + 9·4·4/8 = 32, as for the whole set.
        let mut left = average_of(&[2.0, 4.0, 4.0, 4.0]);
        left.merge(&average_of(&[5.0, 5.0, 7.0, 9.0]));
        assert_eq!(left.stddev(), Some(2.0));
        assert_eq!(left.summary().value, Some(5.0));
    }

    #[test]
    fn retracting_an_inner_value_keeps_min_and_max() {
        // 2 4 4 4 5 5 7 9 without one 5: n = 7, sum 35, mean 5; squared deviations
        // 9 1 1 1 0 4 16 = 32, variance 32 / 7.
        let mut state = average_of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(state.retract(5.0), Ok(Retracted::Exact));
        let summary = state.summary();
        assert_eq!(summary.value, Some(5.0));
        assert_eq!((summary.min, summary.max), (Some(2.0), Some(9.0)));
        let stddev = state.stddev().unwrap();
        assert!((stddev - (32.0_f64 / 7.0).sqrt()).abs() < 1e-12, "{stddev}");
    }

    #[test]
    fn retracting_a_bound_marks_min_and_max_stale() {
        let mut state = SumState::default();
        for v in [1.0, 2.0, 3.0] {
            state.record(v);
        }
        assert_eq!(state.retract(3.0), Ok(Retracted::MinMaxStale));
        let summary = state.summary();
        assert_eq!(summary.sum, Some(3.0));
        assert_eq!((summary.min, summary.max), (None, None));
        // Staleness sticks through merges until the bucket is rebuilt.
        let mut rollup = SumState::default();
        rollup.record(10.0);
        rollup.merge(&state);
        assert_eq!(rollup.summary().min, None);
        // Taking the last value back leaves an exact empty bucket.
        let mut single = SumState::default();
        single.record(7.0);
        assert_eq!(single.retract(7.0), Ok(Retracted::Exact));
        assert_eq!(single, SumState::default());
    }

    #[test]
    fn nothing_to_retract_from_an_empty_bucket() {
        assert!(CountState::default().retract().is_err());
        assert!(SumState::default().retract(1.0).is_err());
        assert!(AverageState::default().retract(1.0).is_err());
    }
}
