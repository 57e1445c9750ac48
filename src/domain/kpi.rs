//! KPI definitions: kinds, directions, timezones, dimensions, and the rules a definition obeys.

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::Rejection;

/// Longest KPI id, target id or dimension name, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Most dimensions a KPI may declare: every label combination is a series, so more keys
/// multiply the state a projection keeps.
pub const MAX_DIMENSIONS: usize = 8;
/// Longest KPI name, in bytes.
pub const MAX_NAME_LEN: usize = 200;
/// Longest description or reason, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 2000;
/// Longest unit, in bytes.
pub const MAX_UNIT_LEN: usize = 32;
/// Scale of a RATIO KPI when the client gives none: a percentage.
pub const DEFAULT_RATIO_SCALE: f64 = 100.0;

/// How the measurements of one bucket combine into its value (see SPEC, KPI definitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KpiKind {
    /// Sum of values.
    Sum,
    /// Number of measurements.
    Count,
    /// Mean of values.
    Average,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Value with the latest occurred_at.
    Last,
    /// scale x sum(numerator) / sum(denominator), over two other KPIs.
    Ratio,
    /// Net Promoter Score over integer scores 0..10.
    Nps,
    /// Customer satisfaction over integer scores 1..5.
    Csat,
    /// Quantiles from a mergeable sketch.
    Percentile,
    /// Approximate number of distinct subjects.
    Distinct,
}

impl KpiKind {
    /// Every kind that keeps bucket state of its own (all but RATIO, which divides the
    /// sums of two other KPIs).
    pub const MEASURED: [KpiKind; 10] = [
        Self::Sum,
        Self::Count,
        Self::Average,
        Self::Min,
        Self::Max,
        Self::Last,
        Self::Nps,
        Self::Csat,
        Self::Percentile,
        Self::Distinct,
    ];

    /// Whether "the sum of this KPI over a bucket" is meaningful, which is what a RATIO's
    /// numerator and denominator need.
    pub fn is_summable(self) -> bool {
        matches!(self, Self::Sum | Self::Count)
    }
}

/// Which way is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Direction {
    /// A larger value is better.
    #[default]
    HigherIsBetter,
    /// A smaller value is better.
    LowerIsBetter,
}

/// The two KPIs a RATIO KPI divides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioSettings {
    /// KPI summed above the line.
    pub numerator_kpi_id: String,
    /// KPI summed below the line.
    pub denominator_kpi_id: String,
    /// Multiplier, 100 for a percentage.
    pub scale: f64,
}

/// A KPI as declared by a client, defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KpiDefinition {
    /// Slug `[a-z0-9_]{1,64}`.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Unit shown next to values.
    pub unit: String,
    /// How measurements combine.
    pub kind: KpiKind,
    /// Which way is good.
    pub direction: Direction,
    /// Timezone of the calendar buckets.
    pub timezone: Tz,
    /// Declared label keys, in declaration order.
    pub dimensions: Vec<String>,
    /// Present exactly when `kind` is `Ratio`.
    pub ratio: Option<RatioSettings>,
}

