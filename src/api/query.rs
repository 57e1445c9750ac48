//! The kpi.v1.Query service. Its RPCs are part of the contract already; they answer
//! UNIMPLEMENTED until the projections behind them land.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto::query_server::Query;
use crate::proto::{self};

/// gRPC adapter of the queries.
pub struct QueryApi;

#[tonic::async_trait]
impl Query for QueryApi {
    type GetAggregatesStream =
        Pin<Box<dyn Stream<Item = Result<proto::GetAggregatesResponse, Status>> + Send>>;

    async fn get_aggregates(
        &self,
        _request: Request<proto::GetAggregatesRequest>,
    ) -> Result<Response<Self::GetAggregatesStream>, Status> {
        Err(super::not_yet("GetAggregates"))
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
