//! Property tests of the bucket laws, for every kind: merge is associative and commutative
//! with the empty bucket as identity, the merge of a random split equals the bucket of the
//! whole list, retraction undoes recording, and the sketches stay within their error.
//!
//! Exact equality is required where the state is made of integers or of values chosen
//! from the input (COUNT, MIN, MAX, LAST, NPS, CSAT, PERCENTILE's exact values, the
//! sketches' bins and registers).
//! Sums and variances are compared within a tolerance: floating-point addition is not
//! associative, so adding the same numbers grouped differently (which is what a merge
//! does) rounds at different places. Compensated summation makes the error about one
//! rounding of the result, not zero, and the Welford and Chan updates of the variance
//! round differently from each other.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;

use super::*;

/// Every kind with a state of its own.
const KINDS: [KpiKind; 10] = KpiKind::MEASURED;

/// The value of rank ⌊q (n - 1)⌋ (0-based) in ascending `sorted`: what DDSketch
/// approximates.
pub(super) fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    let rank = (q * to_f64(u64::try_from(last).unwrap())).floor();
    let index = (0..=last)
        .find(|&i| to_f64(u64::try_from(i).unwrap()) == rank)
        .unwrap();
    sorted[index]
}

/// A generated measurement, before it is given a kind-specific value.
#[derive(Debug, Clone)]
struct Raw {
    /// Any finite value: wide reals and small integers (so MIN/MAX see ties).
    value: f64,
    /// Picks an NPS or CSAT score.
    score: u8,
    /// Seconds into the bucket: few choices, so LAST sees ties on occurred_at.
    second: i64,
    /// Picks a subject among 300 (so DISTINCT reaches its HyperLogLog form).
    subject: u16,
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        prop_oneof![
            -1e6..1e6_f64,
            (-5_i32..5).prop_map(f64::from),
            (0_u32..1000).prop_map(|cents| f64::from(cents) * 0.01),
        ],
        any::<u8>(),
        0_i64..4,
        0_u16..300,
    )
        .prop_map(|(value, score, second, subject)| Raw {
            value,
            score,
            second,
            subject,
        })
}

/// A generated measurement made concrete for one kind.
#[derive(Debug, Clone)]
struct Obs {
    value: f64,
    occurred_at: DateTime<Utc>,
    seq: u64,
    subject: String,
}

impl Obs {
    fn observation(&self) -> Observation<'_> {
        Observation {
            value: self.value,
            occurred_at: self.occurred_at,
            seq: self.seq,
            subject: Some(&self.subject),
        }
    }
}

/// Gives the raw measurements kind-appropriate values and unique seqs 1, 2, ….
fn concrete(kind: KpiKind, raws: &[Raw]) -> Vec<Obs> {
    let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
    raws.iter()
        .zip(1..)
        .map(|(raw, seq)| Obs {
            value: match kind {
                KpiKind::Nps => f64::from(raw.score % 11),
                KpiKind::Csat => f64::from(1 + raw.score % 5),
                _ => raw.value,
            },
            occurred_at: start + TimeDelta::seconds(raw.second),
            seq,
            subject: format!("visitor-{}", raw.subject),
        })
        .collect()
}

fn state_of<'a>(kind: KpiKind, observations: impl IntoIterator<Item = &'a Obs>) -> BucketState {
    let mut state = BucketState::new(kind).unwrap();
    for o in observations {
        state.record(o.observation()).unwrap();
    }
    state
}

fn merged(a: &BucketState, b: &BucketState) -> BucketState {
    let mut out = a.clone();
    out.merge(b).unwrap();
    out
}

/// How far two summaries of the same measurements may differ, per field.
struct Tolerance {
    sum: f64,
    average: f64,
    stddev: f64,
}

impl Tolerance {
    /// Compensated sums agree to about one rounding of the result; 1e-14 Σ|x| is a wide
    /// margin over that which still catches a lost term or a lost compensation. The
    /// stddev is a square root: an error δ in m2 near 0 becomes sqrt(δ/n) ≈ 1e-8 max|x|,
    /// hence 1e-6 max|x| (reverse Welford on retraction rounds a little more).
    fn of(values: &[f64]) -> Self {
        let abs_sum: f64 = values.iter().map(|v| v.abs()).sum();
        let max_abs = values.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
        let n = to_f64(u64::try_from(values.len().max(1)).unwrap());
        Self {
            sum: 1e-14 * abs_sum,
            average: 1e-14 * abs_sum / n,
            stddev: 1e-6 * max_abs,
        }
    }
}

