//! The gRPC edge: the kpi.v1 services, grpc.health.v1 and server reflection. The only
//! module that knows tonic; every handler is a thin adapter over `service::KpiService`.

pub mod audit;
pub mod catalog;
pub mod ingest;
pub mod query;
pub mod status;
pub mod watch;

use tonic::service::Routes;

use crate::proto::audit_server::AuditServer;
use crate::proto::ingest_server::IngestServer;
use crate::proto::kpi_catalog_server::KpiCatalogServer;
use crate::proto::query_server::QueryServer;
use crate::service::KpiService;

/// Why a following stream (ReplayEvents with follow, WatchKpis) woke up.
pub(crate) enum Wake {
    /// The durable head moved: read the new events.
    HeadMoved,
    /// Nothing happened for a heartbeat interval: send a checkpoint or heartbeat.
    Idle,
    /// The stream is over: the client went away, or the server is shutting down (an
    /// UNAVAILABLE status has been sent).
    Stop,
}

/// Waits until the head moves, the heartbeat interval passes, the client goes away or the
/// server shuts down, whichever comes first.
pub(crate) async fn wait_for_more<T>(
    head: &mut tokio::sync::watch::Receiver<u64>,
    heartbeat: std::time::Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    sender: &tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
) -> Wake {
    tokio::select! {
        () = shutdown.cancelled() => {
            let _ = sender.send(Err(tonic::Status::unavailable("the server is shutting down"))).await;
            Wake::Stop
        }
        () = sender.closed() => Wake::Stop,
        changed = head.changed() => match changed {
            Ok(()) => Wake::HeadMoved,
            Err(_) => Wake::Stop,
        },
        () = tokio::time::sleep(heartbeat) => Wake::Idle,
    }
}

/// Runs a blocking read of the log for a following stream off the executor. On failure
/// the stream gets the error's status and `None` comes back: the stream is over.
pub(crate) async fn read_for_stream<T: Send + 'static, R: Send + 'static>(
    sender: &tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    read: impl FnOnce() -> Result<R, crate::store::StoreError> + Send + 'static,
) -> Option<R> {
    let status = match tokio::task::spawn_blocking(read).await {
        Ok(Ok(value)) => return Some(value),
        Ok(Err(error)) => status::store_status(&error),
        Err(error) => tonic::Status::internal(format!("log read failed: {error}")),
    };
    let _ = sender.send(Err(status)).await;
    None
}

/// Largest request message the server decodes. A full batch of 10,000 measurements with
/// labels, subjects and event ids stays well below it; gRPC's default of 4 MiB does not.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The fully-qualified names of the kpi.v1 services, as health checks and reflection see them.
pub const SERVICE_NAMES: [&str; 4] = [
    "kpi.v1.KpiCatalog",
    "kpi.v1.Ingest",
    "kpi.v1.Query",
    "kpi.v1.Audit",
];

/// The kpi.v1 services, health and reflection, ready to serve. Returns the routes and the
/// health reporter that marks them serving (and not serving during shutdown).
pub async fn routes(
    service: KpiService,
) -> Result<(Routes, tonic_health::server::HealthReporter), tonic_reflection::server::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            KpiCatalogServer::new(catalog::CatalogApi::new(service.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        )
        .add_service(
            IngestServer::new(ingest::IngestApi::new(service.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        )
        .add_service(QueryServer::new(query::QueryApi::new(service.clone())))
        .add_service(AuditServer::new(audit::AuditApi::new(service)));
    Ok((routes, health_reporter))
}
