//! Unit tests of `domain/trend.rs`.

use super::*;
use proptest::prelude::*;

fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-9 * (1.0 + expected.abs())
}

fn assert_close(actual: f64, expected: f64) {
    assert!(close(actual, expected), "{actual} != {expected}");
}

fn window(values: &[f64]) -> Vec<Option<f64>> {
    values.iter().copied().map(Some).collect()
}

#[test]
fn exact_line_has_r_squared_one_and_no_residual_error() {
    // y = [1, 2, 3] at x = [0, 1, 2]: x̄ = 1, ȳ = 2, Sxx = 2, Sxy = 2,
    // slope = 1, intercept = 2 − 1·1 = 1, SSE = 0, r² = 1, s = sqrt(0/1) = 0.
    let report = analyze_window(&window(&[1.0, 2.0, 3.0]), None, 0, TrendMethod::Linear);
    let fit = report.fit.unwrap();
    assert_close(fit.slope, 1.0);
    assert_close(fit.intercept, 1.0);
    assert_close(fit.r_squared, 1.0);
    assert_eq!(fit.residual_standard_error, Some(0.0));
}

#[test]
fn noisy_line_matches_hand_computation() {
    // y = [2, 4, 5, 4, 5], x = 0..4: x̄ = 2, ȳ = 20/5 = 4, Sxx = 4+1+0+1+4 = 10,
    // Sxy = (−2)(−2) + (−1)(0) + 0·1 + 1·0 + 2·1 = 6, slope = 0.6,
    // intercept = 4 − 0.6·2 = 2.8.
    // Fitted: 2.8, 3.4, 4.0, 4.6, 5.2; residuals −0.8, 0.6, 1.0, −0.6, −0.2;
    // SSE = 0.64+0.36+1+0.36+0.04 = 2.4; SST = 4+0+1+0+1 = 6; r² = 1 − 2.4/6 = 0.6.
    let fit =
        LinearFit::fit(&[(0.0, 2.0), (1.0, 4.0), (2.0, 5.0), (3.0, 4.0), (4.0, 5.0)]).unwrap();
    assert_eq!(fit.points, 5);
    assert_close(fit.slope, 0.6);
    assert_close(fit.intercept, 2.8);
    assert_close(fit.r_squared, 0.6);
    assert_close(fit.mean_x, 2.0);
    assert_close(fit.sxx, 10.0);
    // s = sqrt(2.4 / 3) = sqrt(0.8)
    assert_close(fit.residual_standard_error.unwrap(), 0.8_f64.sqrt());
    // t_{0.975, 3} = 3.182446 (table value, six decimals)
    assert!((fit.t_critical.unwrap() - 3.182_446).abs() < 1e-6);
}

#[test]
fn prediction_interval_matches_the_formula() {
    // Same series; forecast at x = 5 (the first bucket after a window of 5):
    // ŷ = 2.8 + 0.6·5 = 5.8;
    // se = s·sqrt(1 + 1/5 + (5 − 2)²/10) = sqrt(0.8)·sqrt(2.1) = sqrt(1.68);
    // half = 3.182446 · sqrt(1.68) ≈ 3.182446 · 1.296148 ≈ 4.12492.
    let report = analyze_window(
        &window(&[2.0, 4.0, 5.0, 4.0, 5.0]),
        None,
        2,
        TrendMethod::Linear,
    );
    assert_eq!(report.forecast.len(), 2);
    let first = report.forecast[0];
    assert_close(first.x, 5.0);
    assert_close(first.value, 5.8);
    let half = 3.182_446 * 1.68_f64.sqrt();
    let interval = first.interval.unwrap();
    assert!((interval.lower - (5.8 - half)).abs() < 1e-5);
    assert!((interval.upper - (5.8 + half)).abs() < 1e-5);
    assert_eq!(interval.level, 0.95);
    // x = 6: ŷ = 6.4, se = sqrt(0.8)·sqrt(1 + 0.2 + 16/10) = sqrt(0.8 · 2.8) = sqrt(2.24).
    let second = report.forecast[1];
    assert_close(second.value, 6.4);
    let half = 3.182_446 * 2.24_f64.sqrt();
    assert!((second.interval.unwrap().upper - (6.4 + half)).abs() < 1e-5);
}