fn close(
    what: &str,
    expected: Option<f64>,
    actual: Option<f64>,
    tolerance: f64,
) -> Result<(), TestCaseError> {
    match (expected, actual) {
        (Some(e), Some(a)) if e == a || (e - a).abs() <= tolerance => Ok(()),
        (None, None) => Ok(()),
        _ => Err(TestCaseError::fail(format!(
            "{what}: expected {expected:?}, got {actual:?} (tolerance {tolerance:e})"
        ))),
    }
}

/// Checks `actual` against `expected` for `kind`: exactly, except for sums, averages,
/// stddevs (tolerance) and the DISTINCT estimate (see `distinct_close`).
fn same_summary(
    kind: KpiKind,
    expected: &Summary,
    actual: &Summary,
    tolerance: &Tolerance,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(expected.count, actual.count, "count of {:?}", kind);
    prop_assert_eq!(expected.min, actual.min, "min of {:?}", kind);
    prop_assert_eq!(expected.max, actual.max, "max of {:?}", kind);
    close("sum", expected.sum, actual.sum, tolerance.sum)?;
    match kind {
        KpiKind::Sum => close("value", expected.value, actual.value, tolerance.sum)?,
        KpiKind::Average => close("value", expected.value, actual.value, tolerance.average)?,
        KpiKind::Distinct => distinct_close(expected.value, actual.value)?,
        _ => prop_assert_eq!(expected.value, actual.value, "value of {:?}", kind),
    }
    match (&expected.detail, &actual.detail) {
        (Some(Detail::Average(e)), Some(Detail::Average(a))) => {
            close("stddev", Some(e.stddev), Some(a.stddev), tolerance.stddev)?;
        }
        (e, a) => prop_assert_eq!(e, a, "detail of {:?}", kind),
    }
    Ok(())
}

/// Two DISTINCT estimates of the same subjects: equal registers, but the sketch keeps its
/// harmonic sum as an f32 updated in insertion order, so the estimates may differ by a
/// rounding (well under 0.1%).
fn distinct_close(expected: Option<f64>, actual: Option<f64>) -> Result<(), TestCaseError> {
    match (expected, actual) {
        (Some(e), Some(a)) => close("distinct", Some(e), Some(a), 1e-3 * e + 1.0),
        _ => close("distinct", expected, actual, 0.0),
    }
}

/// The parts of a split: `assignment[i]` says which of three parts observation i joins.
fn parts<'a>(observations: &'a [Obs], assignment: &[u8]) -> [Vec<&'a Obs>; 3] {
    let mut parts: [Vec<&Obs>; 3] = Default::default();
    for (o, &part) in observations.iter().zip(assignment) {
        parts[usize::from(part % 3)].push(o);
    }
    parts
}

