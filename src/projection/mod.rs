//! Read models folded from the log: rebuilt from it on start, then kept current by the
//! writer's commit notifications (after the flush, before the acknowledgement, so a client
//! reads its own writes).

pub mod catalog;

pub use catalog::CatalogView;
