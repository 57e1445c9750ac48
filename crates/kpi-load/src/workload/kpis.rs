//! The workload's KPIs: the source article's eight, as one numbered set
//! (`revenue_001`, `new_customers_001`, ...), repeated and cut to the requested number.

use kpi_service::proto::{self, KpiKind};

use super::CHANNEL;

/// What a KPI of the set measures; decides its kind, unit, direction and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KpiRole {
    /// Omzet: order amounts in EUR, SUM.
    Revenue,
    /// Nieuwe klanten: one per new customer, COUNT.
    NewCustomers,
    /// Websitebezoekers: one per visit, COUNT.
    WebsiteVisitors,
    /// Distinct website visitors, DISTINCT by visitor id.
    UniqueVisitors,
    /// Conversieratio: new customers per 100 visits, RATIO (no measurements of its own).
    Conversion,
    /// Klanttevredenheid: scores 1..5, CSAT.
    Csat,
    /// Net Promoter Score: scores 0..10, NPS.
    Nps,
    /// Reply time to a customer in seconds, PERCENTILE, lower is better.
    ReplyTime,
}

/// The article's KPIs in definition order: a RATIO comes after the KPIs it divides.
pub const SET: [KpiRole; 8] = [
    KpiRole::Revenue,
    KpiRole::NewCustomers,
    KpiRole::WebsiteVisitors,
    KpiRole::UniqueVisitors,
    KpiRole::Conversion,
    KpiRole::Csat,
    KpiRole::Nps,
    KpiRole::ReplyTime,
];

/// Ids carry a three-digit set number (`_001`; four digits from set 1000 on): 9999 sets.
pub const MAX_KPIS: usize = SET.len() * 9999;

/// Time zones of the sets, in turn: most in the article's, some elsewhere so that the
/// calendars of several zones are exercised.
const ZONES: [&str; 4] = [
    "Europe/Amsterdam",
    "Europe/Amsterdam",
    "Europe/Amsterdam",
    "America/New_York",
];

impl KpiRole {
    /// The id stem (`revenue` in `revenue_001`).
    pub fn stem(self) -> &'static str {
        match self {
            KpiRole::Revenue => "revenue",
            KpiRole::NewCustomers => "new_customers",
            KpiRole::WebsiteVisitors => "website_visitors",
            KpiRole::UniqueVisitors => "unique_visitors",
            KpiRole::Conversion => "conversion",
            KpiRole::Csat => "csat",
            KpiRole::Nps => "nps",
            KpiRole::ReplyTime => "reply_time",
        }
    }

    /// The kind.
    pub fn kind(self) -> KpiKind {
        match self {
            KpiRole::Revenue => KpiKind::Sum,
            KpiRole::NewCustomers | KpiRole::WebsiteVisitors => KpiKind::Count,
            KpiRole::UniqueVisitors => KpiKind::Distinct,
            KpiRole::Conversion => KpiKind::Ratio,
            KpiRole::Csat => KpiKind::Csat,
            KpiRole::Nps => KpiKind::Nps,
            KpiRole::ReplyTime => KpiKind::Percentile,
        }
    }

    /// How often, relative to the others, a measurement is of this KPI: visits are the
    /// most frequent, customers and survey answers the rarest; a RATIO gets none.
    pub fn weight(self) -> u32 {
        match self {
            KpiRole::Revenue => 3,
            KpiRole::NewCustomers | KpiRole::Csat | KpiRole::Nps => 1,
            KpiRole::WebsiteVisitors | KpiRole::UniqueVisitors => 6,
            KpiRole::Conversion => 0,
            KpiRole::ReplyTime => 2,
        }
    }

    /// True for SUM and COUNT KPIs (the ones a watch test follows).
    pub fn is_summable(self) -> bool {
        matches!(self.kind(), KpiKind::Sum | KpiKind::Count)
    }

    fn name(self) -> &'static str {
        match self {
            KpiRole::Revenue => "Revenue",
            KpiRole::NewCustomers => "New customers",
            KpiRole::WebsiteVisitors => "Website visits",
            KpiRole::UniqueVisitors => "Website visitors (distinct)",
            KpiRole::Conversion => "Conversion rate",
            KpiRole::Csat => "Customer satisfaction (CSAT)",
            KpiRole::Nps => "Net Promoter Score",
            KpiRole::ReplyTime => "Reply time to a customer",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            KpiRole::Revenue => "EUR",
            KpiRole::NewCustomers => "customers",
            KpiRole::WebsiteVisitors => "visits",
            KpiRole::UniqueVisitors => "visitors",
            KpiRole::Conversion | KpiRole::Csat => "%",
            KpiRole::Nps => "NPS",
            KpiRole::ReplyTime => "s",
        }
    }
}

/// One KPI of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadKpi {
    /// Its id, such as `revenue_001`.
    pub id: String,
    /// What it measures.
    pub role: KpiRole,
    /// Its IANA time zone.
    pub timezone: &'static str,
    /// Numerator and denominator ids of a RATIO.
    pub ratio: Option<(String, String)>,
}

impl WorkloadKpi {
    /// The definition DefineKpi takes.
    pub fn definition(&self) -> proto::KpiDefinition {
        let direction = if self.role == KpiRole::ReplyTime {
            proto::Direction::LowerIsBetter
        } else {
            proto::Direction::HigherIsBetter
        };
        proto::KpiDefinition {
            id: self.id.clone(),
            name: self.role.name().into(),
            description: "generated by kpi-load".into(),
            unit: self.role.unit().into(),
            kind: self.role.kind().into(),
            direction: direction.into(),
            timezone: self.timezone.into(),
            dimensions: vec![CHANNEL.into()],
            ratio: self
                .ratio
                .as_ref()
                .map(|(numerator, denominator)| proto::RatioSettings {
                    numerator_kpi_id: numerator.clone(),
                    denominator_kpi_id: denominator.clone(),
                    scale: Some(100.0),
                }),
        }
    }
}

/// The id of `role` in set number `set` (1-based).
fn id(role: KpiRole, set: usize) -> String {
    format!("{}_{set:03}", role.stem())
}

/// The first `count` KPIs of the repeated set.
pub fn layout(count: usize) -> Vec<WorkloadKpi> {
    (0..count)
        .map(|i| {
            let set = i / SET.len() + 1;
            let role = SET[i % SET.len()];
            WorkloadKpi {
                id: id(role, set),
                role,
                timezone: ZONES[(set - 1) % ZONES.len()],
                ratio: (role == KpiRole::Conversion).then(|| {
                    (
                        id(KpiRole::NewCustomers, set),
                        id(KpiRole::WebsiteVisitors, set),
                    )
                }),
            }
        })
        .collect()
}
