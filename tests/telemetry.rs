//! Black-box test of the span export (`--otlp-endpoint`): a kpi-server process sends the
//! `rpc` span of a request, with its method and status code, to an OpenTelemetry collector
//! (here a loopback OTLP/gRPC receiver run by the test).

mod common;

use std::time::Duration;

use kpi_service::proto::{self, kpi_catalog_client::KpiCatalogClient};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::sync::mpsc;

/// A collector that passes every exported span on: its name and string attributes.
struct Collector(mpsc::UnboundedSender<(String, Vec<(String, String)>)>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .into_iter()
                        .filter_map(|attribute| match attribute.value?.value? {
                            Value::StringValue(text) => Some((attribute.key, text)),
                            _ => None,
                        })
                        .collect();
                    let _ = self.0.send((span.name, attributes));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn each_request_is_exported_as_an_rpc_span() {
    let (spans, mut exported) = mpsc::unbounded_channel();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_address = collector.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(collector)),
    );

    let dir = tempfile::tempdir().unwrap();
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut server = common::ServerProcess(
        std::process::Command::new(env!("CARGO_BIN_EXE_kpi-server"))
            .args(["--listen", &address.to_string(), "--data-dir"])
            .arg(dir.path())
            .args(["--otlp-endpoint", &format!("http://{collector_address}")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_lazy();
    let mut catalog = KpiCatalogClient::new(channel);
    let mut answered = false;
    for _ in 0..300 {
        if catalog
            .list_kpis(proto::ListKpisRequest::default())
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "the server answers");
    let missing = catalog
        .get_kpi(proto::GetKpiRequest {
            kpi_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // SIGTERM: the process exports what is left as it ends.
    let pid = server.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let _ = tokio::task::spawn_blocking(move || server.0.wait()).await;

    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some((name, attributes)) = exported.recv().await {
            let attribute = |key: &str| {
                attributes
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            };
            if name == "rpc"
                && attribute("method").as_deref() == Some("/kpi.v1.KpiCatalog/GetKpi")
                && attribute("code").as_deref() == Some("NOT_FOUND")
            {
                return;
            }
            seen.push((name, attributes));
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no rpc span of GetKpi with NOT_FOUND among {seen:?}"
    );
}
