//! Bucket state: the mergeable aggregate of one calendar bucket of one series, per KPI kind,
//! and the summary a query reports from it.
//!
//! Every kind has a state that is a monoid: [`BucketState::new`] is the empty bucket and
//! [`BucketState::merge`] combines two buckets, so a month is the merge of its days and a
//! group-by rollup the merge of its series, without rescanning events. A measurement is
//! applied with [`BucketState::record`]; a retraction with [`BucketState::retract`], which
//! is exact for COUNT, SUM, AVERAGE, NPS, CSAT and PERCENTILE buckets of at most
//! [`PERCENTILE_EXACT_LIMIT`] values, and asks for a rebuild from the log where the state
//! cannot subtract ([`AggregateError::NeedsRecompute`]).
//!
//! | kind       | state                                    | merge                 |
//! |------------|------------------------------------------|-----------------------|
//! | COUNT      | count                                    | exact                 |
//! | SUM        | count, Neumaier sum, min, max            | sum up to rounding    |
//! | AVERAGE    | SUM's fields + Welford mean and m2       | Chan, up to rounding  |
//! | MIN, MAX   | count, extreme                           | exact                 |
//! | LAST       | count, value, occurred_at, seq           | exact                 |
//! | NPS, CSAT  | histogram of scores                      | exact                 |
//! | PERCENTILE | ≤ 128 values, then DDSketch (α = 1%)     | exact values or bins  |
//! | DISTINCT   | count + HyperLogLog++ (p = 14)           | exact registers       |
//!
//! RATIO has no state of its own: its bucket is [`ratio_summary`] of its numerator's and
//! denominator's SUM or COUNT buckets ([`BucketState::ratio_operand`]).
//!
//! Pure: no I/O, no clock. States derive serde so projections can snapshot them.

mod compensated;
#[cfg(test)]
mod laws;
mod moments;
mod order;
mod scores;
mod sketches;
mod summary;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use compensated::CompensatedSum;
pub use moments::{AverageState, CountState, SumState};
pub use order::{ExtremeState, LastState, MaxState, MinState};
pub use scores::{CSAT_HIGHEST, CSAT_LOWEST, CsatState, NPS_HIGHEST, NPS_LOWEST, NpsState};
pub use sketches::{
    DISTINCT_PRECISION, DISTINCT_REGISTER_WIDTH, DISTINCT_STANDARD_ERROR, DistinctState,
    PERCENTILE_EXACT_LIMIT, PERCENTILE_MAX_BINS, PERCENTILE_MIN_MAGNITUDE,
    PERCENTILE_RELATIVE_ERROR, PercentileState,
};
pub use summary::{
    AverageDetail, CsatDetail, Detail, Interval, LastDetail, NpsDetail, PercentileDetail,
    RatioDetail, RatioOperand, Summary, ratio_summary,
};

use super::{KpiKind, Measurement};

/// Confidence level of the NPS and CSAT intervals.
pub const CONFIDENCE_LEVEL: f64 = 0.95;

/// Two-sided 95% normal quantile, rounded to 1.96 as in the usual survey formulas
/// (the exact value 1.959964 changes interval bounds by less than 0.01 percentage point).
pub const Z_95: f64 = 1.96;

/// NPS and CSAT buckets with fewer responses are flagged thin: the normal approximations
/// behind their intervals are rough below about 30 responses.
pub const THIN_SAMPLE_BELOW: u64 = 30;

/// A count as f64. Exact for counts below 2^53 (9·10^15), far more measurements than one
/// bucket can collect.
#[inline]
fn to_f64(count: u64) -> f64 {
    // Not lossy in range, see above.
    count as f64
}

/// What a bucket needs to know of one measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation<'a> {
    /// The value (finite; an integer score for NPS and CSAT).
    pub value: f64,
    /// Event time: LAST keeps the latest.
    pub occurred_at: DateTime<Utc>,
    /// Seq of the event in the log: breaks LAST's ties on occurred_at.
    pub seq: u64,
    /// The subject DISTINCT counts.
    pub subject: Option<&'a str>,
}

impl<'a> Observation<'a> {
    /// The observation of a logged measurement.
    pub fn of(measurement: &'a Measurement, seq: u64) -> Self {
        Self {
            value: measurement.value,
            occurred_at: measurement.occurred_at,
            seq,
            subject: measurement.subject.as_deref(),
        }
    }
}

