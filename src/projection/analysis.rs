//! Answers computed from the aggregates: the trend of a KPI over its latest buckets and the
//! status of a target. The statistics are `domain::trend`; the verdict rules are
//! `domain::target_status`; this module picks the buckets they work on.

use chrono::{DateTime, DurationRound, Months, TimeDelta, Utc};

use super::aggregates::Aggregates;
use crate::domain::calendar::{self, Bucket};
use crate::domain::query::{
    AggregateQuery, AnsweredBucket, Fill, Labels, PeriodVerdict, TargetAnswer, TrendAnswer,
    TrendQuery,
};
use crate::domain::target_status::{Estimate, Progress, TargetState, Verdict};
use crate::domain::trend::{self, Prediction};
use crate::domain::{Grain, KpiDefinition, KpiKind, Rejection, TargetEntry, TargetMode};

/// Largest trend window and horizon, in buckets: enough for years of months or weeks of
/// hours, while one request stays a bounded amount of work.
pub const MAX_TREND_BUCKETS: u32 = 1000;

/// The value a bucket stands for in a trend: its value, or 0 for an empty bucket of a kind
/// whose empty bucket means zero (SUM, COUNT); an empty AVERAGE has no value.
fn trend_value(kind: KpiKind, bucket: &AnsweredBucket) -> Option<f64> {
    match (bucket.summary.count, kind) {
        (0, KpiKind::Sum | KpiKind::Count) => Some(0.0),
        _ => bucket.summary.value,
    }
}

/// The buckets of one KPI over [from, to), one per bucket (empty ones included).
fn window(
    aggregates: &Aggregates,
    kpi_id: &str,
    grain: Grain,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    filter: &Labels,
) -> Result<Vec<AnsweredBucket>, Rejection> {
    aggregates.query(&AggregateQuery {
        kpi_id: kpi_id.to_owned(),
        grain,
        start: from,
        end: to,
        filter: filter.clone(),
        group_by: Vec::new(),
        fill: Fill::Absent,
    })
}

/// Answers GetTrend.
pub fn trend(aggregates: &Aggregates, query: &TrendQuery) -> Result<TrendAnswer, Rejection> {
    if !(2..=MAX_TREND_BUCKETS).contains(&query.window) {
        return Err(Rejection::invalid(
            "window",
            format!(
                "must be within 2..={MAX_TREND_BUCKETS}, got {}",
                query.window
            ),
        ));
    }
    if query.horizon > MAX_TREND_BUCKETS {
        return Err(Rejection::invalid(
            "horizon",
            format!("at most {MAX_TREND_BUCKETS}, got {}", query.horizon),
        ));
    }
    let (definition, _) = aggregates.definition(&query.kpi_id)?;
    let (kind, tz) = (definition.kind, definition.timezone);
    let last = calendar::bucket_of(query.grain, tz, query.evaluated_at);
    let mut first = last;
    for _ in 1..query.window {
        first = calendar::previous_bucket(query.grain, tz, first);
    }
    let buckets = window(
        aggregates,
        &query.kpi_id,
        query.grain,
        first.start,
        last.end,
        &query.filter,
    )?;
    let values: Vec<Option<f64>> = buckets.iter().map(|b| trend_value(kind, b)).collect();
    // The same bucket one year earlier: the bucket containing the latest's start minus
    // twelve calendar months.
    let year_ago = last
        .start
        .with_timezone(&tz)
        .checked_sub_months(Months::new(12))
        .map(|instant| calendar::bucket_of(query.grain, tz, instant.with_timezone(&Utc)))
        .map(|bucket| {
            window(
                aggregates,
                &query.kpi_id,
                query.grain,
                bucket.start,
                bucket.end,
                &query.filter,
            )
        })
        .transpose()?
        .and_then(|answer| answer.first().and_then(|b| trend_value(kind, b)));
    let horizon = usize::try_from(query.horizon).unwrap_or(usize::MAX);
    let report = trend::analyze_window(&values, year_ago, horizon, query.method);
    let mut next = last;
    let forecast = report
        .forecast
        .iter()
        .map(|prediction| {
            next = calendar::next_bucket(query.grain, tz, next);
            (next, *prediction)
        })
        .collect();
    Ok(TrendAnswer {
        buckets,
        report,
        forecast,
    })
}

