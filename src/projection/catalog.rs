//! The catalog read model: the KPI definitions every request is validated against.

use std::sync::{RwLock, RwLockReadGuard};

use crate::domain::Catalog;
use crate::store::{CommitListener, Committed};

/// The catalog as of the latest committed event, shared by all request handlers.
#[derive(Debug, Default)]
pub struct CatalogView {
    catalog: RwLock<Catalog>,
}

impl CatalogView {
    /// A view of `catalog`; register it with the log before the first append.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            catalog: RwLock::new(catalog),
        }
    }

    /// A read guard on the current catalog. Hold it only for synchronous work, never
    /// across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, Catalog> {
        // A panic while holding the lock cannot leave a half-applied event (apply does not
        // panic), so a poisoned lock still holds a consistent catalog.
        self.catalog
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl CommitListener for CatalogView {
    fn committed(&self, events: &[Committed<'_>]) {
        let mut catalog = self
            .catalog
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for committed in events {
            if committed.event.affects_validation() {
                catalog.apply(committed.seq, committed.recorded_at, committed.event);
            }
        }
        if let Some(last) = events.last() {
            catalog.advance_to(last.seq);
        }
    }
}
