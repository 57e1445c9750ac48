//! Survey score buckets: NPS (scores 0..10) and CSAT (scores 1..5) as histograms, with
//! their 95% confidence intervals.

use serde::{Deserialize, Serialize};

use super::{
    AggregateError, CONFIDENCE_LEVEL, CsatDetail, Detail, Interval, NpsDetail, Retracted, Summary,
    THIN_SAMPLE_BELOW, Z_95, to_f64,
};
use crate::domain::KpiKind;

/// Lowest NPS score.
pub const NPS_LOWEST: u8 = 0;
/// Highest NPS score.
pub const NPS_HIGHEST: u8 = 10;
/// Lowest CSAT score.
pub const CSAT_LOWEST: u8 = 1;
/// Highest CSAT score.
pub const CSAT_HIGHEST: u8 = 5;

/// Histogram slot of an integer score in `lowest..=highest`, or `None` for anything else.
#[inline]
fn score_slot(value: f64, lowest: u8, highest: u8) -> Option<usize> {
    if value.fract() == 0.0 && value >= f64::from(lowest) && value <= f64::from(highest) {
        // Not lossy: `value` is an integer between 0 and 10 here.
        let score = value as usize;
        Some(score - usize::from(lowest))
    } else {
        None
    }
}

/// Adds `delta` (+1 or -1) to the histogram slot of `value`; the state is unchanged on error.
fn bump<const N: usize>(
    histogram: &mut [u64; N],
    kind: KpiKind,
    value: f64,
    lowest: u8,
    highest: u8,
    retract: bool,
) -> Result<(), AggregateError> {
    let slot = score_slot(value, lowest, highest)
        .and_then(|slot| histogram.get_mut(slot))
        .ok_or(AggregateError::NotAScore { kind, value })?;
    if retract {
        *slot = slot
            .checked_sub(1)
            .ok_or(AggregateError::NothingToRetract { kind })?;
    } else {
        *slot += 1;
    }
    Ok(())
}

/// `n < 30`: too few responses for the normal approximations behind the intervals.
fn thin(n: u64) -> bool {
    n < THIN_SAMPLE_BELOW
}

/// NPS: responses per score 0..10.
///
/// ```text
/// promoters P = #9 + #10, passives = #7 + #8, detractors D = #0 + … + #6, n = all
/// NPS = 100 (P - D) / n
/// ```
///
/// The 95% interval treats each response as +1 (promoter), 0 or -1 (detractor): with
/// p = P/n and d = D/n the mean is x = p - d, the variance of one response is
/// `E[r²] - x² = p + d - x²`, so Var(x̂) = (p + d - x²) / n and
/// interval = 100 (x ± 1.96 sqrt(Var)), clamped to [-100, 100].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpsState {
    histogram: [u64; 11],
}

impl NpsState {
    /// Adds one score; anything but an integer 0..10 is refused and changes nothing.
    #[inline]
    pub fn record(&mut self, value: f64) -> Result<(), AggregateError> {
        bump(
            &mut self.histogram,
            KpiKind::Nps,
            value,
            NPS_LOWEST,
            NPS_HIGHEST,
            false,
        )
    }

    /// Takes one score back; always exact.
    pub fn retract(&mut self, value: f64) -> Result<Retracted, AggregateError> {
        bump(
            &mut self.histogram,
            KpiKind::Nps,
            value,
            NPS_LOWEST,
            NPS_HIGHEST,
            true,
        )?;
        Ok(Retracted::Exact)
    }

    /// Adds the other bucket's histogram.
    pub fn merge(&mut self, other: &Self) {
        for (ours, theirs) in self.histogram.iter_mut().zip(other.histogram) {
            *ours += theirs;
        }
    }

    /// Responses per score 0..10.
    pub fn histogram(&self) -> [u64; 11] {
        self.histogram
    }

    /// Number of responses.
    pub fn count(&self) -> u64 {
        self.histogram.iter().sum()
    }

