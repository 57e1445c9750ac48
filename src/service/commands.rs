//! The commands: validate against the catalog, then append to the log with the guard
//! that refuses them if what they were validated against changed (`change_definitions`
//! retries those; `record` and `retract` build their events here).

use chrono::{DateTime, Utc};

use crate::domain::measurement::TimeRules;
use crate::domain::measurement::{Recorded, RetractTarget};
use crate::domain::{
    Catalog, Event, KpiDefinition, KpiEntry, Measurement, Rejection, TargetDefinition, TargetEntry,
    UpdateRules,
};
use crate::store::{AppendError, AppendRequest, Outcome};

use super::{KpiService, MAX_BATCH_MEASUREMENTS, MAX_VALIDATION_ATTEMPTS, ServiceError, blocking};

impl KpiService {
    /// DefineKpi.
    pub async fn define_kpi(&self, definition: KpiDefinition) -> Result<KpiEntry, ServiceError> {
        let id = definition.id.clone();
        self.change_definitions(|catalog| {
            catalog.check_room_for_kpi(self.max_kpis)?;
            catalog.decide_define(definition.clone())
        })
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
            // Held until the append returns: the new series the batch brings count
            // against their KPIs' limit for batches validated meanwhile.
            let (guard, _series) = {
                let catalog = self.catalog.read();
                let aggregates = self.aggregates.read();
                let measurements = events.iter().filter_map(|event| match event {
                    Event::MeasurementRecorded(m) => Some(m),
                    _ => None,
                });
                for (i, m) in measurements.clone().enumerate() {
                    catalog
                        .validate_measurement(m, &rules)
                        .map_err(|r| r.within(&format!("measurements[{i}]")))?;
                }
                let reserved = self.series.reserve(&aggregates, measurements)?;
                (catalog.last_validation_change_seq(), reserved)
            };
            let request = AppendRequest {
                events,
                validation_unchanged_since: Some(guard),
                actor: self.actor.clone(),
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
                actor: self.actor.clone(),
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
}

/// Where a measurement went, from the log's outcome for it.
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
