//! The verdict on a SMART target at a time t: elapsed fraction, pace, projection, state and
//! a reason a person can read (SPEC, Targets).
//!
//! Formulas, with f the elapsed fraction of the window [start, deadline):
//! - f = clamp((t − start) / (deadline − start), 0, 1)
//! - expected_now = target × f (linear pace); progress = actual / target
//! - projected = the caller's forecast at the deadline (least squares over the window's
//!   buckets so far, with its 95 % interval) or, without one, actual / f
//! - required_rate = (target − actual) / periods left until the deadline
//! - "meets x" is x ≥ target for HIGHER_IS_BETTER and x ≤ target for LOWER_IS_BETTER;
//!   "within tolerance" is x ≥ target − tol·|target| (mirrored for lower-is-better).
//!
//! States: after the deadline ACHIEVED or MISSED (and the projection is the final actual);
//! before it ACHIEVED as soon as a higher-is-better cumulative actual meets the target,
//! ON_TRACK when the projection meets it, AT_RISK when the projection is within the
//! tolerance or only the favourable bound of its interval meets it, OFF_TRACK otherwise.
//!
//! Windows and periods are half-open, [start, end): a target is under way from its start
//! instant on. Before it: ON_TRACK ("not started"). A window or period that has started
//! but has nothing to project from yet (the start instant itself, or a LEVEL period
//! without measurements) is AT_RISK ("no data yet").

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::Direction;

/// Where a target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetState {
    /// Met.
    Achieved,
    /// The projection meets the target.
    OnTrack,
    /// The projection misses by at most the tolerance, or only its interval's favourable
    /// bound meets the target.
    AtRisk,
    /// The projection misses by more than the tolerance.
    OffTrack,
    /// The deadline passed without the target met.
    Missed,
}

/// A forecast with its 95 % interval, when one could be computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The point forecast.
    pub value: f64,
    /// Lower bound of the interval.
    pub lower: Option<f64>,
    /// Upper bound of the interval.
    pub upper: Option<f64>,
}

/// What is known of a target at the evaluation time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// The target value.
    pub target: f64,
    /// Which way is good.
    pub direction: Direction,
    /// Relative shortfall still AT_RISK.
    pub tolerance: f64,
    /// Start of the window.
    pub start: DateTime<Utc>,
    /// End of the window (exclusive).
    pub deadline: DateTime<Utc>,
    /// The evaluation time.
    pub now: DateTime<Utc>,
    /// The KPI's value so far (the cumulative sum, or the current level).
    pub actual: Option<f64>,
    /// The caller's forecast at the deadline, if it has one.
    pub forecast: Option<Estimate>,
    /// Periods of the target's grain left until the deadline (fractional).
    pub periods_left: f64,
}

/// The verdict on a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The state.
    pub state: TargetState,
    /// One line for a person.
    pub reason: String,
    /// f, clamped to 0..1.
    pub elapsed_fraction: f64,
    /// target × f.
    pub expected_now: f64,
    /// actual / target (None for a target of 0 or no actual).
    pub progress: Option<f64>,
    /// The projection at the deadline.
    pub projected: Option<Estimate>,
    /// What is needed per period for the rest of the window (None when met or over).
    pub required_rate: Option<f64>,
}

/// f = clamp((t − start) / (deadline − start), 0, 1).
pub fn elapsed_fraction(start: DateTime<Utc>, deadline: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    let total = (deadline - start).num_milliseconds();
    if total <= 0 {
        return 1.0;
    }
    let elapsed = (now - start).num_milliseconds().clamp(0, total);
    // Millisecond counts of real windows are far below 2^53, so both convert exactly.
    elapsed as f64 / total as f64
}

impl Progress {
    fn meets(&self, value: f64) -> bool {
        match self.direction {
            Direction::HigherIsBetter => value >= self.target,
            Direction::LowerIsBetter => value <= self.target,
        }
    }

