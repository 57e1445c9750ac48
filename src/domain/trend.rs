//! Trend mathematics over a window of bucket values: changes, moving average, the
//! least-squares line with its prediction intervals, Holt's double exponential smoothing,
//! and the projection of a target to its deadline.
//!
//! Everything here is a pure function of its arguments. The caller (a projection) turns
//! calendar buckets into a window of values, oldest first, and maps the bucket indices of
//! the answers (`0..N` for the window, `N..N+H` for the forecast) back to bucket times.
//!
//! Conventions used throughout:
//! - `x` is the bucket index counted from the window's first bucket, `y` the value.
//! - A value that is absent, NaN or infinite is skipped ("not defined").
//! - Every `f64` returned inside `Some` is finite: a result that overflows `f64` is
//!   reported as absent rather than as infinity or NaN.
//!
//! Size: about 560 lines of formulas that share their conventions (above); the tests are in
//! `trend/tests.rs`.

use statrs::distribution::{ContinuousCDF, StudentsT};

/// Level of every interval computed here.
pub const PREDICTION_LEVEL: f64 = 0.95;

/// The standard normal quantile z_{0.975}, used by Holt's approximate interval (the
/// least-squares interval uses Student's t instead, see [`LinearFit::t_critical`]).
const NORMAL_QUANTILE_975: f64 = 1.959_963_984_540_054;

/// Holt's smoothing parameters used when the series is too short to choose them
/// (fewer than one one-step-ahead residual): a middle level weight and a slower trend
/// weight, the usual textbook starting point.
pub const HOLT_DEFAULT_ALPHA: f64 = 0.5;
/// See [`HOLT_DEFAULT_ALPHA`].
pub const HOLT_DEFAULT_BETA: f64 = 0.3;

/// The grid searched for Holt's α and β: 0.1, 0.2, …, 0.9 each (81 pairs). Coarse on
/// purpose: the one-step SSE surface is flat near its minimum, and a window holds at most
/// 1000 buckets, so 81 passes stay well under a millisecond.
const HOLT_GRID: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// A bucket index as f64. Exact for indices below 2^53, far more buckets than a window
/// (at most 1000) plus a horizon (at most 1000) can hold.
#[inline]
fn index_to_f64(index: usize) -> f64 {
    // Not lossy in range, see above.
    index as f64
}

/// `Some(value)` when the value is finite; overflowed results become absent.
#[inline]
fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

pub use super::aggregate::Interval;

impl Interval {
    /// `center ± half_width` at [`PREDICTION_LEVEL`]; absent when a bound overflows.
    fn around(center: f64, half_width: f64) -> Option<Interval> {
        let lower = finite(center - half_width)?;
        let upper = finite(center + half_width)?;
        Some(Interval {
            lower,
            upper,
            level: PREDICTION_LEVEL,
        })
    }
}

/// A forecast (or projected) value at one bucket index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Bucket index from the window's first bucket (the forecast of a window of N buckets
    /// starts at `N`).
    pub x: f64,
    /// Point forecast.
    pub value: f64,
    /// 95% prediction interval; absent when the data leave no residual degrees of freedom
    /// (see [`LinearFit::predict`] and [`HoltFit::forecast`]).
    pub interval: Option<Interval>,
}

/// Which method produces [`TrendReport::forecast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrendMethod {
    /// The least-squares line over the window ([`LinearFit`]).
    #[default]
    Linear,
    /// Holt's double exponential smoothing ([`HoltFit`]).
    Holt,
}

/// An ordinary least-squares line `y = intercept + slope · x` over the defined points.
///
/// With n points, x̄ = Σx/n, ȳ = Σy/n:
/// - Sxx = Σ(x − x̄)², Sxy = Σ(x − x̄)(y − ȳ), SST = Σ(y − ȳ)²
/// - slope = Sxy / Sxx, intercept = ȳ − slope · x̄
/// - SSE = Σ(y − intercept − slope · x)², r² = 1 − SSE / SST
/// - s = sqrt(SSE / (n − 2)) for n ≥ 3
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearFit {
    /// Number of points fitted (at least 2).
    pub points: usize,
    /// Change of the value per bucket.
    pub slope: f64,
    /// Value of the line at x = 0 (the window's first bucket).
    pub intercept: f64,
    /// Coefficient of determination, in [0, 1]. When all y are equal, SST = 0 and the
    /// ratio is undefined; the line (slope 0 through the common value) is then exact, so
    /// r² is defined as 1.
    pub r_squared: f64,
    /// Residual standard error s = sqrt(SSE / (n − 2)); absent with n = 2, where the line
    /// passes through both points and leaves no degree of freedom to estimate the noise.
    pub residual_standard_error: Option<f64>,
    /// x̄, the centre of the fitted x values (needed by the prediction interval).
    pub mean_x: f64,
    /// Sxx = Σ(x − x̄)² (needed by the prediction interval).
    pub sxx: f64,
    /// t_{0.975, n−2}, the two-sided 95% quantile of Student's t with n − 2 degrees of
    /// freedom; absent with n = 2.
    pub t_critical: Option<f64>,
}

