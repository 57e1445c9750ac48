//! Unit tests of `domain/aggregate/sketches.rs`.

use super::super::laws::exact_quantile;
use super::*;

#[test]
fn percentiles_of_reply_times_are_within_one_percent() {
    // Reply times 1 ms .. 100 s on a geometric grid: 20,001 values, five decades.
    let values: Vec<f64> = (0..=20_000)
        .map(|i| 0.001 * 10f64.powf(5.0 * f64::from(i) / 20_000.0))
        .collect();
    let mut state = PercentileState::default();
    for &v in &values {
        state.record(v);
    }
    for q in [0.5, 0.9, 0.95, 0.99] {
        let exact = exact_quantile(&values, q);
        let estimate = state.quantile(q).unwrap();
        assert!(
            (estimate - exact).abs() <= PERCENTILE_RELATIVE_ERROR * exact * (1.0 + 1e-9),
            "q={q} exact={exact} estimate={estimate}"
        );
    }
    let summary = state.summary();
    assert_eq!(summary.count, 20_001);
    assert_eq!(summary.min, Some(0.001));
    assert_eq!(summary.max, Some(values[20_000]));
    // Five decades at γ ≈ 1.0202: ln(1e5) / ln(γ) ≈ 576 bins, allocated 128 at a time.
    assert_eq!(state.bins(), 640);
}

#[test]
fn negative_and_zero_values_do_not_panic() {
    // Seven values (exact form), then each of them 20 times (140 values: a sketch).
    let values = [-5.0, -1.0, 0.0, 0.0, 1e-12, 2.0, 3.0];
    for copies in [1, 20] {
        let mut state = PercentileState::default();
        for _ in 0..copies {
            for v in values {
                state.record(v);
            }
        }
        assert_eq!(state.bins() > 0, copies > 1);
        let summary = state.summary();
        assert_eq!(summary.min, Some(-5.0));
        assert_eq!(summary.max, Some(3.0));
        // Sorted: -5 -1 0 0 1e-12 2 3; rank ⌊0.5 × 6⌋ = 3 is a zero (and with 20 copies
        // of each, rank ⌊0.5 × 139⌋ = 69 is one of the 40 zeros at ranks 40..79).
        assert_eq!(summary.value, Some(0.0));
        // Rank ⌊0.1 × 6⌋ = 0 (⌊0.1 × 139⌋ = 13 with copies): -5 within 1%.
        let p10 = state.quantile(0.1).unwrap();
        assert!((p10 - -5.0).abs() <= 0.05 * (1.0 + 1e-9), "{p10}");
    }
}

/// The state after recording `values` in order.
fn recorded(values: &[f64]) -> PercentileState {
    let mut state = PercentileState::default();
    for &v in values {
        state.record(v);
    }
    state
}

/// `n` reply times from 0.1 to 100 (three decades, as in benches/restart.rs), from a
/// fixed xorshift sequence.
fn reply_times(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let unit = f64::from(u32::try_from(x >> 40).unwrap()) / f64::from(1_u32 << 24);
            0.1 * 1000_f64.powf(unit)
        })
        .collect()
}

#[test]
fn the_exact_form_becomes_a_sketch_after_the_limit() {
    let values = reply_times(PERCENTILE_EXACT_LIMIT + 1, 7);
    let mut state = recorded(&values[..PERCENTILE_EXACT_LIMIT]);
    let mut sorted = values[..PERCENTILE_EXACT_LIMIT].to_vec();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(state.bins(), 0);
    for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0] {
        assert_eq!(state.quantile(q), Some(exact_quantile(&sorted, q)), "q={q}");
    }
    assert_eq!(state.quantile(1.5), None);

    state.record(values[PERCENTILE_EXACT_LIMIT]);
    assert!(state.bins() > 0, "a sketch after {} values", values.len());
    assert_eq!(state.count(), u64::try_from(values.len()).unwrap());
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    for q in [0.5, 0.9, 0.95, 0.99] {
        let exact = exact_quantile(&sorted, q);
        let estimate = state.quantile(q).unwrap();
        assert!(
            (estimate - exact).abs() <= PERCENTILE_RELATIVE_ERROR * exact * (1.0 + 1e-9),
            "q={q} exact={exact} estimate={estimate}"
        );
    }
    let summary = state.summary();
    assert_eq!(summary.min, sorted.first().copied());
    assert_eq!(summary.max, sorted.last().copied());
}

