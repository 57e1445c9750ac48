//! Unit tests of `domain/aggregate/mod.rs`: the states of every kind through `BucketState`.

use chrono::TimeZone;

use super::*;

fn observation(value: f64) -> Observation<'static> {
    Observation {
        value,
        occurred_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        seq: 1,
        subject: None,
    }
}

#[test]
fn heap_bytes_follow_the_form_a_state_is_in() {
    let mut sum = BucketState::new(KpiKind::Sum).unwrap();
    assert_eq!(sum.heap_bytes(), 0, "empty is inline");
    sum.record(observation(1.0)).unwrap();
    assert_eq!(sum.heap_bytes(), 0, "one value is inline");
    sum.record(observation(2.0)).unwrap();
    assert_eq!(sum.heap_bytes(), std::mem::size_of::<SumState>());

    let mut percentile = BucketState::new(KpiKind::Percentile).unwrap();
    let mut last = 0;
    for value in 0..(PERCENTILE_EXACT_LIMIT + 10) {
        percentile.record(observation(value as f64 + 1.0)).unwrap();
        let bytes = percentile.heap_bytes();
        match value {
            0 => assert_eq!(bytes, 0, "one value is inline"),
            1 => assert_eq!(bytes, std::mem::size_of::<PercentileState>() + 16),
            // The exact form grows by one f64 per value.
            _ if value < PERCENTILE_EXACT_LIMIT => assert_eq!(bytes, last + 8),
            _ => {}
        }
        last = bytes;
    }
    assert!(
        last > std::mem::size_of::<PercentileState>(),
        "a sketch has bins"
    );

    let mut distinct = BucketState::new(KpiKind::Distinct).unwrap();
    let before = {
        distinct
            .record(Observation {
                subject: Some("a"),
                ..observation(1.0)
            })
            .unwrap();
        distinct.heap_bytes()
    };
    for i in 0..1000 {
        let subject = format!("subject-{i}");
        distinct
            .record(Observation {
                subject: Some(&subject),
                ..observation(1.0)
            })
            .unwrap();
    }
    assert!(
        distinct.heap_bytes() > before + 4000,
        "a HyperLogLog is larger than a few hashes"
    );
}

#[test]
fn a_million_cents_sum_to_exactly_ten_thousand() {
    // See compensated.rs for the arithmetic: the exact sum of a million doubles 0.01 is
    // 10000.000000000000208, whose nearest double is 10000.0.
    let mut state = BucketState::new(KpiKind::Sum).unwrap();
    for _ in 0..1_000_000 {
        state.record(observation(0.01)).unwrap();
    }
    let summary = state.summary();
    assert_eq!(summary.value, Some(10000.0));
    assert_eq!(summary.sum, Some(10000.0));
    assert_eq!(summary.count, 1_000_000);
    assert_eq!((summary.min, summary.max), (Some(0.01), Some(0.01)));
}

#[test]
fn ratio_of_sums_with_a_zero_denominator_has_no_value() {
    let mut buyers = BucketState::new(KpiKind::Count).unwrap();
    let mut visitors = BucketState::new(KpiKind::Count).unwrap();
    let scale = 100.0;
    let summary = ratio_summary(
        buyers.ratio_operand().unwrap(),
        visitors.ratio_operand().unwrap(),
        scale,
    );
    assert_eq!(summary.value, None);
    assert_eq!(
        summary.detail,
        Some(Detail::Ratio(RatioDetail {
            numerator: 0.0,
            denominator: 0.0,
            scale,
            numerator_count: 0,
            denominator_count: 0,
        }))
    );
    // 3 buyers of 40 visitors: 100 × 3 / 40 = 7.5 (%).
    for _ in 0..3 {
        buyers.record(observation(1.0)).unwrap();
    }
    for _ in 0..40 {
        visitors.record(observation(1.0)).unwrap();
    }
    let summary = ratio_summary(
        buyers.ratio_operand().unwrap(),
        visitors.ratio_operand().unwrap(),
        scale,
    );
    assert_eq!(summary.value, Some(7.5));
    assert_eq!(summary.count, 43);
    assert!(matches!(
        summary.detail,
        Some(Detail::Ratio(RatioDetail {
            numerator_count: 3,
            denominator_count: 40,
            ..
        }))
    ));
    // A denominator that sums to 0 has no value even with measurements behind it.
    let balanced = RatioOperand { sum: 0.0, count: 2 };
    assert_eq!(ratio_summary(balanced, balanced, scale).value, None);
}

#[test]
fn ratio_of_merged_days_is_a_ratio_of_sums() {
    // Day 1: 1 buyer of 10 visitors (10%); day 2: 2 of 30 (6.67%). The two days are
    // 100 × 3 / 40 = 7.5%, not the mean of the daily ratios (8.33%).
    let day = |buyers: u32, visitors: u32| {
        let mut b = BucketState::new(KpiKind::Sum).unwrap();
        b.record(observation(f64::from(buyers))).unwrap();
        let mut v = BucketState::new(KpiKind::Sum).unwrap();
        v.record(observation(f64::from(visitors))).unwrap();
        (b, v)
    };
    let (mut buyers, mut visitors) = day(1, 10);
    let (buyers_2, visitors_2) = day(2, 30);
    buyers.merge(&buyers_2).unwrap();
    visitors.merge(&visitors_2).unwrap();
    let summary = ratio_summary(
        buyers.ratio_operand().unwrap(),
        visitors.ratio_operand().unwrap(),
        100.0,
    );
    assert_eq!(summary.value, Some(7.5));
}

