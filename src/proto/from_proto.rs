//! kpi.v1 messages to domain types, checking what the wire format cannot express.
//!
//! Every function takes the field path of its message so that a rejection names the exact
//! field, such as `measurements[3].occurred_at`. Stored records go through the same
//! functions; for them a rejection means the record is corrupt.
//!
//! Size: about 540 lines, one short function per message or field kind; splitting them by
//! service would separate the shared field checks from their callers.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use super::as_of;
use super::event_record::Payload;
use crate::domain::kpi::{DEFAULT_RATIO_SCALE, parse_timezone};
use crate::domain::measurement::RetractTarget;
use crate::domain::query::{
    AggregateQuery, AsOf, Fill, ReplayQuery, ReplayStart, TargetSelector, TrendQuery, WatchQuery,
};
use crate::domain::trend::TrendMethod;
use crate::domain::{
    Direction, Event, Grain, KpiDefinition, KpiKind, Measurement, RatioSettings, Rejection,
    TargetDefinition, TargetMode,
};
use crate::proto;

/// Tolerance of a target when the client gives none (SPEC: 10%).
pub const DEFAULT_TARGET_TOLERANCE: f64 = 0.10;

/// A protobuf Timestamp as a UTC instant; rejects nanos outside 0..1e9 and instants chrono
/// cannot represent.
pub fn timestamp(value: &Timestamp, field: &str) -> Result<DateTime<Utc>, Rejection> {
    let nanos = u32::try_from(value.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .ok_or_else(|| {
            Rejection::invalid(
                field,
                format!("nanos must be within 0..999999999, got {}", value.nanos),
            )
        })?;
    DateTime::from_timestamp(value.seconds, nanos).ok_or_else(|| {
        Rejection::invalid(field, format!("seconds {} is out of range", value.seconds))
    })
}

/// The KPI id a ListKpis page token continues after (see [`super::to_proto::page_token`]);
/// empty for an empty token (the first page). INVALID_ARGUMENT for anything this server did
/// not hand out.
pub fn page_token(token: &str, field: &str) -> Result<String, Rejection> {
    use base64::Engine;
    if token.is_empty() {
        return Ok(String::new());
    }
    let malformed = || {
        Rejection::invalid(
            field,
            "not a page token from this server (pass next_page_token unchanged, or empty for the first page)",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| malformed())?;
    let (body, check) = bytes.split_last_chunk::<4>().ok_or_else(malformed)?;
    if crc32fast::hash(body) != u32::from_be_bytes(*check) {
        return Err(malformed());
    }
    match body.split_first() {
        Some((&super::to_proto::PAGE_TOKEN_VERSION, id)) => {
            String::from_utf8(id.to_vec()).map_err(|_| malformed())
        }
        _ => Err(malformed()),
    }
}

/// A required Timestamp field.
pub fn required_timestamp(
    value: Option<&Timestamp>,
    field: &str,
) -> Result<DateTime<Utc>, Rejection> {
    match value {
        Some(value) => timestamp(value, field),
        None => Err(Rejection::invalid(field, "required")),
    }
}

/// A KPI kind; unspecified and unknown numbers are rejected.
pub fn kpi_kind(value: i32, field: &str) -> Result<KpiKind, Rejection> {
    Ok(match proto::KpiKind::try_from(value) {
        Ok(proto::KpiKind::Sum) => KpiKind::Sum,
        Ok(proto::KpiKind::Count) => KpiKind::Count,
        Ok(proto::KpiKind::Average) => KpiKind::Average,
        Ok(proto::KpiKind::Min) => KpiKind::Min,
        Ok(proto::KpiKind::Max) => KpiKind::Max,
        Ok(proto::KpiKind::Last) => KpiKind::Last,
        Ok(proto::KpiKind::Ratio) => KpiKind::Ratio,
        Ok(proto::KpiKind::Nps) => KpiKind::Nps,
        Ok(proto::KpiKind::Csat) => KpiKind::Csat,
        Ok(proto::KpiKind::Percentile) => KpiKind::Percentile,
        Ok(proto::KpiKind::Distinct) => KpiKind::Distinct,
        Ok(proto::KpiKind::Unspecified) => return Err(Rejection::invalid(field, "required")),
        Err(_) => {
            return Err(Rejection::invalid(
                field,
                format!("unknown kind number {value}"),
            ));
        }
    })
}

/// A direction; unspecified means higher is better.
pub fn direction(value: i32, field: &str) -> Result<Direction, Rejection> {
    match proto::Direction::try_from(value) {
        Ok(proto::Direction::Unspecified | proto::Direction::HigherIsBetter) => {
            Ok(Direction::HigherIsBetter)
        }
        Ok(proto::Direction::LowerIsBetter) => Ok(Direction::LowerIsBetter),
        Err(_) => Err(Rejection::invalid(
            field,
            format!("unknown direction number {value}"),
        )),
    }
}

/// A grain; `None` when unspecified.
pub fn grain(value: i32, field: &str) -> Result<Option<Grain>, Rejection> {
    Ok(Some(match proto::Grain::try_from(value) {
        Ok(proto::Grain::Unspecified) => return Ok(None),
        Ok(proto::Grain::Hour) => Grain::Hour,
        Ok(proto::Grain::Day) => Grain::Day,
        Ok(proto::Grain::Week) => Grain::Week,
        Ok(proto::Grain::Month) => Grain::Month,
        Ok(proto::Grain::Quarter) => Grain::Quarter,
        Ok(proto::Grain::Year) => Grain::Year,
        Err(_) => {
            return Err(Rejection::invalid(
                field,
                format!("unknown grain number {value}"),
            ));
        }
    }))
}

/// A KPI definition with defaults filled in. Rules that need only the definition are
/// checked by `KpiDefinition::validate`, rules that need the catalog by the catalog.
pub fn kpi_definition(
    value: proto::KpiDefinition,
    field: &str,
) -> Result<KpiDefinition, Rejection> {
    let kind = kpi_kind(value.kind, &format!("{field}.kind"))?;
    Ok(KpiDefinition {
        direction: direction(value.direction, &format!("{field}.direction"))?,
        timezone: parse_timezone(&value.timezone, &format!("{field}.timezone"))?,
        ratio: value.ratio.map(|ratio| RatioSettings {
            numerator_kpi_id: ratio.numerator_kpi_id,
            denominator_kpi_id: ratio.denominator_kpi_id,
            scale: ratio.scale.unwrap_or(DEFAULT_RATIO_SCALE),
        }),
        id: value.id,
        name: value.name,
        description: value.description,
        unit: value.unit,
        kind,
        dimensions: value.dimensions,
    })
}

/// A measurement; an absent occurred_at becomes `received_at`.
pub fn measurement(
    value: proto::Measurement,
    field: &str,
    received_at: DateTime<Utc>,
) -> Result<Measurement, Rejection> {
    let occurred_at = match &value.occurred_at {
        Some(ts) => timestamp(ts, &format!("{field}.occurred_at"))?,
        None => received_at,
    };
    Ok(Measurement {
        kpi_id: value.kpi_id,
        value: value.value,
        occurred_at,
        labels: value.labels,
        subject: non_empty(value.subject),
        event_id: non_empty(value.event_id),
    })
}

/// A target definition with defaults filled in.
pub fn target_definition(
    value: proto::TargetDefinition,
    field: &str,
) -> Result<TargetDefinition, Rejection> {
    let mode = match proto::TargetMode::try_from(value.mode) {
        Ok(proto::TargetMode::Cumulative) => TargetMode::Cumulative,
        Ok(proto::TargetMode::Level) => TargetMode::Level,
        Ok(proto::TargetMode::Unspecified) => {
            return Err(Rejection::invalid(format!("{field}.mode"), "required"));
        }
        Err(_) => {
            return Err(Rejection::invalid(
                format!("{field}.mode"),
                format!("unknown mode number {}", value.mode),
            ));
        }
    };
    Ok(TargetDefinition {
        start: required_timestamp(value.start.as_ref(), &format!("{field}.start"))?,
        deadline: required_timestamp(value.deadline.as_ref(), &format!("{field}.deadline"))?,
        period_grain: grain(value.period_grain, &format!("{field}.period_grain"))?,
        tolerance: value.tolerance.unwrap_or(DEFAULT_TARGET_TOLERANCE),
        id: value.id,
        kpi_id: value.kpi_id,
        name: value.name,
        value: value.value,
        mode,
    })
}

/// A stored record: its recorded_at and its event.
pub fn event_record(value: proto::EventRecord) -> Result<(DateTime<Utc>, Event), Rejection> {
    let recorded_at = required_timestamp(value.recorded_at.as_ref(), "recorded_at")?;
    let event = match value.payload {
        None => return Err(Rejection::invalid("payload", "required")),
        Some(Payload::KpiDefined(p)) => Event::KpiDefined {
            definition: kpi_definition(
                required(p.definition, "kpi_defined.definition")?,
                "kpi_defined.definition",
            )?,
        },
        Some(Payload::KpiUpdated(p)) => Event::KpiUpdated {
            definition: kpi_definition(
                required(p.definition, "kpi_updated.definition")?,
                "kpi_updated.definition",
            )?,
            version: p.version,
        },
        Some(Payload::KpiRetired(p)) => Event::KpiRetired {
            kpi_id: p.kpi_id,
            reason: p.reason,
            version: p.version,
        },
        Some(Payload::TargetSet(p)) => Event::TargetSet {
            target: target_definition(
                required(p.target, "target_set.target")?,
                "target_set.target",
            )?,
            version: p.version,
        },
        Some(Payload::TargetRemoved(p)) => Event::TargetRemoved {
            target_id: p.target_id,
            reason: p.reason,
        },
        Some(Payload::MeasurementRecorded(p)) => {
            let stored = required(p.measurement, "measurement_recorded.measurement")?;
            if stored.occurred_at.is_none() {
                return Err(Rejection::invalid(
                    "measurement_recorded.measurement.occurred_at",
                    "required",
                ));
            }
            Event::MeasurementRecorded(measurement(
                stored,
                "measurement_recorded.measurement",
                recorded_at,
            )?)
        }
        Some(Payload::MeasurementRetracted(p)) => Event::MeasurementRetracted {
            retracted_seq: p.retracted_seq,
            reason: p.reason,
        },
        Some(Payload::EventsLost(p)) => Event::EventsLost {
            first_seq: p.first_seq,
            last_seq: p.last_seq,
            reason: p.reason,
            acknowledged_hash: match p.acknowledged_hash.len() {
                0 => None,
                _ => Some(p.acknowledged_hash.try_into().map_err(|_| {
                    Rejection::invalid("events_lost.acknowledged_hash", "must be 32 bytes")
                })?),
            },
        },
    };
    Ok((recorded_at, event))
}

/// The as-of point of a request, if it names one.
pub fn as_of(value: Option<proto::AsOf>) -> Result<Option<AsOf>, Rejection> {
    Ok(match value.and_then(|v| v.point) {
        None => None,
        Some(as_of::Point::Seq(seq)) => Some(AsOf::Seq(seq)),
        Some(as_of::Point::RecordedAt(at)) => {
            Some(AsOf::RecordedAt(timestamp(&at, "as_of.recorded_at")?))
        }
    })
}

/// A GetAggregates request as a query.
pub fn aggregate_query(
    request: proto::GetAggregatesRequest,
) -> Result<(AggregateQuery, Option<AsOf>), Rejection> {
    let grain =
        grain(request.grain, "grain")?.ok_or_else(|| Rejection::invalid("grain", "required"))?;
    let fill = match proto::Fill::try_from(request.fill) {
        Ok(proto::Fill::Unspecified | proto::Fill::None) => Fill::None,
        Ok(proto::Fill::Absent) => Fill::Absent,
        Ok(proto::Fill::Zero) => Fill::Zero,
        Err(_) => {
            return Err(Rejection::invalid(
                "fill",
                format!("unknown fill number {}", request.fill),
            ));
        }
    };
    let query = AggregateQuery {
        start: required_timestamp(request.start.as_ref(), "start")?,
        end: required_timestamp(request.end.as_ref(), "end")?,
        kpi_id: request.kpi_id,
        grain,
        filter: request.filter,
        group_by: request.group_by,
        fill,
    };
    Ok((query, as_of(request.as_of)?))
}

/// A GetTrend request as a query.
pub fn trend_query(
    request: proto::GetTrendRequest,
) -> Result<(TrendQuery, Option<AsOf>), Rejection> {
    let grain =
        grain(request.grain, "grain")?.ok_or_else(|| Rejection::invalid("grain", "required"))?;
    let method = match proto::TrendMethod::try_from(request.method) {
        Ok(proto::TrendMethod::Unspecified | proto::TrendMethod::Linear) => TrendMethod::Linear,
        Ok(proto::TrendMethod::Holt) => TrendMethod::Holt,
        Err(_) => {
            return Err(Rejection::invalid(
                "method",
                format!("unknown method number {}", request.method),
            ));
        }
    };
    let evaluated_at = match &request.evaluated_at {
        Some(at) => timestamp(at, "evaluated_at")?,
        None => Utc::now(),
    };
    let query = TrendQuery {
        kpi_id: request.kpi_id,
        grain,
        window: request.window,
        horizon: request.horizon,
        evaluated_at,
        filter: request.filter,
        method,
    };
    Ok((query, as_of(request.as_of)?))
}

/// The selector of a GetTargetStatus request.
pub fn target_selector(
    selector: Option<proto::get_target_status_request::Selector>,
) -> Result<TargetSelector, Rejection> {
    use proto::get_target_status_request::Selector;
    match selector {
        Some(Selector::TargetId(id)) => Ok(TargetSelector::Target(id)),
        Some(Selector::KpiId(id)) => Ok(TargetSelector::Kpi(id)),
        None => Err(Rejection::invalid(
            "selector",
            "give a target_id or a kpi_id",
        )),
    }
}

/// A WatchKpis request as a question.
pub fn watch_query(request: proto::WatchKpisRequest) -> Result<WatchQuery, Rejection> {
    let grain =
        grain(request.grain, "grain")?.ok_or_else(|| Rejection::invalid("grain", "required"))?;
    Ok(WatchQuery {
        kpi_ids: request.kpi_ids,
        grain,
        labels: request.filter,
        from_seq: request.from_seq,
    })
}

/// A batch of request measurements; absent occurred_at values become `received_at`.
pub fn measurements(
    batch: Vec<proto::Measurement>,
    received_at: DateTime<Utc>,
) -> Result<Vec<Measurement>, Rejection> {
    batch
        .into_iter()
        .enumerate()
        .map(|(i, m)| measurement(m, &format!("measurements[{i}]"), received_at))
        .collect()
}

/// What a Retract request withdraws.
pub fn retract_target(
    target: Option<proto::retract_request::Target>,
) -> Result<RetractTarget, Rejection> {
    use proto::retract_request::Target;
    match target {
        Some(Target::Seq(seq)) => Ok(RetractTarget::Seq(seq)),
        Some(Target::EventId(id)) => Ok(RetractTarget::EventId(id)),
        None => Err(Rejection::invalid(
            "target",
            "give the seq or the event_id to retract",
        )),
    }
}

/// The required definition of a DefineKpi or UpdateKpi request.
pub fn required_kpi_definition(
    definition: Option<proto::KpiDefinition>,
) -> Result<KpiDefinition, Rejection> {
    kpi_definition(required(definition, "definition")?, "definition")
}

/// A ReplayEvents request as a question.
pub fn replay_query(request: proto::ReplayEventsRequest) -> Result<ReplayQuery, Rejection> {
    use proto::replay_events_request::Start;
    let start = match request.start {
        None => None,
        Some(Start::FromSeq(seq)) => Some(ReplayStart::Seq(seq)),
        Some(Start::FromRecordedAt(at)) => {
            Some(ReplayStart::RecordedAt(timestamp(&at, "from_recorded_at")?))
        }
    };
    Ok(ReplayQuery {
        start,
        to_seq: request.to_seq,
        kpi_ids: request.kpi_ids,
        follow: request.follow,
    })
}
/// A message field that must be present.
fn required<T>(value: Option<T>, field: &str) -> Result<T, Rejection> {
    value.ok_or_else(|| Rejection::invalid(field, "required"))
}

/// proto3 strings are never absent; empty means "not given".
fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;
    use chrono_tz::Tz;

    use super::*;
    use crate::proto::to_proto;

    #[test]
    fn events_survive_the_round_trip() {
        let at = Utc.with_ymd_and_hms(2026, 3, 29, 1, 30, 0).unwrap();
        let definition = KpiDefinition {
            id: "conversion".into(),
            name: "Conversion".into(),
            description: "buyers per visitor".into(),
            unit: "%".into(),
            kind: KpiKind::Ratio,
            direction: Direction::HigherIsBetter,
            timezone: Tz::Europe__Amsterdam,
            dimensions: vec!["channel".into()],
            ratio: Some(RatioSettings {
                numerator_kpi_id: "buyers".into(),
                denominator_kpi_id: "visitors".into(),
                scale: 100.0,
            }),
        };
        let events = [
            Event::KpiDefined {
                definition: definition.clone(),
            },
            Event::KpiUpdated {
                definition,
                version: 2,
            },
            Event::KpiRetired {
                kpi_id: "conversion".into(),
                reason: "replaced".into(),
                version: 3,
            },
            Event::MeasurementRecorded(Measurement {
                kpi_id: "revenue".into(),
                value: 12.5,
                occurred_at: at,
                labels: BTreeMap::from([("channel".into(), "web".into())]),
                subject: Some("v1".into()),
                event_id: Some("order-1".into()),
            }),
            Event::MeasurementRetracted {
                retracted_seq: 4,
                reason: "test order".into(),
            },
            Event::EventsLost {
                first_seq: 5,
                last_seq: 9,
                reason: "lost".into(),
                acknowledged_hash: Some([7; 32]),
            },
            Event::TargetSet {
                target: TargetDefinition {
                    id: "t".into(),
                    kpi_id: "revenue".into(),
                    name: "T".into(),
                    value: 50.0,
                    start: at,
                    deadline: at + chrono::TimeDelta::days(180),
                    mode: TargetMode::Level,
                    period_grain: Some(Grain::Month),
                    tolerance: 0.1,
                },
                version: 1,
            },
            Event::TargetRemoved {
                target_id: "t".into(),
                reason: String::new(),
            },
        ];
        for event in events {
            let record = to_proto::event_record(at, &event);
            assert_eq!(event_record(record), Ok((at, event)));
        }
    }

    #[test]
    fn timestamps_reject_bad_nanos() {
        let bad = Timestamp {
            seconds: 0,
            nanos: 1_000_000_000,
        };
        assert!(timestamp(&bad, "t").is_err());
        let bad = Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert!(timestamp(&bad, "t").is_err());
    }
}
