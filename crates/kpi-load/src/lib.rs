//! `kpi-load`: the load generator and benchmark client of kpi-server, a crate of its own so
//! that its dependencies (progress bars, histograms, random numbers, JSON) stay out of the
//! server's.
//!
//! - [`workload`]: the seeded, reproducible workload of the benchmarks and `kpi-load`.
//! - [`load`]: the `kpi-load` scenarios, a gRPC *client* of a running server.

pub mod load;
pub mod workload;
