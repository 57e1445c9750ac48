//! The KPI catalog: the current definitions, folded from the log, and the decisions
//! that turn catalog commands into events.

use std::collections::BTreeMap;
use std::ops::Bound;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::kpi::{MAX_DESCRIPTION_LEN, validate_len, validate_slug};
use super::measurement::TimeRules;
use super::{Event, KpiDefinition, Measurement, Rejection, TargetDefinition, TargetMode};

/// A KPI as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KpiEntry {
    /// The definition in force.
    pub definition: KpiDefinition,
    /// 1 after definition, +1 per update and for retirement.
    pub version: u64,
    /// Retired KPIs keep their history but take no measurements.
    pub retired: bool,
    /// recorded_at of the KpiDefined event.
    pub created_at: DateTime<Utc>,
    /// recorded_at of the event that produced `version`.
    pub updated_at: DateTime<Utc>,
    /// seq of the event that produced `version`.
    pub seq: u64,
}

/// A target as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetEntry {
    /// The definition in force.
    pub definition: TargetDefinition,
    /// 1 when created, +1 per change.
    pub version: u64,
    /// recorded_at of the event that produced `version`.
    pub updated_at: DateTime<Utc>,
    /// seq of that event.
    pub seq: u64,
}

/// What the log holds of a KPI, for [`Catalog::decide_update`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredUse {
    /// The KPI (or, for a RATIO, one of its operands) has measurements.
    pub measured: bool,
    /// The label keys its stored measurements use.
    pub dimensions: Vec<String>,
}

/// The conditions of an UpdateKpi.
#[derive(Debug, Clone, Copy)]
pub struct UpdateRules<'a> {
    /// Optimistic concurrency: the version the client read.
    pub expected_version: Option<u64>,
    /// What the log holds of the KPI.
    pub stored: &'a StoredUse,
    /// The client agrees that past buckets are recomputed (a new kind or timezone).
    pub recompute_history: bool,
}

/// Every KPI ever defined, by id, and the targets in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    kpis: BTreeMap<String, KpiEntry>,
    targets: BTreeMap<String, TargetEntry>,
    /// Seq of the latest event folded in that affects validation (every event but a
    /// measurement); see `Event::affects_validation`.
    last_validation_change_seq: u64,
    /// Seq of the latest event folded in (of any kind).
    seq: u64,
}

impl Catalog {
    /// Folds one committed event into the catalog. Measurement events change nothing here.
    pub fn apply(&mut self, seq: u64, recorded_at: DateTime<Utc>, event: &Event) {
        self.seq = self.seq.max(seq);
        if event.affects_validation() {
            self.last_validation_change_seq = seq;
        }
        match event {
            Event::KpiDefined { definition } => {
                self.kpis.insert(
                    definition.id.clone(),
                    KpiEntry {
                        definition: definition.clone(),
                        version: 1,
                        retired: false,
                        created_at: recorded_at,
                        updated_at: recorded_at,
                        seq,
                    },
                );
            }
            Event::KpiUpdated {
                definition,
                version,
            } => {
                if let Some(entry) = self.kpis.get_mut(&definition.id) {
                    entry.definition = definition.clone();
                    entry.version = *version;
                    entry.updated_at = recorded_at;
                    entry.seq = seq;
                }
            }
            Event::KpiRetired {
                kpi_id, version, ..
            } => {
                if let Some(entry) = self.kpis.get_mut(kpi_id) {
                    entry.retired = true;
                    entry.version = *version;
                    entry.updated_at = recorded_at;
                    entry.seq = seq;
                }
            }
            Event::TargetSet { target, version } => {
                self.targets.insert(
                    target.id.clone(),
                    TargetEntry {
                        definition: target.clone(),
                        version: *version,
                        updated_at: recorded_at,
                        seq,
                    },
                );
            }
            Event::TargetRemoved { target_id, .. } => {
                self.targets.remove(target_id);
            }
            Event::MeasurementRecorded(_)
            | Event::MeasurementRetracted { .. }
            | Event::EventsLost { .. } => {}
        }
    }

