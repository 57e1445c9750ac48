//! The kpi.v1.Query service: aggregates now; trends, target status and live watching
//! answer UNIMPLEMENTED until the projections behind them land.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::domain::Rejection;
use crate::domain::aggregate::{self, Detail};
use crate::projection::{AggregateQuery, AnsweredBucket, Fill};
use crate::proto::query_server::Query;
use crate::proto::{self, as_of, from_proto, to_proto};
use crate::service::{AsOf, KpiService};

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

/// An interval of a bucket detail.
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
        _request: Request<proto::GetTrendRequest>,
    ) -> Result<Response<proto::GetTrendResponse>, Status> {
        Err(super::not_yet("GetTrend"))
    }

    async fn get_target_status(
        &self,
        _request: Request<proto::GetTargetStatusRequest>,
    ) -> Result<Response<proto::GetTargetStatusResponse>, Status> {
        Err(super::not_yet("GetTargetStatus"))
    }

    type WatchKpisStream =
        Pin<Box<dyn Stream<Item = Result<proto::WatchKpisResponse, Status>> + Send>>;

    async fn watch_kpis(
        &self,
        _request: Request<proto::WatchKpisRequest>,
    ) -> Result<Response<Self::WatchKpisStream>, Status> {
        Err(super::not_yet("WatchKpis"))
    }
}
