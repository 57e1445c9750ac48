//! The power-cut test's workload: the KPIs it defines (one of every kind the log folds
//! differently, two time zones), and its measurements, each a pure function of the seed
//! and the measurement's key so an acknowledged measurement can be re-sent exactly.

use std::collections::BTreeMap;
use std::fmt;

use kpi_service::proto::{self, KpiDefinition, KpiKind, Measurement};
use prost_types::Timestamp;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// Days before the test's start that measurements may have occurred: several months, so
/// MONTH buckets differ from DAY buckets and late measurements touch old buckets.
pub const SPAN_DAYS: i64 = 75;

const SECONDS_PER_DAY: i64 = 86_400;

/// The label every KPI declares, and its values.
const CHANNEL: &str = "channel";
const CHANNELS: [&str; 3] = ["web", "shop", "app"];

/// Distinct subjects of the DISTINCT KPI: few enough to repeat, many enough for a sketch.
const VISITORS: u32 = 5_000;

/// A batch: the `batch`-th one `writer` sent in `round`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    pub round: u32,
    pub writer: u8,
    pub batch: u32,
}

/// One measurement: the `index`-th of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey {
    pub batch: BatchKey,
    pub index: u16,
}

impl fmt::Display for EventKey {
    /// The measurement's `event_id`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pc-r{}-w{}-b{}-m{}",
            self.batch.round, self.batch.writer, self.batch.batch, self.index
        )
    }
}

impl EventKey {
    /// The key an `event_id` written by `Display` names; `None` for any other id.
    pub fn parse(event_id: &str) -> Option<Self> {
        let mut parts = event_id.strip_prefix("pc-")?.split('-');
        let round = parts.next()?.strip_prefix('r')?.parse().ok()?;
        let writer = parts.next()?.strip_prefix('w')?.parse().ok()?;
        let batch = parts.next()?.strip_prefix('b')?.parse().ok()?;
        let index = parts.next()?.strip_prefix('m')?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            batch: BatchKey {
                round,
                writer,
                batch,
            },
            index,
        })
    }

    /// A number that differs for every key, to seed the measurement's generator.
    fn mix(&self) -> u64 {
        (u64::from(self.batch.round) << 48)
            ^ (u64::from(self.batch.writer) << 40)
            ^ (u64::from(self.batch.batch) << 16)
            ^ u64::from(self.index)
    }
}

/// How a measured KPI's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Values {
    /// Cents in [-500, 2000] EUR.
    Money,
    /// Always 1.
    One,
    /// Whole numbers in [0, 500].
    Amount,
    /// Integer scores in [low, high].
    Score(i32, i32),
    /// Milliseconds in [1, 10000], skewed low.
    Latency,
}

/// A measured KPI of the workload.
struct Measured {
    id: &'static str,
    kind: KpiKind,
    timezone: &'static str,
    values: Values,
    /// Whether measurements carry a subject (DISTINCT needs one).
    subject: bool,
}

const MEASURED: [Measured; 10] = [
    Measured {
        id: "pc_revenue",
        kind: KpiKind::Sum,
        timezone: "Europe/Amsterdam",
        values: Values::Money,
        subject: false,
    },
    Measured {
        id: "pc_orders",
        kind: KpiKind::Count,
        timezone: "America/New_York",
        values: Values::One,
        subject: false,
    },
    Measured {
        id: "pc_basket",
        kind: KpiKind::Average,
        timezone: "",
        values: Values::Amount,
        subject: false,
    },
    Measured {
        id: "pc_lowest",
        kind: KpiKind::Min,
        timezone: "",
        values: Values::Money,
        subject: false,
    },
    Measured {
        id: "pc_highest",
        kind: KpiKind::Max,
        timezone: "",
        values: Values::Money,
        subject: false,
    },
    Measured {
        id: "pc_stock",
        kind: KpiKind::Last,
        timezone: "",
        values: Values::Amount,
        subject: false,
    },
    Measured {
        id: "pc_nps",
        kind: KpiKind::Nps,
        timezone: "",
        values: Values::Score(0, 10),
        subject: false,
    },
    Measured {
        id: "pc_csat",
        kind: KpiKind::Csat,
        timezone: "",
        values: Values::Score(1, 5),
        subject: false,
    },
    Measured {
        id: "pc_reply_ms",
        kind: KpiKind::Percentile,
        timezone: "",
        values: Values::Latency,
        subject: false,
    },
    Measured {
        id: "pc_visitors",
        kind: KpiKind::Distinct,
        timezone: "Europe/Amsterdam",
        values: Values::One,
        subject: true,
    },
];