/// Why a bucket refused an operation. The bucket is unchanged after every error.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// The state cannot subtract this measurement (it may have been the minimum, the
    /// latest, or is folded into a sketch): rebuild the bucket from the log.
    #[error("a {kind:?} bucket cannot take back this measurement: rebuild it from the log")]
    NeedsRecompute {
        /// Kind of the bucket.
        kind: KpiKind,
    },
    /// A retraction on a bucket that holds no such measurement.
    #[error("nothing to retract from this {kind:?} bucket")]
    NothingToRetract {
        /// Kind of the bucket.
        kind: KpiKind,
    },
    /// An NPS or CSAT value that is not an integer score in range (ingest rejects these;
    /// old measurements of a KPI whose kind changed may still be one).
    #[error("{value} is not a {kind:?} score")]
    NotAScore {
        /// Kind of the bucket.
        kind: KpiKind,
        /// The value refused.
        value: f64,
    },
    /// Merging buckets of two different kinds.
    #[error("cannot merge a {theirs:?} bucket into a {ours:?} bucket")]
    KindMismatch {
        /// Kind of the bucket merged into.
        ours: KpiKind,
        /// Kind of the bucket merged from.
        theirs: KpiKind,
    },
    /// Two percentile sketches with different parameters (cannot happen with states made
    /// by this module; stored ones are checked when read).
    #[error("percentile sketches with different parameters cannot merge")]
    IncompatibleSketch,
}

/// How exact a successful retraction was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retracted {
    /// The bucket is exactly as if the measurement had never been recorded (up to float
    /// rounding of sums and variances).
    Exact,
    /// SUM or AVERAGE: count, sum and variance are exact, but the value taken back was at
    /// a bound, so min and max may now be too wide. The bucket reports no min/max (also
    /// after merges) until it is rebuilt from the log.
    MinMaxStale,
}

/// The aggregate state of one bucket of one series, for every kind except RATIO.
///
/// A projection keeps millions of these (two years of HOUR buckets are about one bucket
/// per measurement for a sparse series), so the value is 16 bytes: an empty bucket and a
/// bucket holding one measurement of a kind whose state depends only on the value (SUM,
/// AVERAGE, MIN, MAX, NPS, CSAT, PERCENTILE) are stored inline as that value, a COUNT is
/// its counter, and every other state is boxed. Every operation behaves exactly as on the
/// kind's full state: the inline forms stand for "the empty state" and "the empty state
/// after recording this value", and are turned into that full state before anything else
/// is done with them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketState(Repr);

/// How a [`BucketState`] is stored; see there.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Repr {
    /// No measurement yet (every kind but COUNT).
    Empty(KpiKind),
    /// Exactly one measurement of a kind in [`value_only`], with this value.
    One(KpiKind, f64),
    /// COUNT.
    Count(CountState),
    /// SUM.
    Sum(Box<SumState>),
    /// AVERAGE.
    Average(Box<AverageState>),
    /// MIN.
    Min(Box<MinState>),
    /// MAX.
    Max(Box<MaxState>),
    /// LAST.
    Last(Box<LastState>),
    /// NPS.
    Nps(Box<NpsState>),
    /// CSAT.
    Csat(Box<CsatState>),
    /// PERCENTILE.
    Percentile(Box<PercentileState>),
    /// DISTINCT.
    Distinct(Box<DistinctState>),
}

/// Whether the state of `kind` after one measurement depends on its value only (not on
/// occurred_at, seq or subject), so that the value can stand for the state.
fn value_only(kind: KpiKind) -> bool {
    matches!(
        kind,
        KpiKind::Sum
            | KpiKind::Average
            | KpiKind::Min
            | KpiKind::Max
            | KpiKind::Nps
            | KpiKind::Csat
            | KpiKind::Percentile
    )
}

impl Repr {
    /// The full empty state of `kind`; `None` for RATIO.
    fn full_empty(kind: KpiKind) -> Option<Self> {
        Some(match kind {
            KpiKind::Sum => Self::Sum(Box::default()),
            KpiKind::Count => Self::Count(CountState::default()),
            KpiKind::Average => Self::Average(Box::default()),
            KpiKind::Min => Self::Min(Box::default()),
            KpiKind::Max => Self::Max(Box::default()),
            KpiKind::Last => Self::Last(Box::default()),
            KpiKind::Nps => Self::Nps(Box::default()),
            KpiKind::Csat => Self::Csat(Box::default()),
            KpiKind::Percentile => Self::Percentile(Box::default()),
            KpiKind::Distinct => Self::Distinct(Box::default()),
            KpiKind::Ratio => return None,
        })
    }

