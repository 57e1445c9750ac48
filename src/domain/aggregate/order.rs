//! Bucket states that keep one chosen measurement: MIN, MAX and LAST.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{AggregateError, Detail, LastDetail, Retracted, Summary};
use crate::domain::KpiKind;

/// MIN (`LARGEST = false`) or MAX (`LARGEST = true`): the count and the extreme value.
///
/// Merging is exact (`min(a, b)` is associative and commutative). A retraction is exact
/// when the value taken back is not the extreme (the extreme is still there); taking back
/// the extreme itself needs the remaining values, so it answers
/// [`AggregateError::NeedsRecompute`] and leaves the state as it was.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExtremeState<const LARGEST: bool> {
    count: u64,
    /// The extreme so far; the neutral ±infinity when empty.
    extreme: f64,
}

/// MIN: the smallest value.
pub type MinState = ExtremeState<false>;
/// MAX: the largest value.
pub type MaxState = ExtremeState<true>;

impl<const LARGEST: bool> Default for ExtremeState<LARGEST> {
    fn default() -> Self {
        Self {
            count: 0,
            extreme: if LARGEST {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            },
        }
    }
}

impl<const LARGEST: bool> ExtremeState<LARGEST> {
    const KIND: KpiKind = if LARGEST { KpiKind::Max } else { KpiKind::Min };

    /// Whether `a` beats `b` strictly.
    #[inline]
    fn beats(a: f64, b: f64) -> bool {
        if LARGEST { a > b } else { a < b }
    }

    /// Adds one value.
    #[inline]
    pub fn record(&mut self, value: f64) {
        self.count += 1;
        if Self::beats(value, self.extreme) {
            self.extreme = value;
        }
    }

    /// Takes one value back: exact unless it is the extreme (see the type's documentation).
    pub fn retract(&mut self, value: f64) -> Result<Retracted, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::NothingToRetract { kind: Self::KIND });
        }
        // With one value left it must be the extreme; anything else does not belong here.
        if self.count > 1 && Self::beats(self.extreme, value) {
            self.count -= 1;
            return Ok(Retracted::Exact);
        }
        if self.count == 1 && value == self.extreme {
            *self = Self::default();
            return Ok(Retracted::Exact);
        }
        Err(AggregateError::NeedsRecompute { kind: Self::KIND })
    }

    /// Adds the other bucket: counts add, the better extreme wins.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        if Self::beats(other.extreme, self.extreme) {
            self.extreme = other.extreme;
        }
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// value = the extreme, also reported as `min` (MIN) or `max` (MAX).
    pub fn summary(&self) -> Summary {
        if self.count == 0 {
            return Summary::empty(0);
        }
        let extreme = Some(self.extreme);
        Summary {
            value: extreme,
            min: if LARGEST { None } else { extreme },
            max: if LARGEST { extreme } else { None },
            ..Summary::empty(self.count)
        }
    }
}

/// The measurement a LAST bucket reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Latest {
    value: f64,
    occurred_at: DateTime<Utc>,
    seq: u64,
}

impl Latest {
    /// The order of LAST: occurred_at, then seq. Seqs are unique, so two different
    /// measurements never tie and merging is commutative.
    fn key(&self) -> (DateTime<Utc>, u64) {
        (self.occurred_at, self.seq)
    }
}

/// LAST: the value with the latest occurred_at; ties go to the highest seq.
///
/// A retraction is exact unless it takes back the latest measurement itself; then the
/// one before is unknown and it answers [`AggregateError::NeedsRecompute`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LastState {
    count: u64,
    latest: Option<Latest>,
}

impl LastState {
    /// Adds one measurement.
    #[inline]
    pub fn record(&mut self, value: f64, occurred_at: DateTime<Utc>, seq: u64) {
        self.count += 1;
        let candidate = Latest {
            value,
            occurred_at,
            seq,
        };
        if self
            .latest
            .is_none_or(|latest| candidate.key() > latest.key())
        {
            self.latest = Some(candidate);
        }
    }

