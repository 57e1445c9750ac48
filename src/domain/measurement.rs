//! Measurements and the rules a measurement obeys against its KPI's definition.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};

use super::kpi::{MAX_DIMENSIONS, validate_len};
use super::{KpiDefinition, KpiKind, Rejection};

/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 128;
/// Longest subject, in bytes (room for a UUID, an e-mail hash or a URL-ish visitor key).
pub const MAX_SUBJECT_LEN: usize = 256;
/// Longest event_id, in bytes (room for any UUID or ULID format with a prefix).
pub const MAX_EVENT_ID_LEN: usize = 128;

/// Largest magnitude of a value. With values bounded by it, no sum, mean or variance of
/// any number of measurements (fewer than 2^64) can overflow to infinity: a sum stays
/// below 2 × 10^119 and a sum of squared deviations below 8 × 10^219, so an aggregate is
/// never left infinite by a value that an offsetting one cannot undo.
pub const MAX_VALUE_MAGNITUDE: f64 = 1e100;

/// One measurement of a KPI.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The KPI measured.
    pub kpi_id: String,
    /// The value; finite.
    pub value: f64,
    /// When the measured thing happened; decides the bucket.
    pub occurred_at: DateTime<Utc>,
    /// Label values by declared dimension.
    pub labels: BTreeMap<String, String>,
    /// What was measured (a visitor id for DISTINCT).
    pub subject: Option<String>,
    /// Client-chosen idempotency key.
    pub event_id: Option<String>,
}

/// The time-dependent rules of ingest, fixed for one request.
#[derive(Debug, Clone, Copy)]
pub struct TimeRules {
    /// The server's time when the request arrived.
    pub now: DateTime<Utc>,
    /// How far in the future occurred_at may be (clocks of clients drift).
    pub max_future_skew: TimeDelta,
}

impl TimeRules {
    /// Earliest accepted occurred_at: the Unix epoch. Calendars and sketches need no
    /// history before it, and it catches clients sending seconds where nanos were meant.
    pub const EARLIEST: DateTime<Utc> = DateTime::UNIX_EPOCH;
}

impl Measurement {
    /// Checks the measurement against the definition of its KPI. The caller has found the
    /// KPI and checked that it is not retired.
    pub fn validate(&self, kpi: &KpiDefinition, rules: &TimeRules) -> Result<(), Rejection> {
        if kpi.kind == KpiKind::Ratio {
            return Err(Rejection::precondition(
                "kpi_id",
                format!(
                    "kpi '{}' is a RATIO kpi: record its numerator and denominator kpis instead",
                    kpi.id
                ),
            ));
        }
        if !self.value.is_finite() {
            return Err(Rejection::invalid(
                "value",
                format!("must be finite, got {}", self.value),
            ));
        }
        if self.value.abs() > MAX_VALUE_MAGNITUDE {
            return Err(Rejection::invalid(
                "value",
                format!(
                    "must be within ±{MAX_VALUE_MAGNITUDE:e}, got {:e}",
                    self.value
                ),
            ));
        }
        match kpi.kind {
            KpiKind::Nps => check_score(self.value, 0, 10, "NPS")?,
            KpiKind::Csat => check_score(self.value, 1, 5, "CSAT")?,
            _ => {}
        }
        if self.occurred_at < TimeRules::EARLIEST {
            return Err(Rejection::invalid(
                "occurred_at",
                format!(
                    "{} is before 1970-01-01T00:00:00Z",
                    super::rfc3339(self.occurred_at)
                ),
            ));
        }
        let latest = rules.now + rules.max_future_skew;
        if self.occurred_at > latest {
            return Err(Rejection::invalid(
                "occurred_at",
                format!(
                    "{} is more than {} s in the future (server time {})",
                    super::rfc3339(self.occurred_at),
                    rules.max_future_skew.num_seconds(),
                    super::rfc3339(rules.now)
                ),
            ));
        }
        if self.labels.len() > MAX_DIMENSIONS {
            return Err(Rejection::invalid(
                "labels",
                format!(
                    "at most {MAX_DIMENSIONS} labels (one per declared dimension), got {}",
                    self.labels.len()
                ),
            ));
        }
        for (key, value) in &self.labels {
            if !kpi.dimensions.iter().any(|d| d == key) {
                return Err(Rejection::invalid(
                    format!("labels[{key:?}]"),
                    format!(
                        "'{key}' is not a declared dimension of kpi '{}' (declared: [{}])",
                        kpi.id,
                        kpi.dimensions.join(", ")
                    ),
                ));
            }
            if value.is_empty() {
                return Err(Rejection::invalid(
                    format!("labels[{key:?}]"),
                    "value must not be empty",
                ));
            }
            validate_len(value, MAX_LABEL_VALUE_LEN, &format!("labels[{key:?}]"))?;
        }
        match &self.subject {
            Some(subject) => validate_len(subject, MAX_SUBJECT_LEN, "subject")?,
            None if kpi.kind == KpiKind::Distinct => {
                return Err(Rejection::invalid(
                    "subject",
                    format!("required for DISTINCT kpi '{}'", kpi.id),
                ));
            }
            None => {}
        }
        if let Some(event_id) = &self.event_id {
            validate_len(event_id, MAX_EVENT_ID_LEN, "event_id")?;
        }
        Ok(())
    }
}

