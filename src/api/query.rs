//! The kpi.v1.Query service: aggregates, trends, target status and live watching.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use chrono::Utc;

use super::watch::{WatchFilter, Watcher};
use crate::domain::Rejection;
use crate::domain::aggregate::{self, Detail};
use crate::domain::target_status::TargetState;
use crate::domain::trend::{self, TrendMethod};
use crate::projection::analysis::{TargetAnswer, TrendAnswer, TrendQuery};
use crate::projection::{AggregateQuery, AnsweredBucket, Fill};
use crate::proto::query_server::Query;
use crate::proto::{self, as_of, from_proto, to_proto};
use crate::service::streams::StreamKind;
use crate::service::{AsOf, KpiService, TargetSelector};

/// Updates a watcher may have ready before its client reads them; past this the watcher
/// stops reading the log (its backlog stays there, not in memory).
const WATCH_BUFFER: usize = 256;

/// gRPC adapter of the queries.
pub struct QueryApi {
    service: KpiService,
}

impl QueryApi {
    /// Serves the queries of `service`.
    pub fn new(service: KpiService) -> Self {
        Self { service }
    }
}

/// The as-of point of a request, if it names one.
pub fn as_of(value: Option<proto::AsOf>) -> Result<Option<AsOf>, Rejection> {
    Ok(match value.and_then(|v| v.point) {
        None => None,
        Some(as_of::Point::Seq(seq)) => Some(AsOf::Seq(seq)),
        Some(as_of::Point::RecordedAt(at)) => Some(AsOf::RecordedAt(from_proto::timestamp(
            &at,
            "as_of.recorded_at",
        )?)),
    })
}

/// A GetAggregates request as a query.
fn aggregate_query(
    request: proto::GetAggregatesRequest,
) -> Result<(AggregateQuery, Option<AsOf>), Rejection> {
    let grain = from_proto::grain(request.grain, "grain")?
        .ok_or_else(|| Rejection::invalid("grain", "required"))?;
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
        start: from_proto::required_timestamp(request.start.as_ref(), "start")?,
        end: from_proto::required_timestamp(request.end.as_ref(), "end")?,
        kpi_id: request.kpi_id,
        grain,
        filter: request.filter,
        group_by: request.group_by,
        fill,
    };
    Ok((query, as_of(request.as_of)?))
}

/// An interval of a bucket detail or a forecast.
fn interval(interval: &aggregate::Interval) -> proto::Interval {
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
            occurred_at: Some(to_proto::timestamp(d.occurred_at)),
            seq: d.seq,
        }),
    });
    proto::Bucket {
        start: Some(to_proto::timestamp(answered.bucket.start)),
        end: Some(to_proto::timestamp(answered.bucket.end)),
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

/// A GetTrend request as a query.
fn trend_query(request: proto::GetTrendRequest) -> Result<(TrendQuery, Option<AsOf>), Rejection> {
    let grain = from_proto::grain(request.grain, "grain")?
        .ok_or_else(|| Rejection::invalid("grain", "required"))?;
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
        Some(at) => from_proto::timestamp(at, "evaluated_at")?,
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

/// The GetTrend response of an answer.
fn trend_response(answer: &TrendAnswer) -> proto::GetTrendResponse {
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
                start: Some(to_proto::timestamp(at.start)),
                end: Some(to_proto::timestamp(at.end)),
                value: prediction.value,
                interval: prediction.interval.as_ref().map(interval),
            })
            .collect(),
    }
}

/// The protobuf enum of a target state.
fn target_state(state: TargetState) -> proto::TargetState {
    match state {
        TargetState::Achieved => proto::TargetState::Achieved,
        TargetState::OnTrack => proto::TargetState::OnTrack,
        TargetState::AtRisk => proto::TargetState::AtRisk,
        TargetState::OffTrack => proto::TargetState::OffTrack,
        TargetState::Missed => proto::TargetState::Missed,
    }
}

