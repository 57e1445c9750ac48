//! The aggregate model's answers: GetAggregates (the series matching a filter merged into
//! one per group-by combination, a RATIO from its operands' sums, empty buckets filled),
//! and the single buckets and series a watcher reads.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use super::{Aggregates, MAX_BUCKETS_PER_ANSWER, MAX_BUCKETS_PER_QUERY, slot};
use crate::domain::aggregate::{BucketState, RatioOperand, Summary, ratio_summary};
use crate::domain::calendar::{self, Bucket, BucketKey};
use crate::domain::query::{AggregateQuery, AnsweredBucket, Fill, Labels};
use crate::domain::{Grain, KpiDefinition, KpiKind, Rejection};

impl Aggregates {
    /// Answers a GetAggregates question.
    pub fn query(&self, query: &AggregateQuery) -> Result<Vec<AnsweredBucket>, Rejection> {
        if !self.grains.contains(query.grain) {
            debug_assert!(false, "a question about a grain this fold left out");
            return Err(Rejection::precondition(
                "grain",
                "not folded in this as-of answer",
            ));
        }
        let (definition, version) = self.definition(&query.kpi_id)?;
        check_labels(definition, query)?;
        let tz = definition.timezone;
        if query.end <= query.start {
            return Err(Rejection::invalid("end", "must be after start"));
        }
        let buckets = calendar::count_buckets(query.grain, tz, query.start, query.end);
        if buckets > MAX_BUCKETS_PER_QUERY {
            return Err(Rejection::invalid(
                "grain",
                format!(
                    "the range spans {buckets} {:?} buckets, at most {MAX_BUCKETS_PER_QUERY} per request: use a coarser grain or a shorter range",
                    query.grain
                ),
            ));
        }
        let groups = match &definition.ratio {
            None => self
                .merged(&query.kpi_id, query)?
                .into_iter()
                .map(|(labels, buckets)| {
                    let summaries = buckets
                        .into_iter()
                        .map(|(key, bucket)| (key, bucket.summary))
                        .collect::<BTreeMap<_, _>>();
                    (labels, summaries)
                })
                .collect(),
            Some(ratio) => {
                let numerator = self.merged(&ratio.numerator_kpi_id, query)?;
                let denominator = self.merged(&ratio.denominator_kpi_id, query)?;
                ratio_groups(numerator, denominator, ratio.scale)
            }
        };
        let mut groups = groups;
        if query.group_by.is_empty() && query.fill != Fill::None {
            // Without group-by the answer is one series: filled even when nothing (or
            // nothing matching the filter) was ever measured, so a dashboard still gets a
            // continuous series.
            groups.entry(Labels::new()).or_default();
        }
        let kind = definition.kind;
        let mut answer = Vec::new();
        for (labels, by_start) in groups {
            for bucket in calendar::buckets_in(query.grain, tz, query.start, query.end) {
                let summary = match by_start.get(&bucket.key()) {
                    Some(summary) => summary.clone(),
                    None => match empty_summary(kind, query.fill) {
                        Some(summary) => summary,
                        None => continue,
                    },
                };
                if answer.len() >= MAX_BUCKETS_PER_ANSWER {
                    return Err(Rejection::ResourceExhausted {
                        field: "group_by".into(),
                        reason: format!(
                            "the answer would hold more than {MAX_BUCKETS_PER_ANSWER} buckets: group by fewer dimensions, filter, or shorten the range"
                        ),
                    });
                }
                answer.push(AnsweredBucket {
                    labels: labels.clone(),
                    bucket,
                    summary,
                    definition_version: version,
                });
            }
        }
        Ok(answer)
    }

