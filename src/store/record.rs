//! The bytes of a stored record: the protobuf encoding of `kpi.v1.EventRecord`, built as
//! the group's `recorded_at` field followed by the event's `payload` field.
//!
//! prost writes fields in tag order, so these two pieces concatenated are exactly the
//! encoding prost gives for the whole message. Measurements, nearly every event, are
//! encoded here by hand straight from the domain type: going through the generated
//! message would clone every string and label map first, which made encoding the largest
//! cost of an append. The tests check the hand encoding against prost byte for byte.

use chrono::{DateTime, Utc};
use prost::Message;

use crate::domain::{Event, Measurement};
use crate::proto::{self, to_proto};

/// The encoding of an `EventRecord` with only `recorded_at` set: the first bytes of every
/// record of a group.
pub fn recorded_at_field(recorded_at: DateTime<Utc>) -> Vec<u8> {
    proto::EventRecord {
        recorded_at: Some(to_proto::timestamp(recorded_at)),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The encoding of an `EventRecord` with only `actor` set: nothing for an empty actor,
/// as prost leaves out an empty string.
pub fn actor_field(actor: &str) -> Vec<u8> {
    let mut field = Vec::with_capacity(string_field_len(actor));
    put_string_field(&mut field, KEY_RECORD_ACTOR, actor);
    field
}

/// Appends the encoding of an `EventRecord` with only `payload` set, for `event`.
pub fn encode_payload(event: &Event, buf: &mut Vec<u8>) {
    match event {
        Event::MeasurementRecorded(measurement) => encode_measurement_recorded(measurement, buf),
        other => proto::EventRecord {
            payload: Some(to_proto::event_payload(other)),
            ..Default::default()
        }
        .encode_raw(buf),
    }
}

// Field keys: (field number << 3) | wire type, where 0 is varint, 1 is 64-bit and 2 is
// length-delimited. All fit one byte.
/// `EventRecord.actor` = 2, length-delimited.
const KEY_RECORD_ACTOR: u8 = (2 << 3) | 2;
/// `EventRecord.measurement_recorded` = 15, length-delimited.
const KEY_RECORD_MEASUREMENT_RECORDED: u8 = (15 << 3) | 2;
/// `MeasurementRecorded.measurement` = 1, length-delimited.
const KEY_MEASUREMENT: u8 = (1 << 3) | 2;
/// `Measurement.kpi_id` = 1, length-delimited.
const KEY_KPI_ID: u8 = (1 << 3) | 2;
/// `Measurement.value` = 2, 64-bit.
const KEY_VALUE: u8 = (2 << 3) | 1;
/// `Measurement.occurred_at` = 3, length-delimited.
const KEY_OCCURRED_AT: u8 = (3 << 3) | 2;
/// `Measurement.labels` = 4, length-delimited (one map entry each).
const KEY_LABEL: u8 = (4 << 3) | 2;
/// `Measurement.subject` = 5, length-delimited.
const KEY_SUBJECT: u8 = (5 << 3) | 2;
/// `Measurement.event_id` = 6, length-delimited.
const KEY_EVENT_ID: u8 = (6 << 3) | 2;
/// Map entry key = 1, length-delimited.
const KEY_ENTRY_KEY: u8 = (1 << 3) | 2;
/// Map entry value = 2, length-delimited.
const KEY_ENTRY_VALUE: u8 = (2 << 3) | 2;
/// `Timestamp.seconds` = 1, varint.
const KEY_SECONDS: u8 = 1 << 3;
/// `Timestamp.nanos` = 2, varint.
const KEY_NANOS: u8 = 2 << 3;

/// `EventRecord { measurement_recorded: MeasurementRecorded { measurement } }`, with the
/// field rules prost follows for proto3: scalars and strings equal to their default (0,
/// "") are left out, present messages are written even when empty, and map entries leave
/// out an empty key or value.
fn encode_measurement_recorded(measurement: &Measurement, buf: &mut Vec<u8>) {
    let occurred_at = to_proto::timestamp(measurement.occurred_at);
    // int64 and int32 are written as the two's complement u64 (10 bytes when negative).
    let seconds = occurred_at.seconds.cast_unsigned();
    let nanos = i64::from(occurred_at.nanos).cast_unsigned();
    let timestamp_len = varint_field_len(seconds) + varint_field_len(nanos);

    let subject = measurement.subject.as_deref().unwrap_or_default();
    let event_id = measurement.event_id.as_deref().unwrap_or_default();
    let mut measurement_len = string_field_len(&measurement.kpi_id)
        + if measurement.value != 0.0 { 1 + 8 } else { 0 }
        + 1
        + varint_len(widen(timestamp_len))
        + timestamp_len
        + string_field_len(subject)
        + string_field_len(event_id);
    for (key, value) in &measurement.labels {
        let entry_len = string_field_len(key) + string_field_len(value);
        measurement_len += 1 + varint_len(widen(entry_len)) + entry_len;
    }
    let recorded_len = 1 + varint_len(widen(measurement_len)) + measurement_len;

    buf.reserve(1 + varint_len(widen(recorded_len)) + recorded_len);
    buf.push(KEY_RECORD_MEASUREMENT_RECORDED);
    put_varint(buf, widen(recorded_len));
    buf.push(KEY_MEASUREMENT);
    put_varint(buf, widen(measurement_len));
    put_string_field(buf, KEY_KPI_ID, &measurement.kpi_id);
    if measurement.value != 0.0 {
        buf.push(KEY_VALUE);
        buf.extend_from_slice(&measurement.value.to_le_bytes());
    }
    buf.push(KEY_OCCURRED_AT);
    put_varint(buf, widen(timestamp_len));
    put_varint_field(buf, KEY_SECONDS, seconds);
    put_varint_field(buf, KEY_NANOS, nanos);
    for (key, value) in &measurement.labels {
        buf.push(KEY_LABEL);
        put_varint(buf, widen(string_field_len(key) + string_field_len(value)));
        put_string_field(buf, KEY_ENTRY_KEY, key);
        put_string_field(buf, KEY_ENTRY_VALUE, value);
    }
    put_string_field(buf, KEY_SUBJECT, subject);
    put_string_field(buf, KEY_EVENT_ID, event_id);
}

fn widen(len: usize) -> u64 {
    super::segment::widen(len)
}

/// Bytes of `value` as a varint (prost's count).
fn varint_len(value: u64) -> usize {
    prost::encoding::encoded_len_varint(value)
}

/// Bytes of a varint field (key and value), 0 when the value is 0 and left out.
fn varint_field_len(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + varint_len(value) }
}

/// Bytes of a string field (key, length and bytes), 0 when empty and left out.
fn string_field_len(value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        1 + varint_len(widen(value.len())) + value.len()
    }
}