/// A count as f64. Counts of measurements and periods stay far below 2^53, where every
/// integer converts exactly, so this `as` loses nothing.
fn exact_f64(count: impl TryInto<u64>) -> f64 {
    let count: u64 = count.try_into().unwrap_or(u64::MAX);
    #[allow(clippy::cast_precision_loss)]
    let value = count as f64;
    value
}

/// Fewest finished periods a least-squares projection is fitted to; with fewer the
/// projection is the linear pace (actual / f).
const MIN_PROJECTION_POINTS: usize = 3;

/// Answers GetTargetStatus for one target at `now`.
pub fn target_status(
    aggregates: &Aggregates,
    target: &TargetEntry,
    now: DateTime<Utc>,
) -> Result<TargetAnswer, Rejection> {
    let (definition, _) = aggregates.definition(&target.definition.kpi_id)?;
    match target.definition.mode {
        TargetMode::Cumulative => cumulative(aggregates, definition, target, now),
        TargetMode::Level => level(aggregates, definition, target, now),
    }
}

fn progress(definition: &KpiDefinition, target: &TargetEntry, now: DateTime<Utc>) -> Progress {
    let t = &target.definition;
    Progress {
        target: t.value,
        direction: definition.direction,
        tolerance: t.tolerance,
        start: t.start,
        deadline: t.deadline,
        now,
        actual: None,
        forecast: None,
        periods_left: 0.0,
    }
}

fn estimate(prediction: &Prediction) -> Estimate {
    Estimate {
        value: prediction.value,
        lower: prediction.interval.map(|i| i.lower),
        upper: prediction.interval.map(|i| i.upper),
    }
}

/// The time at fractional period index `x` of `periods` (x = 2.5 is the middle of the
/// third period).
fn time_at(periods: &[Bucket], x: f64) -> Option<DateTime<Utc>> {
    if !(x.is_finite() && x >= 0.0) {
        return None;
    }
    let index = x.floor();
    let within = x - index;
    // `index` is finite, non-negative and compared against the period count below.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bucket = periods.get(index as usize)?;
    let span = (bucket.end - bucket.start).num_milliseconds();
    #[allow(clippy::cast_possible_truncation)]
    let offset = (within * span as f64) as i64;
    // A forecast is not precise to the millisecond: whole seconds, rounded.
    (bucket.start + TimeDelta::milliseconds(offset))
        .duration_round(TimeDelta::seconds(1))
        .ok()
}

/// The grain a target is judged in: its period grain, else days for a CUMULATIVE target
/// and months for a LEVEL one.
pub fn period_grain(target: &TargetEntry) -> Grain {
    target.definition.period_grain()
}

/// The buckets of a target's KPI over its window, in its period grain.
fn periods_of(
    aggregates: &Aggregates,
    target: &TargetEntry,
) -> Result<(Grain, Vec<AnsweredBucket>), Rejection> {
    let t = &target.definition;
    let grain = period_grain(target);
    let buckets = window(
        aggregates,
        &t.kpi_id,
        grain,
        t.start,
        t.deadline,
        &Labels::new(),
    )?;
    Ok((grain, buckets))
}

