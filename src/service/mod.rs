//! The commands and reads of the service, free of gRPC: validate against the catalog,
//! append to the log, answer from the read models. `api` is a thin layer over this.

pub mod streams;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::rfc3339;

use crate::domain::measurement::TimeRules;
use crate::domain::{
    Catalog, Event, KpiDefinition, KpiEntry, Measurement, Rejection, TargetDefinition, TargetEntry,
    UpdateRules,
};
use crate::projection::analysis::{self, TargetAnswer, TrendAnswer, TrendQuery};
use crate::projection::{
    AggregateQuery, AggregateView, AnsweredBucket, CatalogView, Grains, ReadModels, Restored,
    SnapshotError,
};
use streams::{StreamHandle, StreamKind, Streams};

use crate::store::{AppendError, AppendRequest, EventLog, Outcome, StoreError};

/// Most measurements in one Record call or RecordStream batch: large enough to amortise the
/// flush, small enough that a batch stays far below gRPC's message limit and is validated
/// within a millisecond.
pub const MAX_BATCH_MEASUREMENTS: usize = 10_000;

/// How often a command is re-validated when definitions keep changing under it. Definition
/// changes are rare, so reaching this means something is hammering the catalog.
const MAX_VALIDATION_ATTEMPTS: usize = 64;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The client's input or the current state refused it.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The log could not do it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Definitions changed under the command more than `MAX_VALIDATION_ATTEMPTS` times.
    #[error("definitions kept changing while the request was validated; retry")]
    Contended,
    /// A blocking task of the request panicked or was cancelled: a bug, not a state of the
    /// log.
    #[error("a task of the request failed: {0}")]
    TaskFailed(String),
}

/// Runs blocking work (sled reads, folds, large answers) off the async executor; a task
/// that panicked is an internal error of this request, not a failure of the log.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ServiceError::TaskFailed(error.to_string()))
}

/// Where one measurement of a batch is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Its seq, or the original's for a duplicate.
    pub seq: u64,
    /// Whether its event_id was already stored.
    pub duplicate: bool,
}

/// The service's state: the log and the read models folded from it.
#[derive(Clone)]
pub struct KpiService {
    log: EventLog,
    catalog: Arc<CatalogView>,
    aggregates: Arc<AggregateView>,
    models: Arc<ReadModels>,
    snapshot_dir: PathBuf,
    max_future_skew: TimeDelta,
    streams: Arc<Streams>,
    heartbeat: Duration,
    min_free_bytes: u64,
    shutdown: CancellationToken,
}

/// How the service behaves, from the configuration.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Where read-model snapshots go.
    pub snapshot_dir: PathBuf,
    /// How far in the future occurred_at may be.
    pub max_future_skew: TimeDelta,
    /// Most server streams open at once.
    pub max_streams: usize,
    /// Interval of checkpoints and heartbeats on idle streams.
    pub heartbeat: Duration,
    /// Space a snapshot leaves free on its file system, or it is not written.
    pub min_free_bytes: u64,
}

/// The measurement a retraction withdraws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetractTarget {
    /// By the seq of its MeasurementRecorded event.
    Seq(u64),
    /// By its event_id (within the deduplication window).
    EventId(String),
}

/// Which targets GetTargetStatus judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSelector {
    /// One target.
    Target(String),
    /// Every target of a KPI.
    Kpi(String),
}

/// Aggregates to answer from: the live read model, or a fold as of a point of the log.
enum AggregatesAt {
    /// The live projection.
    Current(Arc<AggregateView>),
    /// A fold of the log up to an as-of point.
    Past(Box<crate::projection::Aggregates>),
}

/// A point of the log a query is answered at ("as known at").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The events with seq <= this.
    Seq(u64),
    /// The events recorded at or before this time.
    RecordedAt(DateTime<Utc>),
}

