//! What a bucket reports (`Summary` and its kind-specific `Detail`), and a RATIO's bucket
//! computed from its operands' (`ratio_summary`).

use chrono::{DateTime, Utc};

/// One side of a RATIO in one bucket: the sum of a SUM KPI or the count of a COUNT KPI.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RatioOperand {
    /// The amount divided: the compensated sum (SUM) or the count (COUNT).
    pub sum: f64,
    /// Measurements behind it.
    pub count: u64,
}

/// The bucket of a RATIO KPI from its operands' buckets over the same time range and
/// series:
///
/// ```text
/// value = scale × sum(numerator) / sum(denominator)      (none when the denominator is 0)
/// ```
///
/// a ratio of sums, never an average of per-bucket ratios, so it merges correctly: the
/// ratio of a month is computed from the month's merged operand buckets. `count` is, as for
/// every kind, the number of measurements behind the bucket: those of both operands
/// (`numerator_count + denominator_count`); there is no sum, min or max. The detail always
/// carries the two sums, their counts and the scale, also when the value is undefined.
pub fn ratio_summary(numerator: RatioOperand, denominator: RatioOperand, scale: f64) -> Summary {
    Summary {
        value: (denominator.sum != 0.0).then(|| scale * numerator.sum / denominator.sum),
        detail: Some(Detail::Ratio(RatioDetail {
            numerator: numerator.sum,
            denominator: denominator.sum,
            scale,
            numerator_count: numerator.count,
            denominator_count: denominator.count,
        })),
        ..Summary::empty(numerator.count + denominator.count)
    }
}

/// What a bucket reports: the fields of the API's `Bucket` message that come from the
/// state (the api layer adds the time range, labels and definition version).
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The bucket's value; `None` without measurements, or for a RATIO whose denominator
    /// sums to 0.
    pub value: Option<f64>,
    /// Number of measurements.
    pub count: u64,
    /// Sum of the values (SUM, AVERAGE, PERCENTILE).
    pub sum: Option<f64>,
    /// Smallest value (SUM, AVERAGE, MIN, PERCENTILE; absent while stale).
    pub min: Option<f64>,
    /// Largest value (SUM, AVERAGE, MAX, PERCENTILE; absent while stale).
    pub max: Option<f64>,
    /// Kind-specific fields; `None` for an empty bucket and for kinds without any.
    pub detail: Option<Detail>,
}

impl Summary {
    /// A summary with only a count.
    pub(super) fn empty(count: u64) -> Self {
        Self {
            value: None,
            count,
            sum: None,
            min: None,
            max: None,
            detail: None,
        }
    }
}

/// Kind-specific fields of a summary.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    /// AVERAGE.
    Average(AverageDetail),
    /// RATIO.
    Ratio(RatioDetail),
    /// NPS.
    Nps(NpsDetail),
    /// CSAT.
    Csat(CsatDetail),
    /// PERCENTILE.
    Percentile(PercentileDetail),
    /// LAST.
    Last(LastDetail),
}

/// A two-sided interval around an estimate: a mean's confidence interval, a forecast's
/// prediction interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Coverage, such as 0.95.
    pub level: f64,
}

/// Extra fields of an AVERAGE bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AverageDetail {
    /// Population standard deviation sqrt(m2 / n).
    pub stddev: f64,
}

/// Extra fields of a RATIO bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioDetail {
    /// Sum of the numerator KPI in the bucket.
    pub numerator: f64,
    /// Sum of the denominator KPI in the bucket.
    pub denominator: f64,
    /// The KPI's scale (100 for a percentage).
    pub scale: f64,
    /// Measurements of the numerator KPI in the bucket.
    pub numerator_count: u64,
    /// Measurements of the denominator KPI in the bucket.
    pub denominator_count: u64,
}

/// Extra fields of an NPS bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NpsDetail {
    /// Responses per score 0..10.
    pub histogram: [u64; 11],
    /// Responses scoring 9 or 10.
    pub promoters: u64,
    /// Responses scoring 7 or 8.
    pub passives: u64,
    /// Responses scoring 0..6.
    pub detractors: u64,
    /// 95% confidence interval of the NPS, within [-100, 100].
    pub interval: Interval,
    /// Fewer than [`THIN_SAMPLE_BELOW`](super::THIN_SAMPLE_BELOW) responses.
    pub thin_sample: bool,
}

/// Extra fields of a CSAT bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CsatDetail {
    /// Responses per score 1..5.
    pub histogram: [u64; 5],
    /// Responses scoring 4 or 5.
    pub satisfied: u64,
    /// 95% Wilson interval of the percentage satisfied.
    pub interval: Interval,
    /// Mean score (1..5).
    pub mean_rating: f64,
    /// 95% interval of the mean score; `None` below two responses.
    pub mean_rating_interval: Option<Interval>,
    /// Fewer than [`THIN_SAMPLE_BELOW`](super::THIN_SAMPLE_BELOW) responses.
    pub thin_sample: bool,
}

/// Extra fields of a PERCENTILE bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PercentileDetail {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Relative error bound of every quantile, [`PERCENTILE_RELATIVE_ERROR`](super::PERCENTILE_RELATIVE_ERROR).
    pub relative_error: f64,
}

/// Extra fields of a LAST bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastDetail {
    /// occurred_at of the measurement that gives the value.
    pub occurred_at: DateTime<Utc>,
    /// Its seq.
    pub seq: u64,
}