/// NPS and CSAT take integer scores within a closed range.
fn check_score(value: f64, low: u8, high: u8, kind: &str) -> Result<(), Rejection> {
    if value.fract() != 0.0 || value < f64::from(low) || value > f64::from(high) {
        return Err(Rejection::invalid(
            "value",
            format!("{kind} scores are integers {low}..{high}, got {value}"),
        ));
    }
    Ok(())
}

/// Where one measurement of a batch is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Its seq, or the original's for a duplicate.
    pub seq: u64,
    /// Whether its event_id was already stored.
    pub duplicate: bool,
}

/// The measurement a retraction withdraws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetractTarget {
    /// By the seq of its MeasurementRecorded event.
    Seq(u64),
    /// By its event_id (within the deduplication window).
    EventId(String),
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use chrono_tz::Tz;

    use super::*;
    use crate::domain::Direction;

    fn kpi(kind: KpiKind) -> KpiDefinition {
        KpiDefinition {
            id: "k".into(),
            name: "K".into(),
            description: String::new(),
            unit: String::new(),
            kind,
            direction: Direction::HigherIsBetter,
            timezone: Tz::UTC,
            dimensions: vec!["channel".into()],
            ratio: None,
        }
    }

    fn rules() -> TimeRules {
        TimeRules {
            now: Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap(),
            max_future_skew: TimeDelta::minutes(5),
        }
    }

    fn measurement(value: f64) -> Measurement {
        Measurement {
            kpi_id: "k".into(),
            value,
            occurred_at: rules().now,
            labels: BTreeMap::new(),
            subject: None,
            event_id: None,
        }
    }

    fn field_of(m: &Measurement, kind: KpiKind) -> Option<String> {
        m.validate(&kpi(kind), &rules())
            .err()
            .and_then(|e| e.field().map(str::to_owned))
    }

    #[test]
    fn values_must_be_finite() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                field_of(&measurement(v), KpiKind::Sum).as_deref(),
                Some("value")
            );
        }
        assert_eq!(field_of(&measurement(-1.5), KpiKind::Sum), None);
    }

    #[test]
    fn values_are_bounded_so_that_no_aggregate_can_overflow() {
        for kind in [KpiKind::Sum, KpiKind::Average, KpiKind::Count] {
            for v in [MAX_VALUE_MAGNITUDE, -MAX_VALUE_MAGNITUDE, 0.0] {
                assert_eq!(field_of(&measurement(v), kind), None, "{kind:?} {v}");
            }
            for v in [1.01e100, -1e101, f64::MAX, f64::MIN] {
                assert_eq!(field_of(&measurement(v), kind).as_deref(), Some("value"));
            }
        }
        // The bound's promise: the largest sum and sum of squared deviations of 2^64
        // values at the bound are finite.
        let count = 2.0_f64.powi(64);
        assert!((MAX_VALUE_MAGNITUDE * count).is_finite());
        assert!(((2.0 * MAX_VALUE_MAGNITUDE).powi(2) * count).is_finite());
    }

    #[test]
    fn scores_are_integers_in_range() {
        for (kind, ok, bad) in [
            (KpiKind::Nps, [0.0, 10.0], [-1.0, 11.0, 7.5]),
            (KpiKind::Csat, [1.0, 5.0], [0.0, 6.0, 4.5]),
        ] {
            for v in ok {
                assert_eq!(field_of(&measurement(v), kind), None, "{kind:?} {v}");
            }
            for v in bad {
                assert_eq!(
                    field_of(&measurement(v), kind).as_deref(),
                    Some("value"),
                    "{kind:?} {v}"
                );
            }
        }
    }

    #[test]
    fn occurred_at_is_bounded() {
        let mut m = measurement(1.0);
        m.occurred_at = rules().now + TimeDelta::minutes(5);
        assert_eq!(field_of(&m, KpiKind::Sum), None);
        m.occurred_at = rules().now + TimeDelta::minutes(6);
        assert_eq!(field_of(&m, KpiKind::Sum).as_deref(), Some("occurred_at"));
        m.occurred_at = DateTime::UNIX_EPOCH - TimeDelta::seconds(1);
        assert_eq!(field_of(&m, KpiKind::Sum).as_deref(), Some("occurred_at"));
    }

    #[test]
    fn labels_must_be_declared_and_short() {
        let mut m = measurement(1.0);
        m.labels.insert("channel".into(), "web".into());
        assert_eq!(field_of(&m, KpiKind::Sum), None);
        m.labels.insert("country".into(), "nl".into());
        assert_eq!(
            field_of(&m, KpiKind::Sum).as_deref(),
            Some("labels[\"country\"]")
        );
        m.labels.remove("country");
        m.labels.insert("channel".into(), "x".repeat(129));
        assert_eq!(
            field_of(&m, KpiKind::Sum).as_deref(),
            Some("labels[\"channel\"]")
        );
    }

    #[test]
    fn distinct_needs_a_subject_and_ratio_takes_nothing() {
        let mut m = measurement(1.0);
        assert_eq!(field_of(&m, KpiKind::Distinct).as_deref(), Some("subject"));
        m.subject = Some("visitor-1".into());
        assert_eq!(field_of(&m, KpiKind::Distinct), None);
        let err = m.validate(&kpi(KpiKind::Ratio), &rules()).unwrap_err();
        assert!(matches!(err, Rejection::FailedPrecondition { .. }), "{err}");
    }
}
