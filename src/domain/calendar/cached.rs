//! [`Calendar`], the per-timezone bucket calculator of the hot path, and the [`Buckets`]
//! iterator.
//!
//! The projection asks for the buckets of every measurement in all six grains, and
//! measurements mostly arrive in time order, so the calendar remembers two things:
//!
//! - the latest bucket of each grain. Buckets tile time, so a remembered bucket that
//!   contains the instant *is* its bucket: a hit costs two comparisons.
//! - a stretch of UTC time over which the zone's offset is known to be constant (the
//!   "offset span"). Inside it the local time is one addition and an HOUR bucket is
//!   arithmetic, with no chrono-tz search. The span grows in steps of
//!   [`MIN_OFFSET_CHANGE_SPACING`] (one offset lookup per 2 days of time) and stops exactly
//!   at an offset change (found by bisection, twice a year in a DST zone).
//!
//! Coarser grains (DAY and up) change rarely along a stream; on a miss they are computed
//! by the same function the reference uses, given the offset from the span.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::rules::{self, HOUR, Seconds};
use super::zone::{MIN_OFFSET_CHANGE_SPACING, offset_at, offset_change_between};
use super::{Bucket, Grain, second_of};

/// A bucket calculator for one timezone that remembers recent answers.
///
/// Every method returns exactly what the free function of the same name returns (a
/// property test checks this on random walks through time); only the speed differs. Use
/// one per timezone and thread (lookups take `&mut self`); creating one is cheap and
/// allocates nothing.
#[derive(Debug, Clone)]
pub struct Calendar {
    /// The zone all answers are in.
    tz: Tz,
    /// The latest bucket of each grain, by `Grain::slot`. Starts empty (start == end), so
    /// it contains nothing.
    recent: [Bucket; 6],
    /// UTC seconds over which the offset is known constant.
    span: OffsetSpan,
}

/// A closed interval `[first, last]` of UTC seconds on which the zone's offset is
/// `offset` throughout. `first_is_change` / `last_is_change` record that the interval
/// already reaches an offset change on that side (so it cannot grow there).
#[derive(Debug, Clone, Copy)]
struct OffsetSpan {
    first: i64,
    last: i64,
    offset: i64,
    first_is_change: bool,
    last_is_change: bool,
}

impl OffsetSpan {
    /// The span of the single second `second`.
    fn at(tz: Tz, second: i64) -> OffsetSpan {
        OffsetSpan {
            first: second,
            last: second,
            offset: offset_at(tz, second),
            first_is_change: false,
            last_is_change: false,
        }
    }

    fn contains(&self, second: i64) -> bool {
        self.first <= second && second <= self.last
    }
}

impl Calendar {
    /// A calculator for `tz` with nothing remembered yet.
    pub fn new(tz: Tz) -> Calendar {
        let empty = Bucket {
            start: DateTime::UNIX_EPOCH,
            end: DateTime::UNIX_EPOCH,
        };
        Calendar {
            tz,
            recent: [empty; 6],
            span: OffsetSpan::at(tz, 0),
        }
    }

    /// The timezone of this calendar.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The bucket of `grain` that contains `instant`; equals [`super::bucket_of`].
    #[inline]
    pub fn bucket_of(&mut self, grain: Grain, instant: DateTime<Utc>) -> Bucket {
        let recent = &self.recent[grain.slot()];
        if recent.contains(instant) {
            return *recent;
        }
        self.bucket_of_miss(grain, instant)
    }

    /// The bucket after `bucket`; equals [`super::next_bucket`].
    pub fn next(&mut self, grain: Grain, bucket: Bucket) -> Bucket {
        self.bucket_of(grain, bucket.end)
    }

    /// The bucket before `bucket`; equals [`super::previous_bucket`].
    pub fn previous(&mut self, grain: Grain, bucket: Bucket) -> Bucket {
        let bucket = Bucket::from_seconds(self.compute(grain, second_of(bucket.start) - 1));
        self.recent[grain.slot()] = bucket;
        bucket
    }

    /// The buckets overlapping `[from, to)`; equals [`super::buckets_in`]. The iterator
    /// works on a copy of this calendar.
    pub fn buckets_in(&self, grain: Grain, from: DateTime<Utc>, to: DateTime<Utc>) -> Buckets {
        Buckets::new(self.clone(), grain, from, to)
    }

    #[cold]
    fn bucket_of_miss(&mut self, grain: Grain, instant: DateTime<Utc>) -> Bucket {
        let bucket = Bucket::from_seconds(self.compute(grain, second_of(instant)));
        self.recent[grain.slot()] = bucket;
        bucket
    }