    fn within_tolerance(&self, value: f64) -> bool {
        let slack = self.tolerance * self.target.abs();
        match self.direction {
            Direction::HigherIsBetter => value >= self.target - slack,
            Direction::LowerIsBetter => value <= self.target + slack,
        }
    }

    /// The favourable bound of an interval: the upper one when more is better.
    fn favourable_bound(&self, estimate: &Estimate) -> Option<f64> {
        match self.direction {
            Direction::HigherIsBetter => estimate.upper,
            Direction::LowerIsBetter => estimate.lower,
        }
    }

    /// Judges a cumulative target (the KPI summed over the window so far).
    pub fn judge_cumulative(&self, tz: Tz) -> Verdict {
        let f = elapsed_fraction(self.start, self.deadline, self.now);
        let actual = self.actual.unwrap_or(0.0);
        let projected = if self.now >= self.deadline {
            // Nothing is left to forecast: the value at the deadline is the final actual.
            Some(Estimate {
                value: actual,
                lower: None,
                upper: None,
            })
        } else {
            self.forecast.or_else(|| {
                (f > 0.0).then_some(Estimate {
                    value: actual / f,
                    lower: None,
                    upper: None,
                })
            })
        };
        let required_rate = (!self.meets(actual) && self.periods_left > 0.0)
            .then(|| (self.target - actual) / self.periods_left);
        let by = last_day(self.deadline, tz);
        let (state, reason) = if self.now >= self.deadline {
            if self.meets(actual) {
                (
                    TargetState::Achieved,
                    format!(
                        "achieved: {} of {} by {by}",
                        number(actual),
                        number(self.target)
                    ),
                )
            } else {
                (
                    TargetState::Missed,
                    format!(
                        "missed: {} of {} by {by}",
                        number(actual),
                        number(self.target)
                    ),
                )
            }
        } else if self.direction == Direction::HigherIsBetter && self.meets(actual) {
            (
                TargetState::Achieved,
                format!(
                    "achieved early: {} of {}",
                    number(actual),
                    number(self.target)
                ),
            )
        } else if self.now < self.start {
            (
                TargetState::OnTrack,
                format!(
                    "not started: {} due by {by}, starting {}",
                    number(self.target),
                    last_day(self.start + chrono::TimeDelta::nanoseconds(1), tz)
                ),
            )
        } else {
            self.judge_projection(projected, &by)
        };
        Verdict {
            state,
            reason,
            elapsed_fraction: f,
            expected_now: self.target * f,
            progress: (self.target != 0.0).then(|| actual / self.target),
            projected,
            required_rate,
        }
    }

    /// ON_TRACK, AT_RISK or OFF_TRACK from a projection at the deadline.
    fn judge_projection(&self, projected: Option<Estimate>, by: &str) -> (TargetState, String) {
        let Some(estimate) = projected else {
            // At the start instant nothing has elapsed: too early to project, as a LEVEL
            // period without measurements yet.
            let so_far = self.actual.unwrap_or(0.0);
            return (
                TargetState::AtRisk,
                if so_far == 0.0 {
                    format!("no data yet: {} due by {by}", number(self.target))
                } else {
                    format!(
                        "too early to project: {} of {} due by {by}",
                        number(so_far),
                        number(self.target)
                    )
                },
            );
        };
        let line = format!(
            "projected {} of {} by {by}",
            number(estimate.value),
            number(self.target)
        );
        if self.meets(estimate.value) {
            (TargetState::OnTrack, line)
        } else if self.within_tolerance(estimate.value)
            || self
                .favourable_bound(&estimate)
                .is_some_and(|b| self.meets(b))
        {
            (TargetState::AtRisk, line)
        } else {
            (TargetState::OffTrack, line)
        }
    }

