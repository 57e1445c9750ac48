//! Black-box tests of kpi.v1.KpiCatalog over loopback gRPC.

mod common;

use common::{TestServer, bad_request_field, kpi};
use kpi_service::proto::{self, KpiKind, RatioSettings};
use tonic::Code;
use tonic_types::StatusExt;

async fn update(
    server: &TestServer,
    definition: proto::KpiDefinition,
    expected_version: Option<u64>,
) -> Result<proto::Kpi, tonic::Status> {
    server
        .catalog()
        .update_kpi(proto::UpdateKpiRequest {
            definition: Some(definition),
            expected_version,
            recompute_history: false,
        })
        .await
        .map(|r| r.into_inner().kpi.expect("kpi"))
}

async fn get(server: &TestServer, kpi_id: &str) -> Result<proto::Kpi, tonic::Status> {
    server
        .catalog()
        .get_kpi(proto::GetKpiRequest {
            kpi_id: kpi_id.into(),
        })
        .await
        .map(|r| r.into_inner().kpi.expect("kpi"))
}

async fn retire(
    server: &TestServer,
    kpi_id: &str,
    expected_version: Option<u64>,
) -> Result<proto::Kpi, tonic::Status> {
    server
        .catalog()
        .retire_kpi(proto::RetireKpiRequest {
            kpi_id: kpi_id.into(),
            reason: "replaced by revenue_net".into(),
            expected_version,
        })
        .await
        .map(|r| r.into_inner().kpi.expect("kpi"))
}

async fn list(
    server: &TestServer,
    page_size: u32,
    page_token: &str,
    include_retired: bool,
) -> proto::ListKpisResponse {
    server
        .catalog()
        .list_kpis(proto::ListKpisRequest {
            page_size,
            page_token: page_token.into(),
            include_retired,
        })
        .await
        .expect("list")
        .into_inner()
}

