//! Compensated (Neumaier) summation: a running f64 sum that carries its own rounding error.

use serde::{Deserialize, Serialize};

/// A sum of f64 values with Neumaier's compensation (an improved Kahan summation).
///
/// Every addition `t = sum + x` loses the low-order bits of the smaller operand; those
/// bits are exactly `(sum - t) + x` when `|sum| >= |x|`, else `(x - t) + sum`
/// (Neumaier 1974). They are collected in `compensation` and added back when the value is
/// read: `value = sum + compensation`. The error of the result is then about one rounding
/// of the result itself, independent of the number of terms, so 1,000,000 × 0.01 reads as
/// exactly 10000.0 where a plain loop gives 10000.000000171856.
///
/// The state is a monoid: [`CompensatedSum::merge`] adds the other sum as a term and its
/// compensation into ours, so the rounding error of both halves is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CompensatedSum {
    /// The plain running sum.
    sum: f64,
    /// The rounding errors of every addition so far, to be added back on read.
    compensation: f64,
}

impl CompensatedSum {
    /// The empty sum, 0.
    pub const ZERO: Self = Self {
        sum: 0.0,
        compensation: 0.0,
    };

    /// Adds one term.
    #[inline]
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        // The branch picks the operand whose low bits were lost: the smaller one.
        if self.sum.abs() >= x.abs() {
            self.compensation += (self.sum - t) + x;
        } else {
            self.compensation += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// Adds another compensated sum: its plain sum as one term (with its own rounding error
    /// caught), then its compensation.
    #[inline]
    pub fn merge(&mut self, other: &Self) {
        self.add(other.sum);
        self.compensation += other.compensation;
    }

    /// The sum: `sum + compensation`.
    ///
    /// Once the plain sum has overflowed to ±infinity the compensation means nothing
    /// (it is `inf - inf`), so the plain sum is returned as it is.
    #[inline]
    pub fn value(&self) -> f64 {
        if self.sum.is_finite() {
            self.sum + self.compensation
        } else {
            self.sum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_cents_are_exactly_ten_thousand() {
        // The double nearest 0.01 is 0.01000000000000000020816681711721685...; a million of
        // them is 10000.000000000000208..., whose nearest double is 10000.0. A plain loop
        // drifts to 10000.000000171856 because every addition rounds at the sum's magnitude.
        let mut sum = CompensatedSum::ZERO;
        let mut naive = 0.0_f64;
        for _ in 0..1_000_000 {
            sum.add(0.01);
            naive += 0.01;
        }
        assert_eq!(sum.value(), 10000.0);
        assert_ne!(naive, 10000.0, "the test would prove nothing");
    }

    #[test]
    fn merging_keeps_both_compensations() {
        // Left: 1e16 + 1. The 1 is below half an ulp of 1e16 (ulp 2), so the plain sum
        // stays 1e16 and the compensation holds 1. Right: -1e16 + 1, likewise.
        // Merged: sum 1e16 + (-1e16) = 0 exactly, compensation 1 + 1 = 2; the true sum is 2.
        // A merge that dropped the compensations would give 0.
        let mut left = CompensatedSum::ZERO;
        left.add(1e16);
        left.add(1.0);
        let mut right = CompensatedSum::ZERO;
        right.add(-1e16);
        right.add(1.0);
        left.merge(&right);
        assert_eq!(left.value(), 2.0);
    }

    #[test]
    fn halves_of_a_million_cents_merge_to_exactly_ten_thousand() {
        let mut first = CompensatedSum::ZERO;
        let mut second = CompensatedSum::ZERO;
        for _ in 0..500_000 {
            first.add(0.01);
            second.add(0.01);
        }
        first.merge(&second);
        assert_eq!(first.value(), 10000.0);
    }

    #[test]
    fn an_overflowed_sum_reads_as_infinity_not_nan() {
        let mut sum = CompensatedSum::ZERO;
        sum.add(f64::MAX);
        sum.add(f64::MAX);
        assert_eq!(sum.value(), f64::INFINITY);
    }
}
