//! What the power-cut test shares: the `kpi-server` process it runs, and its workload.

pub mod server;
pub mod workload;