/// CUMULATIVE: the KPI summed over the window's periods (whole buckets of the period
/// grain, or days) that started before `now`; projected by a least-squares line through the
/// running total at the end of each finished period.
fn cumulative(
    aggregates: &Aggregates,
    definition: &KpiDefinition,
    target: &TargetEntry,
    now: DateTime<Utc>,
) -> Result<TargetAnswer, Rejection> {
    let t = &target.definition;
    let (grain, buckets) = periods_of(aggregates, target)?;
    let periods: Vec<Bucket> = buckets.iter().map(|b| b.bucket).collect();
    let contribution = |b: &AnsweredBucket| match definition.kind {
        KpiKind::Count => exact_f64(b.summary.count),
        _ => b.summary.sum.or(b.summary.value).unwrap_or(0.0),
    };
    let mut total = 0.0;
    let mut points = Vec::new();
    // Periods are half-open: one has started at its first instant.
    for (index, bucket) in buckets.iter().enumerate() {
        if bucket.bucket.start > now {
            break;
        }
        total += contribution(bucket);
        if bucket.bucket.end <= now {
            points.push((exact_f64(index) + 1.0, total));
        }
    }
    let finished = points.len();
    let deadline_x = exact_f64(periods.len());
    let projection = (finished >= MIN_PROJECTION_POINTS)
        .then(|| trend::project_target(&points, deadline_x, t.value))
        .flatten();
    // A running total that cannot go down (COUNT, or a SUM whose values so far are all
    // non-negative) ends at least where it is: the fitted line is not allowed below that.
    let never_decreases = match definition.kind {
        KpiKind::Count => true,
        KpiKind::Sum => buckets
            .iter()
            .filter(|b| b.summary.count > 0)
            .all(|b| b.summary.min.is_some_and(|min| min >= 0.0)),
        _ => false,
    };
    let floor = |value: f64| {
        if never_decreases {
            value.max(total)
        } else {
            value
        }
    };
    let started = periods.iter().filter(|p| p.start <= now).count();
    let mut progress = progress(definition, target, now);
    progress.actual = Some(total);
    progress.forecast = projection.map(|p| {
        let at_deadline = estimate(&p.at_deadline);
        Estimate {
            value: floor(at_deadline.value),
            lower: at_deadline.lower.map(floor),
            upper: at_deadline.upper.map(floor),
        }
    });
    // Periods not started yet, plus the current one when it is under way.
    progress.periods_left = exact_f64(periods.len() - started.min(periods.len()))
        + if started > finished { 1.0 } else { 0.0 };
    let verdict = progress.judge_cumulative(definition.timezone);
    let estimated_reached_at = projection
        .and_then(|p| p.reach_x)
        .and_then(|x| time_at(&periods, x));
    Ok(TargetAnswer {
        target: target.clone(),
        actual: Some(total),
        verdict,
        rate_grain: grain,
        estimated_reached_at,
        periods: Vec::new(),
    })
}

/// LEVEL: every period of the window that started is judged on the KPI's value in it; the
/// target's state is the current period's (after the deadline: ACHIEVED when every period
/// met the target, MISSED otherwise).
fn level(
    aggregates: &Aggregates,
    definition: &KpiDefinition,
    target: &TargetEntry,
    now: DateTime<Utc>,
) -> Result<TargetAnswer, Rejection> {
    let t = &target.definition;
    let (grain, buckets) = periods_of(aggregates, target)?;
    let progress_now = progress(definition, target, now);
    // Periods are half-open: the one that starts at `now` is the current one. Before the
    // target's own start nothing is judged, even when its first period began earlier.
    let periods: Vec<PeriodVerdict> = buckets
        .iter()
        .filter(|b| now >= t.start && b.bucket.start <= now)
        .map(|b| {
            let finished = b.bucket.end <= now;
            PeriodVerdict {
                bucket: b.bucket,
                actual: b.summary.value,
                state: progress_now.judge_period(b.summary.value, finished),
                current: b.bucket.contains(now),
            }
        })
        .collect();
    let current = periods.iter().find(|p| p.current).or(periods.last());
    let actual = current.and_then(|p| p.actual);
    let met = periods
        .iter()
        .filter(|p| matches!(p.state, TargetState::Achieved | TargetState::OnTrack))
        .count();
    let value = |x: Option<f64>| x.map_or_else(|| "no data".to_owned(), |v| format!("{v:.2}"));
    let (state, reason) = if now >= t.deadline {
        let all = periods.iter().all(|p| p.state == TargetState::Achieved) && !periods.is_empty();
        (
            if all {
                TargetState::Achieved
            } else {
                TargetState::Missed
            },
            format!("{met} of {} periods met {}", periods.len(), t.value),
        )
    } else if let Some(current) = current {
        (
            current.state,
            format!(
                "current period at {} against {}; {met} of {} periods so far met it",
                value(current.actual),
                t.value,
                periods.len()
            ),
        )
    } else {
        (
            TargetState::OnTrack,
            format!(
                "not started: {} per period from {}",
                t.value,
                t.start.date_naive()
            ),
        )
    };
    let f = crate::domain::target_status::elapsed_fraction(t.start, t.deadline, now);
    let verdict = Verdict {
        state,
        reason,
        elapsed_fraction: f,
        expected_now: t.value,
        progress: actual.filter(|_| t.value != 0.0).map(|a| a / t.value),
        projected: actual.map(|value| Estimate {
            value,
            lower: None,
            upper: None,
        }),
        required_rate: None,
    };
    Ok(TargetAnswer {
        target: target.clone(),
        actual,
        verdict,
        rate_grain: grain,
        estimated_reached_at: None,
        periods,
    })
}