/// The RATIO KPI, revenue per order, defined after its operands.
const RATIO_ID: &str = "pc_revenue_per_order";

/// Every KPI to define, operands before the ratio over them.
pub fn kpi_definitions() -> Vec<KpiDefinition> {
    let mut definitions: Vec<KpiDefinition> = MEASURED
        .iter()
        .map(|kpi| definition(kpi.id, kpi.kind, kpi.timezone))
        .collect();
    let mut ratio = definition(RATIO_ID, KpiKind::Ratio, "");
    ratio.ratio = Some(proto::RatioSettings {
        numerator_kpi_id: "pc_revenue".into(),
        denominator_kpi_id: "pc_orders".into(),
        scale: Some(1.0),
    });
    definitions.push(ratio);
    definitions
}

fn definition(id: &str, kind: KpiKind, timezone: &str) -> KpiDefinition {
    let direction = if kind == KpiKind::Percentile {
        proto::Direction::LowerIsBetter
    } else {
        proto::Direction::HigherIsBetter
    };
    KpiDefinition {
        id: id.into(),
        name: format!("power-cut {id}"),
        description: String::new(),
        unit: String::new(),
        kind: kind.into(),
        direction: direction.into(),
        timezone: timezone.into(),
        dimensions: vec![CHANNEL.into()],
        ratio: None,
    }
}

/// The measurement `key` stands for: the same for the same seed, key and `base`.
/// `base_seconds` is the test's start (Unix seconds); every measurement occurred within
/// `SPAN_DAYS` before it.
pub fn measurement(seed: u64, key: EventKey, base_seconds: i64) -> Measurement {
    let mut rng = Pcg64Mcg::seed_from_u64(seed ^ key.mix().wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let kpi = &MEASURED[rng.random_range(0..MEASURED.len())];
    let value = match kpi.values {
        Values::Money => f64::from(rng.random_range(-50_000..=200_000)) / 100.0,
        Values::One => 1.0,
        Values::Amount => f64::from(rng.random_range(0..=500)),
        Values::Score(low, high) => f64::from(rng.random_range(low..=high)),
        Values::Latency => {
            let tenth = rng.random_range(1..=1_000);
            f64::from(tenth * rng.random_range(1..=10))
        }
    };
    let seconds = base_seconds - rng.random_range(60..=SPAN_DAYS * SECONDS_PER_DAY);
    let channel = CHANNELS[rng.random_range(0..CHANNELS.len())];
    let subject = if kpi.subject {
        format!("visitor-{}", rng.random_range(0..VISITORS))
    } else {
        String::new()
    };
    Measurement {
        kpi_id: kpi.id.into(),
        value,
        occurred_at: Some(Timestamp {
            seconds,
            nanos: rng.random_range(0..1_000_000_000),
        }),
        labels: BTreeMap::from([(CHANNEL.to_owned(), channel.to_owned())]),
        subject,
        event_id: key.to_string(),
    }
}

/// The range of GetAggregates that covers every measurement: from a little before the
/// span to a day after `base_seconds`.
pub fn query_range(base_seconds: i64) -> (Timestamp, Timestamp) {
    (
        Timestamp {
            seconds: base_seconds - (SPAN_DAYS + 2) * SECONDS_PER_DAY,
            nanos: 0,
        },
        Timestamp {
            seconds: base_seconds + SECONDS_PER_DAY,
            nanos: 0,
        },
    )
}

#[test]
fn event_ids_round_trip() {
    let key = EventKey {
        batch: BatchKey {
            round: 12,
            writer: 3,
            batch: 4567,
        },
        index: 89,
    };
    assert_eq!(key.to_string(), "pc-r12-w3-b4567-m89");
    assert_eq!(EventKey::parse(&key.to_string()), Some(key));
    assert_eq!(EventKey::parse("pc-r1-w2-b3"), None);
    assert_eq!(EventKey::parse("other"), None);
    assert_eq!(
        measurement(7, key, 1_800_000_000),
        measurement(7, key, 1_800_000_000)
    );
}