/// The TargetStatus message of an answer.
pub(crate) fn target_status(answer: &TargetAnswer) -> proto::TargetStatus {
    let verdict = &answer.verdict;
    proto::TargetStatus {
        target: Some(to_proto::target(&answer.target)),
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
        required_rate_grain: to_proto::grain(answer.rate_grain).into(),
        estimated_reached_at: answer.estimated_reached_at.map(to_proto::timestamp),
        periods: answer
            .periods
            .iter()
            .map(|period| proto::PeriodStatus {
                start: Some(to_proto::timestamp(period.bucket.start)),
                end: Some(to_proto::timestamp(period.bucket.end)),
                actual: period.actual,
                state: target_state(period.state).into(),
                current: period.current,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Query for QueryApi {
    type GetAggregatesStream =
        Pin<Box<dyn Stream<Item = Result<proto::GetAggregatesResponse, Status>> + Send>>;

    async fn get_aggregates(
        &self,
        request: Request<proto::GetAggregatesRequest>,
    ) -> Result<Response<Self::GetAggregatesStream>, Status> {
        let (query, as_of) = aggregate_query(request.into_inner())?;
        let answer = self.service.get_aggregates(query, as_of).await?;
        // The answer is bounded (see `projection::aggregates`), so it is computed whole
        // and streamed from memory.
        let responses = answer.into_iter().map(|answered| {
            Ok(proto::GetAggregatesResponse {
                bucket: Some(bucket(&answered)),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(responses))))
    }

    async fn get_trend(
        &self,
        request: Request<proto::GetTrendRequest>,
    ) -> Result<Response<proto::GetTrendResponse>, Status> {
        let (query, as_of) = trend_query(request.into_inner())?;
        let answer = self.service.get_trend(query, as_of).await?;
        Ok(Response::new(trend_response(&answer)))
    }

    async fn get_target_status(
        &self,
        request: Request<proto::GetTargetStatusRequest>,
    ) -> Result<Response<proto::GetTargetStatusResponse>, Status> {
        let request = request.into_inner();
        let selector = match request.selector {
            Some(proto::get_target_status_request::Selector::TargetId(id)) => {
                TargetSelector::Target(id)
            }
            Some(proto::get_target_status_request::Selector::KpiId(id)) => TargetSelector::Kpi(id),
            None => {
                return Err(Rejection::invalid("selector", "give a target_id or a kpi_id").into());
            }
        };
        let evaluated_at = request
            .evaluated_at
            .map(|at| from_proto::timestamp(&at, "evaluated_at"))
            .transpose()?;
        let as_of = as_of(request.as_of)?;
        let answers = self
            .service
            .get_target_status(selector, evaluated_at, as_of)
            .await?;
        Ok(Response::new(proto::GetTargetStatusResponse {
            statuses: answers.iter().map(target_status).collect(),
        }))
    }

    type WatchKpisStream =
        Pin<Box<dyn Stream<Item = Result<proto::WatchKpisResponse, Status>> + Send>>;

    async fn watch_kpis(
        &self,
        request: Request<proto::WatchKpisRequest>,
    ) -> Result<Response<Self::WatchKpisStream>, Status> {
        let remote_addr = request.remote_addr();
        let request = request.into_inner();
        let grain = from_proto::grain(request.grain, "grain")?
            .ok_or_else(|| Rejection::invalid("grain", "required"))?;
        self.service.check_known_kpis(&request.kpi_ids, "kpi_ids")?;
        let handle = self.service.open_stream(
            StreamKind::WatchKpis,
            remote_addr,
            request.from_seq.saturating_sub(1),
        )?;
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let filter = WatchFilter {
            kpi_ids: request.kpi_ids.into_iter().collect(),
            grain,
            labels: request.filter,
        };
        let watcher = Watcher::new(
            self.service.clone(),
            filter,
            request.from_seq,
            sender,
            handle,
        );
        tokio::spawn(watcher.run());
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}
