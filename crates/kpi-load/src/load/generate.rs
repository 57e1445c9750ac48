//! `kpi-load generate`: the workload as two CSV files, for loading into other systems
//! (the PostgreSQL comparison reads exactly these names and columns).
//!
//! - `kpis.csv`: `kpi_id,kind,timezone,direction,numerator,denominator`
//!   (kind and direction as the proto enum names without prefix, such as `SUM` and
//!   `LOWER_IS_BETTER`; numerator and denominator empty unless RATIO).
//! - `measurements.csv`: `kpi_id,occurred_at,value,channel,subject`
//!   (occurred_at RFC 3339 in UTC with `Z` and milliseconds; subject empty when none).
//!
//! No field of the workload contains a comma, quote or newline, so no quoting is needed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use chrono::SecondsFormat;
use indicatif::ProgressBar;
use serde_json::Value;

use super::{Latencies, LoadError, Report};
use crate::workload::{CHANNEL, Workload};
use kpi_service::proto::{self, from_proto};

/// Measurements generated between progress updates.
const PROGRESS_EVERY: u64 = 10_000;

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The enum name without its `KPI_KIND_` / `DIRECTION_` prefix.
fn kind_name(kind: i32) -> &'static str {
    proto::KpiKind::try_from(kind)
        .map(|kind| kind.as_str_name())
        .unwrap_or("KPI_KIND_UNSPECIFIED")
        .trim_start_matches("KPI_KIND_")
}

fn direction_name(direction: i32) -> &'static str {
    proto::Direction::try_from(direction)
        .map(|direction| direction.as_str_name())
        .unwrap_or("DIRECTION_UNSPECIFIED")
        .trim_start_matches("DIRECTION_")
}

/// Writes `out/kpis.csv` and `out/measurements.csv` (creating `out`).
pub fn generate(
    workload: &Workload,
    out: &Path,
    progress: &ProgressBar,
) -> Result<Report, LoadError> {
    let started = Instant::now();
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    let kpis_path = out.join("kpis.csv");
    let mut kpis = BufWriter::new(File::create(&kpis_path).map_err(io_error(&kpis_path))?);
    writeln!(kpis, "kpi_id,kind,timezone,direction,numerator,denominator")
        .map_err(io_error(&kpis_path))?;
    for definition in workload.definitions() {
        let (numerator, denominator) = definition
            .ratio
            .map(|r| (r.numerator_kpi_id, r.denominator_kpi_id))
            .unwrap_or_default();
        writeln!(
            kpis,
            "{},{},{},{},{numerator},{denominator}",
            definition.id,
            kind_name(definition.kind),
            definition.timezone,
            direction_name(definition.direction),
        )
        .map_err(io_error(&kpis_path))?;
    }
    kpis.flush().map_err(io_error(&kpis_path))?;

    let path = out.join("measurements.csv");
    let mut file = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(io_error(&path))?);
    writeln!(file, "kpi_id,occurred_at,value,channel,subject").map_err(io_error(&path))?;
    let mut written = 0_u64;
    for measurement in workload.measurements(0..workload.len()) {
        let occurred_at = measurement
            .occurred_at
            .as_ref()
            .ok_or_else(|| LoadError::Invalid("generated measurement without occurred_at".into()))
            .and_then(|ts| {
                from_proto::timestamp(ts, "occurred_at")
                    .map_err(|rejection| LoadError::Invalid(rejection.to_string()))
            })?;
        let channel = measurement.labels.get(CHANNEL).map_or("", String::as_str);
        writeln!(
            file,
            "{},{},{},{channel},{}",
            measurement.kpi_id,
            occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            measurement.value,
            measurement.subject,
        )
        .map_err(io_error(&path))?;
        written += 1;
        if written.is_multiple_of(PROGRESS_EVERY) {
            progress.inc(PROGRESS_EVERY);
        }
    }
    file.flush().map_err(io_error(&path))?;
    progress.finish_and_clear();
    Ok(Report {
        scenario: "generate",
        params: vec![
            ("out", Value::from(out.display().to_string())),
            ("kpis", Value::from(workload.kpis().len())),
            ("seed", Value::from(workload.config().seed)),
        ],
        items: written,
        ops: 0,
        elapsed: started.elapsed(),
        latencies: Latencies::new(),
        extra: Vec::new(),
    })
}