    /// value = NPS; detail = histogram, groups, interval, thin flag. No sum, min or max.
    pub fn summary(&self) -> Summary {
        let n = self.count();
        if n == 0 {
            return Summary::empty(0);
        }
        let detractors: u64 = self.histogram[..7].iter().sum();
        let passives = self.histogram[7] + self.histogram[8];
        let promoters = self.histogram[9] + self.histogram[10];
        let n_f = to_f64(n);
        let p = to_f64(promoters) / n_f;
        let d = to_f64(detractors) / n_f;
        let x = p - d;
        // Rounding can make p + d - x² a hair negative when every response is on one side.
        let variance = ((p + d - x * x) / n_f).max(0.0);
        let half_width = Z_95 * variance.sqrt();
        Summary {
            value: Some(100.0 * x),
            detail: Some(Detail::Nps(NpsDetail {
                histogram: self.histogram,
                promoters,
                passives,
                detractors,
                interval: Interval {
                    lower: (100.0 * (x - half_width)).clamp(-100.0, 100.0),
                    upper: (100.0 * (x + half_width)).clamp(-100.0, 100.0),
                    level: CONFIDENCE_LEVEL,
                },
                thin_sample: thin(n),
            })),
            ..Summary::empty(n)
        }
    }
}

/// CSAT: responses per score 1..5.
///
/// ```text
/// satisfied S = #4 + #5, n = all;  CSAT = 100 S / n
/// ```
///
/// Its 95% interval is the Wilson score interval of the proportion p̂ = S/n (it stays
/// inside [0, 1] and behaves at p̂ = 0 or 1 and small n, unlike p̂ ± 1.96 sqrt(p̂(1-p̂)/n)):
///
/// ```text
/// center = (p̂ + z²/2n) / (1 + z²/n)
/// half   = z / (1 + z²/n) · sqrt(p̂(1 - p̂)/n + z²/4n²)        z = 1.96
/// interval = 100 (center ± half)
/// ```
///
/// The mean rating is Σ s·#s / n, with the interval mean ± 1.96 s/sqrt(n), s the sample
/// standard deviation sqrt(Σ #s (s - mean)² / (n - 1)); no interval below two responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsatState {
    histogram: [u64; 5],
}

impl CsatState {
    /// Adds one score; anything but an integer 1..5 is refused and changes nothing.
    #[inline]
    pub fn record(&mut self, value: f64) -> Result<(), AggregateError> {
        bump(
            &mut self.histogram,
            KpiKind::Csat,
            value,
            CSAT_LOWEST,
            CSAT_HIGHEST,
            false,
        )
    }

    /// Takes one score back; always exact.
    pub fn retract(&mut self, value: f64) -> Result<Retracted, AggregateError> {
        bump(
            &mut self.histogram,
            KpiKind::Csat,
            value,
            CSAT_LOWEST,
            CSAT_HIGHEST,
            true,
        )?;
        Ok(Retracted::Exact)
    }

    /// Adds the other bucket's histogram.
    pub fn merge(&mut self, other: &Self) {
        for (ours, theirs) in self.histogram.iter_mut().zip(other.histogram) {
            *ours += theirs;
        }
    }

    /// Responses per score 1..5.
    pub fn histogram(&self) -> [u64; 5] {
        self.histogram
    }

    /// Number of responses.
    pub fn count(&self) -> u64 {
        self.histogram.iter().sum()
    }

