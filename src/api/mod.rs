//! The gRPC edge: the kpi.v1 services, grpc.health.v1 and server reflection, and what
//! guards them: the connection limits, TLS, the gate of principals and roles, and the
//! reloads of their files.
//! The only module that knows tonic; every handler is a thin adapter over
//! `service::KpiService`.

pub mod audit;
pub mod auth;
pub mod catalog;
pub mod codec;
pub mod connections;
pub mod ingest;
pub mod metrics;
pub mod query;
pub mod reload;
pub mod status;
pub mod tls;

use tonic::service::Routes;

use crate::proto::audit_server::AuditServer;
use crate::proto::ingest_server::IngestServer;
use crate::proto::kpi_catalog_server::KpiCatalogServer;
use crate::proto::query_server::QueryServer;
use crate::service::KpiService;

/// Largest request message the server decodes: 24 MiB. A full batch of 10,000
/// measurements with every field at its maximum (a 64-byte KPI id, eight labels of 64-byte
/// keys and 128-byte values, a 256-byte subject, a 128-byte event id) is 20.8 MB, so every
/// valid batch fits (tested in `tests/limits.rs`); gRPC's default of 4 MiB does not.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 24 * 1024 * 1024;

/// The fully-qualified names of the kpi.v1 services, as health checks and reflection see them.
pub const SERVICE_NAMES: [&str; 4] = [
    "kpi.v1.KpiCatalog",
    "kpi.v1.Ingest",
    "kpi.v1.Query",
    "kpi.v1.Audit",
];

/// The kpi.v1 services, health and (unless `reflection` is false) reflection, ready to
/// serve. Returns the routes and the health reporter that marks them serving (and not
/// serving during shutdown).
pub async fn routes(
    service: KpiService,
    reflection: bool,
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
    let mut routes = Routes::new(health_service)
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
    if reflection {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        routes = routes
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
    }
    Ok((routes, health_reporter))
}
