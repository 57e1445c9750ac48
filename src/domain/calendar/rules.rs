//! The bucket rules computed from scratch, with no memory between calls: the reference
//! that the memoising [`super::Calendar`] must always agree with.
//!
//! Everything here works in whole Unix seconds. Offsets, offset changes and local
//! period starts are whole seconds in tzdb, so every bucket boundary is a whole second and
//! the bucket of an instant is the bucket of its second (its fraction cannot cross one).

use chrono::{Datelike, NaiveDate};
use chrono_tz::Tz;

use super::Grain;
use super::zone::{offset_at, offset_change_between, resolve_local};

/// Seconds in a clock hour.
pub(super) const HOUR: i64 = 3_600;
/// Seconds in a local calendar day (the local clock's day, not the bucket's length).
pub(super) const DAY: i64 = 86_400;
/// chrono counts days from 0001-01-01 as day 1; 1970-01-01 is day 719,163.
const UNIX_EPOCH_DAY_FROM_CE: i64 = 719_163;
/// 1970-01-01 was a Thursday: adding 3 to a day number since the epoch makes Monday the
/// first day of every group of 7 (ISO weeks start on Monday).
const EPOCH_DAYS_AFTER_MONDAY: i64 = 3;

/// A half-open bucket `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seconds {
    pub(super) start: i64,
    pub(super) end: i64,
}

/// The bucket of `grain` containing the second `seconds`, computed from scratch.
pub(super) fn bucket(tz: Tz, grain: Grain, seconds: i64) -> Seconds {
    match grain {
        Grain::Hour => hour_bucket(tz, seconds),
        _ => period_bucket(tz, grain, seconds, offset_at(tz, seconds)).1,
    }
}

/// The HOUR bucket containing `seconds`.
///
/// Rule: a new hour bucket starts whenever the wall clock enters a different clock hour
/// (by ticking past a whole hour, or by being set forward into another hour) and whenever
/// the clock is set back. So a local 02:00 shown twice starts two buckets, and in a zone
/// with a 30-minute setback (Australia/Lord_Howe, 02:00 back to 01:30) the repeated
/// 01:30-02:00 is a bucket of its own. A clock set forward within one hour does not start
/// a bucket. In a zone at +05:30 the buckets start at :30 UTC.
///
/// Without a change of offset nearby the bucket is the clock hour under the current
/// offset. A change within the hour is found by bisection; at most one fits in an hour
/// (`MIN_OFFSET_CHANGE_SPACING`).
pub(super) fn hour_bucket(tz: Tz, seconds: i64) -> Seconds {
    let offset = offset_at(tz, seconds);
    let local = seconds + offset;
    let clock_hour = local.div_euclid(HOUR);
    let hour_start_local = clock_hour * HOUR;

    // Start: the clock showed the whole hour under this offset, unless the offset changed
    // since then.
    let start_candidate = hour_start_local - offset;
    let offset_before = offset_at(tz, start_candidate);
    let start = if offset_before == offset {
        start_candidate
    } else {
        let change = offset_change_between(tz, start_candidate, seconds);
        let set_back = offset < offset_before;
        let hour_before_change = (change - 1 + offset_before).div_euclid(HOUR);
        if !set_back && hour_before_change == clock_hour {
            // Set forward within this hour: the bucket began at the whole hour under the
            // old offset.
            hour_start_local - offset_before
        } else {
            change
        }
    };

    // End: the clock reaches the next whole hour under this offset, unless the offset
    // changes first.
    let end_candidate = hour_start_local + HOUR - offset;
    let offset_after = offset_at(tz, end_candidate - 1);
    let end = if offset_after == offset {
        end_candidate
    } else {
        let change = offset_change_between(tz, seconds, end_candidate - 1);
        let set_back = offset_after < offset;
        let hour_after_change = (change + offset_after).div_euclid(HOUR);
        if !set_back && hour_after_change == clock_hour {
            hour_start_local + HOUR - offset_after
        } else {
            change
        }
    };
    Seconds { start, end }
}

/// The bucket of a DAY, WEEK, MONTH, QUARTER or YEAR grain containing `seconds`, where
/// `offset` is the zone's offset at `seconds`; also returns the period's index (see
/// [`period_index`]).
///
/// Rule: the bucket of local period `k` is `[resolve(start of k), resolve(start of k+1))`,
/// where `resolve` maps a local time to an instant (earlier instant if ambiguous, end of
/// the gap if skipped: see `zone::resolve_local`). A DST day is therefore 23 or 25 hours.
/// The local date of `seconds` names the period almost always; the loop corrects the rare
/// case where a clock set back across a period start shows the old period's date after
/// the new period has begun (the earlier instant won), and skips a period that does not
/// exist at all (Pacific/Apia skipped 2011-12-30).
pub(super) fn period_bucket(tz: Tz, grain: Grain, seconds: i64, offset: i64) -> (i64, Seconds) {
    let mut index = period_index(grain, seconds + offset);
    loop {
        let start = resolve_local(tz, period_start(grain, index));
        if seconds < start {
            index -= 1;
            continue;
        }
        let end = resolve_local(tz, period_start(grain, index + 1));
        if seconds >= end {
            index += 1;
            continue;
        }
        // Terminates: a step down happens only while `seconds < start(k)` and then
        // `seconds < end(k - 1) = start(k)` holds, so the walk never turns around, and
        // resolved starts grow without bound in both directions.
        return (index, Seconds { start, end });
    }
}