    /// value = CSAT; detail = histogram, satisfied, Wilson interval, mean rating and its
    /// interval, thin flag. No sum, min or max.
    pub fn summary(&self) -> Summary {
        let n = self.count();
        if n == 0 {
            return Summary::empty(0);
        }
        let n_f = to_f64(n);
        let satisfied = self.histogram[3] + self.histogram[4];
        let p = to_f64(satisfied) / n_f;

        let z2 = Z_95 * Z_95;
        let denominator = 1.0 + z2 / n_f;
        let center = (p + z2 / (2.0 * n_f)) / denominator;
        let half = Z_95 / denominator * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();

        let scores = (CSAT_LOWEST..=CSAT_HIGHEST).map(f64::from);
        let weighted: f64 = scores
            .clone()
            .zip(self.histogram)
            .map(|(score, responses)| score * to_f64(responses))
            .sum();
        let mean = weighted / n_f;
        let mean_rating_interval = (n >= 2).then(|| {
            // Two passes over five slots: the deviations are exact enough, no cancellation.
            let squares: f64 = scores
                .zip(self.histogram)
                .map(|(score, responses)| to_f64(responses) * (score - mean) * (score - mean))
                .sum();
            let s = (squares / (n_f - 1.0)).sqrt();
            let half = Z_95 * s / n_f.sqrt();
            Interval {
                lower: mean - half,
                upper: mean + half,
                level: CONFIDENCE_LEVEL,
            }
        });

        Summary {
            value: Some(100.0 * p),
            detail: Some(Detail::Csat(CsatDetail {
                histogram: self.histogram,
                satisfied,
                interval: Interval {
                    lower: (100.0 * (center - half)).clamp(0.0, 100.0),
                    upper: (100.0 * (center + half)).clamp(0.0, 100.0),
                    level: CONFIDENCE_LEVEL,
                },
                mean_rating: mean,
                mean_rating_interval,
                thin_sample: thin(n),
            })),
            ..Summary::empty(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-9
    }

    fn nps_of(scores: &[f64]) -> NpsState {
        let mut state = NpsState::default();
        for &s in scores {
            state.record(s).unwrap();
        }
        state
    }

    #[test]
    fn nps_of_five_promoters_three_passives_two_detractors() {
        // Scores 10 10 9 9 9 | 8 7 7 | 6 0: P = 5, passives 3, D = 2, n = 10.
        // NPS = 100 (5 - 2) / 10 = 30.
        // p = 0.5, d = 0.2, x = 0.3; Var = (0.5 + 0.2 - 0.09) / 10 = 0.061;
        // sqrt(0.061) = 0.24698178; 1.96 × 0.24698178 = 0.48408429;
        // interval = 100 (0.3 ± 0.48408429) = [-18.408429, 78.408429].
        let state = nps_of(&[10.0, 10.0, 9.0, 9.0, 9.0, 8.0, 7.0, 7.0, 6.0, 0.0]);
        let summary = state.summary();
        assert!(close(summary.value.unwrap(), 30.0), "{summary:?}");
        assert_eq!(summary.count, 10);
        assert_eq!((summary.sum, summary.min, summary.max), (None, None, None));
        let Some(Detail::Nps(detail)) = summary.detail else {
            panic!("no nps detail: {summary:?}");
        };
        assert_eq!(detail.histogram, [1, 0, 0, 0, 0, 0, 1, 2, 1, 3, 2]);
        assert_eq!(
            (detail.promoters, detail.passives, detail.detractors),
            (5, 3, 2)
        );
        let half = 1.96 * 0.061_f64.sqrt();
        assert!(close(detail.interval.lower, 100.0 * (0.3 - half)));
        assert!(close(detail.interval.upper, 100.0 * (0.3 + half)));
        assert!((detail.interval.lower - -18.408429).abs() < 1e-6);
        assert!((detail.interval.upper - 78.408429).abs() < 1e-6);
        assert_eq!(detail.interval.level, 0.95);
        assert!(detail.thin_sample);
    }

    #[test]
    fn nps_interval_is_clamped_and_thin_flag_clears_at_thirty() {
        // 30 promoters: x = 1, Var = (1 + 0 - 1) / 30 = 0, interval [100, 100].
        let state = nps_of(&[10.0; 30]);
        let Some(Detail::Nps(detail)) = state.summary().detail else {
            panic!("no detail");
        };
        assert_eq!(state.summary().value, Some(100.0));
        assert_eq!(
            (detail.interval.lower, detail.interval.upper),
            (100.0, 100.0)
        );
        assert!(!detail.thin_sample);
        // 2 promoters, 1 detractor: x = 1/3, Var = (1 - 1/9) / 3 = 0.296296,
        // 1.96 sqrt(Var) = 1.066889; lower 100 (0.333333 - 1.066889) = -73.3556,
        // upper 100 (0.333333 + 1.066889) = 140.02, clamped to 100.
        let Some(Detail::Nps(detail)) = nps_of(&[9.0, 9.0, 0.0]).summary().detail else {
            panic!("no detail");
        };
        assert_eq!(detail.interval.upper, 100.0);
        assert!((detail.interval.lower - -73.3556).abs() < 1e-3);
    }

    #[test]
    fn csat_of_a_known_set() {
        // Scores 5 5 5 4 4 4 4 3 2 1: satisfied (4 or 5) = 7 of n = 10, CSAT = 70.
        // Wilson, p̂ = 0.7, z² = 3.8416: 1 + z²/n = 1.38416;
        // center = (0.7 + 0.19208) / 1.38416 = 0.64449197;
        // half = 1.96 / 1.38416 × sqrt(0.021 + 0.009604) = 1.41602127 × 0.17494 = 0.24771875;
        // interval = [39.677322, 89.221071].
        // Mean rating (15 + 16 + 3 + 2 + 1) / 10 = 3.7; squared deviations
        // 3×1.69 + 4×0.09 + 0.49 + 2.89 + 7.29 = 16.1; s = sqrt(16.1 / 9) = 1.33749351;
        // 1.96 s / sqrt(10) = 0.82898707; interval [2.8710129, 4.5289871].
        let mut state = CsatState::default();
        for s in [5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0] {
            state.record(s).unwrap();
        }
        let summary = state.summary();
        assert!(close(summary.value.unwrap(), 70.0));
        assert_eq!(summary.count, 10);
        let Some(Detail::Csat(detail)) = summary.detail else {
            panic!("no csat detail: {summary:?}");
        };
        assert_eq!(detail.histogram, [1, 1, 1, 4, 3]);
        assert_eq!(detail.satisfied, 7);
        assert!(
            (detail.interval.lower - 39.677322).abs() < 1e-5,
            "{detail:?}"
        );
        assert!(
            (detail.interval.upper - 89.221071).abs() < 1e-5,
            "{detail:?}"
        );
        assert!(close(detail.mean_rating, 3.7));
        let mean_interval = detail.mean_rating_interval.unwrap();
        assert!(
            (mean_interval.lower - 2.8710129).abs() < 1e-6,
            "{mean_interval:?}"
        );
        assert!(
            (mean_interval.upper - 4.5289871).abs() < 1e-6,
            "{mean_interval:?}"
        );
        assert!(detail.thin_sample);
    }

    #[test]
    fn csat_of_one_response_has_no_mean_interval() {
        let mut state = CsatState::default();
        state.record(5.0).unwrap();
        let Some(Detail::Csat(detail)) = state.summary().detail else {
            panic!("no detail");
        };
        assert_eq!(detail.mean_rating, 5.0);
        assert_eq!(detail.mean_rating_interval, None);
        // Wilson at p̂ = 1, n = 1: center = (1 + 1.9208) / 4.8416 = 0.60327;
        // half = 1.96 / 4.8416 × sqrt(0 + 0.9604) = 0.39673: [20.6543, 100].
        assert!((detail.interval.lower - 20.6543).abs() < 1e-3, "{detail:?}");
        assert!(close(detail.interval.upper, 100.0));
    }

    #[test]
    fn scores_out_of_range_are_refused_without_change() {
        let mut nps = NpsState::default();
        for bad in [-1.0, 11.0, 7.5, f64::NAN] {
            assert!(matches!(
                nps.record(bad),
                Err(AggregateError::NotAScore { .. })
            ));
        }
        let mut csat = CsatState::default();
        for bad in [0.0, 6.0, 4.2] {
            assert!(csat.record(bad).is_err());
        }
        assert_eq!((nps.count(), csat.count()), (0, 0));
        assert!(matches!(
            csat.retract(3.0),
            Err(AggregateError::NothingToRetract { .. })
        ));
    }
}
