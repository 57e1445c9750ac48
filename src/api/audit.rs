//! The kpi.v1.Audit service: the log itself, its digest and its verification.

use std::pin::Pin;

use chrono::TimeDelta;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::proto::audit_server::Audit;
use crate::proto::{self, from_proto, replay_events_request, to_proto};
use crate::service::KpiService;
use crate::store::StoredEvent;

/// Envelopes a replay may have ready before the client reads them; the reading thread
/// waits past this, so a slow auditor costs bounded memory.
const REPLAY_BUFFER: usize = 256;

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

/// The envelope of a stored event, with the record bytes verbatim.
fn envelope(stored: StoredEvent) -> Result<proto::EventEnvelope, Status> {
    let event = proto::EventRecord::decode(stored.record.as_ref()).map_err(|e| {
        tracing::error!(seq = stored.seq, error = %e, "stored record does not decode");
        Status::internal("a stored record does not decode; run VerifyLog")
    })?;
    Ok(proto::EventEnvelope {
        seq: stored.seq,
        recorded_at: Some(to_proto::timestamp(stored.recorded_at)),
        prev_hash: stored.prev_hash.to_vec(),
        hash: stored.hash.to_vec(),
        record: stored.record.to_vec(),
        event: Some(event),
    })
}

#[tonic::async_trait]
impl Audit for AuditApi {
    type ReplayEventsStream =
        Pin<Box<dyn Stream<Item = Result<proto::ReplayEventsResponse, Status>> + Send>>;

    async fn replay_events(
        &self,
        request: Request<proto::ReplayEventsRequest>,
    ) -> Result<Response<Self::ReplayEventsStream>, Status> {
        let request = request.into_inner();
        if request.follow {
            return Err(super::not_yet("ReplayEvents with follow"));
        }
        if !request.kpi_ids.is_empty() {
            return Err(super::not_yet("ReplayEvents with a kpi_ids filter"));
        }
        let log = self.service.log().clone();
        let from_seq = match request.start {
            None => 1,
            Some(replay_events_request::Start::FromSeq(seq)) => seq.max(1),
            Some(replay_events_request::Start::FromRecordedAt(at)) => {
                let at = from_proto::timestamp(&at, "from_recorded_at")?;
                let log = log.clone();
                // The first event recorded at or after `at` follows the last one before it.
                let before =
                    tokio::task::spawn_blocking(move || log.seq_at(at - TimeDelta::nanoseconds(1)))
                        .await
                        .map_err(|e| Status::internal(format!("replay lookup failed: {e}")))?
                        .map_err(|e| super::status::store_status(&e))?;
                before + 1
            }
        };
        let head = log.head().seq;
        let to_seq = match request.to_seq {
            None | Some(0) => head,
            Some(seq) => seq.min(head),
        };
        let (sender, receiver) = mpsc::channel(REPLAY_BUFFER);
        tokio::task::spawn_blocking(move || {
            for stored in log.read(from_seq, to_seq) {
                let item = stored
                    .map_err(|e| super::status::store_status(&e))
                    .and_then(envelope)
                    .map(|event| proto::ReplayEventsResponse {
                        item: Some(proto::replay_events_response::Item::Event(event)),
                    });
                let failed = item.is_err();
                // A failed send means the client went away: stop reading.
                if sender.blocking_send(item).is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn verify_log(
        &self,
        _request: Request<proto::VerifyLogRequest>,
    ) -> Result<Response<proto::VerifyLogResponse>, Status> {
        let log = self.service.log().clone();
        let verification = tokio::task::spawn_blocking(move || log.verify())
            .await
            .map_err(|e| Status::internal(format!("verification failed: {e}")))?
            .map_err(|e| super::status::store_status(&e))?;
        let mut response = proto::VerifyLogResponse {
            ok: verification.result.is_ok(),
            checked_events: verification.checked_events,
            head_seq: verification.head_seq,
            ..Default::default()
        };
        match verification.result {
            Ok(hash) => response.head_hash = hash.to_vec(),
            Err(chain_break) => {
                response.chain_break = Some(proto::ChainBreak {
                    seq: chain_break.seq,
                    reason: chain_break.reason,
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
        Ok(Response::new(response))
    }

    async fn get_log_info(
        &self,
        _request: Request<proto::GetLogInfoRequest>,
    ) -> Result<Response<proto::GetLogInfoResponse>, Status> {
        let head = self.service.log().head();
        let restored = self.service.restored();
        Ok(Response::new(proto::GetLogInfoResponse {
            head_seq: head.seq,
            head_hash: head.hash.to_vec(),
            event_count: head.seq,
            head_recorded_at: head.recorded_at.map(to_proto::timestamp),
            restored_snapshot_seq: restored.snapshot_seq,
            replayed_events: restored.replayed_events,
        }))
    }
}
