//! Calendar buckets: which HOUR, DAY, WEEK, MONTH, QUARTER or YEAR of a KPI's timezone an
//! instant belongs to, the buckets around it and in a range, and the key they are stored by.
//!
//! # Rules
//!
//! A bucket is a half-open UTC interval `[start, end)`. For every grain and zone the
//! buckets tile time: every instant lies in exactly one bucket, and each bucket's `end`
//! is the next bucket's `start`.
//!
//! - DAY runs from local midnight to the next local midnight: 23 or 25 hours on a DST
//!   change day in Europe/Amsterdam. WEEK is the ISO week, from Monday local midnight.
//!   MONTH, QUARTER (January, April, July, October) and YEAR start at local midnight of
//!   their first day.
//! - A period start that does not exist locally (the clock jumped over it) starts at the
//!   first instant after the gap. A period start shown twice (the clock was set back)
//!   means the earlier instant. So Beirut's day after a midnight spring-forward starts at
//!   01:00 local, and Sao Paulo's day before a midnight fall-back lasts 25 hours.
//! - HOUR buckets are the clock hours of the local time: at +05:30 they start at :30 UTC.
//!   A new hour bucket also starts whenever the clock is set back, so the two local
//!   02:00-03:00 hours of a fall-back night are two buckets of one hour each, and every
//!   HOUR bucket is a stretch of one clock hour shown once.
//! - A finer bucket lies inside the coarser one: HOUR in DAY in WEEK, DAY in MONTH in
//!   QUARTER in YEAR.
//!
//! The timezone data is chrono-tz's; the one assumption made about it is
//! [`MIN_OFFSET_CHANGE_SPACING`].
//!
//! # Two ways to ask
//!
//! The free functions ([`bucket_of`], [`count_buckets`], ...) compute from scratch. The
//! projection asks for every measurement and every grain, so [`Calendar`] remembers the
//! latest bucket of each grain and a stretch of time over which the zone's offset is
//! known to be constant; it always returns what the free functions return.
//!
//! Instants are supported from [`SUPPORTED_FIRST`] to [`SUPPORTED_LAST`] (years 1 to
//! 9999); an instant outside is treated as the nearest supported one. The domain accepts
//! measurements from 1970 on.

mod cached;
mod rules;
mod zone;

#[cfg(test)]
mod tests;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;

pub use cached::{Buckets, Calendar};
pub use zone::MIN_OFFSET_CHANGE_SPACING;

use rules::Seconds;

/// A calendar bucket size, computed in the KPI's timezone.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
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

impl Grain {
    /// Every grain, finest first.
    pub const ALL: [Grain; 6] = [
        Grain::Hour,
        Grain::Day,
        Grain::Week,
        Grain::Month,
        Grain::Quarter,
        Grain::Year,
    ];

    /// Position in [`Grain::ALL`].
    pub const fn slot(self) -> usize {
        match self {
            Grain::Hour => 0,
            Grain::Day => 1,
            Grain::Week => 2,
            Grain::Month => 3,
            Grain::Quarter => 4,
            Grain::Year => 5,
        }
    }
}

/// First supported second: 0001-01-01T00:00:00Z.
const SUPPORTED_FIRST_SECOND: i64 = -62_135_596_800;
/// Last supported second: 9999-12-31T23:59:59Z.
const SUPPORTED_LAST_SECOND: i64 = 253_402_300_799;

/// The earliest supported instant, 0001-01-01T00:00:00Z. Earlier instants are treated as
/// this one. The bound keeps every local time and period start the calendar computes
/// inside chrono's range with room to spare.
pub const SUPPORTED_FIRST: DateTime<Utc> = utc(SUPPORTED_FIRST_SECOND);
/// The latest supported instant, the last nanosecond of 9999-12-31 UTC. Later instants are
/// treated as this one.
pub const SUPPORTED_LAST: DateTime<Utc> =
    match DateTime::from_timestamp(SUPPORTED_LAST_SECOND, 999_999_999) {
        Some(last) => last,
        None => panic!("9999-12-31 is inside chrono's range"),
    };

/// The instant of a Unix second. Bucket boundaries stay within a year of the supported
/// range, well inside chrono's, so the fallback is unreachable and only keeps this total.
const fn utc(seconds: i64) -> DateTime<Utc> {
    match DateTime::from_timestamp(seconds, 0) {
        Some(instant) => instant,
        None => DateTime::UNIX_EPOCH,
    }
}

/// The whole Unix second containing `instant`, clamped to the supported range. Bucket
/// boundaries are whole seconds, so an instant and its second share their bucket.
fn second_of(instant: DateTime<Utc>) -> i64 {
    instant
        .timestamp()
        .clamp(SUPPORTED_FIRST_SECOND, SUPPORTED_LAST_SECOND)
}