    /// The full state this one stands for (itself when it is full already).
    fn full(&self) -> std::borrow::Cow<'_, Self> {
        use std::borrow::Cow;
        match *self {
            Self::Empty(kind) => Cow::Owned(
                Self::full_empty(kind)
                    .unwrap_or_else(|| unreachable!("no bucket state of RATIO is ever made")),
            ),
            Self::One(kind, value) => {
                let mut full = Self::full_empty(kind)
                    .unwrap_or_else(|| unreachable!("no bucket state of RATIO is ever made"));
                // One is only made from a value this kind accepted.
                let _ = full.record_full(Observation {
                    value,
                    occurred_at: DateTime::UNIX_EPOCH,
                    seq: 0,
                    subject: None,
                });
                Cow::Owned(full)
            }
            _ => Cow::Borrowed(self),
        }
    }

    /// Replaces an inline form by the full state it stands for.
    fn make_full(&mut self) {
        if matches!(self, Self::Empty(_) | Self::One(..)) {
            *self = self.full().into_owned();
        }
    }

    /// `record` on a full state.
    #[inline]
    fn record_full(&mut self, observation: Observation<'_>) -> Result<(), AggregateError> {
        let value = observation.value;
        match self {
            Self::Sum(s) => s.record(value),
            Self::Count(s) => s.record(),
            Self::Average(s) => s.record(value),
            Self::Min(s) => s.record(value),
            Self::Max(s) => s.record(value),
            Self::Last(s) => s.record(value, observation.occurred_at, observation.seq),
            Self::Nps(s) => return s.record(value),
            Self::Csat(s) => return s.record(value),
            Self::Percentile(s) => s.record(value),
            Self::Distinct(s) => s.record(observation.subject),
            Self::Empty(_) | Self::One(..) => {
                unreachable!("record_full is called on full states only")
            }
        }
        Ok(())
    }
}

impl BucketState {
    /// The empty bucket of `kind` (the monoid's identity); `None` for RATIO, which has no
    /// measurements of its own (see [`ratio_summary`]).
    pub fn new(kind: KpiKind) -> Option<Self> {
        match kind {
            KpiKind::Ratio => None,
            KpiKind::Count => Repr::full_empty(kind).map(Self),
            _ => Some(Self(Repr::Empty(kind))),
        }
    }

    /// The kind this state aggregates.
    pub fn kind(&self) -> KpiKind {
        match &self.0 {
            Repr::Empty(kind) | Repr::One(kind, _) => *kind,
            Repr::Sum(_) => KpiKind::Sum,
            Repr::Count(_) => KpiKind::Count,
            Repr::Average(_) => KpiKind::Average,
            Repr::Min(_) => KpiKind::Min,
            Repr::Max(_) => KpiKind::Max,
            Repr::Last(_) => KpiKind::Last,
            Repr::Nps(_) => KpiKind::Nps,
            Repr::Csat(_) => KpiKind::Csat,
            Repr::Percentile(_) => KpiKind::Percentile,
            Repr::Distinct(_) => KpiKind::Distinct,
        }
    }

    /// Number of measurements in the bucket.
    pub fn count(&self) -> u64 {
        match &self.0 {
            Repr::Empty(_) => 0,
            Repr::One(..) => 1,
            Repr::Sum(s) => s.count(),
            Repr::Count(s) => s.count(),
            Repr::Average(s) => s.count(),
            Repr::Min(s) => s.count(),
            Repr::Max(s) => s.count(),
            Repr::Last(s) => s.count(),
            Repr::Nps(s) => s.count(),
            Repr::Csat(s) => s.count(),
            Repr::Percentile(s) => s.count(),
            Repr::Distinct(s) => s.count(),
        }
    }