/// t_{0.975, df}: the upper 97.5% quantile of Student's t with `df` degrees of freedom.
fn student_t_975(degrees_of_freedom: f64) -> Option<f64> {
    let distribution = StudentsT::new(0.0, 1.0, degrees_of_freedom).ok()?;
    finite(distribution.inverse_cdf(0.975))
}

impl LinearFit {
    /// Fits the line through `points` (x, y). Points whose x or y is not finite are skipped.
    ///
    /// Absent with fewer than 2 usable points, when all x are equal (Sxx = 0, no line is
    /// determined), or when the arithmetic overflows `f64`.
    pub fn fit(points: &[(f64, f64)]) -> Option<LinearFit> {
        let usable: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let n = usable.len();
        if n < 2 {
            return None;
        }
        let count = index_to_f64(n);
        // x̄ = Σx / n, ȳ = Σy / n
        let mean_x = finite(usable.iter().map(|(x, _)| x).sum::<f64>() / count)?;
        let mean_y = finite(usable.iter().map(|(_, y)| y).sum::<f64>() / count)?;
        // Sxx = Σ(x − x̄)²; centred sums avoid the cancellation of Σx² − n·x̄².
        let sxx = finite(
            usable
                .iter()
                .map(|(x, _)| (x - mean_x).powi(2))
                .sum::<f64>(),
        )?;
        if sxx <= 0.0 {
            return None;
        }

        let first_y = usable[0].1;
        let (slope, intercept, sse, r_squared) = if usable.iter().all(|&(_, y)| y == first_y) {
            // Constant data: the horizontal line through the common value is exact.
            // Handled apart because ȳ, computed in floating point, may differ from the
            // common value by a rounding error, which would give a tiny spurious slope.
            (0.0, first_y, 0.0, 1.0)
        } else {
            // Sxy = Σ(x − x̄)(y − ȳ); slope = Sxy / Sxx; intercept = ȳ − slope · x̄
            let sxy: f64 = usable
                .iter()
                .map(|(x, y)| (x - mean_x) * (y - mean_y))
                .sum();
            let slope = finite(sxy / sxx)?;
            let intercept = finite(mean_y - slope * mean_x)?;
            // SSE = Σ(y − ŷ)², computed from the residuals rather than as SST − slope·Sxy,
            // which can go slightly negative by cancellation.
            let sse = finite(
                usable
                    .iter()
                    .map(|(x, y)| (y - (intercept + slope * x)).powi(2))
                    .sum::<f64>(),
            )?;
            // SST = Σ(y − ȳ)² > 0 here since not all y are equal.
            let sst = finite(
                usable
                    .iter()
                    .map(|(_, y)| (y - mean_y).powi(2))
                    .sum::<f64>(),
            )?;
            // r² = 1 − SSE / SST, clamped to [0, 1] against rounding.
            let r_squared = if sst > 0.0 {
                (1.0 - sse / sst).clamp(0.0, 1.0)
            } else {
                1.0
            };
            (slope, intercept, sse, r_squared)
        };

        // s = sqrt(SSE / (n − 2)), t_{0.975, n−2}: both need n ≥ 3.
        let (residual_standard_error, t_critical) = if n >= 3 {
            let degrees_of_freedom = index_to_f64(n - 2);
            (
                finite((sse / degrees_of_freedom).sqrt()),
                student_t_975(degrees_of_freedom),
            )
        } else {
            (None, None)
        };

        Some(LinearFit {
            points: n,
            slope,
            intercept,
            r_squared,
            residual_standard_error,
            mean_x,
            sxx,
            t_critical,
        })
    }

    /// The line's value at `x`: ŷ = intercept + slope · x.
    pub fn value_at(&self, x: f64) -> Option<f64> {
        finite(self.intercept + self.slope * x)
    }

