//! SMART targets as the log stores them: a value a KPI must reach within a window.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::kpi::{MAX_NAME_LEN, validate_len, validate_slug};
use super::{Grain, Rejection};

/// How a target's actual value is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetMode {
    /// The KPI summed over the whole window must reach the value.
    Cumulative,
    /// The KPI's value over each period must meet the value.
    Level,
}

/// A target on a KPI, as set by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetDefinition {
    /// Slug, unique across KPIs.
    pub id: String,
    /// The KPI the target is on.
    pub kpi_id: String,
    /// Human-readable name.
    pub name: String,
    /// The value to reach.
    pub value: f64,
    /// Start of the window (inclusive).
    pub start: DateTime<Utc>,
    /// End of the window (exclusive).
    pub deadline: DateTime<Utc>,
    /// Cumulative or level.
    pub mode: TargetMode,
    /// Period of a level target.
    pub period_grain: Option<Grain>,
    /// Relative shortfall still reported at risk rather than off track.
    pub tolerance: f64,
}

/// Largest tolerance of a target: a shortfall of more than the whole target is not "at risk".
pub const MAX_TOLERANCE: f64 = 1.0;

/// Most periods (buckets of [`TargetDefinition::period_grain`]) in a target's window:
/// its status is computed from all of them at once, in one query of the buckets (within
/// the query limit, `projection::aggregates::MAX_BUCKETS_PER_QUERY`).
pub const MAX_TARGET_PERIODS: u64 = 100_000;

impl TargetDefinition {
    /// The grain of the target's periods: `period_grain`, or by default DAY for a
    /// CUMULATIVE target (whose running total is projected day by day) and MONTH for a
    /// LEVEL one.
    pub fn period_grain(&self) -> Grain {
        self.period_grain.unwrap_or(match self.mode {
            TargetMode::Cumulative => Grain::Day,
            TargetMode::Level => Grain::Month,
        })
    }

    /// Refuses a window of more than [`MAX_TARGET_PERIODS`] periods in the KPI's
    /// timezone `tz`: its status could never be answered.
    pub fn check_periods(&self, tz: chrono_tz::Tz, field: &str) -> Result<(), Rejection> {
        let grain = self.period_grain();
        let periods = super::calendar::count_buckets(grain, tz, self.start, self.deadline);
        if periods > MAX_TARGET_PERIODS {
            return Err(Rejection::invalid(
                format!("{field}.deadline"),
                format!(
                    "the window from start to deadline spans {periods} {grain:?} periods, at most {MAX_TARGET_PERIODS}: use a coarser period_grain or a shorter window"
                ),
            ));
        }
        Ok(())
    }

    /// Checks every rule that needs nothing but the target itself; the catalog checks the
    /// KPI it is on.
    pub fn validate(&self, field: &str) -> Result<(), Rejection> {
        validate_slug(&self.id, &format!("{field}.id"))?;
        validate_slug(&self.kpi_id, &format!("{field}.kpi_id"))?;
        if self.name.is_empty() {
            return Err(Rejection::invalid(
                format!("{field}.name"),
                "must not be empty",
            ));
        }
        validate_len(&self.name, MAX_NAME_LEN, &format!("{field}.name"))?;
        if !self.value.is_finite() {
            return Err(Rejection::invalid(
                format!("{field}.value"),
                format!("must be finite, got {}", self.value),
            ));
        }
        if self.deadline <= self.start {
            return Err(Rejection::invalid(
                format!("{field}.deadline"),
                format!("must be after start ({})", super::rfc3339(self.start)),
            ));
        }
        if self.start < DateTime::UNIX_EPOCH {
            return Err(Rejection::invalid(
                format!("{field}.start"),
                "must not be before 1970-01-01T00:00:00Z",
            ));
        }
        if self.mode == TargetMode::Level && self.period_grain.is_none() {
            return Err(Rejection::invalid(
                format!("{field}.period_grain"),
                "required for a LEVEL target",
            ));
        }
        if !(self.tolerance.is_finite() && (0.0..=MAX_TOLERANCE).contains(&self.tolerance)) {
            return Err(Rejection::invalid(
                format!("{field}.tolerance"),
                format!("must be within 0..={MAX_TOLERANCE}, got {}", self.tolerance),
            ));
        }
        Ok(())
    }
}
