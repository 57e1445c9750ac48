//! The limit of label combinations (series) per KPI, exact across the measurements of a
//! batch and across batches validated at the same time.
//!
//! Validation reads the read model, which knows the series of the events folded so far;
//! two batches validated against the same state could each bring the last series the
//! limit allows. So a batch *reserves* what it may add, under one lock, and holds it until
//! its append returns: by then its series are in the read model (the log folds a group
//! before it answers it) or the batch failed.
//!
//! Far from the limit a batch reserves one *slot* per distinct label combination it has
//! for the KPI, without looking them up in the read model: no batch in flight can then
//! take the KPI past the limit, at the cost of a counter. Near it (when the series in the
//! read model, the slots and the reserved series in flight, and the batch's combinations
//! could pass the limit) the batch looks each combination up and reserves exactly the new
//! ones; the others' slots count as new series, so a batch may be refused at the edge
//! while slots are in flight, and is taken when retried after them, but the limit is
//! never passed.

use std::collections::{HashMap, HashSet, hash_map::Entry};
use std::sync::{Arc, Mutex, PoisonError};

use crate::domain::query::Labels;
use crate::domain::{Measurement, Rejection};
use crate::projection::Aggregates;
use crate::projection::aggregates::MAX_SERIES_PER_KPI;

/// What the batches in flight reserved for one KPI.
#[derive(Debug, Default)]
struct KpiReservations {
    /// Label combinations of batches far from the limit: each may be a new series.
    slots: usize,
    /// New series of batches near the limit, with how many batches bring each.
    series: HashMap<Labels, usize>,
}

/// The reservations of the batches between their validation and the end of their append.
#[derive(Debug, Default)]
pub struct SeriesReservations {
    kpis: Mutex<HashMap<String, KpiReservations>>,
}

/// What one batch reserved; released when dropped.
#[derive(Debug)]
pub struct Reserved {
    owner: Arc<SeriesReservations>,
    slots: Vec<(String, usize)>,
    series: Vec<(String, Labels)>,
}

impl SeriesReservations {
    /// Reserves what `batch` may add to each KPI's series, or refuses it
    /// (RESOURCE_EXHAUSTED, naming the first measurement past the limit) when a KPI would
    /// have more than [`MAX_SERIES_PER_KPI`].
    pub fn reserve<'a>(
        self: &Arc<Self>,
        aggregates: &Aggregates,
        batch: impl Iterator<Item = &'a Measurement> + Clone,
    ) -> Result<Reserved, Rejection> {
        let mut reserved = Reserved {
            owner: Arc::clone(self),
            slots: Vec::new(),
            series: Vec::new(),
        };
        // Per KPI of the batch, its distinct label combinations: at most that many new
        // series (a batch of 10,000 measurements of one series reserves one slot).
        let mut per_kpi: HashMap<&str, HashSet<&Labels, foldhash::fast::RandomState>> =
            HashMap::new();
        for measurement in batch.clone() {
            per_kpi
                .entry(measurement.kpi_id.as_str())
                .or_default()
                .insert(&measurement.labels);
        }
        let mut kpis = self.kpis.lock().unwrap_or_else(PoisonError::into_inner);
        for (kpi_id, combinations) in per_kpi {
            let combinations = combinations.len();
            // A RATIO or unknown KPI: validation refuses its measurements.
            let Some(in_model) = aggregates.series_count(kpi_id) else {
                continue;
            };
            let kpi = kpis.entry(kpi_id.to_owned()).or_default();
            let in_flight = kpi.slots
                + kpi
                    .series
                    .keys()
                    .filter(|labels| !aggregates.has_series(kpi_id, labels))
                    .count();
            if in_model + in_flight + combinations <= MAX_SERIES_PER_KPI {
                kpi.slots += combinations;
                reserved.slots.push((kpi_id.to_owned(), combinations));
                continue;
            }
            let mut count = in_model + in_flight;
            let mut seen: HashSet<&Labels> = HashSet::new();
            for (index, measurement) in batch.clone().enumerate() {
                let labels = &measurement.labels;
                if measurement.kpi_id != kpi_id
                    || aggregates.has_series(kpi_id, labels)
                    || !seen.insert(labels)
                {
                    continue;
                }
                match kpi.series.entry(labels.clone()) {
                    // Another batch in flight brings it: counted already.
                    Entry::Occupied(mut batches) => *batches.get_mut() += 1,
                    Entry::Vacant(_) if count >= MAX_SERIES_PER_KPI => {
                        return Err(Rejection::ResourceExhausted {
                            field: format!("measurements[{index}].labels"),
                            reason: format!(
                                "kpi '{kpi_id}' has reached its limit of {MAX_SERIES_PER_KPI} label combinations"
                            ),
                        });
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(1);
                        count += 1;
                    }
                }
                reserved.series.push((kpi_id.to_owned(), labels.clone()));
            }
        }
        Ok(reserved)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.slots.is_empty() && self.series.is_empty() {
            return;
        }
        let mut kpis = self
            .owner
            .kpis
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (kpi_id, slots) in self.slots.drain(..) {
            if let Some(kpi) = kpis.get_mut(&kpi_id) {
                kpi.slots = kpi.slots.saturating_sub(slots);
            }
        }
        for (kpi_id, labels) in self.series.drain(..) {
            if let Some(kpi) = kpis.get_mut(&kpi_id)
                && let Entry::Occupied(mut batches) = kpi.series.entry(labels)
            {
                *batches.get_mut() -= 1;
                if *batches.get() == 0 {
                    batches.remove();
                }
            }
        }
        kpis.retain(|_, kpi| kpi.slots > 0 || !kpi.series.is_empty());
    }
}