#[test]
fn ratio_operands_are_sums_and_counts_only() {
    for kind in [KpiKind::Sum, KpiKind::Count] {
        assert!(BucketState::new(kind).unwrap().ratio_operand().is_some());
    }
    for kind in [KpiKind::Average, KpiKind::Nps, KpiKind::Distinct] {
        assert!(BucketState::new(kind).unwrap().ratio_operand().is_none());
    }
    assert!(BucketState::new(KpiKind::Ratio).is_none());
}

#[test]
fn merging_different_kinds_is_refused() {
    let mut sum = BucketState::new(KpiKind::Sum).unwrap();
    sum.record(observation(2.0)).unwrap();
    let count = BucketState::new(KpiKind::Count).unwrap();
    assert_eq!(
        sum.merge(&count),
        Err(AggregateError::KindMismatch {
            ours: KpiKind::Sum,
            theirs: KpiKind::Count
        })
    );
    assert_eq!(sum.summary().sum, Some(2.0));
}

#[test]
fn sketches_ask_for_a_rebuild_on_retraction() {
    let kind = KpiKind::Distinct;
    let mut state = BucketState::new(kind).unwrap();
    assert_eq!(
        state.retract(observation(1.0)),
        Err(AggregateError::NothingToRetract { kind })
    );
    state.record(observation(1.0)).unwrap();
    assert_eq!(
        state.retract(observation(1.0)),
        Err(AggregateError::NeedsRecompute { kind })
    );
    assert_eq!(state.count(), 1);

    // PERCENTILE takes values back exactly until it becomes a sketch.
    let kind = KpiKind::Percentile;
    let mut state = BucketState::new(kind).unwrap();
    assert_eq!(
        state.retract(observation(1.0)),
        Err(AggregateError::NothingToRetract { kind })
    );
    state.record(observation(1.0)).unwrap();
    assert_eq!(state.retract(observation(1.0)), Ok(Retracted::Exact));
    assert_eq!(state.count(), 0);
    assert_eq!(state.summary(), BucketState::new(kind).unwrap().summary());
    for i in 0..=PERCENTILE_EXACT_LIMIT {
        state
            .record(observation(f64::from(u32::try_from(i).unwrap())))
            .unwrap();
    }
    let before = state.summary();
    assert_eq!(
        state.retract(observation(1.0)),
        Err(AggregateError::NeedsRecompute { kind })
    );
    assert_eq!(state.summary(), before);
}

#[test]
fn every_state_survives_a_snapshot() {
    for kind in KpiKind::MEASURED {
        let mut state = BucketState::new(kind).unwrap();
        for (seq, value) in [3.0, 5.0, 1.0, 4.0].into_iter().enumerate() {
            let mut o = observation(value);
            o.seq = u64::try_from(seq).unwrap();
            o.subject = Some(["a", "b"][seq % 2]);
            state.record(o).unwrap();
        }
        let json = serde_json::to_string(&state).unwrap();
        let restored: BucketState = serde_json::from_str(&json).unwrap();
        assert_eq!(restored.summary(), state.summary(), "{kind:?}");
    }
}

#[test]
fn the_inline_forms_answer_as_the_full_states() {
    // An empty bucket and a one-measurement bucket are stored inline; every answer
    // must be that of the full state, also after a second measurement or a merge.
    for kind in KpiKind::MEASURED {
        let full = |values: &[f64]| {
            let mut state = Repr::full_empty(kind).unwrap();
            for &value in values {
                state.record_full(observation(value)).unwrap();
            }
            BucketState(state)
        };
        let mut compact = BucketState::new(kind).unwrap();
        assert_eq!(compact.summary(), full(&[]).summary(), "{kind:?} empty");
        compact.record(observation(3.0)).unwrap();
        assert_eq!(compact.summary(), full(&[3.0]).summary(), "{kind:?} one");
        assert_eq!(compact.count(), 1);
        let mut merged = full(&[5.0]);
        merged.merge(&compact).unwrap();
        assert_eq!(
            merged.summary(),
            full(&[5.0, 3.0]).summary(),
            "{kind:?} merge"
        );
        compact.record(observation(4.0)).unwrap();
        assert_eq!(
            compact.summary(),
            full(&[3.0, 4.0]).summary(),
            "{kind:?} two"
        );
    }
    // A refused score leaves the bucket empty.
    let mut nps = BucketState::new(KpiKind::Nps).unwrap();
    assert!(nps.record(observation(11.0)).is_err());
    assert_eq!(nps.count(), 0);
}

#[test]
fn states_can_be_shared_between_threads() {
    // Projections keep buckets behind locks read by many tasks.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BucketState>();
    assert_send_sync::<Summary>();
}

#[test]
fn common_states_stay_small() {
    // Every bucket of every grain holds one of these: 16 bytes, the inline forms being
    // a kind and a value or a counter, and everything larger boxed.
    assert_eq!(std::mem::size_of::<BucketState>(), 16);
}
