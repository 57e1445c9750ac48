//! The three questions the calendar asks a timezone, in whole Unix seconds: the offset at
//! an instant, the instant of a local wall-clock time, and where the offset changes.
//!
//! chrono-tz answers point questions only (it does not expose its transition table), so
//! finding an offset change uses bisection and rests on [`MIN_OFFSET_CHANGE_SPACING`].

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeZone};
use chrono_tz::{GapInfo, Tz};

/// The calendar's one assumption about the timezone database: two changes of a zone's
/// UTC offset are always more than this many seconds (2 days) apart.
///
/// Why it is needed: chrono-tz answers "which offset at instant t" but does not list its
/// transitions, so "the offset is the same at a and at b" can only prove "no change in
/// between" when at most one change fits between them. Measured on the tables of
/// chrono-tz 0.10.4 (every zone, all years): the closest two offset changes are 601,200 s
/// (just under 7 days) apart (Brazil in 2000, Gaza in future years), so 2 days leaves a
/// wide margin. Changes that keep the total offset (a renamed abbreviation, a different
/// split between standard and daylight time) are invisible here and do not count.
pub const MIN_OFFSET_CHANGE_SPACING: i64 = 2 * 86_400;

/// Converts Unix seconds into a naive date-time (UTC or local, as the caller means it).
/// The calendar keeps every value inside chrono's range (see `SUPPORTED_*` in the parent
/// module, a few years inside chrono's ±262,143 years), so the fallback is unreachable; it
/// only keeps the function total.
pub(super) fn naive(seconds: i64) -> NaiveDateTime {
    DateTime::from_timestamp(seconds, 0)
        .unwrap_or(DateTime::UNIX_EPOCH)
        .naive_utc()
}

/// The zone's offset (local minus UTC, in seconds) at the instant `utc_seconds`.
pub(super) fn offset_at(tz: Tz, utc_seconds: i64) -> i64 {
    let offset = tz.offset_from_utc_datetime(&naive(utc_seconds));
    i64::from(offset.fix().local_minus_utc())
}

/// The instant at which the zone's wall clock shows `local_seconds` (local time written
/// as if it were UTC seconds).
///
/// Rules: an ambiguous local time (shown twice because the clock was set back) resolves
/// to the earlier instant; a local time that does not exist (skipped because the clock
/// was set forward) resolves to the first instant after the gap, the instant of the change.
pub(super) fn resolve_local(tz: Tz, local_seconds: i64) -> i64 {
    let local = naive(local_seconds);
    match tz.offset_from_local_datetime(&local) {
        LocalResult::Single(offset) => local_seconds - i64::from(offset.fix().local_minus_utc()),
        LocalResult::Ambiguous(first, second) => {
            let first = local_seconds - i64::from(first.fix().local_minus_utc());
            let second = local_seconds - i64::from(second.fix().local_minus_utc());
            first.min(second)
        }
        LocalResult::None => GapInfo::new(&local, &tz)
            .and_then(|gap| gap.end)
            .map_or_else(
                // Unreachable with tzdb data: a gap always has a following span whose
                // first local time exists. Take the offset in force at the naive
                // reading so the answer is still an instant near the gap.
                || local_seconds - offset_at(tz, local_seconds),
                |end| end.timestamp(),
            ),
    }
}

/// The instant of the offset change between `before` and `after`, given that the offsets
/// at those instants differ and `after - before` is at most [`MIN_OFFSET_CHANGE_SPACING`]
/// (so exactly one change lies in between): the first second in `(before, after]` that
/// has the new offset. About 18 bisection steps for 2 days.
pub(super) fn offset_change_between(tz: Tz, before: i64, after: i64) -> i64 {
    debug_assert!(before < after);
    let old = offset_at(tz, before);
    // Invariant: offset(low) == old, offset(high) != old.
    let (mut low, mut high) = (before, after);
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if offset_at(tz, middle) == old {
            low = middle;
        } else {
            high = middle;
        }
    }
    high
}