    /// Takes one measurement back: exact unless it is the latest one.
    pub fn retract(
        &mut self,
        occurred_at: DateTime<Utc>,
        seq: u64,
    ) -> Result<Retracted, AggregateError> {
        let Some(latest) = self.latest else {
            return Err(AggregateError::NothingToRetract {
                kind: KpiKind::Last,
            });
        };
        let key = (occurred_at, seq);
        if self.count > 1 && key < latest.key() {
            self.count -= 1;
            return Ok(Retracted::Exact);
        }
        if self.count == 1 && key == latest.key() {
            *self = Self::default();
            return Ok(Retracted::Exact);
        }
        Err(AggregateError::NeedsRecompute {
            kind: KpiKind::Last,
        })
    }

    /// Adds the other bucket: counts add, the later measurement wins.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        if let Some(theirs) = other.latest
            && self.latest.is_none_or(|ours| theirs.key() > ours.key())
        {
            self.latest = Some(theirs);
        }
    }

    /// Number of measurements.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// value = the latest value; detail = its occurred_at and seq.
    pub fn summary(&self) -> Summary {
        let Some(latest) = self.latest else {
            return Summary::empty(0);
        };
        Summary {
            value: Some(latest.value),
            detail: Some(Detail::Last(LastDetail {
                occurred_at: latest.occurred_at,
                seq: latest.seq,
            })),
            ..Summary::empty(self.count)
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, second).unwrap()
    }

    #[test]
    fn last_prefers_the_latest_time_then_the_highest_seq() {
        let mut state = LastState::default();
        state.record(1.0, at(10), 7);
        state.record(2.0, at(5), 9); // earlier: loses despite the higher seq
        state.record(3.0, at(10), 8); // same time, higher seq: wins
        state.record(4.0, at(10), 3); // same time, lower seq: loses
        let summary = state.summary();
        assert_eq!(summary.value, Some(3.0));
        assert_eq!(summary.count, 4);
        assert_eq!(
            summary.detail,
            Some(Detail::Last(LastDetail {
                occurred_at: at(10),
                seq: 8
            }))
        );
    }

    #[test]
    fn last_merges_the_same_either_way_on_a_tie() {
        let mut a = LastState::default();
        a.record(1.0, at(10), 4);
        let mut b = LastState::default();
        b.record(2.0, at(10), 5);
        let mut ab = a;
        ab.merge(&b);
        let mut ba = b;
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.summary().value, Some(2.0));
    }

    #[test]
    fn last_retracts_an_older_measurement_but_not_the_latest() {
        let mut state = LastState::default();
        state.record(1.0, at(1), 1);
        state.record(2.0, at(2), 2);
        let before = state;
        assert_eq!(
            state.retract(at(2), 2),
            Err(AggregateError::NeedsRecompute {
                kind: KpiKind::Last
            })
        );
        assert_eq!(state, before, "a refused retraction changes nothing");
        assert_eq!(state.retract(at(1), 1), Ok(Retracted::Exact));
        assert_eq!(state.summary().count, 1);
        assert_eq!(state.summary().value, Some(2.0));
    }

    #[test]
    fn min_and_max_keep_the_extreme_and_refuse_to_retract_it() {
        let mut min = MinState::default();
        let mut max = MaxState::default();
        for v in [3.0, -1.5, 8.0, -1.5] {
            min.record(v);
            max.record(v);
        }
        assert_eq!(min.summary().value, Some(-1.5));
        assert_eq!(min.summary().min, Some(-1.5));
        assert_eq!(max.summary().value, Some(8.0));
        assert_eq!(max.summary().max, Some(8.0));
        // -1.5 is there twice, but the state cannot know that: it must be rebuilt.
        assert_eq!(
            min.retract(-1.5),
            Err(AggregateError::NeedsRecompute { kind: KpiKind::Min })
        );
        assert_eq!(min.retract(3.0), Ok(Retracted::Exact));
        assert_eq!(min.summary().count, 3);
        assert_eq!(
            max.retract(8.0),
            Err(AggregateError::NeedsRecompute { kind: KpiKind::Max })
        );
    }
}
