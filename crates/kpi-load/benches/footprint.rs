//! What the aggregate read model holds, per grain, as the kpi-load workload grows: buckets
//! and bytes (entries plus their states' heap), every fifth of the stream.
//!
//! Run with `cargo bench -p kpi-load --bench footprint -- MEASUREMENTS KPIS` (default 10,000,000 and
//! 1000); no server, the workload folded straight into `Aggregates`.

use kpi_load::workload::{Workload, WorkloadConfig, default_end};
use kpi_service::domain::{Event, Grain};
use kpi_service::projection::Aggregates;
use kpi_service::proto::from_proto;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let measurements: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let kpis: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let config = WorkloadConfig {
        measurements,
        kpis,
        ..WorkloadConfig::ending_at(default_end(chrono::Utc::now()))
    };
    let workload = Workload::new(config).expect("a valid workload");
    let mut aggregates = Aggregates::default();
    let mut seq = 0;
    for definition in workload.definitions() {
        let definition = from_proto::kpi_definition(definition, "kpi").expect("valid");
        seq += 1;
        aggregates.apply(seq, &Event::KpiDefined { definition }, |_| None);
    }
    let fifth = (measurements / 5).max(1);
    for index in 0..measurements {
        let received = workload.end();
        let measurement =
            from_proto::measurement(workload.measurement(index), "m", received).expect("valid");
        seq += 1;
        aggregates.apply(seq, &Event::MeasurementRecorded(measurement), |_| None);
        if (index + 1) % fifth == 0 || index + 1 == measurements {
            let footprint = aggregates.footprint();
            let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
            let total: usize = footprint.bytes.iter().sum();
            println!(
                "{} measurements: {} series, {:.1} MiB in buckets",
                index + 1,
                footprint.series,
                mib(total)
            );
            for (slot, grain) in Grain::ALL.iter().enumerate() {
                println!(
                    "  {grain:?}: {} buckets, {:.1} MiB",
                    footprint.buckets[slot],
                    mib(footprint.bytes[slot])
                );
            }
        }
    }
}
