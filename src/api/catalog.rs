//! The kpi.v1.KpiCatalog service: a thin adapter over `KpiService`'s catalog commands.

use tonic::{Request, Response, Status};

use super::auth::acting;
use crate::domain::Rejection;
use crate::proto::kpi_catalog_server::KpiCatalog;
use crate::proto::{self, from_proto, to_proto};
use crate::service::KpiService;

/// Page size of ListKpis when the client gives none.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page of ListKpis: a page is built under the catalog's read lock.
const MAX_PAGE_SIZE: u32 = 1000;

/// gRPC adapter of the catalog.
pub struct CatalogApi {
    service: KpiService,
}

impl CatalogApi {
    /// Serves the catalog of `service`.
    pub fn new(service: KpiService) -> Self {
        Self { service }
    }
}

#[tonic::async_trait]
impl KpiCatalog for CatalogApi {
    async fn define_kpi(
        &self,
        request: Request<proto::DefineKpiRequest>,
    ) -> Result<Response<proto::DefineKpiResponse>, Status> {
        let service = acting(&self.service, &request);
        let definition = from_proto::required_kpi_definition(request.into_inner().definition)?;
        let entry = service.define_kpi(definition).await?;
        Ok(Response::new(proto::DefineKpiResponse {
            kpi: Some(to_proto::kpi(&entry)),
        }))
    }

    async fn update_kpi(
        &self,
        request: Request<proto::UpdateKpiRequest>,
    ) -> Result<Response<proto::UpdateKpiResponse>, Status> {
        let service = acting(&self.service, &request);
        let request = request.into_inner();
        let definition = from_proto::required_kpi_definition(request.definition)?;
        let entry = service
            .update_kpi(
                definition,
                request.expected_version,
                request.recompute_history,
            )
            .await?;
        Ok(Response::new(proto::UpdateKpiResponse {
            kpi: Some(to_proto::kpi(&entry)),
        }))
    }

    async fn get_kpi(
        &self,
        request: Request<proto::GetKpiRequest>,
    ) -> Result<Response<proto::GetKpiResponse>, Status> {
        let entry = self.service.get_kpi(&request.into_inner().kpi_id)?;
        Ok(Response::new(proto::GetKpiResponse {
            kpi: Some(to_proto::kpi(&entry)),
        }))
    }

    async fn list_kpis(
        &self,
        request: Request<proto::ListKpisRequest>,
    ) -> Result<Response<proto::ListKpisResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            n => {
                return Err(Rejection::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE_SIZE}, got {n}"),
                )
                .into());
            }
        };
        // The page token carries the last id of the previous page: ids are stable and
        // ordered, so a page never repeats or skips a KPI defined between calls.
        let after = from_proto::page_token(&request.page_token, "page_token")?;
        let (page, more) = self.service.list_kpis(
            &after,
            usize::try_from(page_size).unwrap_or(usize::MAX),
            request.include_retired,
        );
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => to_proto::page_token(&last.definition.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListKpisResponse {
            kpis: page.iter().map(to_proto::kpi).collect(),
            next_page_token,
        }))
    }

    async fn retire_kpi(
        &self,
        request: Request<proto::RetireKpiRequest>,
    ) -> Result<Response<proto::RetireKpiResponse>, Status> {
        let service = acting(&self.service, &request);
        let request = request.into_inner();
        let entry = service
            .retire_kpi(&request.kpi_id, request.reason, request.expected_version)
            .await?;
        Ok(Response::new(proto::RetireKpiResponse {
            kpi: Some(to_proto::kpi(&entry)),
        }))
    }

    async fn set_target(
        &self,
        request: Request<proto::SetTargetRequest>,
    ) -> Result<Response<proto::SetTargetResponse>, Status> {
        let service = acting(&self.service, &request);
        let request = request.into_inner();
        let target = request
            .target
            .ok_or_else(|| Rejection::invalid("target", "required"))?;
        let target = from_proto::target_definition(target, "target")?;
        let entry = service.set_target(target, request.expected_version).await?;
        Ok(Response::new(proto::SetTargetResponse {
            target: Some(to_proto::target(&entry)),
        }))
    }

    async fn remove_target(
        &self,
        request: Request<proto::RemoveTargetRequest>,
    ) -> Result<Response<proto::RemoveTargetResponse>, Status> {
        let service = acting(&self.service, &request);
        let request = request.into_inner();
        let seq = service
            .remove_target(&request.target_id, request.reason)
            .await?;
        Ok(Response::new(proto::RemoveTargetResponse { seq }))
    }

    async fn list_targets(
        &self,
        request: Request<proto::ListTargetsRequest>,
    ) -> Result<Response<proto::ListTargetsResponse>, Status> {
        let request = request.into_inner();
        let kpi_id = (!request.kpi_id.is_empty()).then_some(request.kpi_id);
        let as_of = from_proto::as_of(request.as_of)?;
        let targets = self.service.list_targets(kpi_id, as_of).await?;
        Ok(Response::new(proto::ListTargetsResponse {
            targets: targets.iter().map(to_proto::target).collect(),
        }))
    }
}
