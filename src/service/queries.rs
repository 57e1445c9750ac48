//! The reads: the catalog, aggregates, trends and target status, now or as known at an
//! earlier point of the log (`resolve_as_of`, then the history index's catalog and folds).

use chrono::{DateTime, Utc};

use crate::domain::query::{
    AggregateQuery, AnsweredBucket, AsOf, TargetAnswer, TargetSelector, TrendAnswer, TrendQuery,
};
use crate::domain::rfc3339;
use crate::domain::{Catalog, KpiEntry, Rejection, TargetEntry};
use crate::projection::Grains;
use crate::projection::analysis;
use crate::store::StoreError;

use super::{AggregatesAt, KpiService, ServiceError, blocking};

impl KpiService {
    /// ListTargets: the targets in force now or as known at an earlier point, in id
    /// order; only those of `kpi_id` when given.
    pub async fn list_targets(
        &self,
        kpi_id: Option<String>,
        as_of: Option<AsOf>,
    ) -> Result<Vec<TargetEntry>, ServiceError> {
        if let Some(id) = &kpi_id {
            crate::domain::kpi::validate_slug(id, "kpi_id")?;
        }
        let list = |catalog: &Catalog| -> Result<Vec<TargetEntry>, Rejection> {
            if let Some(id) = &kpi_id
                && catalog.get(id).is_none()
            {
                return Err(Rejection::not_found("kpi_id", format!("kpi '{id}'")));
            }
            Ok(catalog.targets(kpi_id.as_deref()).cloned().collect())
        };
        match self.resolve_as_of(as_of).await? {
            Some(seq) => Ok(list(&self.catalog_as_of(seq).await?)?),
            None => Ok(list(&self.catalog.read())?),
        }
    }

    /// The catalog as known at `seq`, from the history index.
    async fn catalog_as_of(&self, seq: u64) -> Result<Catalog, ServiceError> {
        let history = self.models.history.clone();
        Ok(blocking(move || history.catalog_as_of(seq)).await??)
    }

    /// The seq an as-of point names, or `None` when it names the head (answer from the
    /// current read models). A point the log has not reached yet is OUT_OF_RANGE: its
    /// answer would still change, so it is not an answer "as known at" that point.
    async fn resolve_as_of(&self, as_of: Option<AsOf>) -> Result<Option<u64>, ServiceError> {
        let head = self.log.head().seq;
        let seq = match as_of {
            None => return Ok(None),
            Some(AsOf::Seq(seq)) => {
                if seq > head {
                    return Err(Rejection::out_of_range(
                        "as_of.seq",
                        format!("seq {seq} is beyond the log's head seq {head}"),
                    )
                    .into());
                }
                seq
            }
            Some(AsOf::RecordedAt(at)) => {
                let now = Utc::now();
                if at > now {
                    return Err(Rejection::out_of_range(
                        "as_of.recorded_at",
                        format!(
                            "{} is later than the server's clock ({}): what will be known then is not known yet",
                            rfc3339(at),
                            rfc3339(now)
                        ),
                    )
                    .into());
                }
                self.seq_at(at).await?
            }
        };
        Ok((seq < head).then_some(seq))
    }

    /// NOT_FOUND naming every id of `kpi_ids` that is not in the catalog (a typo would
    /// otherwise watch or replay nothing, forever); INVALID_ARGUMENT for one that is not an
    /// id at all. `field` is the request's field, such as `kpi_ids`.
    pub fn check_known_kpis(&self, kpi_ids: &[String], field: &str) -> Result<(), ServiceError> {
        for (i, id) in kpi_ids.iter().enumerate() {
            crate::domain::kpi::validate_slug(id, &format!("{field}[{i}]"))?;
        }
        let catalog = self.catalog.read();
        let unknown: Vec<(usize, &String)> = kpi_ids
            .iter()
            .enumerate()
            .filter(|(_, id)| catalog.get(id).is_none())
            .collect();
        match unknown.as_slice() {
            [] => Ok(()),
            [(i, id)] => {
                Err(Rejection::not_found(format!("{field}[{i}]"), format!("kpi '{id}'")).into())
            }
            several => {
                let names: Vec<String> = several.iter().map(|(_, id)| format!("'{id}'")).collect();
                Err(Rejection::not_found(field, format!("kpis {}", names.join(", "))).into())
            }
        }
    }