#[test]
fn constant_series_has_slope_zero_r_squared_one_and_a_point_interval() {
    // y = [0.1, 0.1, 0.1, 0.1]: every y equals ȳ, SST = 0, r² defined as 1, s = 0.
    let report = analyze_window(&window(&[0.1; 4]), Some(0.1), 3, TrendMethod::Linear);
    let fit = report.fit.unwrap();
    assert_eq!(fit.slope, 0.0);
    assert_eq!(fit.intercept, 0.1);
    assert_eq!(fit.r_squared, 1.0);
    assert_eq!(fit.residual_standard_error, Some(0.0));
    for point in &report.forecast {
        assert_eq!(point.value, 0.1);
        let interval = point.interval.unwrap();
        assert_eq!((interval.lower, interval.upper), (0.1, 0.1));
    }
    assert_eq!(report.absolute_change, Some(0.0));
    assert_eq!(report.relative_change, Some(0.0));
    assert_eq!(report.year_over_year_change, Some(0.0));
    assert_close(report.moving_average.unwrap(), 0.1);
}

#[test]
fn two_points_give_a_point_forecast_without_interval() {
    // y = [1, 3]: slope 2, intercept 1, n − 2 = 0 degrees of freedom.
    let report = analyze_window(&window(&[1.0, 3.0]), None, 1, TrendMethod::Linear);
    let fit = report.fit.unwrap();
    assert_close(fit.slope, 2.0);
    assert_close(fit.intercept, 1.0);
    assert_close(fit.r_squared, 1.0);
    assert_eq!(fit.residual_standard_error, None);
    assert_eq!(report.forecast.len(), 1);
    // ŷ(2) = 1 + 2·2 = 5
    assert_close(report.forecast[0].value, 5.0);
    assert_eq!(report.forecast[0].interval, None);
}

#[test]
fn single_point_and_no_data_report_nothing_but_what_is_known() {
    let single = analyze_window(&[Some(7.0)], Some(5.0), 3, TrendMethod::Linear);
    assert_eq!(single.latest, Some(7.0));
    assert_eq!(single.previous, None);
    assert_eq!(single.absolute_change, None);
    assert_eq!(single.relative_change, None);
    // 7 − 5 = 2
    assert_eq!(single.year_over_year_change, Some(2.0));
    assert_eq!(single.moving_average, Some(7.0));
    assert_eq!(single.fit, None);
    assert!(single.forecast.is_empty());

    for method in [TrendMethod::Linear, TrendMethod::Holt] {
        for values in [&[][..], &[None, None, None][..]] {
            let report = analyze_window(values, None, 5, method);
            assert_eq!(report.latest, None);
            assert_eq!(report.previous, None);
            assert_eq!(report.absolute_change, None);
            assert_eq!(report.relative_change, None);
            assert_eq!(report.year_over_year_change, None);
            assert_eq!(report.moving_average, None);
            assert_eq!(report.fit, None);
            assert!(report.forecast.is_empty());
        }
    }
}

#[test]
fn gaps_are_skipped_by_the_fit_and_the_average() {
    // Defined points (0, 1), (2, 5), (3, 7), (4, 9); bucket 1 has no value.
    // x̄ = 9/4 = 2.25, ȳ = 22/4 = 5.5,
    // Sxx = 5.0625 + 0.0625 + 0.5625 + 3.0625 = 8.75,
    // Sxy = (−2.25)(−4.5) + (−0.25)(−0.5) + 0.75·1.5 + 1.75·3.5
    //     = 10.125 + 0.125 + 1.125 + 6.125 = 17.5, slope = 2, intercept = 5.5 − 4.5 = 1.
    let values = [Some(1.0), None, Some(5.0), Some(7.0), Some(9.0)];
    let report = analyze_window(&values, None, 0, TrendMethod::Linear);
    let fit = report.fit.unwrap();
    assert_eq!(fit.points, 4);
    assert_close(fit.slope, 2.0);
    assert_close(fit.intercept, 1.0);
    assert_close(fit.r_squared, 1.0);
    assert_close(report.moving_average.unwrap(), 5.5);
    // 9 − 7 = 2, 2 / 7
    assert_eq!(report.absolute_change, Some(2.0));
    assert_close(report.relative_change.unwrap(), 2.0 / 7.0);

    // A gap in the latest or previous bucket leaves the changes absent.
    let report = analyze_window(
        &[Some(1.0), None, Some(3.0)],
        Some(1.0),
        0,
        TrendMethod::Linear,
    );
    assert_eq!(report.previous, None);
    assert_eq!(report.absolute_change, None);
    assert_eq!(report.relative_change, None);
    assert_eq!(report.year_over_year_change, Some(2.0));
}

