//! The commands and reads of the service, free of gRPC: validate against the catalog,
//! append to the log, answer from the read models. `api` is a thin layer over this.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::measurement::TimeRules;
use crate::domain::{Catalog, Event, KpiDefinition, KpiEntry, Measurement, Rejection};
use crate::projection::CatalogView;
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
    max_future_skew: TimeDelta,
}

impl KpiService {
    /// Builds the read models from `log` and serves from them.
    pub fn new(log: EventLog, max_future_skew: TimeDelta) -> Result<Self, StoreError> {
        let catalog = CatalogView::rebuild(&log)?;
        Ok(Self {
            log,
            catalog,
            max_future_skew,
        })
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

    /// UpdateKpi.
    pub async fn update_kpi(
        &self,
        definition: KpiDefinition,
        expected_version: Option<u64>,
    ) -> Result<KpiEntry, ServiceError> {
        let id = definition.id.clone();
        self.change_definitions(|catalog| {
            catalog.decide_update(definition.clone(), expected_version)
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
                for (i, event) in events.iter().enumerate() {
                    if let Event::MeasurementRecorded(m) = event {
                        catalog
                            .validate_measurement(m, &rules)
                            .map_err(|r| r.within(&format!("measurements[{i}]")))?;
                    }
                }
                catalog.last_definition_seq()
            };
            let request = AppendRequest {
                events,
                definitions_unchanged_since: Some(guard),
            };
            match self.log.append(request).await {
                Ok(outcomes) => return Ok(outcomes.into_iter().map(recorded).collect()),
                Err(AppendError::DefinitionsChanged { events: returned }) => events = returned,
                Err(AppendError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ServiceError::Contended)
    }

    /// Appends the one event `decide` derives from the current catalog, re-deciding when
    /// another definition change got in first.
    async fn change_definitions(
        &self,
        decide: impl Fn(&Catalog) -> Result<Event, Rejection>,
    ) -> Result<u64, ServiceError> {
        for _ in 0..MAX_VALIDATION_ATTEMPTS {
            let (event, guard) = {
                let catalog = self.catalog.read();
                (decide(&catalog)?, catalog.last_definition_seq())
            };
            let request = AppendRequest {
                events: vec![event],
                definitions_unchanged_since: Some(guard),
            };
            match self.log.append(request).await {
                Ok(outcomes) => {
                    return Ok(outcomes.first().map_or(0, |o| recorded(*o).seq));
                }
                Err(AppendError::DefinitionsChanged { .. }) => {}
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
