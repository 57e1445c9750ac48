//! Black-box tests of the limits a client meets at their edges: the message limit against
//! a batch at every field's maximum, bytes that are not the message, target windows too
//! long to answer, values too large to add up, and the number of KPIs.

mod common;

use common::{TestServer, bad_request_field, kpi, measurement};
use kpi_service::proto::{self, Grain, KpiKind};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A KPI id, dimension names, label values, subject and event id at their maxima (64,
/// 64, 128, 256 and 128 bytes).
fn widest_kpi() -> proto::KpiDefinition {
    proto::KpiDefinition {
        dimensions: (0..8).map(|d| format!("{d}{}", "d".repeat(63))).collect(),
        ..kpi(&"k".repeat(64), KpiKind::Sum)
    }
}

fn widest_measurement(index: usize) -> proto::Measurement {
    let definition = widest_kpi();
    proto::Measurement {
        labels: definition
            .dimensions
            .iter()
            .map(|dimension| (dimension.clone(), "v".repeat(128)))
            .collect(),
        subject: "s".repeat(256),
        // Unique, and 128 bytes.
        event_id: format!("{index:0>128}"),
        ..measurement(&definition.id, -123_456.789)
    }
}

#[tokio::test]
async fn a_full_batch_at_every_field_maximum_fits_the_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(widest_kpi()).await;
    let batch: Vec<proto::Measurement> = (0..10_000).map(widest_measurement).collect();
    let request = proto::RecordRequest {
        measurements: batch.clone(),
    };
    // Larger than gRPC's default limit of 4 MiB, and than the 16 MiB the server had.
    assert!(
        request.encoded_len() > 20_000_000,
        "{}",
        request.encoded_len()
    );
    let results = server
        .record(batch)
        .await
        .expect("a full batch of the widest measurements");
    assert_eq!(results.len(), 10_000);
    assert_eq!(server.log_info().await.head_seq, 10_001);

    // Past the documented message limit (24 MiB) a request is refused, and nothing of it
    // is stored.
    let too_large: Vec<proto::Measurement> = (10_000..23_000).map(widest_measurement).collect();
    let status = server
        .record(too_large)
        .await
        .expect_err("over the message limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(server.log_info().await.head_seq, 10_001);
    server.stop().await;
}

/// Sends bytes as they are and returns the reply's bytes.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn bytes_that_are_not_the_message_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let mut grpc = tonic::client::Grpc::new(server.channel());
    let garbage: [&[u8]; 4] = [
        &[0xff, 0xff, 0xff, 0xff],
        // Field 1 (measurements) claims 100 bytes that are not there.
        &[0x0a, 0x64, 0x01],
        // A varint that never ends.
        &[
            0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
        ],
        // Wire type 7 does not exist.
        &[0x0f],
    ];
    for (path, bytes) in ["/kpi.v1.Ingest/Record", "/kpi.v1.KpiCatalog/DefineKpi"]
        .into_iter()
        .flat_map(|path| garbage.iter().map(move |bytes| (path, bytes)))
    {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(bytes.to_vec()),
                path.parse().unwrap(),
                RawCodec,
            )
            .await
            .expect_err("garbage");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{path} {bytes:?}: {status:?}"
        );
        assert!(status.message().contains("not a valid"), "{status:?}");
    }
    assert_eq!(server.log_info().await.head_seq, 1, "nothing stored");
    server.stop().await;
}

fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

#[tokio::test]
async fn a_target_whose_window_has_too_many_periods_is_refused_and_status_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let target = |id: &str, grain: Grain, deadline: i64| proto::TargetDefinition {
        id: id.into(),
        kpi_id: "revenue".into(),
        name: "hourly revenue".into(),
        value: 10.0,
        start: at(0),
        deadline: at(deadline),
        mode: proto::TargetMode::Level.into(),
        period_grain: grain.into(),
        tolerance: None,
    };
    let set = |target: proto::TargetDefinition| {
        let mut catalog = server.catalog();
        async move {
            catalog
                .set_target(proto::SetTargetRequest {
                    target: Some(target),
                    expected_version: None,
                })
                .await
        }
    };
    // 1970 to 9999 in hours: 70 million periods.
    let status = set(target("forever", Grain::Hour, 253_402_300_799))
        .await
        .expect_err("too many periods");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        bad_request_field(&status).as_deref(),
        Some("target.deadline")
    );
    assert!(status.message().contains("100000"), "{status:?}");
    // 100,000 hours is the most; one hour more is refused.
    set(target("longest", Grain::Hour, 100_000 * 3600))
        .await
        .expect("100,000 periods");
    let status = set(target("too_long", Grain::Hour, 100_001 * 3600))
        .await
        .expect_err("100,001 periods");
    assert_eq!(status.code(), Code::InvalidArgument);
    // Centuries of years are fine.
    set(target("centuries", Grain::Year, 253_402_300_799))
        .await
        .expect("8,000 yearly periods");

    let statuses = server
        .query()
        .get_target_status(proto::GetTargetStatusRequest {
            selector: Some(proto::get_target_status_request::Selector::KpiId(
                "revenue".into(),
            )),
            ..Default::default()
        })
        .await
        .expect("every stored target can be answered")
        .into_inner()
        .statuses;
    assert_eq!(statuses.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn values_too_large_to_add_up_are_refused_and_sums_stay_finite() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    for value in [1.5e308, -1e101, f64::MAX] {
        let status = server
            .record(vec![measurement("revenue", value)])
            .await
            .expect_err("too large");
        assert_eq!(status.code(), Code::InvalidArgument, "{value}");
        assert_eq!(
            bad_request_field(&status).as_deref(),
            Some("measurements[0].value")
        );
    }
    // At the bound, any number of them adds up to a finite sum, and offsetting values
    // bring it back.
    let year = |server: &TestServer| {
        let request = proto::GetAggregatesRequest {
            kpi_id: "revenue".into(),
            grain: Grain::Year.into(),
            start: at(0),
            end: at(4_102_444_800), // 2100
            ..Default::default()
        };
        let channel = server.channel();
        async move {
            let mut stream = proto::query_client::QueryClient::new(channel)
                .get_aggregates(request)
                .await
                .unwrap()
                .into_inner();
            let bucket = stream.message().await.unwrap().unwrap().bucket.unwrap();
            assert!(stream.message().await.unwrap().is_none(), "one year");
            bucket.value.expect("a sum")
        }
    };
    server
        .record(vec![measurement("revenue", 1e100); 1000])
        .await
        .expect("values at the bound");
    let high = year(&server).await;
    assert!(high.is_finite() && (high - 1e103).abs() < 1e90, "{high}");
    server
        .record(vec![measurement("revenue", -1e100); 1000])
        .await
        .expect("offsetting values");
    let back = year(&server).await;
    assert!(back.is_finite() && back.abs() < 1e90, "{back}");
    server.stop().await;
}

