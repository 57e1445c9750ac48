//! Domain types to kpi.v1 messages. Infallible (but for a stored record's bytes): domain
//! values are valid by construction.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use super::event_record::Payload;
use crate::domain::aggregate::{self, Detail};
use crate::domain::measurement::Recorded;
use crate::domain::query::{
    AnsweredBucket, BucketChange, ListedStreams, LogInfo, StreamInfo, StreamKind, TargetAnswer,
    TrendAnswer, Verification,
};
use crate::domain::signed_head::SignedHead;
use crate::domain::target_status::TargetState;
use crate::domain::trend;
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
        ..Default::default()
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

/// An interval of a bucket detail or a forecast.
pub fn interval(interval: &aggregate::Interval) -> proto::Interval {
    proto::Interval {
        lower: interval.lower,
        upper: interval.upper,
        level: interval.level,
    }
}

/// One answered bucket of GetAggregates.
pub fn bucket(answered: &AnsweredBucket) -> proto::Bucket {
    use proto::bucket::Detail as P;
    let summary = &answered.summary;
    let detail = summary.detail.as_ref().map(|detail| match detail {
        Detail::Average(d) => P::Average(proto::AverageDetail { stddev: d.stddev }),
        Detail::Ratio(d) => P::Ratio(proto::RatioDetail {
            numerator: d.numerator,
            denominator: d.denominator,
            scale: d.scale,
            numerator_count: d.numerator_count,
            denominator_count: d.denominator_count,
        }),
        Detail::Nps(d) => P::Nps(proto::NpsDetail {
            histogram: d.histogram.to_vec(),
            promoters: d.promoters,
            passives: d.passives,
            detractors: d.detractors,
            interval: Some(interval(&d.interval)),
            thin_sample: d.thin_sample,
        }),
        Detail::Csat(d) => P::Csat(proto::CsatDetail {
            histogram: d.histogram.to_vec(),
            satisfied: d.satisfied,
            interval: Some(interval(&d.interval)),
            mean_rating: d.mean_rating,
            mean_rating_interval: d.mean_rating_interval.as_ref().map(interval),
            thin_sample: d.thin_sample,
        }),
        Detail::Percentile(d) => P::Percentile(proto::PercentileDetail {
            p50: d.p50,
            p90: d.p90,
            p95: d.p95,
            p99: d.p99,
            relative_error: d.relative_error,
        }),
        Detail::Last(d) => P::Last(proto::LastDetail {
            occurred_at: Some(timestamp(d.occurred_at)),
            seq: d.seq,
        }),
    });
    proto::Bucket {
        start: Some(timestamp(answered.bucket.start)),
        end: Some(timestamp(answered.bucket.end)),
        labels: answered.labels.clone(),
        value: summary.value,
        count: summary.count,
        sum: summary.sum,
        min: summary.min,
        max: summary.max,
        definition_version: answered.definition_version,
        detail,
    }
}

/// The GetTrend response of an answer.
pub fn trend_response(answer: &TrendAnswer) -> proto::GetTrendResponse {
    let report = &answer.report;
    proto::GetTrendResponse {
        buckets: answer.buckets.iter().map(bucket).collect(),
        latest: report.latest,
        previous: report.previous,
        absolute_change: report.absolute_change,
        relative_change: report.relative_change,
        year_over_year_change: report.year_over_year_change,
        moving_average: report.moving_average,
        fit: report.fit.map(|fit| proto::LinearFit {
            slope: fit.slope,
            intercept: fit.intercept,
            r_squared: fit.r_squared,
        }),
        forecast: answer
            .forecast
            .iter()
            .map(|(at, prediction)| proto::ForecastPoint {
                start: Some(timestamp(at.start)),
                end: Some(timestamp(at.end)),
                value: prediction.value,
                interval: prediction.interval.as_ref().map(interval),
            })
            .collect(),
    }
}

/// The protobuf enum of a target state.
pub fn target_state(state: TargetState) -> proto::TargetState {
    match state {
        TargetState::Achieved => proto::TargetState::Achieved,
        TargetState::OnTrack => proto::TargetState::OnTrack,
        TargetState::AtRisk => proto::TargetState::AtRisk,
        TargetState::OffTrack => proto::TargetState::OffTrack,
        TargetState::Missed => proto::TargetState::Missed,
    }
}

/// The TargetStatus message of an answer.
pub fn target_status(answer: &TargetAnswer) -> proto::TargetStatus {
    let verdict = &answer.verdict;
    proto::TargetStatus {
        target: Some(target(&answer.target)),
        state: target_state(verdict.state).into(),
        reason: verdict.reason.clone(),
        actual: answer.actual,
        progress: verdict.progress,
        elapsed_fraction: verdict.elapsed_fraction,
        expected_now: verdict.expected_now,
        projected: verdict.projected.map(|p| p.value),
        projected_interval: verdict.projected.and_then(|p| {
            p.lower.zip(p.upper).map(|(lower, upper)| proto::Interval {
                lower,
                upper,
                level: trend::PREDICTION_LEVEL,
            })
        }),
        required_rate: verdict.required_rate,
        required_rate_grain: grain(answer.rate_grain).into(),
        estimated_reached_at: answer.estimated_reached_at.map(timestamp),
        periods: answer
            .periods
            .iter()
            .map(|period| proto::PeriodStatus {
                start: Some(timestamp(period.bucket.start)),
                end: Some(timestamp(period.bucket.end)),
                actual: period.actual,
                state: target_state(period.state).into(),
                current: period.current,
            })
            .collect(),
    }
}