#[test]
fn merging_exact_buckets_stays_exact_up_to_the_limit() {
    let values = reply_times(2 * PERCENTILE_EXACT_LIMIT, 11);
    let half = PERCENTILE_EXACT_LIMIT / 2;
    // 64 + 64 values: exact, and the same answers as recording all of them.
    let mut merged = recorded(&values[..half]);
    merged.merge(&recorded(&values[half..2 * half])).unwrap();
    assert_eq!(merged.bins(), 0);
    assert_eq!(merged.summary(), recorded(&values[..2 * half]).summary());
    // One more value in the other bucket: a sketch, with the bins of recording them.
    for (left, right) in [(half, half + 1), (half + 1, half), (3, 2 * half - 2)] {
        let mut merged = recorded(&values[..left]);
        merged
            .merge(&recorded(&values[left..left + right]))
            .unwrap();
        assert!(merged.bins() > 0);
        let whole = recorded(&values[..left + right]).summary();
        let summary = merged.summary();
        assert_eq!(summary.detail, whole.detail, "{left} + {right}");
        assert_eq!((summary.min, summary.max), (whole.min, whole.max));
        assert_eq!(summary.count, whole.count);
    }
    // A sketch merged with an exact bucket, either way round.
    let sketch = recorded(&values[..=PERCENTILE_EXACT_LIMIT]);
    let exact = recorded(&values[PERCENTILE_EXACT_LIMIT + 1..PERCENTILE_EXACT_LIMIT + 10]);
    let whole = recorded(&values[..PERCENTILE_EXACT_LIMIT + 10]).summary();
    let mut a = sketch.clone();
    a.merge(&exact).unwrap();
    let mut b = exact.clone();
    b.merge(&sketch).unwrap();
    for merged in [a, b] {
        let summary = merged.summary();
        assert_eq!(summary.detail, whole.detail);
        assert_eq!((summary.min, summary.max), (whole.min, whole.max));
        assert_eq!(summary.count, whole.count);
    }
}

#[test]
fn the_exact_form_takes_back_equal_bits_only() {
    let mut state = recorded(&[2.0, 0.0, 1.0, 2.0]);
    assert_eq!(
        state.retract(-0.0),
        Err(AggregateError::NothingToRetract {
            kind: KpiKind::Percentile
        })
    );
    assert_eq!(state.retract(2.0), Ok(Retracted::Exact));
    assert_eq!(state.summary(), recorded(&[0.0, 1.0, 2.0]).summary());
    assert_eq!(state.retract(0.0), Ok(Retracted::Exact));
    assert_eq!(state.summary(), recorded(&[1.0, 2.0]).summary());
    assert_eq!(state.count(), 2);
}

#[test]
fn both_forms_read_back_and_still_merge() {
    for n in [
        1,
        4,
        PERCENTILE_EXACT_LIMIT,
        PERCENTILE_EXACT_LIMIT + 1,
        1000,
    ] {
        let state = recorded(&reply_times(n, 3));
        let bytes = crate::encoding::encode(&state).unwrap();
        let mut restored: PercentileState = crate::encoding::decode(&bytes).unwrap();
        assert_eq!(restored.summary(), state.summary(), "{n}");
        assert_eq!(restored.bins(), state.bins(), "{n}");
        restored.merge(&state).unwrap();
        assert_eq!(restored.count(), 2 * u64::try_from(n).unwrap());
    }
    let mut distinct = DistinctState::default();
    for i in 0..500 {
        distinct.record(Some(&format!("visitor-{i}")));
    }
    let json = serde_json::to_string(&distinct).unwrap();
    let restored: DistinctState = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, distinct);
}

