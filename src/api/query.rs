//! The kpi.v1.Query service: aggregates, trends, target status and live watching.

use std::pin::Pin;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::proto::query_server::Query;
use crate::proto::watch_kpis_response::Item;
use crate::proto::{self, from_proto, to_proto};
use crate::service::{KpiService, WatchItem};

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

/// The message of a watcher's item.
fn watch_response(item: WatchItem) -> proto::WatchKpisResponse {
    let item = match item {
        WatchItem::Snapshot(change) => Item::Snapshot(to_proto::bucket_update(&change)),
        WatchItem::SnapshotComplete { head_seq, at } => {
            Item::SnapshotComplete(to_proto::heartbeat(head_seq, at))
        }
        WatchItem::Update(change) => Item::Update(to_proto::bucket_update(&change)),
        WatchItem::Heartbeat { head_seq, at } => Item::Heartbeat(to_proto::heartbeat(head_seq, at)),
    };
    proto::WatchKpisResponse { item: Some(item) }
}

#[tonic::async_trait]
impl Query for QueryApi {
    type GetAggregatesStream =
        Pin<Box<dyn Stream<Item = Result<proto::GetAggregatesResponse, Status>> + Send>>;

    async fn get_aggregates(
        &self,
        request: Request<proto::GetAggregatesRequest>,
    ) -> Result<Response<Self::GetAggregatesStream>, Status> {
        let (query, as_of) = from_proto::aggregate_query(request.into_inner())?;
        let answer = self.service.get_aggregates(query, as_of).await?;
        // The answer is bounded (see `projection::aggregates`), so it is computed whole
        // and streamed from memory.
        let responses = answer.into_iter().map(|answered| {
            Ok(proto::GetAggregatesResponse {
                bucket: Some(to_proto::bucket(&answered)),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(responses))))
    }

    async fn get_trend(
        &self,
        request: Request<proto::GetTrendRequest>,
    ) -> Result<Response<proto::GetTrendResponse>, Status> {
        let (query, as_of) = from_proto::trend_query(request.into_inner())?;
        let answer = self.service.get_trend(query, as_of).await?;
        Ok(Response::new(to_proto::trend_response(&answer)))
    }

    async fn get_target_status(
        &self,
        request: Request<proto::GetTargetStatusRequest>,
    ) -> Result<Response<proto::GetTargetStatusResponse>, Status> {
        let request = request.into_inner();
        let selector = from_proto::target_selector(request.selector)?;
        let evaluated_at = request
            .evaluated_at
            .map(|at| from_proto::timestamp(&at, "evaluated_at"))
            .transpose()?;
        let as_of = from_proto::as_of(request.as_of)?;
        let answers = self
            .service
            .get_target_status(selector, evaluated_at, as_of)
            .await?;
        Ok(Response::new(proto::GetTargetStatusResponse {
            statuses: answers.iter().map(to_proto::target_status).collect(),
        }))
    }

    type WatchKpisStream =
        Pin<Box<dyn Stream<Item = Result<proto::WatchKpisResponse, Status>> + Send>>;

    async fn watch_kpis(
        &self,
        request: Request<proto::WatchKpisRequest>,
    ) -> Result<Response<Self::WatchKpisStream>, Status> {
        let peer = request.remote_addr();
        let query = from_proto::watch_query(request.into_inner())?;
        let items = self.service.watch_kpis(query, peer)?;
        let responses =
            ReceiverStream::new(items).map(|item| item.map(watch_response).map_err(Status::from));
        Ok(Response::new(Box::pin(responses)))
    }
}