    /// The last seq recorded at or before `at` (0 if none).
    pub async fn seq_at(&self, at: DateTime<Utc>) -> Result<u64, ServiceError> {
        let log = self.log.clone();
        Ok(blocking(move || log.seq_at(at)).await??)
    }

    /// VerifyLog: the whole chain recomputed up to the head.
    pub async fn verify_log(&self) -> Result<crate::store::Verification, ServiceError> {
        let log = self.log.clone();
        Ok(blocking(move || log.verify()).await??)
    }

    /// GetKpi.
    pub fn get_kpi(&self, kpi_id: &str) -> Result<KpiEntry, ServiceError> {
        crate::domain::kpi::validate_slug(kpi_id, "kpi_id")?;
        self.current_kpi(kpi_id)
    }

    /// ListKpis: up to `limit` KPIs after the id `after`, and whether more follow.
    pub fn list_kpis(
        &self,
        after: &str,
        limit: usize,
        include_retired: bool,
    ) -> (Vec<KpiEntry>, bool) {
        let catalog = self.catalog.read();
        let mut page: Vec<KpiEntry> = catalog
            .list_after(after, include_retired)
            .take(limit + 1)
            .cloned()
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    /// GetTrend: statistics and a forecast over the latest buckets of a KPI.
    pub async fn get_trend(
        &self,
        query: TrendQuery,
        as_of: Option<AsOf>,
    ) -> Result<TrendAnswer, ServiceError> {
        crate::domain::kpi::validate_slug(&query.kpi_id, "kpi_id")?;
        let grain = query.grain;
        let seq = self.resolve_as_of(as_of).await?;
        let (_, aggregates) = self
            .catalog_and_aggregates_at(seq, &query.kpi_id, move |_| Grains::only([grain]))
            .await?;
        Ok(blocking(move || match aggregates {
            AggregatesAt::Current(view) => analysis::trend(&view.read(), &query),
            AggregatesAt::Past(past) => analysis::trend(&past, &query),
        })
        .await??)
    }

    /// GetTargetStatus: the status of one target, or of every target of a KPI, at
    /// `evaluated_at` (the server clock when absent).
    pub async fn get_target_status(
        &self,
        selector: TargetSelector,
        evaluated_at: Option<DateTime<Utc>>,
        as_of: Option<AsOf>,
    ) -> Result<Vec<TargetAnswer>, ServiceError> {
        let now = evaluated_at.unwrap_or_else(Utc::now);
        match &selector {
            TargetSelector::Kpi(kpi_id) => crate::domain::kpi::validate_slug(kpi_id, "kpi_id")?,
            TargetSelector::Target(target_id) => {
                crate::domain::kpi::validate_slug(target_id, "target_id")?;
            }
        }
        let seq = self.resolve_as_of(as_of).await?;
        let kpi_id = match &selector {
            TargetSelector::Kpi(kpi_id) => kpi_id.clone(),
            TargetSelector::Target(target_id) => {
                let kpi_of = |catalog: &Catalog| {
                    catalog
                        .target(target_id)
                        .map(|t| t.definition.kpi_id.clone())
                        .ok_or_else(|| {
                            Rejection::not_found("target_id", format!("target '{target_id}'"))
                        })
                };
                match seq {
                    Some(seq) => kpi_of(&self.catalog_as_of(seq).await?)?,
                    None => kpi_of(&self.catalog.read())?,
                }
            }
        };
        let grains = {
            let (kpi_id, selector) = (kpi_id.clone(), selector.clone());
            move |catalog: &Catalog| {
                let grains = match &selector {
                    TargetSelector::Kpi(_) => catalog
                        .targets(Some(&kpi_id))
                        .map(analysis::period_grain)
                        .collect::<Vec<_>>(),
                    TargetSelector::Target(id) => catalog
                        .target(id)
                        .map(analysis::period_grain)
                        .into_iter()
                        .collect(),
                };
                Grains::only(grains)
            }
        };
        let (catalog, aggregates) = self.catalog_and_aggregates_at(seq, &kpi_id, grains).await?;
        let answer = blocking(move || {
            if catalog.get(&kpi_id).is_none() {
                return Err(Rejection::not_found("kpi_id", format!("kpi '{kpi_id}'")));
            }
            let targets: Vec<TargetEntry> = match &selector {
                TargetSelector::Kpi(_) => catalog.targets(Some(&kpi_id)).cloned().collect(),
                TargetSelector::Target(id) => catalog.target(id).cloned().into_iter().collect(),
            };
            let judge = |aggregates: &crate::projection::Aggregates| {
                targets
                    .iter()
                    .map(|target| analysis::target_status(aggregates, target, now))
                    .collect::<Result<Vec<_>, _>>()
            };
            match aggregates {
                AggregatesAt::Current(view) => judge(&view.read()),
                AggregatesAt::Past(past) => judge(&past),
            }
        })
        .await??;
        Ok(answer)
    }

    /// The catalog and aggregates to answer from: the current ones (`seq` is `None`), or
    /// folds of the log up to `seq` (from [`Self::resolve_as_of`]) for `kpi_id` (and a
    /// ratio's operands) in the grains `grains` picks from the catalog as of that point.
    async fn catalog_and_aggregates_at(
        &self,
        seq: Option<u64>,
        kpi_id: &str,
        grains: impl FnOnce(&Catalog) -> Grains + Send + 'static,
    ) -> Result<(Catalog, AggregatesAt), ServiceError> {
        match seq {
            Some(seq) => {
                let kpi_ids = self.with_operands(kpi_id);
                let history = self.models.history.clone();
                let aggregates = self.aggregates.clone();
                let (catalog, past) = blocking(move || {
                    let ids: Vec<&str> = kpi_ids.iter().map(String::as_str).collect();
                    let catalog = history.catalog_as_of(seq)?;
                    let past = aggregates.as_of(seq, &ids, grains(&catalog))?;
                    Ok::<_, StoreError>((catalog, past))
                })
                .await??;
                Ok((catalog, AggregatesAt::Past(Box::new(past))))
            }
            None => Ok((
                self.catalog.read().clone(),
                AggregatesAt::Current(self.aggregates.clone()),
            )),
        }
    }

    /// GetAggregates: the buckets of a KPI, now or as known at an earlier point of the log.
    pub async fn get_aggregates(
        &self,
        query: AggregateQuery,
        as_of: Option<AsOf>,
    ) -> Result<Vec<AnsweredBucket>, ServiceError> {
        crate::domain::kpi::validate_slug(&query.kpi_id, "kpi_id")?;
        match self.resolve_as_of(as_of).await? {
            Some(seq) => {
                let kpi_ids = self.with_operands(&query.kpi_id);
                let aggregates = self.aggregates.clone();
                let grain = query.grain;
                let past = blocking(move || {
                    let ids: Vec<&str> = kpi_ids.iter().map(String::as_str).collect();
                    aggregates.as_of(seq, &ids, Grains::only([grain]))
                })
                .await??;
                Ok(past.query(&query)?)
            }
            None => {
                // A large answer takes milliseconds: off the async executor.
                let aggregates = self.aggregates.clone();
                Ok(blocking(move || {
                    let answer = aggregates.read().query(&query);
                    // Buckets that could not be read are rebuilt from the log: once more.
                    if answer.is_err() && aggregates.heal() {
                        return aggregates.read().query(&query);
                    }
                    answer
                })
                .await??)
            }
        }
    }

    /// `kpi_id` and, for a ratio, its operands: the KPIs an as-of fold needs.
    fn with_operands(&self, kpi_id: &str) -> Vec<String> {
        let mut kpi_ids = vec![kpi_id.to_owned()];
        if let Some(ratio) = self
            .catalog
            .read()
            .get(kpi_id)
            .and_then(|entry| entry.definition.ratio.clone())
        {
            kpi_ids.push(ratio.numerator_kpi_id);
            kpi_ids.push(ratio.denominator_kpi_id);
        }
        kpi_ids
    }
}
