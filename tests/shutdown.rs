//! Black-box test of the graceful shutdown against clients that misbehave: it ends within
//! the shutdown timeout (and the log's close) whatever they do, and keeps every
//! acknowledged event.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, kpi, measurement};
use kpi_service::Config;
use kpi_service::proto::{self, Grain, KpiKind};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn shutdown_ends_in_bounded_time_whatever_clients_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.shutdown_timeout_secs = 2;
    let mut server = TestServer::start_with(config).await;
    server.define(kpi("orders", KpiKind::Sum)).await;

    // A TCP connection that never says anything, and one that stops inside the HTTP/2
    // preface.
    let idle = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // A RecordStream whose requests never come, and never end.
    let mut ingest = server.ingest();
    let open_upload = ingest
        .record_stream(tokio_stream::pending::<proto::RecordStreamRequest>())
        .await
        .expect("the stream is open");
    // A WatchKpis and a following ReplayEvents whose client never reads, on a connection
    // that buffers little.
    let small_window = server.small_window_channel().await;
    let stuck_watch = proto::query_client::QueryClient::new(small_window.clone())
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["orders".into()],
            grain: Grain::Hour.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let stuck_replay = proto::audit_client::AuditClient::new(small_window)
        .replay_events(proto::ReplayEventsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Enough traffic that both stuck streams have more to send than the window takes.
    for batch in 0..20 {
        let measurements = (0..1000)
            .map(|i| proto::Measurement {
                labels: [(
                    "channel".to_owned(),
                    format!("c{}", (batch * 1000 + i) % 500),
                )]
                .into(),
                ..measurement("orders", 1.0)
            })
            .collect();
        server.record(measurements).await.expect("record");
    }
    let acknowledged = server.log_info().await.head_seq;

    let started = Instant::now();
    server.stop_inner().await.expect("a clean stop");
    let took = started.elapsed();
    // The shutdown timeout (2 s), then at least 2 s for the log to close, and slack for a
    // busy machine.
    assert!(took < Duration::from_secs(8), "the shutdown took {took:?}");

    // Every acknowledged event is there at the next start, in this same process: the
    // shutdown closed the connections it cut off, so their tasks let go of the log.
    let server = TestServer::start(dir.path()).await;
    assert_eq!(server.log_info().await.head_seq, acknowledged);
    server.stop().await;
    drop((idle, half, open_upload, stuck_watch, stuck_replay, ingest));
}
