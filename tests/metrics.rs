//! Black-box test of the Prometheus endpoint (`--metrics-listen`): scraped over HTTP after
//! a few calls, its counters and gauges moved as the calls did.

mod common;

use std::net::SocketAddr;

use common::{TestServer, kpi, measurement};
use kpi_service::Config;
use kpi_service::proto::{self, Grain, KpiKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback address with a port that was free a moment ago.
fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `GET path` over HTTP/1.1: the status line and the body.
async fn get(address: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: kpi\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a header and a body");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of the sample `name` (with its labels, as printed) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_metrics_endpoint_counts_calls_and_shows_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_address();
    let mut config = Config::with_data_dir(dir.path());
    config.metrics_listen = Some(metrics);
    let server = TestServer::start_with(config).await;
    server.define(kpi("orders", KpiKind::Sum)).await;
    server
        .record(vec![measurement("orders", 1.0), measurement("orders", 2.0)])
        .await
        .unwrap();
    let missing = server
        .catalog()
        .get_kpi(proto::GetKpiRequest {
            kpi_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut watch = server
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["orders".into()],
            grain: Grain::Hour.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the snapshot begins");

    let (status, text) = get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let record = r#"{method="/kpi.v1.Ingest/Record",code="OK"}"#;
    assert_eq!(
        sample(&text, &format!("kpi_rpc_requests_total{record}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"kpi_rpc_requests_total{method="/kpi.v1.KpiCatalog/GetKpi",code="NOT_FOUND"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"kpi_rpc_duration_seconds_count{method="/kpi.v1.Ingest/Record"}"#
        ),
        Some(1.0)
    );
    let head = server.log_info().await.head_seq;
    assert_eq!(sample(&text, "kpi_log_head_seq"), Some(head as f64));
    assert_eq!(
        sample(&text, "kpi_events_appended_total"),
        Some(head as f64)
    );
    let flushes = sample(&text, "kpi_log_flushes_total").unwrap();
    assert!(flushes >= 1.0);
    assert_eq!(
        sample(&text, "kpi_log_sync_duration_seconds_count"),
        Some(flushes)
    );
    assert_eq!(
        sample(&text, "kpi_append_requests_total"),
        Some(2.0),
        "a define and a record"
    );
    assert!(sample(&text, "kpi_append_groups_total").unwrap() >= 1.0);
    assert_eq!(sample(&text, "kpi_open_streams_watch_kpis"), Some(1.0));
    assert!(sample(&text, "kpi_open_connections").unwrap() >= 1.0);
    assert!(sample(&text, "kpi_bucket_memory_bytes").unwrap() > 0.0);
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);

    // More calls move the counters.
    server
        .record(vec![measurement("orders", 3.0)])
        .await
        .unwrap();
    let (_, later) = get(metrics, "/metrics").await;
    assert_eq!(
        sample(&later, &format!("kpi_rpc_requests_total{record}")),
        Some(2.0)
    );
    assert_eq!(
        sample(&later, "kpi_events_appended_total"),
        Some(head as f64 + 1.0)
    );
    // A watch is counted when it ends; one its client dropped, as CANCELLED.
    drop(watch);
    let watch = r#"kpi_rpc_requests_total{method="/kpi.v1.Query/WatchKpis",code="CANCELLED"}"#;
    let mut counted = None;
    for _ in 0..50 {
        counted = sample(&get(metrics, "/metrics").await.1, watch);
        if counted.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(counted, Some(1.0));
    let (status, _) = get(metrics, "/other").await;
    assert!(status.contains("404"), "{status}");
    server.stop().await;
}