/// The number of the local period (of a grain other than HOUR) containing the local time
/// `local_seconds`, counted from the period containing 1970-01-01 (negative before it).
/// Consecutive periods have consecutive numbers.
pub(super) fn period_index(grain: Grain, local_seconds: i64) -> i64 {
    let day = local_seconds.div_euclid(DAY);
    match grain {
        Grain::Hour => local_seconds.div_euclid(HOUR),
        Grain::Day => day,
        Grain::Week => (day + EPOCH_DAYS_AFTER_MONDAY).div_euclid(7),
        Grain::Month | Grain::Quarter | Grain::Year => {
            let date = date_of_day(day);
            let year = i64::from(date.year());
            let month0 = i64::from(date.month0());
            match grain {
                Grain::Month => year * 12 + month0,
                Grain::Quarter => year * 4 + month0 / 3,
                _ => year,
            }
        }
    }
}

/// The local time (as seconds) at which period `index` of `grain` starts: local midnight
/// of its first day (a Monday for WEEK; the 1st of January, April, July or October for
/// QUARTER).
pub(super) fn period_start(grain: Grain, index: i64) -> i64 {
    let day = match grain {
        Grain::Hour => return index * HOUR,
        Grain::Day => index,
        Grain::Week => index * 7 - EPOCH_DAYS_AFTER_MONDAY,
        Grain::Month => day_of_date(index.div_euclid(12), index.rem_euclid(12) + 1),
        Grain::Quarter => day_of_date(index.div_euclid(4), index.rem_euclid(4) * 3 + 1),
        Grain::Year => day_of_date(index, 1),
    };
    day * DAY
}

/// The date of a day number since 1970-01-01. Day numbers stay inside chrono's range
/// (the parent module clamps instants), so the fallback is unreachable.
fn date_of_day(day: i64) -> NaiveDate {
    i32::try_from(day + UNIX_EPOCH_DAY_FROM_CE)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .unwrap_or(NaiveDate::MAX)
}

/// The day number since 1970-01-01 of the first day of `month` (1-12) in `year`.
fn day_of_date(year: i64, month: i64) -> i64 {
    let date = i32::try_from(year)
        .ok()
        .zip(u32::try_from(month).ok())
        .and_then(|(year, month)| NaiveDate::from_ymd_opt(year, month, 1))
        .unwrap_or(NaiveDate::MAX);
    i64::from(date.num_days_from_ce()) - UNIX_EPOCH_DAY_FROM_CE
}

/// The number of HOUR buckets that start in `(after, up_to]`: the number of hour bucket
/// boundaries there. Walks the range in steps of `MIN_OFFSET_CHANGE_SPACING` (one offset
/// lookup per 2 days), counting whole hours arithmetically between offset changes.
pub(super) fn count_hour_boundaries(tz: Tz, after: i64, up_to: i64) -> u64 {
    // Whole hours of the local clock at instants in (from, to] under a fixed offset.
    let whole_hours = |from: i64, to: i64, offset: i64| {
        u64::try_from((to + offset).div_euclid(HOUR) - (from + offset).div_euclid(HOUR))
            .unwrap_or(0)
    };
    let mut boundaries = 0;
    let mut cursor = after;
    let mut offset = offset_at(tz, cursor);
    while cursor < up_to {
        let probe = (cursor + super::zone::MIN_OFFSET_CHANGE_SPACING).min(up_to);
        let probe_offset = offset_at(tz, probe);
        if probe_offset == offset {
            boundaries += whole_hours(cursor, probe, offset);
            cursor = probe;
            continue;
        }
        let change = offset_change_between(tz, cursor, probe);
        boundaries += whole_hours(cursor, change - 1, offset);
        // The same rule as `hour_bucket`: a change starts a bucket if it sets the clock
        // back or moves it into another hour (landing on a whole hour is one of those).
        let set_back = probe_offset < offset;
        let hour_before = (change - 1 + offset).div_euclid(HOUR);
        let hour_after = (change + probe_offset).div_euclid(HOUR);
        if set_back || hour_after != hour_before {
            boundaries += 1;
        }
        cursor = change;
        offset = probe_offset;
    }
    boundaries
}
