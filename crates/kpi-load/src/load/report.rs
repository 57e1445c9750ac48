//! What a scenario measured: counts, wall time and an HDR latency histogram, printed as a
//! readable table and as one JSON object per line.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// Latencies recorded in nanoseconds, 1 ns to 1 hour, with 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

/// The longest latency the histogram tells apart; longer ones count as this.
const LONGEST_NS: u64 = 3_600_000_000_000;

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty histogram.
    pub fn new() -> Latencies {
        // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 x low, 3 digits).
        let histogram = Histogram::new_with_bounds(1, LONGEST_NS, 3)
            .expect("1 ns to 1 h with 3 significant digits is a valid histogram");
        Latencies { histogram }
    }

    /// Adds one latency.
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(LONGEST_NS);
        self.histogram.saturating_record(nanos.clamp(1, LONGEST_NS));
    }

    /// Adds every latency of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Both have the same bounds, so adding cannot fail; if it did, `other` is lost
        // from the figures rather than the run.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0 to 1), in microseconds.
    pub fn quantile_us(&self, quantile: f64) -> f64 {
        micros(self.histogram.value_at_quantile(quantile))
    }

    /// The longest latency, in microseconds.
    pub fn max_us(&self) -> f64 {
        micros(self.histogram.max())
    }
}

fn micros(nanos: u64) -> f64 {
    Duration::from_nanos(nanos).as_secs_f64() * 1e6
}

/// The result of one scenario run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario: `ingest`, `record`, `query`, `watch`, `generate`, `setup`, `sled`,
    /// `sled_query`.
    pub scenario: &'static str,
    /// The options that shaped the run (producers, batch, ...), in print order.
    pub params: Vec<(&'static str, Value)>,
    /// Things processed: measurements acknowledged, buckets received, ...
    pub items: u64,
    /// Calls made (or batches, or updates), whose latencies are in `latencies`.
    pub ops: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Latency per op.
    pub latencies: Latencies,
    /// Further figures of the scenario, in print order.
    pub extra: Vec<(&'static str, Value)>,
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        // u64 -> f64 rounds above 2^53, far beyond any count here.
        count as f64 / seconds
    } else {
        0.0
    }
}

/// One decimal place is enough for microseconds and rates.
fn rounded(value: f64) -> Value {
    Value::from((value * 10.0).round() / 10.0)
}

impl Report {
    /// Items per second of wall time.
    pub fn items_per_s(&self) -> f64 {
        per_second(self.items, self.elapsed)
    }

    /// Ops per second of wall time.
    pub fn ops_per_s(&self) -> f64 {
        per_second(self.ops, self.elapsed)
    }

    /// The figures in JSON order: the params, then the common figures, then the extras.
    fn entries(&self) -> Vec<(&'static str, Value)> {
        let mut entries = vec![("scenario", Value::from(self.scenario))];
        entries.extend(self.params.iter().cloned());
        entries.extend([
            ("items", Value::from(self.items)),
            (
                "seconds",
                Value::from((self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0),
            ),
            ("items_per_s", rounded(self.items_per_s())),
            ("ops", Value::from(self.ops)),
            ("ops_per_s", rounded(self.ops_per_s())),
            ("p50_us", rounded(self.latencies.quantile_us(0.5))),
            ("p90_us", rounded(self.latencies.quantile_us(0.9))),
            ("p99_us", rounded(self.latencies.quantile_us(0.99))),
            ("max_us", rounded(self.latencies.max_us())),
            ("latencies", Value::from(self.latencies.count())),
        ]);
        entries.extend(self.extra.iter().cloned());
        entries
    }

    /// The report as one line of JSON (no newline).
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
    }

    /// The report as a table a person reads.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let _ = writeln!(out, "== {} ({})", self.scenario, params.join(" "));
        let _ = writeln!(
            out,
            "  {:<14} {:>14}   {:>14.1} /s",
            "items",
            self.items,
            self.items_per_s()
        );
        let _ = writeln!(
            out,
            "  {:<14} {:>14}   {:>14.1} /s",
            "ops",
            self.ops,
            self.ops_per_s()
        );
        let _ = writeln!(
            out,
            "  {:<14} {:>14.3}",
            "seconds",
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  {:<14} p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (n = {})",
            "latency µs",
            self.latencies.quantile_us(0.5),
            self.latencies.quantile_us(0.9),
            self.latencies.quantile_us(0.99),
            self.latencies.max_us(),
            self.latencies.count()
        );
        for (key, value) in &self.extra {
            match value {
                // A list (such as the buckets of an answer) reads better one item a line.
                Value::Array(items) => {
                    let _ = writeln!(out, "  {key:<14} {} items", items.len());
                    for item in items {
                        let _ = writeln!(out, "  {:<14}   {item}", "");
                    }
                }
                _ => {
                    let _ = writeln!(out, "  {key:<14} {value}");
                }
            }
        }
        out
    }
}

impl Serialize for Report {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries = self.entries();
        let mut map = serializer.serialize_map(Some(entries.len()))?;
        for (key, value) in &entries {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}
