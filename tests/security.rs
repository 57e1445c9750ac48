//! Black-box tests of what keeps the server safe on a network: bearer tokens and roles
//! (every RPC against the README's table), TLS and mutual TLS with certificates made at
//! test time, reloads of both files, the actor in the audit trail, private files, the
//! switches for reflection and ListStreams, and a scan of a kpi-server process without
//! credentials.

mod common;
// Not in `common`: the load tool's tests share `common` without TLS dependencies.
#[path = "common/secure.rs"]
mod secure;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{TestServer, kpi, measurement};
use kpi_service::Config;
use kpi_service::proto::{self, KpiKind};
use secure::{Clients, TestCa, TestPrincipal, auth_file, tls_channel, write};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const READER: &str = "kpi_test_reader_token";
const WRITER: &str = "kpi_test_writer_token";
const ADMIN: &str = "kpi_test_admin_token";
const AUDITOR: &str = "kpi_test_auditor_token";

/// The README's table: every RPC and the role it needs.
const RPC_ROLES: [(&str, &str); 19] = [
    ("DefineKpi", "admin"),
    ("UpdateKpi", "admin"),
    ("GetKpi", "reader"),
    ("ListKpis", "reader"),
    ("RetireKpi", "admin"),
    ("SetTarget", "admin"),
    ("RemoveTarget", "admin"),
    ("ListTargets", "reader"),
    ("Record", "writer"),
    ("RecordStream", "writer"),
    ("Retract", "writer"),
    ("GetAggregates", "reader"),
    ("GetTrend", "reader"),
    ("GetTargetStatus", "reader"),
    ("WatchKpis", "reader"),
    ("ReplayEvents", "auditor"),
    ("VerifyLog", "auditor"),
    ("GetLogInfo", "auditor"),
    ("ListStreams", "auditor"),
];

fn token_of(role: &str) -> &'static str {
    match role {
        "reader" => READER,
        "writer" => WRITER,
        "admin" => ADMIN,
        "auditor" => AUDITOR,
        other => panic!("no role {other}"),
    }
}

/// An auth file with one principal per role, named after it.
fn one_principal_per_role() -> String {
    auth_file(&[
        TestPrincipal {
            name: "reader",
            roles: &["reader"],
            token: Some(READER),
            certificate_subject: None,
        },
        TestPrincipal {
            name: "writer",
            roles: &["writer"],
            token: Some(WRITER),
            certificate_subject: None,
        },
        TestPrincipal {
            name: "admin",
            roles: &["admin"],
            token: Some(ADMIN),
            certificate_subject: None,
        },
        TestPrincipal {
            name: "auditor",
            roles: &["auditor"],
            token: Some(AUDITOR),
            certificate_subject: None,
        },
    ])
}

/// A server on `dir/data` with `auth` as its auth file.
async fn start_with_auth(dir: &Path, auth: &str) -> TestServer {
    let mut config = Config::with_data_dir(dir.join("data"));
    config.auth_file = Some(write(dir, "auth.toml", auth));
    TestServer::start_with(config).await
}

/// A server's configuration on `dir/data` serving TLS with a certificate of `ca`
/// (`dir/server.pem` and `dir/server.key`).
fn tls_config(dir: &Path, ca: &TestCa) -> Config {
    let server_key = ca.server();
    let mut config = Config::with_data_dir(dir.join("data"));
    config.tls_cert = Some(write(dir, "server.pem", &server_key.cert));
    config.tls_key = Some(write(dir, "server.key", &server_key.key));
    config
}

