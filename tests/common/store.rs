//! Helpers for the tests of the store through its Rust API.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kpi_service::domain::{Event, Measurement};
use kpi_service::store::{AppendRequest, EventLog, Outcome, StoredEvent};

/// A measurement event with one label, occurring at `occurred_at`.
pub fn measurement_at(
    kpi_id: &str,
    value: f64,
    event_id: Option<&str>,
    occurred_at: DateTime<Utc>,
) -> Event {
    Event::MeasurementRecorded(Measurement {
        kpi_id: kpi_id.into(),
        value,
        occurred_at,
        labels: BTreeMap::from([("channel".into(), "web".into())]),
        subject: None,
        event_id: event_id.map(str::to_owned),
    })
}

/// Appends without a guard and returns the outcomes.
pub fn append(log: &EventLog, events: Vec<Event>) -> Vec<Outcome> {
    log.append_blocking(AppendRequest {
        events,
        validation_unchanged_since: None,
        ..Default::default()
    })
    .unwrap()
}

/// The stored events from `from` to `to`, inclusive.
pub fn read(log: &EventLog, from: u64, to: u64) -> Vec<StoredEvent> {
    log.read(from, to).collect::<Result<_, _>>().unwrap()
}