/// Appends `value` as a varint (prost's encoding).
fn put_varint(buf: &mut Vec<u8>, value: u64) {
    prost::encoding::encode_varint(value, buf);
}

fn put_varint_field(buf: &mut Vec<u8>, key: u8, value: u64) {
    if value != 0 {
        buf.push(key);
        put_varint(buf, value);
    }
}

fn put_string_field(buf: &mut Vec<u8>, key: u8, value: &str) {
    if !value.is_empty() {
        buf.push(key);
        put_varint(buf, widen(value.len()));
        buf.extend_from_slice(value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;

    /// What prost gives for the payload field alone.
    fn prost_payload(event: &Event) -> Vec<u8> {
        proto::EventRecord {
            payload: Some(to_proto::event_payload(event)),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z_]{1,20}",
            ".{0,8}",
            "[a-z]{120,140}",
        ]
    }

    fn measurement() -> impl Strategy<Value = Measurement> {
        (
            text(),
            prop_oneof![
                Just(0.0),
                Just(-0.0),
                Just(f64::NAN),
                Just(f64::INFINITY),
                any::<f64>(),
            ],
            // From before 1970 (negative seconds) to far ahead, with any nanos.
            (-5_000_000_000_i64..300_000_000_000, 0_u32..1_000_000_000),
            proptest::collection::btree_map(text(), text(), 0..4),
            proptest::option::of(text()),
            proptest::option::of(text()),
        )
            .prop_map(
                |(kpi_id, value, (seconds, nanos), labels, subject, event_id)| Measurement {
                    kpi_id,
                    value,
                    occurred_at: DateTime::from_timestamp(seconds, nanos).unwrap(),
                    labels,
                    subject,
                    event_id,
                },
            )
    }

    proptest! {
        #[test]
        fn measurements_encode_exactly_like_prost(measurement in measurement()) {
            let event = Event::MeasurementRecorded(measurement);
            let mut buf = Vec::new();
            encode_payload(&event, &mut buf);
            prop_assert_eq!(buf, prost_payload(&event));
        }
    }

    #[test]
    fn edge_measurements_encode_exactly_like_prost() {
        let base = Measurement {
            kpi_id: String::new(),
            value: 0.0,
            occurred_at: DateTime::UNIX_EPOCH,
            labels: BTreeMap::new(),
            subject: None,
            event_id: None,
        };
        let long = "x".repeat(300);
        let cases = [
            base.clone(),
            Measurement {
                occurred_at: DateTime::UNIX_EPOCH - TimeDelta::nanoseconds(1),
                subject: Some(String::new()),
                ..base.clone()
            },
            Measurement {
                labels: BTreeMap::from([
                    (String::new(), String::new()),
                    (long.clone(), "v".into()),
                ]),
                kpi_id: long.clone(),
                value: -0.0,
                ..base.clone()
            },
            Measurement {
                event_id: Some(long),
                value: f64::MIN_POSITIVE,
                occurred_at: DateTime::<Utc>::MAX_UTC,
                ..base
            },
        ];
        for measurement in cases {
            let event = Event::MeasurementRecorded(measurement);
            let mut buf = Vec::new();
            encode_payload(&event, &mut buf);
            assert_eq!(buf, prost_payload(&event), "{event:?}");
        }
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            assert_eq!(varint_len(value), buf.len(), "{value}");
        }
    }
}