impl KpiDefinition {
    /// Checks every rule that needs nothing but the definition itself. Rules that depend on
    /// other KPIs (a ratio's operands) are checked by the catalog.
    ///
    /// `field` is the path of the definition in the request, such as `definition`.
    pub fn validate(&self, field: &str) -> Result<(), Rejection> {
        validate_slug(&self.id, &format!("{field}.id"))?;
        if self.name.is_empty() {
            return Err(Rejection::invalid(
                format!("{field}.name"),
                "must not be empty",
            ));
        }
        validate_len(&self.name, MAX_NAME_LEN, &format!("{field}.name"))?;
        validate_len(
            &self.description,
            MAX_DESCRIPTION_LEN,
            &format!("{field}.description"),
        )?;
        validate_len(&self.unit, MAX_UNIT_LEN, &format!("{field}.unit"))?;
        if self.dimensions.len() > MAX_DIMENSIONS {
            return Err(Rejection::invalid(
                format!("{field}.dimensions"),
                format!(
                    "at most {MAX_DIMENSIONS} dimensions, got {}",
                    self.dimensions.len()
                ),
            ));
        }
        for (i, dimension) in self.dimensions.iter().enumerate() {
            let path = format!("{field}.dimensions[{i}]");
            validate_slug(dimension, &path)?;
            if self.dimensions[..i].contains(dimension) {
                return Err(Rejection::invalid(
                    path,
                    format!("dimension '{dimension}' is declared twice"),
                ));
            }
        }
        match (&self.ratio, self.kind) {
            (None, KpiKind::Ratio) => Err(Rejection::invalid(
                format!("{field}.ratio"),
                "required for a RATIO kpi",
            )),
            (Some(_), kind) if kind != KpiKind::Ratio => Err(Rejection::invalid(
                format!("{field}.ratio"),
                "only allowed for a RATIO kpi",
            )),
            (Some(ratio), _) => {
                validate_slug(
                    &ratio.numerator_kpi_id,
                    &format!("{field}.ratio.numerator_kpi_id"),
                )?;
                validate_slug(
                    &ratio.denominator_kpi_id,
                    &format!("{field}.ratio.denominator_kpi_id"),
                )?;
                if !(ratio.scale.is_finite() && ratio.scale > 0.0) {
                    return Err(Rejection::invalid(
                        format!("{field}.ratio.scale"),
                        "must be finite and greater than 0",
                    ));
                }
                if ratio.numerator_kpi_id == self.id || ratio.denominator_kpi_id == self.id {
                    return Err(Rejection::invalid(
                        format!("{field}.ratio"),
                        "a ratio kpi cannot refer to itself",
                    ));
                }
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }
}

/// Checks an identifier: 1 to 64 characters of `[a-z0-9_]`.
///
/// ```
/// use kpi_service::domain::kpi::validate_slug;
///
/// assert!(validate_slug("new_customers", "definition.id").is_ok());
/// let rejection = validate_slug("New-Customers", "definition.id").unwrap_err();
/// assert_eq!(rejection.field(), Some("definition.id"));
/// ```
pub fn validate_slug(value: &str, field: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Rejection::invalid(
            field,
            format!("at most {MAX_ID_LEN} characters, got {}", value.len()),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        return Err(Rejection::invalid(
            field,
            format!("only [a-z0-9_] allowed, found {bad:?}"),
        ));
    }
    Ok(())
}

/// Checks that a string is at most `max` bytes long.
pub fn validate_len(value: &str, max: usize, field: &str) -> Result<(), Rejection> {
    if value.len() > max {
        return Err(Rejection::invalid(
            field,
            format!("at most {max} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

/// Parses an IANA timezone name; empty means UTC.
pub fn parse_timezone(name: &str, field: &str) -> Result<Tz, Rejection> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    name.parse::<Tz>().map_err(|_| {
        Rejection::invalid(
            field,
            format!("unknown IANA timezone {name:?} (use a name such as \"Europe/Amsterdam\")"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revenue() -> KpiDefinition {
        KpiDefinition {
            id: "revenue".into(),
            name: "Revenue".into(),
            description: String::new(),
            unit: "EUR".into(),
            kind: KpiKind::Sum,
            direction: Direction::HigherIsBetter,
            timezone: Tz::Europe__Amsterdam,
            dimensions: vec!["channel".into()],
            ratio: None,
        }
    }

    #[test]
    fn a_plain_definition_is_valid() {
        assert_eq!(revenue().validate("definition"), Ok(()));
    }

    #[test]
    fn ids_must_be_slugs() {
        for bad in ["", "Revenue", "re-venue", "été", &"x".repeat(65)] {
            let mut d = revenue();
            d.id = bad.into();
            let err = d.validate("definition").unwrap_err();
            assert_eq!(err.field(), Some("definition.id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn dimensions_are_bounded_and_unique() {
        let mut d = revenue();
        d.dimensions = (0..9).map(|i| format!("d{i}")).collect();
        assert_eq!(
            d.validate("definition").unwrap_err().field(),
            Some("definition.dimensions")
        );
        d.dimensions = vec!["a".into(), "a".into()];
        assert_eq!(
            d.validate("definition").unwrap_err().field(),
            Some("definition.dimensions[1]")
        );
    }

    #[test]
    fn ratio_settings_go_with_the_ratio_kind_only() {
        let mut d = revenue();
        d.kind = KpiKind::Ratio;
        assert_eq!(
            d.validate("definition").unwrap_err().field(),
            Some("definition.ratio")
        );
        d.ratio = Some(RatioSettings {
            numerator_kpi_id: "buyers".into(),
            denominator_kpi_id: "visitors".into(),
            scale: 0.0,
        });
        assert_eq!(
            d.validate("definition").unwrap_err().field(),
            Some("definition.ratio.scale")
        );
        d.kind = KpiKind::Sum;
        assert_eq!(
            d.validate("definition").unwrap_err().field(),
            Some("definition.ratio")
        );
    }

    #[test]
    fn timezones_are_iana_names() {
        assert_eq!(parse_timezone("", "tz"), Ok(Tz::UTC));
        assert_eq!(
            parse_timezone("Europe/Amsterdam", "tz"),
            Ok(Tz::Europe__Amsterdam)
        );
        assert!(parse_timezone("Mars/Olympus", "tz").is_err());
    }
}