/// A request of `rpc` that would change or read something real on a server that has
/// the KPI `revenue` with a measurement at seq 2 and the target `revenue_goal`.
async fn call(rpc: &str, clients: &Clients) -> Result<(), tonic::Status> {
    let revenue = || kpi("revenue", KpiKind::Sum);
    match rpc {
        "DefineKpi" => clients
            .catalog()
            .define_kpi(proto::DefineKpiRequest {
                definition: Some(kpi("visitors", KpiKind::Count)),
            })
            .await
            .map(drop),
        "UpdateKpi" => clients
            .catalog()
            .update_kpi(proto::UpdateKpiRequest {
                definition: Some(proto::KpiDefinition {
                    name: "Revenue, renamed".into(),
                    ..revenue()
                }),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetKpi" => clients
            .catalog()
            .get_kpi(proto::GetKpiRequest {
                kpi_id: "revenue".into(),
            })
            .await
            .map(drop),
        "ListKpis" => clients
            .catalog()
            .list_kpis(proto::ListKpisRequest::default())
            .await
            .map(drop),
        "RetireKpi" => clients
            .catalog()
            .retire_kpi(proto::RetireKpiRequest {
                kpi_id: "revenue".into(),
                reason: "test".into(),
                expected_version: None,
            })
            .await
            .map(drop),
        "SetTarget" => clients
            .catalog()
            .set_target(proto::SetTargetRequest {
                target: Some(target("revenue_goal_2")),
                expected_version: None,
            })
            .await
            .map(drop),
        "RemoveTarget" => clients
            .catalog()
            .remove_target(proto::RemoveTargetRequest {
                target_id: "revenue_goal".into(),
                reason: "test".into(),
            })
            .await
            .map(drop),
        "ListTargets" => clients
            .catalog()
            .list_targets(proto::ListTargetsRequest {
                kpi_id: "revenue".into(),
                as_of: None,
            })
            .await
            .map(drop),
        "Record" => clients
            .ingest()
            .record(proto::RecordRequest {
                measurements: vec![measurement("revenue", 5.0)],
            })
            .await
            .map(drop),
        "RecordStream" => {
            let batch = proto::RecordStreamRequest {
                batch_id: "b1".into(),
                measurements: vec![measurement("revenue", 5.0)],
            };
            let mut acks = clients
                .ingest()
                .record_stream(tokio_stream::once(batch))
                .await?
                .into_inner();
            while acks.message().await?.is_some() {}
            Ok(())
        }
        "Retract" => clients
            .ingest()
            .retract(proto::RetractRequest {
                target: Some(proto::retract_request::Target::Seq(2)),
                reason: "test".into(),
            })
            .await
            .map(drop),
        "GetAggregates" => {
            let mut buckets = clients
                .query()
                .get_aggregates(proto::GetAggregatesRequest {
                    kpi_id: "revenue".into(),
                    grain: proto::Grain::Month.into(),
                    start: Some(prost_types::Timestamp {
                        seconds: 1_767_225_600, // 2026-01-01
                        nanos: 0,
                    }),
                    end: Some(prost_types::Timestamp {
                        seconds: 1_893_456_000, // 2030-01-01
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            while buckets.message().await?.is_some() {}
            Ok(())
        }
        "GetTrend" => clients
            .query()
            .get_trend(proto::GetTrendRequest {
                kpi_id: "revenue".into(),
                grain: proto::Grain::Day.into(),
                window: 7,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetTargetStatus" => clients
            .query()
            .get_target_status(proto::GetTargetStatusRequest {
                selector: Some(proto::get_target_status_request::Selector::KpiId(
                    "revenue".into(),
                )),
                ..Default::default()
            })
            .await
            .map(drop),
        "WatchKpis" => clients
            .query()
            .watch_kpis(proto::WatchKpisRequest {
                kpi_ids: vec!["revenue".into()],
                grain: proto::Grain::Day.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "ReplayEvents" => {
            let mut events = clients
                .audit()
                .replay_events(proto::ReplayEventsRequest::default())
                .await?
                .into_inner();
            // The first item proves the stream was served; it does not end by itself.
            events.message().await.map(drop)
        }
        "VerifyLog" => clients
            .audit()
            .verify_log(proto::VerifyLogRequest {})
            .await
            .map(drop),
        "GetLogInfo" => clients
            .audit()
            .get_log_info(proto::GetLogInfoRequest {})
            .await
            .map(drop),
        "ListStreams" => clients
            .audit()
            .list_streams(proto::ListStreamsRequest {})
            .await
            .map(drop),
        other => panic!("no RPC {other}"),
    }
}

fn target(id: &str) -> proto::TargetDefinition {
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    proto::TargetDefinition {
        id: id.into(),
        kpi_id: "revenue".into(),
        name: "revenue in 2026".into(),
        value: 1000.0,
        start: at(1_767_225_600),    // 2026-01-01
        deadline: at(1_798_761_600), // 2027-01-01
        mode: proto::TargetMode::Cumulative.into(),
        period_grain: proto::Grain::Month.into(),
        tolerance: None,
    }
}

/// GetLogInfo through `clients`.
async fn log_info(clients: &Clients) -> Result<proto::GetLogInfoResponse, tonic::Status> {
    clients
        .audit()
        .get_log_info(proto::GetLogInfoRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// Defines the SUM KPI `revenue` through `clients`.
async fn define_revenue(clients: &Clients) -> Result<(), tonic::Status> {
    clients
        .catalog()
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(kpi("revenue", KpiKind::Sum)),
        })
        .await
        .map(drop)
}

/// Records one measurement of `revenue` with `value` through `clients`.
async fn record_revenue(clients: &Clients, value: f64) -> Result<(), tonic::Status> {
    clients
        .ingest()
        .record(proto::RecordRequest {
            measurements: vec![measurement("revenue", value)],
        })
        .await
        .map(drop)
}

/// The head seq, read as the auditor.
async fn head_seq(channel: Channel) -> u64 {
    log_info(&Clients::new(channel, Some(AUDITOR)))
        .await
        .expect("log info as auditor")
        .head_seq
}

#[tokio::test]
async fn every_rpc_needs_a_known_token_with_its_role_and_refusals_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_auth(dir.path(), &one_principal_per_role()).await;
    let admin = Clients::new(server.channel(), Some(ADMIN));
    define_revenue(&admin).await.expect("admin defines");
    record_revenue(&Clients::new(server.channel(), Some(WRITER)), 10.0)
        .await
        .expect("writer records");
    admin
        .catalog()
        .set_target(proto::SetTargetRequest {
            target: Some(target("revenue_goal")),
            expected_version: None,
        })
        .await
        .expect("admin sets a target");
    let head = head_seq(server.channel()).await;
    assert_eq!(head, 3);

    let nobody = Clients::new(server.channel(), None);
    let stranger = Clients::new(server.channel(), Some("kpi_not_in_the_file"));
    for (rpc, role) in RPC_ROLES {
        for (who, clients) in [("no token", &nobody), ("unknown token", &stranger)] {
            let status = call(rpc, clients).await.expect_err(rpc);
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{rpc} with {who}: {status:?}"
            );
        }
        for other in ["reader", "writer", "admin", "auditor"] {
            if other == role {
                continue;
            }
            let status = call(rpc, &Clients::new(server.channel(), Some(token_of(other))))
                .await
                .expect_err(rpc);
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{rpc} as {other}: {status:?}"
            );
            assert!(
                status.message().contains(role) && status.message().contains(other),
                "{rpc} as {other}: the message names the role needed and the principal: {status:?}"
            );
        }
        assert_eq!(
            head_seq(server.channel()).await,
            head,
            "{rpc}: a refused call stored something"
        );
    }

    // With its role, every RPC is served (the writes store their events); RetireKpi
    // last, since the others need the KPI.
    let (retire, others): (Vec<_>, Vec<_>) = RPC_ROLES
        .into_iter()
        .partition(|(rpc, _)| *rpc == "RetireKpi");
    for (rpc, role) in others.into_iter().chain(retire) {
        let clients = Clients::new(server.channel(), Some(token_of(role)));
        if let Err(status) = call(rpc, &clients).await {
            panic!("{rpc} as {role}: {status:?}");
        }
    }
    assert!(head_seq(server.channel()).await > head);

    // Health checks stay open for probes.
    let health = HealthClient::new(server.channel())
        .check(HealthCheckRequest {
            service: "kpi.v1.Ingest".into(),
        })
        .await
        .expect("health without a token");
    assert_eq!(health.into_inner().status, 1, "SERVING");
    server.stop().await;
}

#[tokio::test]
async fn events_name_the_principal_whose_request_caused_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_auth(dir.path(), &one_principal_per_role()).await;
    let admin = Clients::new(server.channel(), Some(ADMIN));
    define_revenue(&admin).await.unwrap();
    let writer = Clients::new(server.channel(), Some(WRITER));
    writer
        .ingest()
        .record(proto::RecordRequest {
            measurements: vec![measurement("revenue", 10.0), measurement("revenue", 2.0)],
        })
        .await
        .unwrap();
    writer
        .ingest()
        .retract(proto::RetractRequest {
            target: Some(proto::retract_request::Target::Seq(2)),
            reason: "typo".into(),
        })
        .await
        .unwrap();

    let mut replay = Clients::new(server.channel(), Some(AUDITOR))
        .audit()
        .replay_events(proto::ReplayEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut actors = Vec::new();
    while actors.len() < 4 {
        let item = replay.message().await.unwrap().expect("the stream goes on");
        if let Some(proto::replay_events_response::Item::Event(envelope)) = item.item {
            let event = envelope.event.expect("decoded event");
            // The stored bytes carry the actor: the chain covers who did it.
            let decoded =
                <proto::EventRecord as prost::Message>::decode(envelope.record.as_slice()).unwrap();
            assert_eq!(decoded.actor, event.actor);
            actors.push(event.actor);
        }
    }
    assert_eq!(actors, ["admin", "writer", "writer", "writer"]);
    server.stop().await;

    // Without an auth file nobody is named.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let events = server.replay_all().await;
    assert_eq!(events[0].event.as_ref().unwrap().actor, "");
    server.stop().await;
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_certificate_and_nothing_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca");
    let mut config = tls_config(dir.path(), &ca);
    config.auth_file = Some(write(dir.path(), "auth.toml", &one_principal_per_role()));
    let server = TestServer::start_with(config).await;

    let secure = tls_channel(server.addr, &ca.pem, None);
    assert_eq!(head_seq(secure.clone()).await, 0);
    let status = log_info(&Clients::new(secure, None))
        .await
        .expect_err("TLS is not authentication");
    assert_eq!(status.code(), Code::Unauthenticated);

    // A client speaking plaintext HTTP/2 gets no answer.
    let plain = Clients::new(server.channel(), Some(AUDITOR));
    let status = log_info(&plain).await.expect_err("plaintext on a TLS port");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );
    // A client that trusts another CA refuses the server.
    let other = TestCa::new("other ca");
    let status = log_info(&Clients::new(
        tls_channel(server.addr, &other.pem, None),
        Some(AUDITOR),
    ))
    .await
    .expect_err("untrusted certificate");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    server.stop().await;
}

#[tokio::test]
async fn under_mutual_tls_the_client_certificate_names_the_principal() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca");
    let mut config = tls_config(dir.path(), &ca);
    config.tls_client_ca = Some(write(dir.path(), "clients.pem", &ca.pem));
    config.auth_file = Some(write(
        dir.path(),
        "auth.toml",
        &auth_file(&[TestPrincipal {
            name: "ops",
            roles: &["admin", "auditor"],
            token: None,
            certificate_subject: Some("ops-client"),
        }]),
    ));
    let server = TestServer::start_with(config).await;

    let ops = ca.client("ops-client");
    let channel = tls_channel(server.addr, &ca.pem, Some(&ops));
    define_revenue(&Clients::new(channel.clone(), None))
        .await
        .expect("the certificate's principal is an admin");
    let info = log_info(&Clients::new(channel.clone(), None))
        .await
        .expect("and an auditor");
    assert_eq!(info.head_seq, 1);
    let status = record_revenue(&Clients::new(channel, None), 1.0)
        .await
        .expect_err("not a writer");
    assert_eq!(status.code(), Code::PermissionDenied);

    // A certificate of the same CA for a subject the auth file does not know.
    let stranger = ca.client("stranger");
    let status = log_info(&Clients::new(
        tls_channel(server.addr, &ca.pem, Some(&stranger)),
        None,
    ))
    .await
    .expect_err("unknown subject");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // No certificate at all: the handshake fails.
    let status = log_info(&Clients::new(tls_channel(server.addr, &ca.pem, None), None))
        .await
        .expect_err("no client certificate");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );
    // The events name the certificate's principal.
    let mut replay = Clients::new(tls_channel(server.addr, &ca.pem, Some(&ops)), None)
        .audit()
        .replay_events(proto::ReplayEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = replay.message().await.unwrap().unwrap();
    let Some(proto::replay_events_response::Item::Event(envelope)) = first.item else {
        panic!("first item is an event: {first:?}");
    };
    assert_eq!(envelope.event.unwrap().actor, "ops");
    server.stop().await;
}

/// Polls `check` until it holds, for at most 20 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn new_certificates_and_tokens_apply_to_new_connections_without_dropping_streams() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old ca");
    let mut config = tls_config(dir.path(), &old_ca);
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    config.auth_file = Some(write(dir.path(), "auth.toml", &one_principal_per_role()));
    config.reload_check_ms = 50;
    let server = TestServer::start_with(config).await;

    let old_channel = tls_channel(server.addr, &old_ca.pem, None);
    define_revenue(&Clients::new(old_channel.clone(), Some(ADMIN)))
        .await
        .unwrap();
    let mut watch = Clients::new(old_channel.clone(), Some(READER))
        .query()
        .watch_kpis(proto::WatchKpisRequest {
            kpi_ids: vec!["revenue".into()],
            grain: proto::Grain::Day.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    // The operator renews the certificate (another CA, to tell them apart) and rotates
    // the writer's token.
    let new_ca = TestCa::new("new ca");
    let new_key = new_ca.server();
    std::fs::write(&key, &new_key.key).unwrap();
    std::fs::write(&cert, &new_key.cert).unwrap();
    const NEW_WRITER: &str = "kpi_test_new_writer_token";
    let rotated = one_principal_per_role().replace(
        &auth_file(&[TestPrincipal {
            name: "writer",
            roles: &["writer"],
            token: Some(WRITER),
            certificate_subject: None,
        }]),
        &auth_file(&[TestPrincipal {
            name: "writer",
            roles: &["writer"],
            token: Some(NEW_WRITER),
            certificate_subject: None,
        }]),
    );
    assert_ne!(rotated, one_principal_per_role());
    write(dir.path(), "auth.toml", &rotated);

    let addr = server.addr;
    let new_ca_pem = new_ca.pem.clone();
    eventually(
        "a new connection is served with the new certificate",
        || {
            let channel = tls_channel(addr, &new_ca_pem, None);
            async move {
                log_info(&Clients::new(channel, Some(AUDITOR)))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    let new_channel = tls_channel(server.addr, &new_ca.pem, None);
    eventually("the new token is accepted", || {
        let clients = Clients::new(new_channel.clone(), Some(NEW_WRITER));
        async move {
            clients
                .ingest()
                .record(proto::RecordRequest {
                    measurements: vec![measurement("revenue", 7.0)],
                })
                .await
                .is_ok()
        }
    })
    .await;
    let status = record_revenue(&Clients::new(new_channel.clone(), Some(WRITER)), 1.0)
        .await
        .expect_err("the old token is gone");
    assert_eq!(status.code(), Code::Unauthenticated);
    // New connections that trust only the old CA are refused...
    let status = log_info(&Clients::new(
        tls_channel(server.addr, &old_ca.pem, None),
        Some(AUDITOR),
    ))
    .await
    .expect_err("old certificate replaced");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // ...while the stream opened before the reload still delivers the update.
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let item = watch
                .message()
                .await
                .expect("stream alive")
                .expect("not ended");
            if let Some(proto::watch_kpis_response::Item::Update(update)) = item.item {
                let bucket = update.bucket.expect("bucket");
                if bucket.value == Some(7.0) {
                    return bucket;
                }
            }
        }
    })
    .await
    .expect("the old stream sees the measurement recorded after the reload");
    assert_eq!(update.count, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_bad_auth_or_tls_file_stops_the_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("data"));
    config.auth_file = Some(write(
        dir.path(),
        "auth.toml",
        "[[principal]]\nname = \"x\"\nroles = [\"root\"]\ntoken_sha256 = \"00\"\n",
    ));
    let error = TestServer::start_with(config)
        .await
        .exit()
        .await
        .expect_err("bad auth file");
    let message = error.to_string();
    assert!(
        message.contains("auth.toml") && message.contains("root"),
        "{message}"
    );

    let mut config = Config::with_data_dir(dir.path().join("data"));
    config.tls_cert = Some(write(dir.path(), "server.pem", "not a certificate"));
    config.tls_key = Some(write(dir.path(), "server.key", "not a key"));
    let error = TestServer::start_with(config)
        .await
        .exit()
        .await
        .expect_err("bad certificate");
    assert!(error.to_string().contains("server.pem"), "{error}");
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

#[tokio::test]
async fn the_data_directory_and_its_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new").join("data");
    let server = TestServer::start(&data).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server
        .record(vec![measurement("revenue", 1.0)])
        .await
        .unwrap();
    server.stop().await;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let mut checked = 0;
    let mut pending = vec![data];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is open to others",
                path.display()
            );
            checked += 1;
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    assert!(
        checked > 3,
        "the log, snapshot and more were checked: {checked}"
    );
}

#[tokio::test]
async fn reflection_and_list_streams_can_be_switched_off() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.no_reflection = true;
    config.no_list_streams = true;
    let server = TestServer::start_with(config).await;
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(server.channel())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect_err("no reflection");
    assert_eq!(status.code(), Code::Unimplemented);
    let status = server
        .audit()
        .list_streams(proto::ListStreamsRequest {})
        .await
        .expect_err("no ListStreams");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("--no-list-streams"), "{status:?}");
    // The rest of the audit service is there.
    assert_eq!(server.log_info().await.head_seq, 0);
    server.stop().await;
}

/// Calls `path` with an empty message (a valid encoding of every request), as a scanner
/// that knows the service's paths would, with `token` if any.
async fn probe(
    channel: Channel,
    path: &'static str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    grpc.unary::<(), (), _>(
        request,
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn a_scan_from_another_process_without_credentials_reads_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("scan CA");
    let server_key = ca.server();
    let cert = write(dir.path(), "server.pem", &server_key.cert);
    let key = write(dir.path(), "server.key", &server_key.key);
    let auth = write(
        dir.path(),
        "auth.toml",
        &auth_file(&[TestPrincipal {
            name: "operator",
            roles: &["reader", "writer", "admin", "auditor"],
            token: Some(ADMIN),
            certificate_subject: None,
        }]),
    );
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _server = common::ServerProcess(
        std::process::Command::new(env!("CARGO_BIN_EXE_kpi-server"))
            .args(["--listen", &address.to_string(), "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--auth-file")
            .arg(&auth)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = tls_channel(address, &ca.pem, None);
    let operator = Clients::new(channel.clone(), Some(ADMIN));
    // The server answers health checks to anyone once it is up.
    let mut up = false;
    for _ in 0..300 {
        let check = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if check.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the server answers health checks");
    operator
        .catalog()
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(kpi("orders", KpiKind::Sum)),
        })
        .await
        .unwrap();
    operator
        .ingest()
        .record(proto::RecordRequest {
            measurements: vec![measurement("orders", 5.0)],
        })
        .await
        .unwrap();
    let before = operator
        .audit()
        .get_log_info(proto::GetLogInfoRequest {})
        .await
        .unwrap()
        .into_inner();

    let mut paths: Vec<&'static str> = kpi_service::api::auth::RPC_ROLES
        .iter()
        .map(|(path, _)| *path)
        .collect();
    paths.extend([
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/kpi.v1.Admin/Everything",
    ]);
    for path in paths {
        for token in [None, Some("kpi_guessed_token")] {
            let answer = probe(channel.clone(), path, token).await;
            let code = answer.err().map(|status| status.code());
            assert_eq!(code, Some(Code::Unauthenticated), "{path} with {token:?}");
        }
    }
    probe(channel.clone(), "/grpc.health.v1.Health/Check", None)
        .await
        .expect("health stays open");

    // Nothing changed: the same head, the same catalog.
    let after = operator
        .audit()
        .get_log_info(proto::GetLogInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.head_seq, after.head_hash),
        (before.head_seq, before.head_hash)
    );
    let kpis = operator
        .catalog()
        .list_kpis(proto::ListKpisRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kpis.kpis.len(), 1);
}
