//! Unit tests of `domain/catalog.rs`.

use chrono_tz::Tz;

use super::*;
use crate::domain::{Direction, KpiKind, RatioSettings};

fn definition(id: &str, kind: KpiKind) -> KpiDefinition {
    KpiDefinition {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        unit: String::new(),
        kind,
        direction: Direction::HigherIsBetter,
        timezone: Tz::UTC,
        dimensions: vec![],
        ratio: None,
    }
}

fn conversion() -> KpiDefinition {
    KpiDefinition {
        ratio: Some(RatioSettings {
            numerator_kpi_id: "buyers".into(),
            denominator_kpi_id: "visitors".into(),
            scale: 100.0,
        }),
        ..definition("conversion", KpiKind::Ratio)
    }
}

static NOTHING_STORED: StoredUse = StoredUse {
    measured: false,
    dimensions: Vec::new(),
};

fn rules(expected_version: Option<u64>) -> UpdateRules<'static> {
    UpdateRules {
        expected_version,
        stored: &NOTHING_STORED,
        recompute_history: false,
    }
}

#[test]
fn changes_that_rewrite_history_need_consent() {
    let mut catalog = Catalog::default();
    let mut revenue = definition("revenue", KpiKind::Sum);
    revenue.dimensions = vec!["channel".into(), "region".into()];
    commit(&mut catalog, |c| c.decide_define(revenue.clone()));
    let stored = StoredUse {
        measured: true,
        dimensions: vec!["channel".into()],
    };
    let with = |recompute_history| UpdateRules {
        expected_version: None,
        stored: &stored,
        recompute_history,
    };
    let mut average = revenue.clone();
    average.kind = KpiKind::Average;
    assert!(matches!(
        catalog.decide_update(average.clone(), with(false)),
        Err(Rejection::FailedPrecondition { field, reason })
            if field == "definition.kind" && reason.contains("recompute_history")
    ));
    assert!(catalog.decide_update(average, with(true)).is_ok());
    let mut amsterdam = revenue.clone();
    amsterdam.timezone = "Europe/Amsterdam".parse().expect("zone");
    assert!(matches!(
        catalog.decide_update(amsterdam.clone(), with(false)),
        Err(Rejection::FailedPrecondition { field, .. }) if field == "definition.timezone"
    ));
    assert!(catalog.decide_update(amsterdam, with(true)).is_ok());
    // An unused dimension may go; a used one never, whatever the consent.
    let mut no_region = revenue.clone();
    no_region.dimensions = vec!["channel".into()];
    assert!(catalog.decide_update(no_region, with(false)).is_ok());
    let mut no_channel = revenue.clone();
    no_channel.dimensions = vec!["region".into()];
    assert!(matches!(
        catalog.decide_update(no_channel, with(true)),
        Err(Rejection::FailedPrecondition { field, .. }) if field == "definition.dimensions"
    ));
    // Without measurements nothing is rewritten.
    let mut count = revenue;
    count.kind = KpiKind::Count;
    assert!(catalog.decide_update(count, rules(None)).is_ok());
}

fn commit(catalog: &mut Catalog, decide: impl FnOnce(&Catalog) -> Result<Event, Rejection>) {
    let event = decide(catalog).expect("accepted");
    let seq = catalog.last_validation_change_seq() + 1;
    catalog.apply(seq, DateTime::UNIX_EPOCH, &event);
}

#[test]
fn versions_count_every_change() {
    let mut catalog = Catalog::default();
    commit(&mut catalog, |c| {
        c.decide_define(definition("revenue", KpiKind::Sum))
    });
    assert_eq!(catalog.get("revenue").map(|e| e.version), Some(1));
    let mut changed = definition("revenue", KpiKind::Sum);
    changed.unit = "EUR".into();
    commit(&mut catalog, |c| c.decide_update(changed, rules(Some(1))));
    assert_eq!(catalog.get("revenue").map(|e| e.version), Some(2));
    assert_eq!(
        catalog.decide_update(definition("revenue", KpiKind::Sum), rules(Some(1))),
        Err(Rejection::VersionMismatch {
            what: "kpi 'revenue'".into(),
            expected: 1,
            current: 2
        })
    );
    commit(&mut catalog, |c| {
        c.decide_retire("revenue", "done".into(), None)
    });
    let entry = catalog.get("revenue").expect("kept");
    assert!(entry.retired);
    assert_eq!(entry.version, 3);
    assert!(matches!(
        catalog.decide_update(definition("revenue", KpiKind::Sum), rules(None)),
        Err(Rejection::FailedPrecondition { .. })
    ));
    assert!(matches!(
        catalog.decide_define(definition("revenue", KpiKind::Sum)),
        Err(Rejection::AlreadyExists { .. })
    ));
}

#[test]
fn ratios_need_live_summable_operands() {
    let mut catalog = Catalog::default();
    assert!(matches!(
        catalog.decide_define(conversion()),
        Err(Rejection::NotFound { field, .. }) if field == "definition.ratio.numerator_kpi_id"
    ));
    commit(&mut catalog, |c| {
        c.decide_define(definition("buyers", KpiKind::Count))
    });
    commit(&mut catalog, |c| {
        c.decide_define(definition("visitors", KpiKind::Average))
    });
    assert!(matches!(
        catalog.decide_define(conversion()),
        Err(Rejection::FailedPrecondition { field, .. }) if field == "definition.ratio.denominator_kpi_id"
    ));
    commit(&mut catalog, |c| {
        c.decide_update(definition("visitors", KpiKind::Count), rules(None))
    });
    commit(&mut catalog, |c| c.decide_define(conversion()));
    assert!(matches!(
        catalog.decide_retire("buyers", String::new(), None),
        Err(Rejection::FailedPrecondition { .. })
    ));
    assert!(matches!(
        catalog.decide_update(definition("visitors", KpiKind::Max), rules(None)),
        Err(Rejection::FailedPrecondition { field, .. }) if field == "definition.kind"
    ));
}

#[test]
fn listing_pages_by_id() {
    let mut catalog = Catalog::default();
    for id in ["c", "a", "b"] {
        commit(&mut catalog, |c| {
            c.decide_define(definition(id, KpiKind::Sum))
        });
    }
    commit(&mut catalog, |c| c.decide_retire("b", String::new(), None));
    let ids = |after: &str, retired: bool| -> Vec<String> {
        catalog
            .list_after(after, retired)
            .map(|e| e.definition.id.clone())
            .collect()
    };
    assert_eq!(ids("", false), ["a", "c"]);
    assert_eq!(ids("a", true), ["b", "c"]);
}
