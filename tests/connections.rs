//! Black-box tests of the connection limits: the cap keeps the server answering under a
//! flood of idle connections, silent connections are closed after the idle timeout, and
//! live clients that only wait are kept by the HTTP/2 keepalive.

mod common;

use std::time::Duration;

use common::{TestServer, kpi, measurement};
use kpi_service::Config;
use kpi_service::proto::{self, Grain, KpiKind};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Whether the server closes `socket` within `within` (what it sends before, its HTTP/2
/// settings, is read and dropped).
async fn closed_by_server(socket: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0_u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A health check on a connection of its own.
async fn health_on_new_connection(server: &TestServer) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_flood_of_silent_connections_does_not_lock_out_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.max_connections = 4;
    let mut server = TestServer::start_with(config).await;
    // A client that works before the flood.
    server.define(kpi("orders", KpiKind::Sum)).await;

    let mut flood = Vec::new();
    for _ in 0..12 {
        flood.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // A probe on a fresh connection still gets its answer.
    health_on_new_connection(&server)
        .await
        .expect("health answers at the connection cap");
    // The server made room by closing silent connections, the oldest first: of 12 + the
    // client's + the probe's under a cap of 4, at least 10 went.
    let mut closed = 0;
    for socket in &mut flood {
        if closed_by_server(socket, Duration::from_millis(500)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 10,
        "only {closed} of 12 silent connections were closed"
    );
    assert!(
        closed_by_server(&mut flood[0], Duration::from_millis(100)).await,
        "the oldest silent connection goes first"
    );
    // The client that spoke before the flood still works, and its data is there.
    server
        .record(vec![measurement("orders", 5.0)])
        .await
        .expect("record after the flood");
    // The silent connections still open do not hold the shutdown to its timeout (20 s):
    // they are closed as it begins.
    let started = std::time::Instant::now();
    server.stop_inner().await.expect("a clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the shutdown waited {:?} for silent connections",
        started.elapsed()
    );
    drop(flood);
}

#[tokio::test]
async fn silent_connections_are_closed_and_waiting_clients_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    // Pinged after 1 s of silence, so never quiet for the 2 s that close a connection.
    config.idle_timeout_secs = 2;
    config.keepalive_secs = 1;
    // No heartbeats within the test: only the keepalive carries the watch's connection.
    config.heartbeat_ms = 60_000;
    let server = TestServer::start_with(config).await;
    server.define(kpi("orders", KpiKind::Sum)).await;

    // A watcher on a connection of its own that then hears nothing for 2 idle timeouts.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut watch = proto::query_client::QueryClient::new(channel)
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["orders".into()],
            grain: Grain::Hour.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(6)).await,
        "a connection that says nothing is closed after the idle timeout"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The watcher's stream is still open: a new measurement reaches it.
    server
        .record(vec![measurement("orders", 7.0)])
        .await
        .expect("record");
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = watch
                .message()
                .await
                .expect("the watch stream is still open")
                .expect("the stream did not end");
            if let Some(proto::watch_kpis_response::Item::Update(update)) = message.item {
                return update;
            }
        }
    })
    .await
    .expect("the update arrives");
    assert_eq!(update.kpi_id, "orders");
    server.stop().await;
}
