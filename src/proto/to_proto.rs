//! Domain types to kpi.v1 messages. Infallible: domain values are valid by construction.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use super::event_record::Payload;
use crate::domain::{
    self, Direction, Event, Grain, KpiEntry, KpiKind, Measurement, TargetDefinition, TargetEntry,
    TargetMode,
};
use crate::proto;

/// A UTC instant as a protobuf Timestamp.
pub fn timestamp(instant: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: instant.timestamp(),
        // Always below 2e9 (leap seconds), so it fits an i32.
        nanos: i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or(i32::MAX),
    }
}

/// First byte of a page token, so that the format can change without old tokens being
/// misread.
pub(super) const PAGE_TOKEN_VERSION: u8 = 1;

/// The ListKpis page token that continues after the KPI `last_id`. Opaque to clients:
/// base64url of a version byte, the id and a CRC-32 of both, so a made-up or damaged token
/// is refused (see [`super::from_proto::page_token`]) instead of being read as an id.
pub fn page_token(last_id: &str) -> String {
    use base64::Engine;
    let mut bytes = Vec::with_capacity(last_id.len() + 5);
    bytes.push(PAGE_TOKEN_VERSION);
    bytes.extend_from_slice(last_id.as_bytes());
    let check = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&check.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The protobuf enum of a KPI kind.
pub fn kpi_kind(kind: KpiKind) -> proto::KpiKind {
    match kind {
        KpiKind::Sum => proto::KpiKind::Sum,
        KpiKind::Count => proto::KpiKind::Count,
        KpiKind::Average => proto::KpiKind::Average,
        KpiKind::Min => proto::KpiKind::Min,
        KpiKind::Max => proto::KpiKind::Max,
        KpiKind::Last => proto::KpiKind::Last,
        KpiKind::Ratio => proto::KpiKind::Ratio,
        KpiKind::Nps => proto::KpiKind::Nps,
        KpiKind::Csat => proto::KpiKind::Csat,
        KpiKind::Percentile => proto::KpiKind::Percentile,
        KpiKind::Distinct => proto::KpiKind::Distinct,
    }
}

/// The protobuf enum of a direction.
pub fn direction(direction: Direction) -> proto::Direction {
    match direction {
        Direction::HigherIsBetter => proto::Direction::HigherIsBetter,
        Direction::LowerIsBetter => proto::Direction::LowerIsBetter,
    }
}

/// The protobuf enum of a grain.
pub fn grain(grain: Grain) -> proto::Grain {
    match grain {
        Grain::Hour => proto::Grain::Hour,
        Grain::Day => proto::Grain::Day,
        Grain::Week => proto::Grain::Week,
        Grain::Month => proto::Grain::Month,
        Grain::Quarter => proto::Grain::Quarter,
        Grain::Year => proto::Grain::Year,
    }
}

/// A KPI definition message.
pub fn kpi_definition(definition: &domain::KpiDefinition) -> proto::KpiDefinition {
    proto::KpiDefinition {
        id: definition.id.clone(),
        name: definition.name.clone(),
        description: definition.description.clone(),
        unit: definition.unit.clone(),
        kind: kpi_kind(definition.kind).into(),
        direction: direction(definition.direction).into(),
        timezone: definition.timezone.name().to_owned(),
        dimensions: definition.dimensions.clone(),
        ratio: definition.ratio.as_ref().map(|ratio| proto::RatioSettings {
            numerator_kpi_id: ratio.numerator_kpi_id.clone(),
            denominator_kpi_id: ratio.denominator_kpi_id.clone(),
            scale: Some(ratio.scale),
        }),
    }
}

/// A catalog entry as the Kpi message.
pub fn kpi(entry: &KpiEntry) -> proto::Kpi {
    proto::Kpi {
        definition: Some(kpi_definition(&entry.definition)),
        version: entry.version,
        retired: entry.retired,
        created_at: Some(timestamp(entry.created_at)),
        updated_at: Some(timestamp(entry.updated_at)),
        seq: entry.seq,
    }
}

/// A measurement message.
pub fn measurement(measurement: &Measurement) -> proto::Measurement {
    proto::Measurement {
        kpi_id: measurement.kpi_id.clone(),
        value: measurement.value,
        occurred_at: Some(timestamp(measurement.occurred_at)),
        labels: measurement.labels.clone(),
        subject: measurement.subject.clone().unwrap_or_default(),
        event_id: measurement.event_id.clone().unwrap_or_default(),
    }
}

/// A target definition message.
pub fn target_definition(target: &TargetDefinition) -> proto::TargetDefinition {
    proto::TargetDefinition {
        id: target.id.clone(),
        kpi_id: target.kpi_id.clone(),
        name: target.name.clone(),
        value: target.value,
        start: Some(timestamp(target.start)),
        deadline: Some(timestamp(target.deadline)),
        mode: match target.mode {
            TargetMode::Cumulative => proto::TargetMode::Cumulative,
            TargetMode::Level => proto::TargetMode::Level,
        }
        .into(),
        period_grain: target
            .period_grain
            .map_or(proto::Grain::Unspecified, grain)
            .into(),
        tolerance: Some(target.tolerance),
    }
}

/// The payload of the stored record of `event`.
pub fn event_payload(event: &Event) -> Payload {
    match event {
        Event::KpiDefined { definition } => Payload::KpiDefined(proto::KpiDefined {
            definition: Some(kpi_definition(definition)),
        }),
        Event::KpiUpdated {
            definition,
            version,
        } => Payload::KpiUpdated(proto::KpiUpdated {
            definition: Some(kpi_definition(definition)),
            version: *version,
        }),
        Event::KpiRetired {
            kpi_id,
            reason,
            version,
        } => Payload::KpiRetired(proto::KpiRetired {
            kpi_id: kpi_id.clone(),
            reason: reason.clone(),
            version: *version,
        }),
        Event::TargetSet { target, version } => Payload::TargetSet(proto::TargetSet {
            target: Some(target_definition(target)),
            version: *version,
        }),
        Event::TargetRemoved { target_id, reason } => {
            Payload::TargetRemoved(proto::TargetRemoved {
                target_id: target_id.clone(),
                reason: reason.clone(),
            })
        }
        Event::MeasurementRecorded(m) => Payload::MeasurementRecorded(proto::MeasurementRecorded {
            measurement: Some(measurement(m)),
        }),
        Event::MeasurementRetracted {
            retracted_seq,
            reason,
        } => Payload::MeasurementRetracted(proto::MeasurementRetracted {
            retracted_seq: *retracted_seq,
            reason: reason.clone(),
        }),
        Event::EventsLost {
            first_seq,
            last_seq,
            reason,
            acknowledged_hash,
        } => Payload::EventsLost(proto::EventsLost {
            first_seq: *first_seq,
            last_seq: *last_seq,
            reason: reason.clone(),
            acknowledged_hash: acknowledged_hash
                .map(|hash| hash.to_vec())
                .unwrap_or_default(),
        }),
    }
}

/// The stored record of `event`, committed at `recorded_at`.
pub fn event_record(recorded_at: DateTime<Utc>, event: &Event) -> proto::EventRecord {
    proto::EventRecord {
        recorded_at: Some(timestamp(recorded_at)),
        payload: Some(event_payload(event)),
    }
}

/// A catalog target as the Target message.
pub fn target(entry: &TargetEntry) -> proto::Target {
    proto::Target {
        definition: Some(target_definition(&entry.definition)),
        version: entry.version,
        updated_at: Some(timestamp(entry.updated_at)),
        seq: entry.seq,
    }
}