#[test]
fn relative_change_from_zero_is_absent_and_uses_the_magnitude_of_previous() {
    let report = analyze_window(&window(&[4.0, 0.0, 5.0]), None, 0, TrendMethod::Linear);
    assert_eq!(report.absolute_change, Some(5.0));
    assert_eq!(report.relative_change, None);
    // previous −4, latest −2: (−2 − (−4)) / |−4| = +0.5 (an improvement upwards).
    let report = analyze_window(&window(&[-4.0, -2.0]), None, 0, TrendMethod::Linear);
    assert_eq!(report.relative_change, Some(0.5));
}

#[test]
fn holt_on_a_linear_series_forecasts_the_line() {
    // y = 3 + 2x for x = 0..9: initial ℓ = 5, b = 2, every one-step residual is 0,
    // so ℓ and b stay on the line and ŷ_{9+h} = 21 + 2h, with a zero-width interval.
    let values: Vec<Option<f64>> = (0..10).map(|x| Some(3.0 + 2.0 * f64::from(x))).collect();
    let holt = HoltFit::fit(&values).unwrap();
    assert_close(holt.level, 21.0);
    assert_close(holt.trend, 2.0);
    assert_eq!(holt.residuals, 8);
    let report = analyze_window(&values, None, 3, TrendMethod::Holt);
    assert_eq!(report.forecast.len(), 3);
    for (step, point) in report.forecast.iter().enumerate() {
        let x = 10.0 + index_to_f64(step);
        assert_close(point.x, x);
        assert_close(point.value, 3.0 + 2.0 * x);
        let interval = point.interval.unwrap();
        assert!((interval.upper - interval.lower).abs() < 1e-9);
    }
}

#[test]
fn holt_steps_over_gaps_and_uses_defaults_when_it_cannot_choose() {
    // Two defined values 1 (x = 0) and 5 (x = 2): b = (5 − 1)/2 = 2, ℓ_2 = 5;
    // bucket 3 is missing: ℓ_3 = 7, b_3 = 2; forecast ŷ_{3+1} = 9. No residual, so the
    // default weights and no interval.
    let holt = HoltFit::fit(&[Some(1.0), None, Some(5.0), None]).unwrap();
    assert_eq!(
        (holt.alpha, holt.beta),
        (HOLT_DEFAULT_ALPHA, HOLT_DEFAULT_BETA)
    );
    assert_eq!(holt.residuals, 0);
    let forecast = holt.forecast(1).unwrap();
    assert_close(forecast.x, 4.0);
    assert_close(forecast.value, 9.0);
    assert_eq!(forecast.interval, None);
    assert_eq!(HoltFit::fit(&[Some(1.0), None]), None);
}

#[test]
fn holt_interval_widens_with_the_horizon() {
    // Residuals are non-zero here, so σ̂ > 0 and σ_h grows with h.
    let values = window(&[2.0, 4.0, 5.0, 4.0, 5.0, 7.0, 6.0, 8.0]);
    let holt = HoltFit::fit(&values).unwrap();
    assert!(holt.residual_standard_deviation.unwrap() > 0.0);
    let width = |h| {
        let interval = holt.forecast(h).unwrap().interval.unwrap();
        interval.upper - interval.lower
    };
    // h = 1: σ_1 = σ̂, half-width = 1.96 σ̂.
    assert_close(
        width(1),
        2.0 * NORMAL_QUANTILE_975 * holt.residual_standard_deviation.unwrap(),
    );
    assert!(width(2) > width(1));
    assert!(width(5) > width(2));
}

