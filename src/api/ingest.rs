//! The kpi.v1.Ingest service: batches of measurements in, seqs out, after the flush.

use std::pin::Pin;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::acting;
use crate::domain::Rejection;
use crate::domain::kpi::validate_len;
use crate::proto::ingest_server::Ingest;
use crate::proto::to_proto;
use crate::proto::{self, from_proto};
use crate::service::{KpiService, ServiceError};

/// Acknowledgements a RecordStream may have ready before the client reads them; past this
/// the server stops reading the client's batches (backpressure instead of buffering).
const STREAM_ACK_BUFFER: usize = 16;
/// Longest batch_id of RecordStream, in bytes.
const MAX_BATCH_ID_LEN: usize = 128;

/// gRPC adapter of ingest.
pub struct IngestApi {
    service: KpiService,
}

impl IngestApi {
    /// Serves ingest of `service`.
    pub fn new(service: KpiService) -> Self {
        Self { service }
    }
}

/// Converts and stores one batch.
async fn record_batch(
    service: &KpiService,
    batch: Vec<proto::Measurement>,
) -> Result<Vec<proto::RecordResult>, ServiceError> {
    let received_at = Utc::now();
    let batch = from_proto::measurements(batch, received_at)?;
    let recorded = service.record(batch, received_at).await?;
    Ok(recorded.iter().map(to_proto::record_result).collect())
}

/// The acknowledgement of a rejected stream batch.
fn batch_rejection(rejection: &Rejection) -> proto::BatchRejection {
    let status = super::status::rejection_status(rejection);
    let field = rejection.field().unwrap_or_default().to_owned();
    proto::BatchRejection {
        code: status.code() as i32,
        message: status.message().to_owned(),
        measurement_index: measurement_index(&field),
        field,
    }
}

/// N of a field path starting with `measurements[N]`.
fn measurement_index(field: &str) -> Option<u32> {
    let rest = field.strip_prefix("measurements[")?;
    rest[..rest.find(']')?].parse().ok()
}

#[tonic::async_trait]
impl Ingest for IngestApi {
    async fn record(
        &self,
        request: Request<proto::RecordRequest>,
    ) -> Result<Response<proto::RecordResponse>, Status> {
        let service = acting(&self.service, &request);
        let results = record_batch(&service, request.into_inner().measurements).await?;
        Ok(Response::new(proto::RecordResponse { results }))
    }

    type RecordStreamStream =
        Pin<Box<dyn Stream<Item = Result<proto::RecordStreamResponse, Status>> + Send>>;

    async fn record_stream(
        &self,
        request: Request<Streaming<proto::RecordStreamRequest>>,
    ) -> Result<Response<Self::RecordStreamStream>, Status> {
        let service = acting(&self.service, &request).into_owned();
        let mut batches = request.into_inner();
        let (acks, ack_stream) = mpsc::channel(STREAM_ACK_BUFFER);
        tokio::spawn(async move {
            while let Some(batch) = batches.next().await {
                let ack = match batch {
                    Ok(batch) => acknowledge(&service, batch).await,
                    Err(status) => Err(status),
                };
                let stop = ack.is_err();
                // A failed send means the client went away: stop reading its batches.
                if acks.send(ack).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_stream))))
    }

    async fn retract(
        &self,
        request: Request<proto::RetractRequest>,
    ) -> Result<Response<proto::RetractResponse>, Status> {
        let service = acting(&self.service, &request);
        let request = request.into_inner();
        let target = from_proto::retract_target(request.target)?;
        let (seq, retracted_seq) = service.retract(target, request.reason).await?;
        Ok(Response::new(proto::RetractResponse { seq, retracted_seq }))
    }
}

/// Stores one stream batch. A rejected batch is answered in its acknowledgement and the
/// stream goes on; a failure of the server ends the stream with its status.
async fn acknowledge(
    service: &KpiService,
    batch: proto::RecordStreamRequest,
) -> Result<proto::RecordStreamResponse, Status> {
    let batch_id = batch.batch_id;
    let outcome = match validate_len(&batch_id, MAX_BATCH_ID_LEN, "batch_id") {
        Ok(()) => record_batch(service, batch.measurements).await,
        Err(rejection) => Err(rejection.into()),
    };
    match outcome {
        Ok(results) => Ok(proto::RecordStreamResponse {
            batch_id,
            results,
            rejection: None,
        }),
        Err(ServiceError::Rejected(rejection)) => Ok(proto::RecordStreamResponse {
            batch_id,
            results: Vec::new(),
            rejection: Some(batch_rejection(&rejection)),
        }),
        Err(other) => Err(other.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::measurement_index;

    #[test]
    fn measurement_index_comes_from_the_field_path() {
        assert_eq!(measurement_index("measurements[12].value"), Some(12));
        assert_eq!(measurement_index("measurements"), None);
        assert_eq!(measurement_index("batch_id"), None);
    }
}