    /// Bytes the state holds on the heap beyond its 16 inline bytes (its box and what
    /// that points to), for the read model's memory accounting.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        match &self.0 {
            Repr::Empty(_) | Repr::One(..) | Repr::Count(_) => 0,
            Repr::Sum(_) => size_of::<SumState>(),
            Repr::Average(_) => size_of::<AverageState>(),
            Repr::Min(_) => size_of::<MinState>(),
            Repr::Max(_) => size_of::<MaxState>(),
            Repr::Last(_) => size_of::<LastState>(),
            Repr::Nps(_) => size_of::<NpsState>(),
            Repr::Csat(_) => size_of::<CsatState>(),
            Repr::Percentile(s) => size_of::<PercentileState>() + s.heap_bytes(),
            Repr::Distinct(s) => size_of::<DistinctState>() + s.heap_bytes(),
        }
    }

    /// Applies one measurement. Only NPS and CSAT can refuse (a value that is not a score);
    /// the bucket is then unchanged.
    #[inline]
    pub fn record(&mut self, observation: Observation<'_>) -> Result<(), AggregateError> {
        if let Repr::Empty(kind) = self.0
            && value_only(kind)
        {
            // The same check the full state would make, without building it.
            match kind {
                KpiKind::Nps => NpsState::default().record(observation.value)?,
                KpiKind::Csat => CsatState::default().record(observation.value)?,
                _ => {}
            }
            self.0 = Repr::One(kind, observation.value);
            return Ok(());
        }
        self.0.make_full();
        self.0.record_full(observation)
    }

    /// Removes one previously recorded measurement's contribution.
    ///
    /// - COUNT, NPS, CSAT: exact.
    /// - SUM, AVERAGE: count, sum and variance exact; [`Retracted::MinMaxStale`] when the
    ///   value was at a bound (min/max then need a rebuild).
    /// - MIN, MAX, LAST: exact when the measurement is not the reported one, else
    ///   [`AggregateError::NeedsRecompute`].
    /// - PERCENTILE: exact while the bucket holds at most [`PERCENTILE_EXACT_LIMIT`]
    ///   values, else (a sketch) [`AggregateError::NeedsRecompute`].
    /// - DISTINCT: always [`AggregateError::NeedsRecompute`].
    ///
    /// On every error the bucket is unchanged (it may be stored in its full form).
    pub fn retract(&mut self, observation: Observation<'_>) -> Result<Retracted, AggregateError> {
        let value = observation.value;
        self.0.make_full();
        match &mut self.0 {
            Repr::Sum(s) => s.retract(value),
            Repr::Count(s) => s.retract(),
            Repr::Average(s) => s.retract(value),
            Repr::Min(s) => s.retract(value),
            Repr::Max(s) => s.retract(value),
            Repr::Last(s) => s.retract(observation.occurred_at, observation.seq),
            Repr::Nps(s) => s.retract(value),
            Repr::Csat(s) => s.retract(value),
            Repr::Percentile(s) => s.retract(value),
            Repr::Distinct(_) | Repr::Empty(_) | Repr::One(..) => {
                if self.count() == 0 {
                    Err(AggregateError::NothingToRetract { kind: self.kind() })
                } else {
                    Err(AggregateError::NeedsRecompute { kind: self.kind() })
                }
            }
        }
    }

    /// Merges another bucket of the same kind into this one (associative, with
    /// [`BucketState::new`] as identity). Refuses buckets of another kind, unchanged.
    pub fn merge(&mut self, other: &Self) -> Result<(), AggregateError> {
        let (ours, theirs) = (self.kind(), other.kind());
        if ours != theirs {
            return Err(AggregateError::KindMismatch { ours, theirs });
        }
        let other = other.0.full();
        self.0.make_full();
        match (&mut self.0, other.as_ref()) {
            (Repr::Sum(a), Repr::Sum(b)) => a.merge(b),
            (Repr::Count(a), Repr::Count(b)) => a.merge(b),
            (Repr::Average(a), Repr::Average(b)) => a.merge(b),
            (Repr::Min(a), Repr::Min(b)) => a.merge(b),
            (Repr::Max(a), Repr::Max(b)) => a.merge(b),
            (Repr::Last(a), Repr::Last(b)) => a.merge(b),
            (Repr::Nps(a), Repr::Nps(b)) => a.merge(b),
            (Repr::Csat(a), Repr::Csat(b)) => a.merge(b),
            (Repr::Percentile(a), Repr::Percentile(b)) => a.merge(b)?,
            (Repr::Distinct(a), Repr::Distinct(b)) => a.merge(b),
            _ => unreachable!("both states are full and of the same kind"),
        }
        Ok(())
    }

    /// What the bucket reports to a query.
    pub fn summary(&self) -> Summary {
        match self.0.full().as_ref() {
            Repr::Sum(s) => s.summary(),
            Repr::Count(s) => s.summary(),
            Repr::Average(s) => s.summary(),
            Repr::Min(s) => s.summary(),
            Repr::Max(s) => s.summary(),
            Repr::Last(s) => s.summary(),
            Repr::Nps(s) => s.summary(),
            Repr::Csat(s) => s.summary(),
            Repr::Percentile(s) => s.summary(),
            Repr::Distinct(s) => s.summary(),
            Repr::Empty(_) | Repr::One(..) => unreachable!("full() is a full state"),
        }
    }

    /// The bucket as a RATIO numerator or denominator: its sum (SUM) or its count (COUNT).
    /// `None` for other kinds, which a ratio cannot use (`KpiKind::is_summable`).
    pub fn ratio_operand(&self) -> Option<RatioOperand> {
        match self.0.full().as_ref() {
            Repr::Sum(s) => Some(s.ratio_operand()),
            Repr::Count(s) => Some(s.ratio_operand()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