    /// Judges one period of a LEVEL target: a finished period is ACHIEVED or MISSED; the
    /// current one is ON_TRACK when its value so far meets the target, AT_RISK within the
    /// tolerance or without measurements yet, OFF_TRACK otherwise.
    pub fn judge_period(&self, value: Option<f64>, finished: bool) -> TargetState {
        match (value, finished) {
            (Some(v), true) if self.meets(v) => TargetState::Achieved,
            (_, true) => TargetState::Missed,
            (Some(v), false) if self.meets(v) => TargetState::OnTrack,
            (Some(v), false) if self.within_tolerance(v) => TargetState::AtRisk,
            (None, false) => TargetState::AtRisk,
            (Some(_), false) => TargetState::OffTrack,
        }
    }
}

/// The last day of a window ending (exclusively) at `deadline`, in the KPI's timezone:
/// "30 Jun 2026" for a deadline of 1 July.
fn last_day(deadline: DateTime<Utc>, tz: Tz) -> String {
    (deadline - chrono::TimeDelta::nanoseconds(1))
        .with_timezone(&tz)
        .format("%-d %b %Y")
        .to_string()
}

/// A number for a person: whole numbers without decimals, others with at most two.
fn number(value: f64) -> String {
    let rounded = (value * 100.0).round() / 100.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.0}")
    } else {
        let text = format!("{rounded:.2}");
        text.trim_end_matches('0').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn day(m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, m, d, 0, 0, 0).unwrap()
    }

    /// "50 new customers in six months": [1 Jan, 1 Jul) 2026, 181 days.
    fn fifty(now: DateTime<Utc>, actual: f64) -> Progress {
        Progress {
            target: 50.0,
            direction: Direction::HigherIsBetter,
            tolerance: 0.10,
            start: day(1, 1),
            deadline: day(7, 1),
            now,
            actual: Some(actual),
            forecast: None,
            periods_left: 3.0,
        }
    }

    #[test]
    fn elapsed_fraction_is_clamped() {
        // 1 Apr is day 90 of 181: f = 90/181.
        assert!((elapsed_fraction(day(1, 1), day(7, 1), day(4, 1)) - 90.0 / 181.0).abs() < 1e-12);
        assert_eq!(elapsed_fraction(day(1, 1), day(7, 1), day(1, 1)), 0.0);
        assert_eq!(elapsed_fraction(day(1, 1), day(7, 1), day(12, 1)), 1.0);
        assert_eq!(elapsed_fraction(day(1, 1), day(1, 1), day(1, 1)), 1.0);
    }

    #[test]
    fn ahead_on_pace_behind_achieved_and_missed() {
        // Ahead: 30 by 1 Apr -> projected 30 / (90/181) = 60.33 >= 50.
        let ahead = fifty(day(4, 1), 30.0).judge_cumulative(Tz::UTC);
        assert_eq!(ahead.state, TargetState::OnTrack);
        assert_eq!(ahead.reason, "projected 60.33 of 50 by 30 Jun 2026");
        // expected_now = 50 x 90/181 = 24.86; required_rate = (50 - 30) / 3 = 6.67.
        assert!((ahead.expected_now - 50.0 * 90.0 / 181.0).abs() < 1e-9);
        assert!((ahead.required_rate.unwrap() - 20.0 / 3.0).abs() < 1e-12);
        assert_eq!(ahead.progress, Some(0.6));
        // Slightly behind: 23 -> 46.26, within 10 % of 50 (>= 45): at risk.
        let behind = fifty(day(4, 1), 23.0).judge_cumulative(Tz::UTC);
        assert_eq!(behind.state, TargetState::AtRisk);
        // Far behind: 20 -> 40.22 < 45: off track.
        assert_eq!(
            fifty(day(4, 1), 20.0).judge_cumulative(Tz::UTC).state,
            TargetState::OffTrack
        );
        // Achieved early: 50 by 1 Mar.
        let early = fifty(day(3, 1), 50.0).judge_cumulative(Tz::UTC);
        assert_eq!(early.state, TargetState::Achieved);
        assert_eq!(early.required_rate, None);
        // Deadline passed with 43: missed.
        let missed = fifty(day(7, 1), 43.0).judge_cumulative(Tz::UTC);
        assert_eq!(missed.state, TargetState::Missed);
        assert_eq!(missed.reason, "missed: 43 of 50 by 30 Jun 2026");
    }

    #[test]
    fn the_interval_can_put_a_miss_at_risk() {
        // Projected 40 (beyond the 10 % tolerance) but the upper bound 52 meets 50.
        let progress = Progress {
            forecast: Some(Estimate {
                value: 40.0,
                lower: Some(28.0),
                upper: Some(52.0),
            }),
            ..fifty(day(4, 1), 20.0)
        };
        assert_eq!(
            progress.judge_cumulative(Tz::UTC).state,
            TargetState::AtRisk
        );
    }

    #[test]
    fn not_started_and_zero_elapsed() {
        let before = fifty(Utc.with_ymd_and_hms(2025, 12, 1, 0, 0, 0).unwrap(), 0.0)
            .judge_cumulative(Tz::UTC);
        assert_eq!(before.state, TargetState::OnTrack);
        assert_eq!(before.elapsed_fraction, 0.0);
        assert_eq!(before.projected, None);
        assert!(
            before.reason.starts_with("not started"),
            "{}",
            before.reason
        );
        // At the very start f = 0: under way, but no pace to project from yet.
        let at_start = fifty(day(1, 1), 0.0).judge_cumulative(Tz::UTC);
        assert_eq!(at_start.projected, None);
        assert_eq!(at_start.state, TargetState::AtRisk);
        assert!(
            at_start.reason.starts_with("no data yet"),
            "{}",
            at_start.reason
        );
    }

    #[test]
    fn lower_is_better_mirrors_every_comparison() {
        // Reply time at most 4 h, tolerance 10 % (up to 4.4 h is at risk).
        let reply = |value: f64| Progress {
            target: 4.0,
            direction: Direction::LowerIsBetter,
            forecast: Some(Estimate {
                value,
                lower: None,
                upper: None,
            }),
            ..fifty(day(4, 1), value)
        };
        assert_eq!(
            reply(3.5).judge_cumulative(Tz::UTC).state,
            TargetState::OnTrack
        );
        assert_eq!(
            reply(4.3).judge_cumulative(Tz::UTC).state,
            TargetState::AtRisk
        );
        assert_eq!(
            reply(5.0).judge_cumulative(Tz::UTC).state,
            TargetState::OffTrack
        );
        // Lower-is-better is never achieved early: it is judged at the deadline.
        assert_ne!(
            reply(1.0).judge_cumulative(Tz::UTC).state,
            TargetState::Achieved
        );
        let done = Progress {
            now: day(7, 1),
            ..reply(3.9)
        };
        assert_eq!(done.judge_cumulative(Tz::UTC).state, TargetState::Achieved);
    }

    #[test]
    fn level_periods() {
        // NPS at least 40 per quarter, tolerance 10 % (36 is at risk).
        let nps = Progress {
            target: 40.0,
            ..fifty(day(5, 1), 0.0)
        };
        assert_eq!(nps.judge_period(Some(42.0), true), TargetState::Achieved);
        assert_eq!(nps.judge_period(Some(39.0), true), TargetState::Missed);
        assert_eq!(nps.judge_period(None, true), TargetState::Missed);
        assert_eq!(nps.judge_period(Some(40.0), false), TargetState::OnTrack);
        assert_eq!(nps.judge_period(Some(36.0), false), TargetState::AtRisk);
        assert_eq!(nps.judge_period(Some(30.0), false), TargetState::OffTrack);
        assert_eq!(nps.judge_period(None, false), TargetState::AtRisk);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(43.0), "43");
        assert_eq!(number(60.3314), "60.33");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(-1.0), "-1");
    }

    #[test]
    fn the_last_day_is_in_the_kpi_timezone() {
        // Deadline 1 Jul 00:00 Amsterdam = 30 Jun 22:00 UTC: the last day is 30 Jun there.
        let deadline = Utc.with_ymd_and_hms(2026, 6, 30, 22, 0, 0).unwrap();
        assert_eq!(last_day(deadline, Tz::Europe__Amsterdam), "30 Jun 2026");
    }
}
