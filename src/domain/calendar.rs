//! Calendar grains: the bucket sizes KPIs are aggregated and judged by.

/// A calendar bucket size, computed in the KPI's timezone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grain {
    /// One clock hour.
    Hour,
    /// Local midnight to local midnight.
    Day,
    /// ISO week, Monday start.
    Week,
    /// Calendar month.
    Month,
    /// Calendar quarter.
    Quarter,
    /// Calendar year.
    Year,
}