    /// The label combinations of a measured KPI (none for RATIO or unknown KPIs).
    pub fn series_of<'a>(&'a self, kpi_id: &str) -> impl Iterator<Item = &'a Labels> + 'a {
        self.measured
            .get(kpi_id)
            .into_iter()
            .flat_map(|kpi| kpi.series.keys())
    }

    /// The buckets of every series of a RATIO KPI in `bucket` (empty ones too): one per
    /// combination of the ratio's dimensions among its operands' series (the groups of
    /// GetAggregates grouped by all of the ratio's dimensions).
    pub fn ratio_series_buckets(
        &self,
        kpi_id: &str,
        grain: Grain,
        bucket: Bucket,
    ) -> Vec<AnsweredBucket> {
        let Some((definition, _)) = self.ratios.get(kpi_id) else {
            return Vec::new();
        };
        // Like a measured KPI, a ratio has no series before its operands have one.
        if !self.stored_use(kpi_id).measured {
            return Vec::new();
        }
        self.query(&AggregateQuery {
            kpi_id: kpi_id.to_owned(),
            grain,
            start: bucket.start,
            end: bucket.end,
            filter: Labels::new(),
            group_by: definition.dimensions.clone(),
            fill: Fill::Absent,
        })
        .unwrap_or_default()
    }

    /// One bucket of one series of a KPI, as it is now; an empty bucket when nothing is in
    /// it. A series of a RATIO KPI is a combination of values of the ratio's dimensions
    /// (see [`Aggregates::ratio_series_buckets`]).
    pub fn series_bucket(
        &self,
        kpi_id: &str,
        labels: &Labels,
        grain: Grain,
        bucket: Bucket,
    ) -> Option<AnsweredBucket> {
        if let Some((definition, version)) = self.ratios.get(kpi_id) {
            let answer = self
                .query(&AggregateQuery {
                    kpi_id: kpi_id.to_owned(),
                    grain,
                    start: bucket.start,
                    end: bucket.end,
                    filter: labels.clone(),
                    group_by: definition.dimensions.clone(),
                    fill: Fill::None,
                })
                .ok()?;
            let summary = answer
                .into_iter()
                .find(|answered| answered.labels == *labels && answered.bucket == bucket)
                .map_or_else(
                    || empty_summary(definition.kind, Fill::Absent),
                    |answered| Some(answered.summary),
                )?;
            return Some(AnsweredBucket {
                labels: labels.clone(),
                bucket,
                summary,
                definition_version: *version,
            });
        }
        let kpi = self.measured.get(kpi_id)?;
        let summary = kpi
            .series
            .get(labels)
            .map(|series| {
                series.grains[slot(grain)]
                    .get(&bucket.key(), self.store())
                    .map_err(|error| self.unreadable(kpi_id, &error))
            })
            .transpose()
            .ok()?
            .flatten()
            .map_or_else(
                || empty_summary(kpi.definition.kind, Fill::Absent),
                |state| Some(state.summary()),
            )?;
        Some(AnsweredBucket {
            labels: labels.clone(),
            bucket,
            summary,
            definition_version: kpi.version,
        })
    }

    /// The definition and version of a KPI, measured or RATIO.
    pub fn definition(&self, kpi_id: &str) -> Result<(&KpiDefinition, u64), Rejection> {
        if let Some(kpi) = self.measured.get(kpi_id) {
            return Ok((&kpi.definition, kpi.version));
        }
        self.ratios
            .get(kpi_id)
            .map(|(definition, version)| (definition, *version))
            .ok_or_else(|| Rejection::not_found("kpi_id", format!("kpi '{kpi_id}'")))
    }

    /// The buckets of a measured KPI in the query's range, merged per group, as summaries
    /// (and, for ratio operands, their sums).
    fn merged(
        &self,
        kpi_id: &str,
        query: &AggregateQuery,
    ) -> Result<BTreeMap<Labels, BTreeMap<BucketKey, MergedBucket>>, Rejection> {
        let Some(kpi) = self.measured.get(kpi_id) else {
            return Ok(BTreeMap::new());
        };
        let slot = slot(query.grain);
        let first = calendar::bucket_of(query.grain, kpi.definition.timezone, query.start).key();
        let mut groups: BTreeMap<Labels, BTreeMap<BucketKey, BucketState>> = BTreeMap::new();
        for (labels, series) in &kpi.series {
            if !query
                .filter
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
            {
                continue;
            }
            let group_labels: Labels = query
                .group_by
                .iter()
                .filter_map(|key| labels.get(key).map(|value| (key.clone(), value.clone())))
                .collect();
            let group = groups.entry(group_labels).or_default();
            let mut merge_error = None;
            series.grains[slot]
                .visit_from(first, self.store(), |key, state| {
                    if key.start() >= query.end {
                        return ControlFlow::Break(());
                    }
                    match group.get_mut(key) {
                        Some(merged) => {
                            if let Err(error) = merged.merge(state) {
                                merge_error = Some(error);
                                return ControlFlow::Break(());
                            }
                        }
                        None => {
                            group.insert(*key, state.clone());
                        }
                    }
                    ControlFlow::Continue(())
                })
                .map_err(|error| self.unreadable(kpi_id, &error))?;
            if let Some(error) = merge_error {
                return Err(Rejection::precondition(
                    "kpi_id",
                    format!("buckets do not merge: {error}"),
                ));
            }
        }
        Ok(groups
            .into_iter()
            .map(|(labels, buckets)| {
                let buckets = buckets
                    .into_iter()
                    .map(|(key, state)| {
                        (
                            key,
                            MergedBucket {
                                summary: state.summary(),
                                operand: state.ratio_operand(),
                            },
                        )
                    })
                    .collect();
                (labels, buckets)
            })
            .collect())
    }
}

