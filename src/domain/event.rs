//! The events of the log: every state change of the service is one of these.

use super::{KpiDefinition, Measurement, TargetDefinition};

/// One state change, as appended to the log (see `proto/kpi/v1/events.proto`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A KPI was defined (version 1).
    KpiDefined {
        /// The definition.
        definition: KpiDefinition,
    },
    /// A KPI's definition was replaced.
    KpiUpdated {
        /// The new definition.
        definition: KpiDefinition,
        /// The version it produced.
        version: u64,
    },
    /// A KPI stopped accepting measurements.
    KpiRetired {
        /// The KPI.
        kpi_id: String,
        /// Why.
        reason: String,
        /// The version it produced.
        version: u64,
    },
    /// A target was created or changed.
    TargetSet {
        /// The target in force from now on.
        target: TargetDefinition,
        /// The version it produced.
        version: u64,
    },
    /// A target was removed.
    TargetRemoved {
        /// The target.
        target_id: String,
        /// Why.
        reason: String,
    },
    /// A measurement was recorded.
    MeasurementRecorded(Measurement),
    /// A recorded measurement was withdrawn.
    MeasurementRetracted {
        /// Seq of the withdrawn MeasurementRecorded event.
        retracted_seq: u64,
        /// Why.
        reason: String,
    },
    /// Stands in one seq of a range of acknowledged events that were lost (written by
    /// `kpi-server recover`); projections ignore it.
    EventsLost {
        /// First lost seq.
        first_seq: u64,
        /// Last lost seq.
        last_seq: u64,
        /// What happened.
        reason: String,
        /// The chain hash at `last_seq` that was acknowledged, when known.
        acknowledged_hash: Option<[u8; 32]>,
    },
}

impl Event {
    /// Whether the event changes what later commands are validated against: every event
    /// but a measurement (KPI and target definitions, retirements, and retractions, which
    /// a later retraction of the same measurement is checked against). Appends are guarded
    /// by the seq of the latest such event, so nothing is stored against a state that
    /// changed after it was validated.
    pub fn affects_validation(&self) -> bool {
        !matches!(self, Self::MeasurementRecorded(_))
    }

    /// The idempotency key of a measurement, if it has one.
    pub fn event_id(&self) -> Option<&str> {
        match self {
            Self::MeasurementRecorded(m) => m.event_id.as_deref(),
            _ => None,
        }
    }
}
