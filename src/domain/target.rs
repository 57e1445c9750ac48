//! SMART targets as the log stores them: a value a KPI must reach within a window.

use chrono::{DateTime, Utc};

use super::Grain;

/// How a target's actual value is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetMode {
    /// The KPI summed over the whole window must reach the value.
    Cumulative,
    /// The KPI's value over each period must meet the value.
    Level,
}

/// A target on a KPI, as set by a client.
#[derive(Debug, Clone, PartialEq)]
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