#[test]
fn a_sketch_with_another_configuration_is_refused() {
    let mut other = DDSketch::new(Config::new(0.02, 2048, 1e-9));
    other.add(1.0);
    let json = format!(
        "{{\"Sketch\":{{\"sketch\":{},\"sum\":{{\"sum\":1.0,\"compensation\":0.0}}}}}}",
        serde_json::to_string(&other).unwrap()
    );
    let error = serde_json::from_str::<PercentileState>(&json).unwrap_err();
    assert!(
        error.to_string().contains("another configuration"),
        "{error}"
    );
}

#[test]
fn stored_exact_values_must_be_sorted_and_few() {
    assert_eq!(
        serde_json::from_str::<PercentileState>(r#"{"Exact":[1.0,2.0]}"#)
            .unwrap()
            .count(),
        2
    );
    let error = serde_json::from_str::<PercentileState>(r#"{"Exact":[2.0,1.0]}"#).unwrap_err();
    assert!(error.to_string().contains("not sorted"), "{error}");
    let too_many = serde_json::to_string(&vec![1.0; PERCENTILE_EXACT_LIMIT + 1]).unwrap();
    let error =
        serde_json::from_str::<PercentileState>(&format!(r#"{{"Exact":{too_many}}}"#)).unwrap_err();
    assert!(error.to_string().contains("too many"), "{error}");
}

#[test]
fn the_percentile_state_is_two_words() {
    // Boxed in a `BucketState`: a fat pointer to the exact values, or a thin one to
    // the sketch, in the same 16 bytes.
    assert_eq!(std::mem::size_of::<PercentileState>(), 16);
    // The fixed part of a sketch, as the memory figures in the docs say.
    assert_eq!(std::mem::size_of::<PercentileSketch>(), 192);
}

#[test]
fn distinct_counts_within_two_percent_at_every_scale() {
    // Deterministic: WyHash has no seed, so these estimates are the same on every run.
    let mut state = DistinctState::default();
    let mut next = 0_u64;
    for target in [1_u64, 2, 100, 128, 1_000, 10_000, 100_000, 1_000_000] {
        while next < target {
            state.record(Some(&format!("visitor-{next:08}")));
            next += 1;
        }
        let estimate = to_f64(state.estimate());
        let exact = to_f64(target);
        assert!(
            (estimate - exact).abs() <= 0.02 * exact,
            "{target} distinct, estimate {estimate}"
        );
        if target <= 128 {
            assert_eq!(state.estimate(), target, "exact in the small forms");
        }
    }
    // Recording the same subjects again changes the count, not the estimate.
    let estimate = state.estimate();
    state.record(Some("visitor-00000007"));
    assert_eq!(state.estimate(), estimate);
    assert_eq!(state.count(), 1_000_001);
}

#[test]
fn distinct_sketches_read_back_in_every_form() {
    for n in [0, 1, 3, 24, 100, 128, 130] {
        let mut state = DistinctState::default();
        for i in 0..n {
            state.record(Some(&format!("visitor-{i}")));
        }
        let bytes = crate::encoding::encode(&state).unwrap();
        let restored: DistinctState = crate::encoding::decode(&bytes).unwrap();
        assert_eq!(restored, state, "{n}");
        assert_eq!(restored.estimate(), state.estimate(), "{n}");
        assert_eq!(restored.sketch_bytes(), state.sketch_bytes(), "{n}");
    }
}

#[test]
fn distinct_sketch_memory_grows_with_the_subjects() {
    let mut state = DistinctState::default();
    let mut sizes = Vec::new();
    for i in 0..1000 {
        if [0, 2, 16, 128, 129].contains(&i) {
            sizes.push((i, state.sketch_bytes()));
        }
        state.record(Some(&format!("s{i}")));
    }
    // 8-byte handle; array of 4-byte hashes with power-of-two capacity; 16384 × 6 bits
    // = 12,288 bytes of registers + 12 bytes of header + the handle.
    assert_eq!(
        sizes,
        vec![(0, 8), (2, 8), (16, 72), (128, 520), (129, 12_308)]
    );
}