impl KpiService {
    /// Serves from read models already restored from `log` (see
    /// [`crate::projection::open`]).
    pub fn with_models(log: EventLog, models: ReadModels, options: ServiceOptions) -> Self {
        let models = Arc::new(models);
        Self {
            log,
            catalog: models.catalog.clone(),
            aggregates: models.aggregates.clone(),
            models,
            snapshot_dir: options.snapshot_dir,
            max_future_skew: options.max_future_skew,
            streams: Streams::new(options.max_streams),
            heartbeat: options.heartbeat,
            min_free_bytes: options.min_free_bytes,
            shutdown: CancellationToken::new(),
        }
    }

    /// A place for one more server stream starting at `position`, or RESOURCE_EXHAUSTED
    /// past the limit.
    pub fn open_stream(
        &self,
        kind: StreamKind,
        peer: Option<std::net::SocketAddr>,
        position: u64,
    ) -> Result<StreamHandle, ServiceError> {
        Ok(self.streams.open(kind, peer, position)?)
    }

    /// The open server streams and their limit.
    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// The catalog read model, for watchers.
    pub fn catalog(&self) -> &Arc<CatalogView> {
        &self.catalog
    }

    /// The aggregate read model, for watchers.
    pub fn aggregates(&self) -> &Arc<AggregateView> {
        &self.aggregates
    }