fn values(observations: &[Obs]) -> Vec<f64> {
    observations.iter().map(|o| o.value).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// e ⊕ a = a = a ⊕ e exactly; (a ⊕ b) ⊕ c ≈ a ⊕ (b ⊕ c); a ⊕ b ≈ b ⊕ a; and the merge
    /// of the three parts equals the bucket of the whole list.
    #[test]
    fn merge_is_a_monoid_and_splits_merge_to_the_whole(
        raws in prop::collection::vec(raw(), 0..250),
        assignment in prop::collection::vec(any::<u8>(), 250),
    ) {
        for kind in KINDS {
            let observations = concrete(kind, &raws);
            let tolerance = Tolerance::of(&values(&observations));
            let [a, b, c] = parts(&observations, &assignment)
                .map(|part| state_of(kind, part));
            let empty = BucketState::new(kind).unwrap();
            let whole = state_of(kind, &observations).summary();

            let exact = Tolerance { sum: 0.0, average: 0.0, stddev: 0.0 };
            same_summary(kind, &a.summary(), &merged(&empty, &a).summary(), &exact)?;
            same_summary(kind, &a.summary(), &merged(&a, &empty).summary(), &exact)?;

            let left = merged(&merged(&a, &b), &c);
            let right = merged(&a, &merged(&b, &c));
            same_summary(kind, &left.summary(), &right.summary(), &tolerance)?;
            same_summary(kind, &merged(&a, &b).summary(), &merged(&b, &a).summary(), &tolerance)?;
            same_summary(kind, &whole, &left.summary(), &tolerance)?;
        }
    }

    /// Recording a measurement and retracting it gives back the bucket (exact kinds), or
    /// flags what it cannot restore; retracting any recorded measurement equals the
    /// bucket rebuilt without it. Up to 160 measurements: PERCENTILE in both forms.
    #[test]
    fn retract_undoes_record(
        raws in prop::collection::vec(raw(), 0..160),
        extra in raw(),
        pick in any::<prop::sample::Index>(),
    ) {
        for kind in KINDS {
            let mut observations = concrete(kind, &raws);
            let mut all = raws.clone();
            all.push(extra.clone());
            let extra = concrete(kind, &all).pop().unwrap();
            let before = state_of(kind, &observations);

            let mut state = before.clone();
            state.record(extra.observation()).unwrap();
            let recorded = state.summary();
            let mut with_extra = values(&observations);
            with_extra.push(extra.value);
            let tolerance = Tolerance::of(&with_extra);
            check_retraction(kind, &mut state, &extra, &before.summary(), &recorded, &tolerance)?;

            if observations.is_empty() {
                continue;
            }
            let index = pick.index(observations.len());
            let mut state = before.clone();
            let removed = observations.remove(index);
            let rebuilt = state_of(kind, &observations).summary();
            check_retraction(kind, &mut state, &removed, &rebuilt, &before.summary(), &tolerance)?;
        }
    }

    /// PERCENTILE quantiles are within 1% of the exact value of the same rank, and that
    /// value itself up to [`PERCENTILE_EXACT_LIMIT`] values; DISTINCT is within 2% (+1 for a
    /// hash collision) of the exact number of subjects.
    #[test]
    fn sketches_stay_within_their_error(raws in prop::collection::vec(raw(), 1..400)) {
        let observations = concrete(KpiKind::Percentile, &raws);
        let summary = state_of(KpiKind::Percentile, &observations).summary();
        let mut sorted = values(&observations);
        sorted.sort_by(f64::total_cmp);
        let Some(Detail::Percentile(detail)) = summary.detail else {
            return Err(TestCaseError::fail("no percentile detail"));
        };
        for (q, estimate) in [(0.5, detail.p50), (0.9, detail.p90), (0.95, detail.p95), (0.99, detail.p99)] {
            let exact = exact_quantile(&sorted, q);
            if sorted.len() <= PERCENTILE_EXACT_LIMIT {
                prop_assert_eq!(estimate, exact, "q={}", q);
            }
            let bound = PERCENTILE_RELATIVE_ERROR * exact.abs() * (1.0 + 1e-9) + PERCENTILE_MIN_MAGNITUDE;
            prop_assert!((estimate - exact).abs() <= bound, "q={} exact={} estimate={}", q, exact, estimate);
        }
        prop_assert_eq!(summary.min, sorted.first().copied());
        prop_assert_eq!(summary.max, sorted.last().copied());

        let observations = concrete(KpiKind::Distinct, &raws);
        let estimate = state_of(KpiKind::Distinct, &observations).summary().value.unwrap();
        let mut subjects: Vec<&str> = observations.iter().map(|o| o.subject.as_str()).collect();
        subjects.sort_unstable();
        subjects.dedup();
        let exact = to_f64(u64::try_from(subjects.len()).unwrap());
        prop_assert!((estimate - exact).abs() <= 0.02 * exact + 1.0, "exact={} estimate={}", exact, estimate);
    }
}

/// Retracts `o` from `state` (whose summary is `recorded`) and checks the outcome against
/// `expected`, the summary of the bucket without `o`.
fn check_retraction(
    kind: KpiKind,
    state: &mut BucketState,
    o: &Obs,
    expected: &Summary,
    recorded: &Summary,
    tolerance: &Tolerance,
) -> Result<(), TestCaseError> {
    match (kind, state.retract(o.observation())) {
        (_, Ok(Retracted::Exact)) => same_summary(kind, expected, &state.summary(), tolerance),
        (KpiKind::Percentile, Err(AggregateError::NeedsRecompute { .. }))
            if recorded.count <= u64::try_from(PERCENTILE_EXACT_LIMIT).unwrap() =>
        {
            Err(TestCaseError::fail(format!(
                "a PERCENTILE bucket of {} values is exact and must retract exactly",
                recorded.count
            )))
        }
        (KpiKind::Sum | KpiKind::Average, Ok(Retracted::MinMaxStale)) => {
            let mut stale = expected.clone();
            stale.min = None;
            stale.max = None;
            same_summary(kind, &stale, &state.summary(), tolerance)
        }
        (
            KpiKind::Min | KpiKind::Max | KpiKind::Last | KpiKind::Percentile | KpiKind::Distinct,
            Err(AggregateError::NeedsRecompute { .. }),
        ) => {
            // Refused: nothing changed.
            same_summary(kind, recorded, &state.summary(), &Tolerance::of(&[]))
        }
        (_, outcome) => Err(TestCaseError::fail(format!(
            "{kind:?}: unexpected retraction outcome {outcome:?}"
        ))),
    }
}