    /// The forecast at `x` with its 95% prediction interval for a new observation:
    ///
    /// ŷ ± t_{0.975, n−2} · s · sqrt(1 + 1/n + (x − x̄)² / Sxx)
    ///
    /// The `1` accounts for the noise of the new observation, `1/n + (x − x̄)²/Sxx` for the
    /// uncertainty of the fitted line, which grows away from the data's centre.
    /// With n = 2 there is no estimate of s, so the interval is absent (the point forecast
    /// remains). With s = 0 (the points lie exactly on the line) the interval collapses to
    /// the point. Absent altogether when ŷ overflows.
    pub fn predict(&self, x: f64) -> Option<Prediction> {
        let value = self.value_at(x)?;
        let interval = match (self.residual_standard_error, self.t_critical) {
            (Some(s), Some(t)) => {
                let n = index_to_f64(self.points);
                let standard_error =
                    s * (1.0 + 1.0 / n + (x - self.mean_x).powi(2) / self.sxx).sqrt();
                finite(t * standard_error).and_then(|half| Interval::around(value, half))
            }
            _ => None,
        };
        Some(Prediction { x, value, interval })
    }

    /// The x at which the line reaches `value`, looking forward from `from_x`:
    /// x* = (value − intercept) / slope.
    ///
    /// Absent when the slope is 0 (the line never gets there) or when x* < `from_x`: the
    /// line was at `value` before `from_x` and now moves away from it.
    pub fn x_reaching(&self, value: f64, from_x: f64) -> Option<f64> {
        if self.slope == 0.0 {
            return None;
        }
        let x = finite((value - self.intercept) / self.slope)?;
        (x >= from_x).then_some(x)
    }
}

/// Holt's linear (double exponential) smoothing, fitted over a window.
///
/// Recurrences, with level ℓ, trend b, level weight α and trend weight β:
/// - one-step forecast ŷ_t = ℓ_{t−1} + b_{t−1}, residual e_t = y_t − ŷ_t
/// - ℓ_t = α · y_t + (1 − α)(ℓ_{t−1} + b_{t−1})
/// - b_t = β (ℓ_t − ℓ_{t−1}) + (1 − β) b_{t−1}
/// - h-step forecast from the last bucket: ŷ_{T+h} = ℓ_T + h · b_T
///
/// Initialisation from the first two defined values y_i, y_j (i < j): ℓ_j = y_j,
/// b_j = (y_j − y_i) / (j − i). A missing bucket is stepped over without an update:
/// ℓ_t = ℓ_{t−1} + b_{t−1}, b_t = b_{t−1} (the forecast stands in for the observation).
///
/// α and β are chosen on the grid 0.1, 0.2, …, 0.9 to minimise the one-step SSE Σe_t²
/// (the first pair wins ties, so the choice is deterministic); with no residual to judge
/// by (only two defined values) the defaults [`HOLT_DEFAULT_ALPHA`] and
/// [`HOLT_DEFAULT_BETA`] are used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HoltFit {
    /// Level weight α.
    pub alpha: f64,
    /// Trend weight β.
    pub beta: f64,
    /// Level ℓ_T at the window's last bucket.
    pub level: f64,
    /// Trend b_T (change per bucket) at the window's last bucket.
    pub trend: f64,
    /// Index T of the window's last bucket; forecasts start at T + 1.
    pub last_x: f64,
    /// Number of one-step-ahead residuals (defined values after the first two).
    pub residuals: usize,
    /// σ̂ = sqrt(Σe_t² / m) over the m one-step residuals; absent when m = 0.
    pub residual_standard_deviation: Option<f64>,
}

/// The state after one pass of Holt's recurrences.
struct HoltPass {
    level: f64,
    trend: f64,
    sse: f64,
    residuals: usize,
}

/// Runs Holt's recurrences over `values` with the given weights; absent with fewer than two
/// defined values.
fn holt_pass(values: &[Option<f64>], alpha: f64, beta: f64) -> Option<HoltPass> {
    let mut defined = values
        .iter()
        .enumerate()
        .filter_map(|(index, value)| value.filter(|v| v.is_finite()).map(|v| (index, v)));
    let (first_index, first_value) = defined.next()?;
    let (second_index, second_value) = defined.next()?;
    // ℓ_j = y_j, b_j = (y_j − y_i) / (j − i)
    let mut level = second_value;
    let mut trend = (second_value - first_value) / index_to_f64(second_index - first_index);
    let mut sse = 0.0;
    let mut residuals = 0;
    for value in &values[second_index + 1..] {
        let forecast = level + trend;
        match value.filter(|v| v.is_finite()) {
            Some(y) => {
                // e_t = y_t − (ℓ_{t−1} + b_{t−1})
                sse += (y - forecast).powi(2);
                residuals += 1;
                // ℓ_t = α y_t + (1 − α)(ℓ_{t−1} + b_{t−1})
                let new_level = alpha * y + (1.0 - alpha) * forecast;
                // b_t = β (ℓ_t − ℓ_{t−1}) + (1 − β) b_{t−1}
                trend = beta * (new_level - level) + (1.0 - beta) * trend;
                level = new_level;
            }
            None => {
                // Missing bucket: ℓ_t = ℓ_{t−1} + b_{t−1}, b_t = b_{t−1}.
                level = forecast;
            }
        }
    }
    Some(HoltPass {
        level,
        trend,
        sse,
        residuals,
    })
}