    /// The bucket of the second `second`, using the offset span.
    fn compute(&mut self, grain: Grain, second: i64) -> Seconds {
        let offset = self.offset_at(second);
        if grain != Grain::Hour {
            return rules::period_bucket(self.tz, grain, second, offset).1;
        }
        // With the offset constant over the whole clock hour, the hour bucket is that
        // clock hour: no change can start or end it early (see `rules::hour_bucket`).
        let start = (second + offset).div_euclid(HOUR) * HOUR - offset;
        let end = start + HOUR;
        if self.covers(start, end - 1) {
            Seconds { start, end }
        } else {
            rules::hour_bucket(self.tz, second)
        }
    }

    /// The offset at `second`, moving the span there: grown by one step if `second` is
    /// within a step of it, else replaced.
    fn offset_at(&mut self, second: i64) -> i64 {
        if self.span.contains(second) {
            return self.span.offset;
        }
        if second > self.span.last && second - self.span.last <= MIN_OFFSET_CHANGE_SPACING {
            if !self.span.last_is_change {
                self.grow_forward();
                if self.span.contains(second) {
                    return self.span.offset;
                }
            }
            // `second` is past the change that ends the span, and within one spacing of
            // it, so no other change lies between: the new span starts at the change.
            let change = self.span.last + 1;
            self.span = OffsetSpan::at(self.tz, second);
            self.span.first = change;
            self.span.first_is_change = true;
            return self.span.offset;
        }
        if second < self.span.first && self.span.first - second <= MIN_OFFSET_CHANGE_SPACING {
            if !self.span.first_is_change {
                self.grow_backward();
                if self.span.contains(second) {
                    return self.span.offset;
                }
            }
            let change = self.span.first;
            self.span = OffsetSpan::at(self.tz, second);
            self.span.last = change - 1;
            self.span.last_is_change = true;
            return self.span.offset;
        }
        self.span = OffsetSpan::at(self.tz, second);
        self.span.offset
    }

    /// Whether the offset is known constant on `[first, last]`, which overlaps the span,
    /// growing the span by at most one step on each side to find out.
    fn covers(&mut self, first: i64, last: i64) -> bool {
        if last > self.span.last && !self.span.last_is_change {
            self.grow_forward();
        }
        if first < self.span.first && !self.span.first_is_change {
            self.grow_backward();
        }
        self.span.first <= first && last <= self.span.last
    }

    /// Grows the span forward by one step: the offset one spacing ahead equals the span's
    /// offset exactly when no change lies between (at most one fits). Otherwise bisection
    /// finds the change and the span ends just before it.
    fn grow_forward(&mut self) {
        let probe = self.span.last + MIN_OFFSET_CHANGE_SPACING;
        if offset_at(self.tz, probe) == self.span.offset {
            self.span.last = probe;
        } else {
            self.span.last = offset_change_between(self.tz, self.span.last, probe) - 1;
            self.span.last_is_change = true;
        }
    }

    /// Grows the span backward by one step; the mirror of `grow_forward`.
    fn grow_backward(&mut self) {
        let probe = self.span.first - MIN_OFFSET_CHANGE_SPACING;
        if offset_at(self.tz, probe) == self.span.offset {
            self.span.first = probe;
        } else {
            self.span.first = offset_change_between(self.tz, probe, self.span.first);
            self.span.first_is_change = true;
        }
    }
}

/// The buckets of one grain overlapping a half-open range `[from, to)`, in order; made
/// by [`super::buckets_in`] and [`Calendar::buckets_in`]. For filling empty buckets of
/// a query: consecutive items share their boundary.
#[derive(Debug, Clone)]
pub struct Buckets {
    calendar: Calendar,
    grain: Grain,
    /// The next bucket to yield, if it starts before `to`.
    next: Option<Bucket>,
    to: DateTime<Utc>,
}

impl Buckets {
    pub(super) fn new(
        mut calendar: Calendar,
        grain: Grain,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Buckets {
        let next = (from < to).then(|| calendar.bucket_of(grain, from));
        Buckets {
            calendar,
            grain,
            next,
            to,
        }
    }
}

impl Iterator for Buckets {
    type Item = Bucket;

    fn next(&mut self) -> Option<Bucket> {
        let current = self.next.take()?;
        let following = self.calendar.next(self.grain, current);
        // The second test ends the walk at the end of the supported range, where the
        // next bucket would be the same one again.
        if following.start < self.to && following.start > current.start {
            self.next = Some(following);
        }
        Some(current)
    }
}
