//! Realistic values per KPI role: order amounts with cents, survey scores with a plausible
//! spread, reply times over several decades, visitor ids from a bounded population.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rand::RngExt;
use rand_pcg::Pcg64Mcg;

use super::kpis::{KpiRole, WorkloadKpi};
use super::{CHANNEL, CHANNELS};
use kpi_service::proto::{self, to_proto};

/// Distinct visitors per set of KPIs: enough for a full HyperLogLog, few enough that
/// visitors come back.
const VISITORS: u32 = 50_000;
/// CSAT answers 1..5: mostly satisfied, as surveys usually are.
const CSAT_WEIGHTS: [u32; 5] = [4, 6, 15, 40, 35];
/// NPS answers 0..10: some detractors, many passives and promoters (an NPS around +20).
const NPS_WEIGHTS: [u32; 11] = [2, 1, 2, 2, 3, 4, 6, 12, 18, 25, 25];
/// Reply times are log-uniform over 1 minute to 2 days, in seconds.
const REPLY_MIN_LN: f64 = 4.094_344_562_222_1; // ln(60)
const REPLY_MAX_LN: f64 = 12.059_046_921_215_9; // ln(172,800)

/// Index drawn from `weights` (relative frequencies).
fn weighted(rng: &mut Pcg64Mcg, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut pick = rng.random_range(0..total);
    for (index, weight) in weights.iter().enumerate() {
        if pick < *weight {
            return index;
        }
        pick -= weight;
    }
    weights.len() - 1
}

/// A measurement of `kpi` at `occurred_at` with a value, channel and subject drawn from
/// `rng`.
pub(super) fn measurement(
    kpi: &WorkloadKpi,
    occurred_at: DateTime<Utc>,
    rng: &mut Pcg64Mcg,
) -> proto::Measurement {
    let channel_weights = CHANNELS.map(|(_, weight)| weight);
    let channel = CHANNELS[weighted(rng, &channel_weights)].0;
    let mut subject = String::new();
    let value = match kpi.role {
        // Amounts of 5 to about 900 EUR with cents, most of them small: the product of two
        // uniform numbers is skewed towards zero, as order values are.
        KpiRole::Revenue => {
            let cents = 500 + rng.random_range(0..300_u32) * rng.random_range(0..300_u32);
            f64::from(cents) / 100.0
        }
        KpiRole::NewCustomers | KpiRole::WebsiteVisitors | KpiRole::Conversion => 1.0,
        KpiRole::UniqueVisitors => {
            subject = format!("visitor-{:05}", rng.random_range(0..VISITORS));
            1.0
        }
        KpiRole::Csat => f64::from(u8::try_from(weighted(rng, &CSAT_WEIGHTS) + 1).unwrap_or(5)),
        KpiRole::Nps => f64::from(u8::try_from(weighted(rng, &NPS_WEIGHTS)).unwrap_or(10)),
        KpiRole::ReplyTime => {
            let ln = REPLY_MIN_LN + rng.random::<f64>() * (REPLY_MAX_LN - REPLY_MIN_LN);
            ln.exp().round()
        }
    };
    proto::Measurement {
        kpi_id: kpi.id.clone(),
        value,
        occurred_at: Some(to_proto::timestamp(occurred_at)),
        labels: BTreeMap::from([(CHANNEL.to_owned(), channel.to_owned())]),
        subject,
        event_id: String::new(),
    }
}