impl HoltFit {
    /// Fits Holt's method over a window of bucket values, oldest first. Absent with fewer
    /// than two defined values, an empty window, or when the arithmetic overflows.
    pub fn fit(values: &[Option<f64>]) -> Option<HoltFit> {
        let last_x = index_to_f64(values.len().checked_sub(1)?);
        let defaults = holt_pass(values, HOLT_DEFAULT_ALPHA, HOLT_DEFAULT_BETA)?;
        let (alpha, beta, pass) = if defaults.residuals == 0 {
            (HOLT_DEFAULT_ALPHA, HOLT_DEFAULT_BETA, defaults)
        } else {
            let mut best: Option<(f64, f64, HoltPass)> = None;
            for alpha in HOLT_GRID {
                for beta in HOLT_GRID {
                    let Some(pass) = holt_pass(values, alpha, beta) else {
                        continue;
                    };
                    if !pass.sse.is_finite() {
                        continue;
                    }
                    if best.as_ref().is_none_or(|(_, _, b)| pass.sse < b.sse) {
                        best = Some((alpha, beta, pass));
                    }
                }
            }
            best?
        };
        let level = finite(pass.level)?;
        let trend = finite(pass.trend)?;
        // σ̂² = Σe_t² / m. Dividing by m rather than m − 2 ignores that α, β and the
        // initial state were fitted; part of the approximation documented on `forecast`.
        let residual_standard_deviation = (pass.residuals > 0)
            .then(|| (pass.sse / index_to_f64(pass.residuals)).sqrt())
            .and_then(finite);
        Some(HoltFit {
            alpha,
            beta,
            level,
            trend,
            last_x,
            residuals: pass.residuals,
            residual_standard_deviation,
        })
    }

    /// The forecast `steps` buckets after the window's last one (`steps` ≥ 1), at
    /// x = T + steps, with an approximate 95% interval ŷ ± z_{0.975} · σ_h.
    ///
    /// σ_h is the h-step forecast standard deviation of the additive-error Holt model
    /// (ETS(A,A,N), Hyndman et al., *Forecasting with Exponential Smoothing*, 2008,
    /// class 1), written with the state-space trend weight β' = α · β:
    ///
    /// σ_h² = σ̂² · [1 + (h − 1)(α² + α β' h + β'² h (2h − 1) / 6)]
    ///
    /// The approximation: the one-step residuals are taken as independent, normal and of
    /// constant variance, α, β and σ̂ are treated as known rather than estimated, and
    /// missing buckets are ignored in σ̂. The interval is therefore too narrow for short
    /// or irregular series. Absent when there is no residual (two defined values), and
    /// the whole forecast is absent when it overflows.
    pub fn forecast(&self, steps: usize) -> Option<Prediction> {
        let h = index_to_f64(steps);
        // ŷ_{T+h} = ℓ_T + h · b_T
        let value = finite(self.level + h * self.trend)?;
        let x = self.last_x + h;
        let interval = self.residual_standard_deviation.and_then(|sigma| {
            let alpha = self.alpha;
            let beta_state = self.alpha * self.beta;
            let growth = 1.0
                + (h - 1.0)
                    * (alpha * alpha
                        + alpha * beta_state * h
                        + beta_state * beta_state * h * (2.0 * h - 1.0) / 6.0);
            let sigma_h = sigma * growth.sqrt();
            finite(NORMAL_QUANTILE_975 * sigma_h).and_then(|half| Interval::around(value, half))
        });
        Some(Prediction { x, value, interval })
    }
}

