//! The catalog read model: the KPI definitions every request is validated against.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::domain::Catalog;
use crate::store::{CommitListener, Committed, EventLog, StoreError};

/// The catalog as of the latest committed event, shared by all request handlers.
#[derive(Debug, Default)]
pub struct CatalogView {
    catalog: RwLock<Catalog>,
}

impl CatalogView {
    /// Folds the whole log into a new view and registers it for committed events.
    /// Call before the first append, so no event is missed.
    pub fn rebuild(log: &EventLog) -> Result<Arc<Self>, StoreError> {
        let mut catalog = Catalog::default();
        for stored in log.read(1, log.head().seq) {
            let stored = stored?;
            catalog.apply(stored.seq, stored.recorded_at, &stored.event);
        }
        let view = Arc::new(Self {
            catalog: RwLock::new(catalog),
        });
        log.add_listener(view.clone());
        Ok(view)
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
        if !events.iter().any(|c| c.event.changes_definitions()) {
            return;
        }
        let mut catalog = self
            .catalog
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for committed in events {
            catalog.apply(committed.seq, committed.recorded_at, committed.event);
        }
    }
}