/// A merged bucket: its summary, and its sum when it can be a ratio operand.
#[derive(Debug, Clone)]
struct MergedBucket {
    summary: Summary,
    operand: Option<RatioOperand>,
}

/// Groups of a ratio: for every group and bucket of either operand,
/// scale x sum(numerator) / sum(denominator).
fn ratio_groups(
    numerator: BTreeMap<Labels, BTreeMap<BucketKey, MergedBucket>>,
    denominator: BTreeMap<Labels, BTreeMap<BucketKey, MergedBucket>>,
    scale: f64,
) -> BTreeMap<Labels, BTreeMap<BucketKey, Summary>> {
    let mut groups: BTreeMap<Labels, BTreeMap<BucketKey, (RatioOperand, RatioOperand)>> =
        BTreeMap::new();
    for (labels, buckets) in numerator {
        let group = groups.entry(labels).or_default();
        for (key, bucket) in buckets {
            group.entry(key).or_default().0 = bucket.operand.unwrap_or_default();
        }
    }
    for (labels, buckets) in denominator {
        let group = groups.entry(labels).or_default();
        for (key, bucket) in buckets {
            group.entry(key).or_default().1 = bucket.operand.unwrap_or_default();
        }
    }
    groups
        .into_iter()
        .map(|(labels, buckets)| {
            let buckets = buckets
                .into_iter()
                .map(|(key, (num, den))| (key, ratio_summary(num, den, scale)))
                .collect();
            (labels, buckets)
        })
        .collect()
}

/// Checks that filter keys and group-by dimensions are declared dimensions.
fn check_labels(definition: &KpiDefinition, query: &AggregateQuery) -> Result<(), Rejection> {
    let declared = |key: &str| definition.dimensions.iter().any(|d| d == key);
    for key in query.filter.keys() {
        if !declared(key) {
            return Err(Rejection::invalid(
                format!("filter[{key:?}]"),
                format!(
                    "'{key}' is not a declared dimension of kpi '{}' (declared: [{}])",
                    definition.id,
                    definition.dimensions.join(", ")
                ),
            ));
        }
    }
    for (i, key) in query.group_by.iter().enumerate() {
        if !declared(key) {
            return Err(Rejection::invalid(
                format!("group_by[{i}]"),
                format!(
                    "'{key}' is not a declared dimension of kpi '{}' (declared: [{}])",
                    definition.id,
                    definition.dimensions.join(", ")
                ),
            ));
        }
        if query.group_by[..i].contains(key) {
            return Err(Rejection::invalid(
                format!("group_by[{i}]"),
                format!("'{key}' is listed twice"),
            ));
        }
    }
    Ok(())
}

/// What an empty bucket answers under `fill`, or `None` to leave it out.
fn empty_summary(kind: KpiKind, fill: Fill) -> Option<Summary> {
    let absent = Summary {
        value: None,
        count: 0,
        sum: None,
        min: None,
        max: None,
        detail: None,
    };
    match fill {
        Fill::None => None,
        Fill::Absent => Some(absent),
        Fill::Zero => Some(Summary {
            value: Some(0.0),
            sum: matches!(kind, KpiKind::Sum | KpiKind::Count | KpiKind::Average).then_some(0.0),
            ..absent
        }),
    }
}
