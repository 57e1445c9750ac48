//! Tests of the workload generator: reproducible, every kind present, late share as
//! configured, and every definition and measurement valid by the domain's own rules.

use std::collections::{BTreeMap, HashMap};

use chrono::{TimeDelta, TimeZone, Utc};

use super::*;
use kpi_service::domain::measurement::TimeRules;
use kpi_service::proto::from_proto;

fn end() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn config(kpis: usize, measurements: u64) -> WorkloadConfig {
    WorkloadConfig {
        kpis,
        measurements,
        ..WorkloadConfig::ending_at(end())
    }
}

#[test]
fn the_same_seed_gives_the_same_stream_and_another_seed_another() {
    let one = Workload::new(config(16, 5000)).unwrap();
    let again = Workload::new(config(16, 5000)).unwrap();
    let other = Workload::new(WorkloadConfig {
        seed: 2,
        ..config(16, 5000)
    })
    .unwrap();
    let first: Vec<_> = one.measurements(0..5000).collect();
    assert_eq!(first, again.measurements(0..5000).collect::<Vec<_>>());
    assert_ne!(first, other.measurements(0..5000).collect::<Vec<_>>());
    assert_eq!(one.definitions(), again.definitions());
}

#[test]
fn any_partition_of_the_stream_gives_the_same_measurements() {
    let workload = Workload::new(config(8, 1003)).unwrap();
    let whole: Vec<_> = workload.measurements(0..u64::MAX).collect();
    assert_eq!(whole.len(), 1003);
    let batched: Vec<_> = (0..workload.batch_count(100))
        .flat_map(|b| workload.batch(b, 100))
        .collect();
    assert_eq!(whole, batched);
    assert_eq!(workload.batch_count(100), 11);
    assert_eq!(workload.batch(10, 100).len(), 3);
    assert!(workload.batch(11, 100).is_empty());
}

#[test]
fn ids_repeat_the_article_set_and_ratios_refer_to_earlier_kpis() {
    let workload = Workload::new(config(32, 0)).unwrap();
    let ids: Vec<_> = workload.kpis().iter().map(|k| k.id.as_str()).collect();
    assert_eq!(
        &ids[..3],
        ["revenue_001", "new_customers_001", "website_visitors_001"]
    );
    assert_eq!(ids[8], "revenue_002");
    assert_eq!(ids[18], "website_visitors_003");
    for (position, kpi) in workload.kpis().iter().enumerate() {
        if let Some((numerator, denominator)) = &kpi.ratio {
            assert!(ids[..position].contains(&numerator.as_str()));
            assert!(ids[..position].contains(&denominator.as_str()));
        }
    }
    assert_eq!(workload.kpis()[24].timezone, "America/New_York");
    assert_eq!(
        Workload::new(config(0, 1)).unwrap_err(),
        WorkloadError::NoKpis
    );
}

/// Every definition passes the domain's rules, and every measurement passes them against
/// its KPI (the checks the server makes), at the end of the span.
#[test]
fn definitions_and_measurements_are_valid_for_their_kinds() {
    let workload = Workload::new(WorkloadConfig {
        event_ids: true,
        ..config(24, 20_000)
    })
    .unwrap();
    let mut definitions = HashMap::new();
    for definition in workload.definitions() {
        let definition = from_proto::kpi_definition(definition, "definition").unwrap();
        definition.validate("definition").unwrap();
        definitions.insert(definition.id.clone(), definition);
    }
    let rules = TimeRules {
        now: end(),
        max_future_skew: TimeDelta::zero(),
    };
    let mut per_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut event_ids = std::collections::HashSet::new();
    for measurement in workload.measurements(0..20_000) {
        let measurement = from_proto::measurement(measurement, "m", end()).unwrap();
        let definition = &definitions[&measurement.kpi_id];
        measurement.validate(definition, &rules).unwrap();
        assert!(measurement.occurred_at >= workload.start());
        assert!(event_ids.insert(measurement.event_id.clone().unwrap()));
        match definition.kind {
            kpi_service::domain::KpiKind::Distinct => assert!(measurement.subject.is_some()),
            kpi_service::domain::KpiKind::Sum => {
                assert!((5.0..1000.0).contains(&measurement.value))
            }
            kpi_service::domain::KpiKind::Percentile => {
                assert!((60.0..=172_800.0).contains(&measurement.value));
            }
            _ => {}
        }
        *per_kind
            .entry(format!("{:?}", definition.kind))
            .or_default() += 1;
    }
    let kinds: Vec<_> = per_kind.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        ["Count", "Csat", "Distinct", "Nps", "Percentile", "Sum"],
        "every measured kind appears: {per_kind:?}"
    );
}

/// Late measurements are days before their place in the stream; the others within the
/// jitter. The measured share is close to the configured one.
#[test]
fn the_late_share_is_roughly_as_configured() {
    for share in [0.0, 0.05, 0.2] {
        let count = 40_000;
        let workload = Workload::new(WorkloadConfig {
            late_share: share,
            ..config(8, count)
        })
        .unwrap();
        let span = workload.end() - workload.start();
        let mut late = 0_u32;
        let mut considered = 0_u32;
        for (index, measurement) in workload.measurements(0..count).enumerate() {
            let index = i32::try_from(index).unwrap();
            let place = workload.start() + span * index / i32::try_from(count).unwrap();
            // The first LATE_MAX of the span clamps late measurements to the start.
            if place < workload.start() + LATE_MAX {
                continue;
            }
            considered += 1;
            let ts = measurement.occurred_at.unwrap();
            let at = Utc.timestamp_opt(ts.seconds, 0).unwrap();
            let before = place - at;
            assert!(before <= LATE_MAX + TimeDelta::seconds(1));
            if before >= LATE_MIN - TimeDelta::seconds(1) {
                late += 1;
            } else {
                assert!(before <= JITTER + TimeDelta::seconds(1), "{before}");
            }
        }
        let measured = f64::from(late) / f64::from(considered);
        assert!(
            (measured - share).abs() < 0.01,
            "configured {share}, measured {measured}"
        );
    }
}

#[test]
fn the_default_end_is_the_hour() {
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 34, 56).unwrap();
    assert_eq!(
        default_end(now),
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    );
}