/// A changed bucket as the BucketUpdate message.
pub fn bucket_update(change: &BucketChange) -> proto::BucketUpdate {
    proto::BucketUpdate {
        kpi_id: change.kpi_id.clone(),
        bucket: Some(bucket(&change.bucket)),
        seq: change.seq,
        revised: change.revised,
        targets: change.targets.iter().map(target_status).collect(),
    }
}

/// A watcher's position as the Heartbeat message.
pub fn heartbeat(head_seq: u64, at: DateTime<Utc>) -> proto::Heartbeat {
    proto::Heartbeat {
        head_seq,
        at: Some(timestamp(at)),
    }
}

/// A replay's position as the Checkpoint message.
pub fn checkpoint(seq: u64, at: DateTime<Utc>, signed: Option<&SignedHead>) -> proto::Checkpoint {
    proto::Checkpoint {
        seq,
        at: Some(timestamp(at)),
        signed_head: signed.map(signed_head),
    }
}

/// A head the server signed.
pub fn signed_head(head: &SignedHead) -> proto::SignedHead {
    proto::SignedHead {
        seq: head.seq,
        hash: head.hash.to_vec(),
        signed_at: Some(timestamp(head.signed_at)),
        public_key: head.public_key.to_vec(),
        signature: head.signature.to_vec(),
    }
}

/// A stored event as the replay envelope: the record bytes verbatim and decoded. The
/// bytes come from the log, so an error means a damaged or unknown record.
pub fn envelope(
    seq: u64,
    recorded_at: DateTime<Utc>,
    prev_hash: &[u8],
    hash: &[u8],
    record: &[u8],
) -> Result<proto::EventEnvelope, prost::DecodeError> {
    use prost::Message;
    Ok(proto::EventEnvelope {
        seq,
        recorded_at: Some(timestamp(recorded_at)),
        prev_hash: prev_hash.to_vec(),
        hash: hash.to_vec(),
        record: record.to_vec(),
        event: Some(proto::EventRecord::decode(record)?),
    })
}

/// The open streams as the ListStreams response.
pub fn list_streams(listed: &ListedStreams) -> proto::ListStreamsResponse {
    proto::ListStreamsResponse {
        streams: listed.streams.iter().map(stream_info).collect(),
        head_seq: listed.head_seq,
        max_streams: u32::try_from(listed.max_streams).unwrap_or(u32::MAX),
        watch_pending_limit: u64::try_from(listed.watch_pending_limit).unwrap_or(u64::MAX),
    }
}

/// One open stream as the StreamInfo message.
fn stream_info(info: &StreamInfo) -> proto::StreamInfo {
    proto::StreamInfo {
        id: info.id,
        kind: match info.kind {
            StreamKind::WatchKpis => proto::StreamKind::WatchKpis,
            StreamKind::ReplayEvents => proto::StreamKind::ReplayEvents,
        } as i32,
        peer: info.peer.map(|peer| peer.to_string()).unwrap_or_default(),
        opened_at: Some(timestamp(info.opened_at)),
        position_seq: info.position,
        messages_sent: info.sent,
        pending_updates: info.pending,
        max_pending_updates: info.max_pending,
    }
}

/// Where a recorded measurement is in the log, as the RecordResult message.
pub fn record_result(recorded: &Recorded) -> proto::RecordResult {
    proto::RecordResult {
        seq: recorded.seq,
        duplicate: recorded.duplicate,
    }
}

/// A verification of the log as the VerifyLog response.
pub fn verify_log(verification: &Verification) -> proto::VerifyLogResponse {
    let mut response = proto::VerifyLogResponse {
        ok: verification.result.is_ok(),
        checked_events: verification.checked_events,
        head_seq: verification.head_seq,
        ..Default::default()
    };
    match &verification.result {
        Ok(hash) => response.head_hash = hash.to_vec(),
        Err(chain_break) => {
            response.chain_break = Some(proto::ChainBreak {
                seq: chain_break.seq,
                reason: chain_break.reason.clone(),
                expected_hash: chain_break
                    .expected_hash
                    .map(|h| h.to_vec())
                    .unwrap_or_default(),
                stored_hash: chain_break
                    .stored_hash
                    .map(|h| h.to_vec())
                    .unwrap_or_default(),
            });
        }
    }
    response
}

/// The head and the start of the read models as the GetLogInfo response.
pub fn log_info(info: &LogInfo) -> proto::GetLogInfoResponse {
    proto::GetLogInfoResponse {
        head_seq: info.head_seq,
        head_hash: info.head_hash.to_vec(),
        event_count: info.head_seq,
        head_recorded_at: info.head_recorded_at.map(timestamp),
        restored_snapshot_seq: info.restored_snapshot_seq,
        replayed_events: info.replayed_events,
        signed_head: info.signed_head.as_ref().map(signed_head),
    }
}
