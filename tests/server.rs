//! Black-box tests of the server as a whole: reflection, health, the contract's RPC names,
//! one server per data directory.

mod common;

use common::TestServer;
use kpi_service::RunError;
use kpi_service::store::StoreError;
use prost::Message;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

async fn reflect(server: &TestServer, request: MessageRequest) -> ServerReflectionResponse {
    let mut client = ServerReflectionClient::new(server.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection")
        .into_inner();
    responses.next().await.expect("one response").expect("ok")
}

/// The method names of `service` as reflection describes them.
async fn methods_of(server: &TestServer, service: &str) -> Vec<String> {
    let response = reflect(server, MessageRequest::FileContainingSymbol(service.into())).await;
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("no descriptor for {service}: {response:?}");
    };
    let (package, name) = service.rsplit_once('.').expect("qualified name");
    for bytes in files.file_descriptor_proto {
        let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("descriptor");
        if file.package() != package {
            continue;
        }
        if let Some(found) = file.service.iter().find(|s| s.name() == name) {
            return found.method.iter().map(|m| m.name().to_owned()).collect();
        }
    }
    panic!("{service} not in its descriptor files");
}

#[tokio::test]
async fn reflection_lists_the_contract_and_health_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;

    let response = reflect(&server, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "kpi.v1.KpiCatalog",
        "kpi.v1.Ingest",
        "kpi.v1.Query",
        "kpi.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} in {services:?}"
        );
    }

    let contract: [(&str, &[&str]); 4] = [
        (
            "kpi.v1.KpiCatalog",
            &[
                "DefineKpi",
                "UpdateKpi",
                "GetKpi",
                "ListKpis",
                "RetireKpi",
                "SetTarget",
                "RemoveTarget",
                "ListTargets",
            ],
        ),
        ("kpi.v1.Ingest", &["Record", "RecordStream"]),
        (
            "kpi.v1.Query",
            &["GetAggregates", "GetTrend", "GetTargetStatus", "WatchKpis"],
        ),
        ("kpi.v1.Audit", &["ReplayEvents", "VerifyLog", "GetLogInfo"]),
    ];
    for (service, rpcs) in contract {
        let methods = methods_of(&server, service).await;
        for rpc in rpcs {
            assert!(
                methods.iter().any(|m| m == rpc),
                "{service}.{rpc} in {methods:?}"
            );
        }
    }

    let mut health = HealthClient::new(server.channel());
    for service in [
        "",
        "kpi.v1.KpiCatalog",
        "kpi.v1.Ingest",
        "kpi.v1.Query",
        "kpi.v1.Audit",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(dir.path()).await;
    // The first one has opened its log once it answers.
    assert_eq!(first.log_info().await.head_seq, 0);

    let started = std::time::Instant::now();
    let second = TestServer::start(dir.path()).await;
    let error = second
        .exit()
        .await
        .expect_err("second server must not start");
    // The data directory's lock is refused at once, not after a wait.
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let log_dir = dir.path().join(kpi_service::LOG_DIR);
    assert!(
        matches!(
            &error,
            RunError::Store { source: StoreError::AlreadyInUse { path }, .. } if *path == log_dir
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("already") && message.contains(&dir.path().display().to_string()),
        "unclear message: {message}"
    );
    // The first server is unharmed.
    assert_eq!(first.log_info().await.head_seq, 0);
    first.stop().await;

    // Once the first has stopped, the directory is free.
    let third = TestServer::start(dir.path()).await;
    assert_eq!(third.log_info().await.head_seq, 0);
    third.stop().await;
}

/// Sequential calls this test makes; at 40 ms each, a Nagle stall would take 800 ms.
const NAGLE_PROBE_CALLS: u32 = 20;

#[tokio::test]
async fn small_responses_are_not_held_back_by_nagle() {
    // Without TCP_NODELAY on the accepted socket, the last small frame of every server
    // stream waited for the client's delayed ACK (about 40 ms on Linux): each
    // GetAggregates took ~44 ms instead of well under a millisecond.
    use kpi_service::proto::{self, Grain, KpiKind};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(common::kpi("revenue", KpiKind::Sum)).await;
    let now = chrono::Utc::now();
    // A measurement every 30 days for two years: a stream of about 23 monthly buckets.
    let measurements = (0..24)
        .map(|month| proto::Measurement {
            occurred_at: Some(prost_types::Timestamp {
                seconds: now.timestamp() - month * 30 * 86_400,
                nanos: 0,
            }),
            ..common::measurement("revenue", 1.0)
        })
        .collect();
    server.record(measurements).await.unwrap();
    let request = proto::GetAggregatesRequest {
        kpi_id: "revenue".into(),
        grain: Grain::Month.into(),
        start: Some(prost_types::Timestamp {
            seconds: now.timestamp() - 24 * 30 * 86_400,
            nanos: 0,
        }),
        end: Some(prost_types::Timestamp {
            seconds: now.timestamp() + 86_400,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut query = server.query();
    let mut ask = async || {
        let mut stream = query
            .get_aggregates(request.clone())
            .await
            .unwrap()
            .into_inner();
        let mut buckets = 0;
        while stream.message().await.unwrap().is_some() {
            buckets += 1;
        }
        buckets
    };
    // The first call also sets up the connection.
    let buckets = ask().await;
    assert!(buckets >= 20, "{buckets} buckets");
    let started = Instant::now();
    for _ in 0..NAGLE_PROBE_CALLS {
        assert_eq!(ask().await, buckets);
    }
    let elapsed = started.elapsed();
    // Half the stalled time: a slow CI machine stays far below it without the stall.
    assert!(
        elapsed < Duration::from_millis(400),
        "{NAGLE_PROBE_CALLS} sequential GetAggregates took {elapsed:?}"
    );
    server.stop().await;
}