    /// Seq of the latest event folded in.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Notes that every event up to `seq` is folded in (the ones after the last
    /// event that affects validation are measurements, which change nothing here).
    pub fn advance_to(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// Seq of the latest event folded in that affects validation. A write validated
    /// against this catalog is stored only if no such event was appended after it.
    pub fn last_validation_change_seq(&self) -> u64 {
        self.last_validation_change_seq
    }

    /// One KPI, retired or not.
    pub fn get(&self, kpi_id: &str) -> Option<&KpiEntry> {
        self.kpis.get(kpi_id)
    }

    /// KPIs with ids after `after` (all when empty), in id order.
    pub fn list_after<'a>(
        &'a self,
        after: &str,
        include_retired: bool,
    ) -> impl Iterator<Item = &'a KpiEntry> + 'a {
        let start = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after.to_owned())
        };
        self.kpis
            .range((start, Bound::Unbounded))
            .map(|(_, entry)| entry)
            .filter(move |entry| include_retired || !entry.retired)
    }

    /// Number of KPIs, retired ones included.
    pub fn len(&self) -> usize {
        self.kpis.len()
    }

    /// True before the first KPI is defined.
    pub fn is_empty(&self) -> bool {
        self.kpis.is_empty()
    }

    /// Refuses a new KPI when the catalog holds `max_kpis` already (retired ones count:
    /// their history and aggregates stay).
    pub fn check_room_for_kpi(&self, max_kpis: usize) -> Result<(), Rejection> {
        if self.kpis.len() >= max_kpis {
            return Err(Rejection::ResourceExhausted {
                field: "definition.id".into(),
                reason: format!(
                    "the catalog holds its limit of {max_kpis} KPIs (retired ones count); the server's --max-kpis sets it"
                ),
            });
        }
        Ok(())
    }

    /// DefineKpi: the event that adds `definition`, or why it cannot be added.
    pub fn decide_define(&self, definition: KpiDefinition) -> Result<Event, Rejection> {
        definition.validate("definition")?;
        if self.kpis.contains_key(&definition.id) {
            return Err(Rejection::AlreadyExists {
                field: "definition.id".into(),
                what: format!("kpi '{}'", definition.id),
            });
        }
        self.check_ratio_operands(&definition)?;
        Ok(Event::KpiDefined { definition })
    }

    /// UpdateKpi: the event that replaces the definition of `definition.id`. `stored` is
    /// what the log holds of the KPI: a change of kind or timezone recomputes every past
    /// bucket of a KPI with measurements and needs `change.recompute_history`; a dimension
    /// that stored measurements use cannot be dropped at all (they would carry an
    /// undeclared label).
    pub fn decide_update(
        &self,
        definition: KpiDefinition,
        change: UpdateRules<'_>,
    ) -> Result<Event, Rejection> {
        definition.validate("definition")?;
        let entry = self.live_entry(&definition.id, "definition.id", change.expected_version)?;
        self.check_ratio_operands(&definition)?;
        let old = &entry.definition;
        if let Some(dropped) = change
            .stored
            .dimensions
            .iter()
            .find(|used| !definition.dimensions.contains(used))
        {
            return Err(Rejection::precondition(
                "definition.dimensions",
                format!(
                    "dimension '{dropped}' of kpi '{}' is used by stored measurements and cannot be dropped",
                    definition.id
                ),
            ));
        }
        if change.stored.measured && !change.recompute_history {
            let rewritten = if old.kind != definition.kind {
                Some((
                    "definition.kind",
                    format!("kind {:?} to {:?}", old.kind, definition.kind),
                ))
            } else if old.timezone != definition.timezone {
                Some((
                    "definition.timezone",
                    format!("timezone {} to {}", old.timezone, definition.timezone),
                ))
            } else {
                None
            };
            if let Some((field, what)) = rewritten {
                return Err(Rejection::precondition(
                    field,
                    format!(
                        "changing the {what} recomputes every past bucket of kpi '{}', which has measurements: set recompute_history to do it",
                        definition.id
                    ),
                ));
            }
        }
        if entry.definition.kind != definition.kind {
            self.check_not_an_operand(&definition.id, "definition.kind", |ratio| {
                if definition.kind.is_summable() {
                    None
                } else {
                    Some(format!(
                        "kpi '{}' is an operand of ratio kpi '{ratio}', so it must stay SUM or COUNT",
                        definition.id
                    ))
                }
            })?;
        }
        Ok(Event::KpiUpdated {
            version: entry.version + 1,
            definition,
        })
    }

    /// RetireKpi: the event that retires `kpi_id`.
    pub fn decide_retire(
        &self,
        kpi_id: &str,
        reason: String,
        expected_version: Option<u64>,
    ) -> Result<Event, Rejection> {
        validate_slug(kpi_id, "kpi_id")?;
        validate_len(&reason, MAX_DESCRIPTION_LEN, "reason")?;
        let entry = self.live_entry(kpi_id, "kpi_id", expected_version)?;
        self.check_not_an_operand(kpi_id, "kpi_id", |ratio| {
            Some(format!(
                "kpi '{kpi_id}' is an operand of ratio kpi '{ratio}': retire or change that kpi first"
            ))
        })?;
        Ok(Event::KpiRetired {
            kpi_id: kpi_id.to_owned(),
            reason,
            version: entry.version + 1,
        })
    }

    /// The targets in force, in id order; only those of `kpi_id` when given.
    pub fn targets<'a>(
        &'a self,
        kpi_id: Option<&'a str>,
    ) -> impl Iterator<Item = &'a TargetEntry> + 'a {
        self.targets
            .values()
            .filter(move |entry| kpi_id.is_none_or(|id| entry.definition.kpi_id == id))
    }

    /// One target in force.
    pub fn target(&self, target_id: &str) -> Option<&TargetEntry> {
        self.targets.get(target_id)
    }

    /// SetTarget: the event that creates or changes `target`. With `expected_version`, 0
    /// means "must not exist yet".
    pub fn decide_set_target(
        &self,
        target: TargetDefinition,
        expected_version: Option<u64>,
    ) -> Result<Event, Rejection> {
        target.validate("target")?;
        let kpi = self.kpis.get(&target.kpi_id).ok_or_else(|| {
            Rejection::not_found("target.kpi_id", format!("kpi '{}'", target.kpi_id))
        })?;
        if kpi.retired {
            return Err(Rejection::precondition(
                "target.kpi_id",
                format!("kpi '{}' is retired", target.kpi_id),
            ));
        }
        target.check_periods(kpi.definition.timezone, "target")?;
        if target.mode == TargetMode::Cumulative && !kpi.definition.kind.is_summable() {
            return Err(Rejection::precondition(
                "target.mode",
                format!(
                    "a CUMULATIVE target sums its kpi over the window, but kpi '{}' is {:?}: use a LEVEL target",
                    target.kpi_id, kpi.definition.kind
                ),
            ));
        }
        let current = self.targets.get(&target.id);
        let current_version = current.map_or(0, |entry| entry.version);
        if let Some(expected) = expected_version
            && expected != current_version
        {
            return Err(Rejection::VersionMismatch {
                what: format!("target '{}'", target.id),
                expected,
                current: current_version,
            });
        }
        if let Some(entry) = current
            && entry.definition.kpi_id != target.kpi_id
        {
            return Err(Rejection::precondition(
                "target.kpi_id",
                format!(
                    "target '{}' is on kpi '{}'; a target cannot move to another kpi (remove it and set a new one)",
                    target.id, entry.definition.kpi_id
                ),
            ));
        }
        Ok(Event::TargetSet {
            version: current_version + 1,
            target,
        })
    }

    /// RemoveTarget: the event that removes `target_id`.
    pub fn decide_remove_target(
        &self,
        target_id: &str,
        reason: String,
    ) -> Result<Event, Rejection> {
        validate_slug(target_id, "target_id")?;
        validate_len(&reason, MAX_DESCRIPTION_LEN, "reason")?;
        if !self.targets.contains_key(target_id) {
            return Err(Rejection::not_found(
                "target_id",
                format!("target '{target_id}'"),
            ));
        }
        Ok(Event::TargetRemoved {
            target_id: target_id.to_owned(),
            reason,
        })
    }

    /// Record: checks one measurement against the catalog and its KPI's rules.
    pub fn validate_measurement(
        &self,
        measurement: &Measurement,
        rules: &TimeRules,
    ) -> Result<(), Rejection> {
        let Some(entry) = self.kpis.get(&measurement.kpi_id) else {
            validate_slug(&measurement.kpi_id, "kpi_id")?;
            return Err(Rejection::not_found(
                "kpi_id",
                format!("kpi '{}'", measurement.kpi_id),
            ));
        };
        if entry.retired {
            return Err(Rejection::precondition(
                "kpi_id",
                format!("kpi '{}' is retired", measurement.kpi_id),
            ));
        }
        measurement.validate(&entry.definition, rules)
    }

    /// The entry of a KPI that may still change: it exists, is not retired, and is at the
    /// version the client expects (when it says).
    fn live_entry(
        &self,
        kpi_id: &str,
        field: &str,
        expected_version: Option<u64>,
    ) -> Result<&KpiEntry, Rejection> {
        let entry = self
            .kpis
            .get(kpi_id)
            .ok_or_else(|| Rejection::not_found(field, format!("kpi '{kpi_id}'")))?;
        if let Some(expected) = expected_version
            && expected != entry.version
        {
            return Err(Rejection::VersionMismatch {
                what: format!("kpi '{kpi_id}'"),
                expected,
                current: entry.version,
            });
        }
        if entry.retired {
            return Err(Rejection::precondition(
                field,
                format!("kpi '{kpi_id}' is retired"),
            ));
        }
        Ok(entry)
    }

    /// A RATIO's operands exist, are live, and can be summed.
    fn check_ratio_operands(&self, definition: &KpiDefinition) -> Result<(), Rejection> {
        let Some(ratio) = &definition.ratio else {
            return Ok(());
        };
        for (field, id) in [
            ("definition.ratio.numerator_kpi_id", &ratio.numerator_kpi_id),
            (
                "definition.ratio.denominator_kpi_id",
                &ratio.denominator_kpi_id,
            ),
        ] {
            let operand = self
                .kpis
                .get(id)
                .ok_or_else(|| Rejection::not_found(field, format!("kpi '{id}'")))?;
            if operand.retired {
                return Err(Rejection::precondition(
                    field,
                    format!("kpi '{id}' is retired"),
                ));
            }
            if !operand.definition.kind.is_summable() {
                return Err(Rejection::precondition(
                    field,
                    format!(
                        "kpi '{id}' is {:?}; a ratio divides sums, so its operands must be SUM or COUNT",
                        operand.definition.kind
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fails with the reason `why` gives for the first live RATIO KPI that uses `kpi_id`.
    fn check_not_an_operand(
        &self,
        kpi_id: &str,
        field: &str,
        why: impl Fn(&str) -> Option<String>,
    ) -> Result<(), Rejection> {
        let user = self.kpis.values().find(|entry| {
            !entry.retired
                && entry.definition.ratio.as_ref().is_some_and(|ratio| {
                    ratio.numerator_kpi_id == kpi_id || ratio.denominator_kpi_id == kpi_id
                })
        });
        match user.and_then(|entry| why(&entry.definition.id)) {
            Some(reason) => Err(Rejection::precondition(field, reason)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
