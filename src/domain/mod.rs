//! Pure KPI logic: definitions, measurements, events, the catalog and their validation,
//! calendars, the mergeable aggregate state of a bucket, and trend mathematics.
//!
//! Architecture invariant: nothing here does I/O or reads a clock. No tokio, sled, tonic
//! or prost; the current time is always an argument.

pub mod aggregate;
pub mod calendar;
pub mod catalog;
pub mod error;
pub mod event;
pub mod kpi;
pub mod measurement;
pub mod query;
pub mod signed_head;
pub mod target;
pub mod target_status;
pub mod trend;

pub use aggregate::{AggregateError, BucketState, Observation, Retracted, Summary};
pub use calendar::{
    Bucket, BucketKey, Buckets, Calendar, Grain, bucket_of, buckets_in, count_buckets, next_bucket,
    previous_bucket,
};
pub use catalog::{Catalog, KpiEntry, StoredUse, TargetEntry, UpdateRules};
pub use error::Rejection;
pub use event::Event;
pub use kpi::{Direction, KpiDefinition, KpiKind, RatioSettings};
pub use measurement::Measurement;
pub use target::{TargetDefinition, TargetMode};

use chrono::{DateTime, SecondsFormat, Utc};

/// An instant as RFC 3339 in UTC (`2026-03-01T00:00:00Z`, fractions only when present), as
/// every message of the API writes times.
pub fn rfc3339(instant: DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}