/// A calendar bucket: the half-open UTC interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// First instant of the bucket.
    pub start: DateTime<Utc>,
    /// First instant after the bucket.
    pub end: DateTime<Utc>,
}

impl Bucket {
    fn from_seconds(seconds: Seconds) -> Bucket {
        Bucket {
            start: utc(seconds.start),
            end: utc(seconds.end),
        }
    }

    /// Whether `instant` lies in `[start, end)`.
    pub fn contains(&self, instant: DateTime<Utc>) -> bool {
        self.start <= instant && instant < self.end
    }

    /// The bucket's length: 23 or 25 hours for a DST change day, for example.
    pub fn duration(&self) -> TimeDelta {
        self.end - self.start
    }

    /// The key the bucket is stored and ordered by.
    pub fn key(&self) -> BucketKey {
        BucketKey(self.start.timestamp())
    }
}

/// The compact key of a bucket: its start as Unix seconds.
///
/// Within one grain and timezone (which the KPI fixes) a bucket's start identifies it,
/// and keys order like the buckets. For storage, [`BucketKey::to_be_bytes`] gives 8 bytes
/// that sort bytewise in the same order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BucketKey(i64);

impl BucketKey {
    /// The sign bit, flipped in the stored form so that negative starts (before 1970)
    /// sort before positive ones bytewise.
    const SIGN_BIT: u64 = 1 << 63;

    /// The key of the bucket that starts at Unix second `start`.
    pub const fn from_unix_seconds(start: i64) -> BucketKey {
        BucketKey(start)
    }

    /// The bucket's start as Unix seconds.
    pub const fn unix_seconds(self) -> i64 {
        self.0
    }

    /// The bucket's start.
    pub const fn start(self) -> DateTime<Utc> {
        utc(self.0)
    }

    /// The stored form: the start with its sign bit flipped, big-endian, so that byte
    /// order (sled's key order) equals key order.
    pub const fn to_be_bytes(self) -> [u8; 8] {
        (self.0.cast_unsigned() ^ Self::SIGN_BIT).to_be_bytes()
    }

    /// Reads the stored form written by [`BucketKey::to_be_bytes`].
    pub const fn from_be_bytes(bytes: [u8; 8]) -> BucketKey {
        BucketKey((u64::from_be_bytes(bytes) ^ Self::SIGN_BIT).cast_signed())
    }
}

/// The bucket of `grain` in `tz` that contains `instant`: `start <= instant < end`.
pub fn bucket_of(grain: Grain, tz: Tz, instant: DateTime<Utc>) -> Bucket {
    Bucket::from_seconds(rules::bucket(tz, grain, second_of(instant)))
}

/// The bucket right after `bucket` (which must be a bucket of `grain` in `tz`): it starts
/// at `bucket.end`.
pub fn next_bucket(grain: Grain, tz: Tz, bucket: Bucket) -> Bucket {
    bucket_of(grain, tz, bucket.end)
}

/// The bucket right before `bucket` (which must be a bucket of `grain` in `tz`): it ends
/// at `bucket.start`.
pub fn previous_bucket(grain: Grain, tz: Tz, bucket: Bucket) -> Bucket {
    Bucket::from_seconds(rules::bucket(tz, grain, second_of(bucket.start) - 1))
}

/// The buckets of `grain` in `tz` that overlap `[from, to)`, in order: the bucket of
/// `from` first, then each next one that starts before `to`. Empty if `to <= from`.
pub fn buckets_in(grain: Grain, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Buckets {
    Buckets::new(Calendar::new(tz), grain, from, to)
}

/// How many buckets [`buckets_in`] yields for the same arguments, without visiting them.
///
/// DAY and coarser grains count local periods, in constant time. There is one exception,
/// where this counts one more than [`buckets_in`] yields: a local date skipped entirely
/// (Pacific/Apia and Pacific/Fakaofo skipped 2011-12-30; Kiritimati and Kanton skipped
/// 1994-12-31) has no bucket but is counted. For a "too many buckets" limit that errs on
/// the safe side. HOUR walks the range with one offset lookup per
/// [`MIN_OFFSET_CHANGE_SPACING`] (about 18,000 for a century) and is exact.
pub fn count_buckets(grain: Grain, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    if to <= from {
        return 0;
    }
    let first = second_of(from);
    // The last instant before `to` lies in the last overlapping bucket.
    let last = second_of(to - TimeDelta::nanoseconds(1));
    if grain == Grain::Hour {
        let first_start = rules::hour_bucket(tz, first).start;
        return 1 + rules::count_hour_boundaries(tz, first_start, last);
    }
    let index = |seconds| rules::period_bucket(tz, grain, seconds, zone::offset_at(tz, seconds)).0;
    u64::try_from(index(last) - index(first) + 1).unwrap_or(0)
}