#[test]
fn target_projection_and_reach_date() {
    // Cumulative 10, 20, 30 at buckets 0..2 toward 50 by bucket 5:
    // slope 10, intercept 10, at deadline 10 + 10·5 = 60; reaches 50 at (50 − 10)/10 = 4.
    let projection = project_target(&[(0.0, 10.0), (1.0, 20.0), (2.0, 30.0)], 5.0, 50.0).unwrap();
    assert_close(projection.at_deadline.value, 60.0);
    let interval = projection.at_deadline.interval.unwrap();
    assert_close(interval.lower, 60.0);
    assert_close(interval.upper, 60.0);
    assert_close(projection.reach_x.unwrap(), 4.0);

    // A falling level heading away from a higher target never reaches it.
    let projection = project_target(&[(0.0, 5.0), (1.0, 4.0), (2.0, 3.0)], 5.0, 10.0).unwrap();
    assert_eq!(projection.reach_x, None);
    // A flat line never reaches anything else.
    let projection = project_target(&[(0.0, 5.0), (1.0, 5.0)], 5.0, 10.0).unwrap();
    assert_eq!(projection.reach_x, None);
    assert_eq!(projection.at_deadline.interval, None);
    // One point: no projection (the caller falls back to actual / f).
    assert_eq!(project_target(&[(0.0, 5.0)], 5.0, 10.0), None);
}

fn values_strategy() -> impl Strategy<Value = Vec<Option<f64>>> {
    let value = prop_oneof![
        4 => (-1e6..1e6f64).prop_map(Some),
        1 => any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(Some),
        1 => Just(Some(0.0)),
        1 => Just(None),
    ];
    prop::collection::vec(value, 0..60)
}

fn check_prediction(point: &Prediction) -> Result<(), TestCaseError> {
    prop_assert!(point.x.is_finite() && point.value.is_finite());
    if let Some(interval) = point.interval {
        prop_assert!(interval.lower.is_finite() && interval.upper.is_finite());
        prop_assert!(interval.lower <= point.value && point.value <= interval.upper);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any finite data nothing panics and every reported number is finite.
    #[test]
    fn outputs_are_finite(
        values in values_strategy(),
        year_ago in prop::option::of(-1e6..1e6f64),
        horizon in 0usize..20,
        holt in any::<bool>(),
    ) {
        let method = if holt { TrendMethod::Holt } else { TrendMethod::Linear };
        let report = analyze_window(&values, year_ago, horizon, method);
        for number in [
            report.latest,
            report.previous,
            report.absolute_change,
            report.relative_change,
            report.year_over_year_change,
            report.moving_average,
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(number.is_finite());
        }
        if let Some(fit) = report.fit {
            prop_assert!(fit.slope.is_finite() && fit.intercept.is_finite());
            prop_assert!((0.0..=1.0).contains(&fit.r_squared));
            if let Some(s) = fit.residual_standard_error {
                prop_assert!(s.is_finite() && s >= 0.0);
            }
        }
        prop_assert!(report.forecast.len() <= horizon);
        for point in &report.forecast {
            check_prediction(point)?;
        }
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (index_to_f64(i), v)))
            .collect();
        if let Some(projection) = project_target(&points, 100.0, 1e3) {
            check_prediction(&projection.at_deadline)?;
            if let Some(x) = projection.reach_x {
                prop_assert!(x.is_finite());
            }
        }
    }

    /// Least squares through exactly linear data recovers its slope and intercept.
    #[test]
    fn exact_lines_are_recovered(
        slope in -1e3..1e3f64,
        intercept in -1e3..1e3f64,
        present in prop::collection::vec(any::<bool>(), 2..80),
    ) {
        let values: Vec<Option<f64>> = present
            .iter()
            .enumerate()
            .map(|(x, &p)| p.then(|| intercept + slope * index_to_f64(x)))
            .collect();
        prop_assume!(values.iter().flatten().count() >= 2);
        let fit = analyze_window(&values, None, 0, TrendMethod::Linear).fit.unwrap();
        prop_assert!((fit.slope - slope).abs() <= 1e-6 * (1.0 + slope.abs()));
        prop_assert!((fit.intercept - intercept).abs() <= 1e-6 * (1.0 + intercept.abs() + slope.abs()));
        prop_assert!(fit.r_squared > 1.0 - 1e-9);
    }
}
