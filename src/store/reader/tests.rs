//! Unit tests of `store/reader.rs`.

use std::collections::BTreeMap;

use chrono::TimeZone;

use super::*;
use crate::domain::Measurement;
use crate::proto::to_proto;

#[test]
fn the_header_decode_agrees_with_the_full_decode() {
    let at = Utc.with_ymd_and_hms(2026, 2, 3, 4, 5, 6).unwrap();
    let measurement = |event_id: Option<&str>| {
        Event::MeasurementRecorded(Measurement {
            kpi_id: "revenue".into(),
            value: 9.5,
            occurred_at: at,
            labels: BTreeMap::from([("channel".into(), "web".into())]),
            subject: Some("s".into()),
            event_id: event_id.map(str::to_owned),
        })
    };
    let events = [
        measurement(Some("order-9")),
        measurement(None),
        Event::MeasurementRetracted {
            retracted_seq: 1,
            reason: "order-9".into(),
        },
    ];
    for event in events {
        let record = to_proto::event_record(at, &event).encode_to_vec();
        let (full_at, full_event) = decode_record(1, &record).unwrap();
        let (header_at, event_id) = decode_header(1, &record).unwrap();
        assert_eq!(header_at, full_at);
        assert_eq!(event_id.as_deref(), full_event.event_id());
    }
}