/// Everything the trend of a window reports (see `GetTrendResponse`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrendReport {
    /// Value of the window's last bucket.
    pub latest: Option<f64>,
    /// Value of the bucket before it.
    pub previous: Option<f64>,
    /// latest − previous.
    pub absolute_change: Option<f64>,
    /// (latest − previous) / |previous|; absent when previous is 0 or absent, since no
    /// relative change from zero is meaningful.
    pub relative_change: Option<f64>,
    /// latest − (the same bucket one year earlier).
    pub year_over_year_change: Option<f64>,
    /// Simple moving average: the mean of the window's defined values.
    pub moving_average: Option<f64>,
    /// Least-squares line over the defined values, x = bucket index 0..N−1; absent with
    /// fewer than two defined values.
    pub fit: Option<LinearFit>,
    /// Forecast of the H buckets after the window, x = N..N+H−1, by the requested method;
    /// empty when the method has too little data (fewer than two defined values).
    pub forecast: Vec<Prediction>,
}

/// Computes the trend of a window of N bucket values, oldest first.
///
/// `values[i]` is the value of bucket i, `None` when the bucket has no value (the caller
/// has already turned empty COUNT/SUM buckets into `Some(0.0)`). `year_ago` is the value of
/// the bucket one year before the latest. `horizon` is the number of forecast buckets H.
pub fn analyze_window(
    values: &[Option<f64>],
    year_ago: Option<f64>,
    horizon: usize,
    method: TrendMethod,
) -> TrendReport {
    let defined = |value: Option<f64>| value.filter(|v| v.is_finite());
    let latest = values.last().copied().and_then(defined);
    let previous = values
        .len()
        .checked_sub(2)
        .and_then(|index| values[index])
        .and_then(|v| defined(Some(v)));
    let year_ago = defined(year_ago);

    // latest − previous
    let absolute_change = latest
        .zip(previous)
        .and_then(|(latest, previous)| finite(latest - previous));
    // (latest − previous) / |previous|, previous ≠ 0
    let relative_change = latest
        .zip(previous)
        .filter(|&(_, previous)| previous != 0.0)
        .and_then(|(latest, previous)| finite((latest - previous) / previous.abs()));
    // latest − year_ago
    let year_over_year_change = latest
        .zip(year_ago)
        .and_then(|(latest, year_ago)| finite(latest - year_ago));

    let points: Vec<(f64, f64)> = values
        .iter()
        .enumerate()
        .filter_map(|(index, &value)| defined(value).map(|v| (index_to_f64(index), v)))
        .collect();
    // Σy / n over the defined values.
    let moving_average = (!points.is_empty())
        .then(|| points.iter().map(|(_, y)| y).sum::<f64>() / index_to_f64(points.len()))
        .and_then(finite);

    let fit = LinearFit::fit(&points);
    let window_length = values.len();
    let forecast = match method {
        TrendMethod::Linear => fit
            .map(|fit| {
                (0..horizon)
                    .map_while(|step| fit.predict(index_to_f64(window_length + step)))
                    .collect()
            })
            .unwrap_or_default(),
        TrendMethod::Holt => HoltFit::fit(values)
            .map(|holt| {
                (1..=horizon)
                    .map_while(|steps| holt.forecast(steps))
                    .collect()
            })
            .unwrap_or_default(),
    };

    TrendReport {
        latest,
        previous,
        absolute_change,
        relative_change,
        year_over_year_change,
        moving_average,
        fit,
        forecast,
    }
}

/// Where a target's trend is heading (see the spec's "Targets (SMART)").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetProjection {
    /// The least-squares line over the points so far.
    pub fit: LinearFit,
    /// The line's value at the deadline bucket, with its 95% prediction interval (absent
    /// with only two points, see [`LinearFit::predict`]).
    pub at_deadline: Prediction,
    /// The bucket index (possibly fractional) at which the line reaches the target value,
    /// at or after the last point; absent when the slope is 0 or points away from the
    /// target. It may lie beyond the deadline.
    pub reach_x: Option<f64>,
}

/// Projects a target's progress to its deadline.
///
/// `points` are (x, y) with x the bucket index from the target window's start and y the
/// cumulative value (CUMULATIVE targets) or the level (LEVEL targets) at that bucket.
/// `deadline_x` is the index of the deadline bucket, `target_value` the value to reach.
/// Absent with fewer than two usable points (the caller then falls back to actual / f).
pub fn project_target(
    points: &[(f64, f64)],
    deadline_x: f64,
    target_value: f64,
) -> Option<TargetProjection> {
    let fit = LinearFit::fit(points)?;
    let at_deadline = fit.predict(deadline_x)?;
    let last_x = points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, _)| x)
        .fold(f64::NEG_INFINITY, f64::max);
    let reach_x = fit.x_reaching(target_value, last_x);
    Some(TargetProjection {
        fit,
        at_deadline,
        reach_x,
    })
}

#[cfg(test)]
mod tests;
