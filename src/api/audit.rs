//! The kpi.v1.Audit service: the log itself, its digest and its verification.

use std::pin::Pin;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::proto::audit_server::Audit;
use crate::proto::replay_events_response::Item;
use crate::proto::{self, from_proto, to_proto};
use crate::service::{KpiService, ReplayItem};

/// gRPC adapter of the audit reads.
pub struct AuditApi {
    service: KpiService,
}

impl AuditApi {
    /// Serves the audit reads of `service`.
    pub fn new(service: KpiService) -> Self {
        Self { service }
    }
}

/// The message of a replay's item; a record that does not decode ends the stream.
fn replay_response(item: ReplayItem) -> Result<proto::ReplayEventsResponse, Status> {
    let item = match item {
        ReplayItem::Event(stored) => Item::Event(
            to_proto::envelope(
                stored.seq,
                stored.recorded_at,
                &stored.prev_hash,
                &stored.hash,
                &stored.record,
            )
            .map_err(|error| super::status::undecodable_record_status(stored.seq, &error))?,
        ),
        ReplayItem::Checkpoint { seq, at, signed } => {
            Item::Checkpoint(to_proto::checkpoint(seq, at, signed.as_ref()))
        }
    };
    Ok(proto::ReplayEventsResponse { item: Some(item) })
}

#[tonic::async_trait]
impl Audit for AuditApi {
    type ReplayEventsStream =
        Pin<Box<dyn Stream<Item = Result<proto::ReplayEventsResponse, Status>> + Send>>;

    async fn replay_events(
        &self,
        request: Request<proto::ReplayEventsRequest>,
    ) -> Result<Response<Self::ReplayEventsStream>, Status> {
        let peer = request.remote_addr();
        let query = from_proto::replay_query(request.into_inner())?;
        let items = self.service.replay_events(query, peer).await?;
        let responses = ReceiverStream::new(items)
            .map(|item| item.map_err(Status::from).and_then(replay_response));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn verify_log(
        &self,
        _request: Request<proto::VerifyLogRequest>,
    ) -> Result<Response<proto::VerifyLogResponse>, Status> {
        let verification = self.service.verify_log().await?;
        Ok(Response::new(to_proto::verify_log(&verification)))
    }

    async fn get_log_info(
        &self,
        _request: Request<proto::GetLogInfoRequest>,
    ) -> Result<Response<proto::GetLogInfoResponse>, Status> {
        Ok(Response::new(to_proto::log_info(&self.service.log_info())))
    }

    async fn list_streams(
        &self,
        _request: Request<proto::ListStreamsRequest>,
    ) -> Result<Response<proto::ListStreamsResponse>, Status> {
        Ok(Response::new(to_proto::list_streams(
            &self.service.list_streams(),
        )))
    }
}