/// A measurement of `clicks` now, in the series `channel`.
fn click(channel: &str) -> proto::Measurement {
    proto::Measurement {
        labels: [("channel".to_owned(), channel.to_owned())].into(),
        ..measurement("clicks", 1.0)
    }
}

/// How many series `clicks` has (its YEAR buckets grouped by channel).
async fn click_series(server: &TestServer) -> usize {
    let now = chrono::Utc::now().timestamp();
    common::buckets(
        server,
        proto::GetAggregatesRequest {
            kpi_id: "clicks".into(),
            grain: Grain::Year.into(),
            start: at(now - 400 * 86_400),
            end: at(now + 400 * 86_400),
            group_by: vec!["channel".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .len()
}

#[tokio::test]
async fn the_label_combination_limit_holds_within_a_batch_and_across_concurrent_batches() {
    let limit = kpi_service::projection::aggregates::MAX_SERIES_PER_KPI;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("clicks", KpiKind::Count)).await;
    let room = 5;
    let first: Vec<_> = (0..limit - room).map(|i| click(&format!("c{i}"))).collect();
    server.record(first).await.unwrap();
    let head = server.log_info().await.head_seq;

    // Six new series where five fit: the sixth is named, and nothing of the batch is
    // stored. Known series do not count.
    let mut six = vec![click("c1"), click("c2")];
    six.extend((0..6).map(|i| click(&format!("n{i}"))));
    let status = server.record(six).await.expect_err("one series too many");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        common::violated_field(&status).as_deref(),
        Some("measurements[7].labels")
    );
    assert_eq!(server.log_info().await.head_seq, head);

    // Eight batches at once, two new series each: at most two of them fit.
    let batches = (0..8).map(|b| {
        let mut ingest = server.ingest();
        let batch = vec![
            click(&format!("p{b}a")),
            click(&format!("p{b}b")),
            click("c3"),
        ];
        async move {
            ingest
                .record(proto::RecordRequest {
                    measurements: batch,
                })
                .await
        }
    });
    let results = futures_join_all(batches).await;
    let taken = results.iter().filter(|result| result.is_ok()).count();
    for result in &results {
        if let Err(status) = result {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        }
    }
    assert!((1..=2).contains(&taken), "{taken} batches taken");
    assert_eq!(click_series(&server).await, limit - room + 2 * taken);
    assert!(click_series(&server).await <= limit);

    // What is left is taken exactly: fill up to the limit, then one more is refused.
    let left = limit - click_series(&server).await;
    let fill: Vec<_> = (0..left).map(|i| click(&format!("f{i}"))).collect();
    if !fill.is_empty() {
        server.record(fill).await.expect("the last places");
    }
    assert_eq!(click_series(&server).await, limit);
    let status = server
        .record(vec![click("one_too_many")])
        .await
        .expect_err("full");
    assert_eq!(status.code(), Code::ResourceExhausted);
    server.stop().await;
}

/// Runs `futures` concurrently on the test's runtime; their results in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kpi_limit_holds_exactly_under_concurrent_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = kpi_service::Config::with_data_dir(dir.path());
    config.max_kpis = 5;
    let server = TestServer::start_with(config).await;
    server.define(kpi("first", KpiKind::Sum)).await;
    // Twelve definitions at once for the four places left.
    let attempts = (0..12).map(|i| {
        let mut catalog = server.catalog();
        tokio::spawn(async move {
            catalog
                .define_kpi(proto::DefineKpiRequest {
                    definition: Some(kpi(&format!("kpi{i}"), KpiKind::Sum)),
                })
                .await
        })
    });
    let mut defined = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        match attempt.await.unwrap() {
            Ok(_) => defined += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(
                    common::violated_field(&status).as_deref(),
                    Some("definition.id")
                );
                assert!(status.message().contains("limit of 5 KPIs"), "{status:?}");
            }
        }
    }
    assert_eq!(defined, 4);
    // A retired KPI keeps its place: its history stays.
    server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: "first".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = server
        .catalog()
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(kpi("late", KpiKind::Sum)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let listed = server
        .catalog()
        .list_kpis(proto::ListKpisRequest {
            include_retired: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.kpis.len(), 5);
    server.stop().await;
}