    /// A receiver of the durable head seq, for followers.
    pub fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.models.live.subscribe()
    }

    /// The live feed: the durable head and the recent touches, for watchers.
    pub fn live(&self) -> &Arc<crate::projection::live::LiveFeed> {
        &self.models.live
    }

    /// The interval of checkpoints and heartbeats on idle streams.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Cancelled when the server starts shutting down: open streams end with UNAVAILABLE.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// How the read models were restored at start.
    pub fn restored(&self) -> Restored {
        self.models.restored
    }

    /// Writes a snapshot of the read models; returns the seq it covers. Blocking.
    pub fn snapshot(&self) -> Result<u64, SnapshotError> {
        self.models
            .snapshot(&self.log, &self.snapshot_dir, self.min_free_bytes)
    }

    /// Writes the history index's part in memory and stops its writer (at shutdown,
    /// before the log closes). Blocking.
    pub fn close_history(&self) -> Result<(), StoreError> {
        self.models.history.close()
    }

    /// The log, for audit reads.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// DefineKpi.
    pub async fn define_kpi(&self, definition: KpiDefinition) -> Result<KpiEntry, ServiceError> {
        let id = definition.id.clone();
        self.change_definitions(|catalog| catalog.decide_define(definition.clone()))
            .await?;
        self.current_kpi(&id)
    }

    /// UpdateKpi. A change of kind or timezone of a KPI with measurements recomputes its
    /// history and needs `recompute_history`.
    pub async fn update_kpi(
        &self,
        definition: KpiDefinition,
        expected_version: Option<u64>,
        recompute_history: bool,
    ) -> Result<KpiEntry, ServiceError> {
        let id = definition.id.clone();
        self.change_definitions(|catalog| {
            let stored = self.aggregates.read().stored_use(&id);
            catalog.decide_update(
                definition.clone(),
                UpdateRules {
                    expected_version,
                    stored: &stored,
                    recompute_history,
                },
            )
        })
        .await?;
        self.current_kpi(&id)
    }

    /// RetireKpi.
    pub async fn retire_kpi(
        &self,
        kpi_id: &str,
        reason: String,
        expected_version: Option<u64>,
    ) -> Result<KpiEntry, ServiceError> {
        self.change_definitions(|catalog| {
            catalog.decide_retire(kpi_id, reason.clone(), expected_version)
        })
        .await?;
        self.current_kpi(kpi_id)
    }

    /// SetTarget: creates or changes a target.
    pub async fn set_target(
        &self,
        target: TargetDefinition,
        expected_version: Option<u64>,
    ) -> Result<TargetEntry, ServiceError> {
        let id = target.id.clone();
        self.change_definitions(|catalog| {
            catalog.decide_set_target(target.clone(), expected_version)
        })
        .await?;
        self.catalog
            .read()
            .target(&id)
            .cloned()
            .ok_or_else(|| Rejection::not_found("target.id", format!("target '{id}'")).into())
    }

    /// RemoveTarget: removes a target; returns the seq of the removal.
    pub async fn remove_target(
        &self,
        target_id: &str,
        reason: String,
    ) -> Result<u64, ServiceError> {
        self.change_definitions(|catalog| catalog.decide_remove_target(target_id, reason.clone()))
            .await
    }

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
            Some(seq) => {
                let history = self.models.history.clone();
                let past = blocking(move || history.catalog_as_of(seq)).await??;
                Ok(list(&past)?)
            }
            None => Ok(list(&self.catalog.read())?),
        }
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

    /// Record: stores every measurement of the batch, or none. `received_at` is the server
    /// time the request arrived, which also fills absent occurred_at values.
    pub async fn record(
        &self,
        measurements: Vec<Measurement>,
        received_at: DateTime<Utc>,
    ) -> Result<Vec<Recorded>, ServiceError> {
        if measurements.is_empty() {
            return Err(
                Rejection::invalid("measurements", "at least one measurement is required").into(),
            );
        }
        if measurements.len() > MAX_BATCH_MEASUREMENTS {
            return Err(Rejection::invalid(
                "measurements",
                format!(
                    "at most {MAX_BATCH_MEASUREMENTS} measurements per batch, got {}",
                    measurements.len()
                ),
            )
            .into());
        }
        let rules = TimeRules {
            now: received_at,
            max_future_skew: self.max_future_skew,
        };
        let mut events: Vec<Event> = measurements
            .into_iter()
            .map(Event::MeasurementRecorded)
            .collect();
        for _ in 0..MAX_VALIDATION_ATTEMPTS {
            let guard = {
                let catalog = self.catalog.read();
                let aggregates = self.aggregates.read();
                for (i, event) in events.iter().enumerate() {
                    if let Event::MeasurementRecorded(m) = event {
                        catalog
                            .validate_measurement(m, &rules)
                            .and_then(|()| aggregates.check_series(m))
                            .map_err(|r| r.within(&format!("measurements[{i}]")))?;
                    }
                }
                catalog.last_validation_change_seq()
            };
            let request = AppendRequest {
                events,
                validation_unchanged_since: Some(guard),
            };
            match self.log.append(request).await {
                Ok(outcomes) => return Ok(outcomes.into_iter().map(recorded).collect()),
                Err(AppendError::ValidationStale { events: returned }) => events = returned,
                Err(AppendError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ServiceError::Contended)
    }

    /// Retract: withdraws one recorded measurement. Returns the seq of the retraction and
    /// the seq of the withdrawn measurement.
    pub async fn retract(
        &self,
        target: RetractTarget,
        reason: String,
    ) -> Result<(u64, u64), ServiceError> {
        crate::domain::kpi::validate_len(
            &reason,
            crate::domain::kpi::MAX_DESCRIPTION_LEN,
            "reason",
        )?;
        let retracted_seq = match target {
            RetractTarget::Seq(seq) => seq,
            RetractTarget::EventId(event_id) => {
                crate::domain::kpi::validate_len(
                    &event_id,
                    crate::domain::measurement::MAX_EVENT_ID_LEN,
                    "event_id",
                )?;
                self.log.find_event_id(&event_id).ok_or_else(|| {
                    Rejection::not_found(
                        "event_id",
                        format!(
                            "a measurement with event_id '{event_id}' within the deduplication window (retract older ones by seq)"
                        ),
                    )
                })?
            }
        };
        if retracted_seq == 0 || retracted_seq > self.log.head().seq {
            return Err(
                Rejection::not_found("seq", format!("event at seq {retracted_seq}")).into(),
            );
        }
        let log = self.log.clone();
        let stored = blocking(move || log.read(retracted_seq, retracted_seq).next())
            .await?
            .transpose()?;
        if !matches!(
            stored.as_ref().map(|s| &s.event),
            Some(Event::MeasurementRecorded(_))
        ) {
            return Err(Rejection::precondition(
                "seq",
                format!("the event at seq {retracted_seq} is not a recorded measurement"),
            )
            .into());
        }
        let event = Event::MeasurementRetracted {
            retracted_seq,
            reason,
        };
        let aggregates = self.aggregates.clone();
        let seq = self
            .change_definitions(move |_| {
                // A retraction is validated against the projection, which knows every
                // earlier one; the guard re-runs this if another retraction got in first.
                match aggregates.read().retracted_by(retracted_seq) {
                    Some(by) => Err(Rejection::precondition(
                        "seq",
                        format!("the measurement at seq {retracted_seq} was already retracted by seq {by}"),
                    )),
                    None => Ok(event.clone()),
                }
            })
            .await?;
        Ok((seq, retracted_seq))
    }

    /// GetTrend: statistics and a forecast over the latest buckets of a KPI.
    pub async fn get_trend(
        &self,
        query: TrendQuery,
        as_of: Option<AsOf>,
    ) -> Result<TrendAnswer, ServiceError> {
        crate::domain::kpi::validate_slug(&query.kpi_id, "kpi_id")?;
        let grain = query.grain;
        let (_, aggregates) = self
            .catalog_and_aggregates_at(as_of, &query.kpi_id, move |_| Grains::only([grain]))
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
        let kpi_id = match &selector {
            TargetSelector::Kpi(kpi_id) => {
                crate::domain::kpi::validate_slug(kpi_id, "kpi_id")?;
                kpi_id.clone()
            }
            TargetSelector::Target(target_id) => {
                crate::domain::kpi::validate_slug(target_id, "target_id")?;
                let catalog = match self.resolve_as_of(as_of).await? {
                    Some(seq) => {
                        let history = self.models.history.clone();
                        blocking(move || history.catalog_as_of(seq)).await??
                    }
                    None => self.catalog.read().clone(),
                };
                catalog
                    .target(target_id)
                    .map(|t| t.definition.kpi_id.clone())
                    .ok_or_else(|| {
                        Rejection::not_found("target_id", format!("target '{target_id}'"))
                    })?
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
        let (catalog, aggregates) = self
            .catalog_and_aggregates_at(as_of, &kpi_id, grains)
            .await?;
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

    /// The catalog and aggregates to answer from: the current ones, or folds of the log up
    /// to the as-of point for `kpi_id` (and a ratio's operands) in the grains `grains`
    /// picks from the catalog as of that point.
    async fn catalog_and_aggregates_at(
        &self,
        as_of: Option<AsOf>,
        kpi_id: &str,
        grains: impl FnOnce(&Catalog) -> Grains + Send + 'static,
    ) -> Result<(Catalog, AggregatesAt), ServiceError> {
        match self.resolve_as_of(as_of).await? {
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

    /// Appends the one event `decide` derives from the current catalog, re-deciding when
    /// another event that affects validation got in first.
    async fn change_definitions(
        &self,
        decide: impl Fn(&Catalog) -> Result<Event, Rejection>,
    ) -> Result<u64, ServiceError> {
        for _ in 0..MAX_VALIDATION_ATTEMPTS {
            let (event, guard) = {
                let catalog = self.catalog.read();
                (decide(&catalog)?, catalog.last_validation_change_seq())
            };
            let request = AppendRequest {
                events: vec![event],
                validation_unchanged_since: Some(guard),
            };
            match self.log.append(request).await {
                Ok(outcomes) => {
                    return Ok(outcomes.first().map_or(0, |o| recorded(*o).seq));
                }
                Err(AppendError::ValidationStale { .. }) => {}
                Err(AppendError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ServiceError::Contended)
    }

    fn current_kpi(&self, kpi_id: &str) -> Result<KpiEntry, ServiceError> {
        self.catalog
            .read()
            .get(kpi_id)
            .cloned()
            .ok_or_else(|| Rejection::not_found("kpi_id", format!("kpi '{kpi_id}'")).into())
    }
}

fn recorded(outcome: Outcome) -> Recorded {
    match outcome {
        Outcome::Appended { seq } => Recorded {
            seq,
            duplicate: false,
        },
        Outcome::Duplicate { seq } => Recorded {
            seq,
            duplicate: true,
        },
    }
}