#[tokio::test]
async fn a_kpi_lives_through_define_update_and_retire() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;

    let mut revenue = kpi("revenue", KpiKind::Sum);
    revenue.unit = "EUR".into();
    revenue.timezone = "Europe/Amsterdam".into();
    let defined = server.define(revenue.clone()).await;
    assert_eq!(defined.version, 1);
    assert!(!defined.retired);
    assert!(defined.seq >= 1);
    let stored = defined.definition.clone().expect("definition");
    assert_eq!(stored.timezone, "Europe/Amsterdam");
    assert_eq!(stored.dimensions, ["channel"]);
    assert_eq!(get(&server, "revenue").await.unwrap(), defined);

    revenue.description = "Total sales income".into();
    revenue.dimensions.push("country".into());
    let updated = update(&server, revenue.clone(), Some(1)).await.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(
        updated.definition.as_ref().map(|d| d.description.as_str()),
        Some("Total sales income")
    );
    assert_eq!(updated.created_at, defined.created_at);
    assert!(updated.seq > defined.seq);

    let retired = retire(&server, "revenue", Some(2)).await.unwrap();
    assert_eq!(retired.version, 3);
    assert!(retired.retired);
    let after = get(&server, "revenue").await.unwrap();
    assert!(after.retired);

    let err = update(&server, revenue.clone(), None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = retire(&server, "revenue", None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = server
        .catalog()
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(revenue),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn stale_versions_are_aborted_with_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut visitors = kpi("visitors", KpiKind::Count);
    server.define(visitors.clone()).await;
    visitors.name = "Website visitors".into();
    update(&server, visitors.clone(), Some(1)).await.unwrap();

    visitors.name = "Visitors (stale edit)".into();
    let err = update(&server, visitors.clone(), Some(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("version 2"), "{}", err.message());
    let info = err.get_details_error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, "VERSION_MISMATCH");
    assert_eq!(
        info.metadata.get("current_version").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        info.metadata.get("expected_version").map(String::as_str),
        Some("1")
    );
    // Nothing changed.
    let current = get(&server, "visitors").await.unwrap();
    assert_eq!(current.version, 2);
    assert_eq!(current.definition.unwrap().name, "Website visitors");

    let err = retire(&server, "visitors", Some(7)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(!get(&server, "visitors").await.unwrap().retired);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_updates_of_one_version_let_exactly_one_win() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("nps", KpiKind::Nps)).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut definition = kpi("nps", KpiKind::Nps);
        definition.name = format!("edit {i}");
        let client = server.catalog();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            client
                .update_kpi(proto::UpdateKpiRequest {
                    definition: Some(definition),
                    expected_version: Some(1),
                    ..Default::default()
                })
                .await
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => {
                won += 1;
                assert_eq!(response.into_inner().kpi.unwrap().version, 2);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(get(&server, "nps").await.unwrap().version, 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_definitions_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let cases: Vec<(proto::KpiDefinition, Code, &str)> = vec![
        (
            kpi("Revenue!", KpiKind::Sum),
            Code::InvalidArgument,
            "definition.id",
        ),
        (
            kpi("", KpiKind::Sum),
            Code::InvalidArgument,
            "definition.id",
        ),
        (
            kpi("k", KpiKind::Unspecified),
            Code::InvalidArgument,
            "definition.kind",
        ),
        (
            proto::KpiDefinition {
                kind: 99,
                ..kpi("k", KpiKind::Sum)
            },
            Code::InvalidArgument,
            "definition.kind",
        ),
        (
            proto::KpiDefinition {
                timezone: "Europe/Atlantis".into(),
                ..kpi("k", KpiKind::Sum)
            },
            Code::InvalidArgument,
            "definition.timezone",
        ),
        (
            proto::KpiDefinition {
                name: String::new(),
                ..kpi("k", KpiKind::Sum)
            },
            Code::InvalidArgument,
            "definition.name",
        ),
        (
            proto::KpiDefinition {
                dimensions: (0..9).map(|i| format!("d{i}")).collect(),
                ..kpi("k", KpiKind::Sum)
            },
            Code::InvalidArgument,
            "definition.dimensions",
        ),
        (
            proto::KpiDefinition {
                dimensions: vec!["Channel".into()],
                ..kpi("k", KpiKind::Sum)
            },
            Code::InvalidArgument,
            "definition.dimensions[0]",
        ),
        (
            kpi("conversion", KpiKind::Ratio),
            Code::InvalidArgument,
            "definition.ratio",
        ),
        (
            proto::KpiDefinition {
                ratio: Some(RatioSettings {
                    numerator_kpi_id: "buyers".into(),
                    denominator_kpi_id: "visitors".into(),
                    scale: None,
                }),
                ..kpi("conversion", KpiKind::Ratio)
            },
            Code::NotFound,
            "definition.ratio.numerator_kpi_id",
        ),
    ];
    for (definition, code, field) in cases {
        let err = server
            .catalog()
            .define_kpi(proto::DefineKpiRequest {
                definition: Some(definition.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{definition:?}: {err:?}");
        assert_eq!(
            common::violated_field(&err).as_deref(),
            Some(field),
            "{err:?}"
        );
        assert_eq!(bad_request_field(&err).as_deref(), Some(field), "{err:?}");
    }
    let err = server
        .catalog()
        .define_kpi(proto::DefineKpiRequest { definition: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // None of it was stored.
    assert_eq!(server.log_info().await.head_seq, 0);
    assert!(list(&server, 0, "", true).await.kpis.is_empty());
    let err = get(&server, "nothing_here").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn ratios_refer_to_live_summable_kpis() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("buyers", KpiKind::Count)).await;
    server.define(kpi("visitors", KpiKind::Count)).await;
    server.define(kpi("reply_time", KpiKind::Average)).await;
    let conversion = |denominator: &str| proto::KpiDefinition {
        unit: "%".into(),
        ratio: Some(RatioSettings {
            numerator_kpi_id: "buyers".into(),
            denominator_kpi_id: denominator.into(),
            scale: None,
        }),
        ..kpi("conversion", KpiKind::Ratio)
    };
    let err = server
        .catalog()
        .define_kpi(proto::DefineKpiRequest {
            definition: Some(conversion("reply_time")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let defined = server.define(conversion("visitors")).await;
    assert_eq!(
        defined.definition.unwrap().ratio.unwrap().scale,
        Some(100.0)
    );
    let err = retire(&server, "visitors", None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("conversion"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn list_pages_through_kpis_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for id in ["e", "a", "d", "b", "c"] {
        server.define(kpi(id, KpiKind::Sum)).await;
    }
    retire(&server, "b", None).await.unwrap();
    let ids = |page: &proto::ListKpisResponse| -> Vec<String> {
        page.kpis
            .iter()
            .map(|k| k.definition.as_ref().unwrap().id.clone())
            .collect()
    };
    let first = list(&server, 2, "", false).await;
    assert_eq!(ids(&first), ["a", "c"]);
    assert!(!first.next_page_token.is_empty());
    let second = list(&server, 2, &first.next_page_token, false).await;
    assert_eq!(ids(&second), ["d", "e"]);
    assert_eq!(second.next_page_token, "");
    assert_eq!(
        ids(&list(&server, 0, "", true).await),
        ["a", "b", "c", "d", "e"]
    );
    let err = server
        .catalog()
        .list_kpis(proto::ListKpisRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_request_field(&err).as_deref(), Some("page_size"));

    // Tokens are opaque: an id, a made-up string or a damaged token is INVALID_ARGUMENT.
    let mut damaged = first.next_page_token.clone().into_bytes();
    let last = damaged.len() - 1;
    damaged[last] = if damaged[last] == b'A' { b'B' } else { b'A' };
    let damaged = String::from_utf8(damaged).unwrap();
    for token in ["c", "not-a-token!!", "AAAA", damaged.as_str()] {
        let err = server
            .catalog()
            .list_kpis(proto::ListKpisRequest {
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err(token);
        assert_eq!(err.code(), Code::InvalidArgument, "{token}: {err:?}");
        assert_eq!(bad_request_field(&err).as_deref(), Some("page_token"));
    }
    // A token stays valid across a restart.
    let dir_path = server.data_dir.clone();
    server.stop().await;
    let server = TestServer::start(&dir_path).await;
    let again = list(&server, 2, &first.next_page_token, false).await;
    assert_eq!(ids(&again), ["d", "e"]);
    server.stop().await;
}

#[tokio::test]
async fn the_catalog_is_rebuilt_from_the_log_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    let mut csat = kpi("csat", KpiKind::Csat);
    server.define(csat.clone()).await;
    csat.name = "Customer satisfaction".into();
    update(&server, csat.clone(), Some(1)).await.unwrap();
    retire(&server, "revenue", None).await.unwrap();
    let before = list(&server, 0, "", true).await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert_eq!(list(&server, 0, "", true).await, before);
    let err = update(&server, csat, Some(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    server.stop().await;
}
