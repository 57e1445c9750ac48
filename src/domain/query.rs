//! The questions clients ask the read side and the answers they get, free of the wire
//! format and of where the answers come from: `proto::from_proto` builds the questions,
//! the read models and the service answer them, `proto::to_proto` turns the answers into
//! messages.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use chrono::{DateTime, Utc};

use super::calendar::Bucket;
use super::target_status::{TargetState, Verdict};
use super::trend::{Prediction, TrendMethod, TrendReport};
use super::{Grain, Summary, TargetEntry};

/// Label values of one series, by dimension.
pub type Labels = BTreeMap<String, String>;

/// How empty buckets are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// Left out.
    #[default]
    None,
    /// Sent with count 0 and no value.
    Absent,
    /// Sent with count 0 and value 0.
    Zero,
}

/// A GetAggregates question, checked against the KPI by [`Aggregates::query`](crate::projection::Aggregates::query).
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateQuery {
    /// The KPI.
    pub kpi_id: String,
    /// Bucket size.
    pub grain: Grain,
    /// Buckets overlapping [start, end) are answered.
    pub start: DateTime<Utc>,
    /// End of the range (exclusive).
    pub end: DateTime<Utc>,
    /// Equality filter on declared dimensions.
    pub filter: Labels,
    /// Dimensions to group by; empty merges all series.
    pub group_by: Vec<String>,
    /// Empty buckets.
    pub fill: Fill,
}

/// One bucket of one group of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnsweredBucket {
    /// The group's label values (the group-by dimensions).
    pub labels: Labels,
    /// Where the bucket lies.
    pub bucket: Bucket,
    /// Its aggregate.
    pub summary: Summary,
    /// The KPI definition version it was computed under.
    pub definition_version: u64,
}

/// A GetTrend question.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendQuery {
    /// The KPI.
    pub kpi_id: String,
    /// Bucket size.
    pub grain: Grain,
    /// Buckets in the window (2..=1000), the last one containing `evaluated_at`.
    pub window: u32,
    /// Forecast buckets after the window (0..=1000).
    pub horizon: u32,
    /// The time whose bucket ends the window.
    pub evaluated_at: DateTime<Utc>,
    /// Equality filter on declared dimensions.
    pub filter: Labels,
    /// Forecast method.
    pub method: TrendMethod,
}

/// The answer to a GetTrend question.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendAnswer {
    /// The window's buckets, oldest first (empty ones included, with count 0).
    pub buckets: Vec<AnsweredBucket>,
    /// The statistics.
    pub report: TrendReport,
    /// The forecast buckets with their predictions.
    pub forecast: Vec<(Bucket, Prediction)>,
}

/// The status of one LEVEL period.
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodVerdict {
    /// The period.
    pub bucket: Bucket,
    /// The KPI's value in it, if any.
    pub actual: Option<f64>,
    /// Its state.
    pub state: TargetState,
    /// Whether it contains the evaluation time.
    pub current: bool,
}

/// The status of one target.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetAnswer {
    /// The target.
    pub target: TargetEntry,
    /// The verdict.
    pub verdict: Verdict,
    /// The KPI's value so far (cumulative sum, or the current period's level).
    pub actual: Option<f64>,
    /// Grain of `verdict.required_rate`.
    pub rate_grain: Grain,
    /// When the fitted line reaches the target, if it does.
    pub estimated_reached_at: Option<DateTime<Utc>>,
    /// LEVEL targets: every period so far.
    pub periods: Vec<PeriodVerdict>,
}

/// A point of the log a query is answered at ("as known at").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The events with seq <= this.
    Seq(u64),
    /// The events recorded at or before this time.
    RecordedAt(DateTime<Utc>),
}

/// Which targets GetTargetStatus judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSelector {
    /// One target.
    Target(String),
    /// Every target of a KPI.
    Kpi(String),
}

/// A WatchKpis question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchQuery {
    /// Only these KPIs; empty watches all.
    pub kpi_ids: Vec<String>,
    /// The grain of the buckets sent.
    pub grain: Grain,
    /// Only series whose labels have these values.
    pub labels: Labels,
    /// The first seq to follow; 0 starts with a snapshot of the current buckets.
    pub from_seq: u64,
}

/// The RPC a stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Query.WatchKpis.
    WatchKpis,
    /// Audit.ReplayEvents.
    ReplayEvents,
}

/// One open stream as ListStreams shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// Server-assigned id.
    pub id: u64,
    /// Which RPC.
    pub kind: StreamKind,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// When it was opened.
    pub opened_at: DateTime<Utc>,
    /// Every event up to this seq has been handled.
    pub position: u64,
    /// Messages handed to the transport.
    pub sent: u64,
    /// Updates held, not yet handed to the transport.
    pub pending: u64,
    /// The most updates held at once.
    pub max_pending: u64,
}

/// The open server streams, as ListStreams answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedStreams {
    /// Every open stream.
    pub streams: Vec<StreamInfo>,
    /// The durable head when they were listed.
    pub head_seq: u64,
    /// Most streams open at once.
    pub max_streams: usize,
    /// Most bucket updates a watcher collects before it sends them.
    pub watch_pending_limit: usize,
}

/// A changed bucket of a watched series, as a watcher sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketChange {
    /// The KPI.
    pub kpi_id: String,
    /// The bucket as the projection has it now.
    pub bucket: AnsweredBucket,
    /// The seq that last changed it (the head, in a snapshot).
    pub seq: u64,
    /// Whether it revises a past bucket (a late measurement or a retraction).
    pub revised: bool,
    /// The status of every target of the KPI now.
    pub targets: Vec<TargetAnswer>,
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// At this seq.
    Seq(u64),
    /// At the first event recorded at or after this time.
    RecordedAt(DateTime<Utc>),
}

/// A ReplayEvents question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayQuery {
    /// Where to start; `None` starts at seq 1.
    pub start: Option<ReplayStart>,
    /// The last seq to send; `None` sends up to the head (or forever, when following).
    pub to_seq: Option<u64>,
    /// Only events about these KPIs; empty sends every event.
    pub kpi_ids: Vec<String>,
    /// Whether to keep following the head.
    pub follow: bool,
}

/// The answer of VerifyLog: how far the stored log checked out (`store::EventLog::verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Events whose records, links and hashes checked out (all of them when the log is
    /// intact; those before the break otherwise).
    pub checked_events: u64,
    /// The committed head seq when verification started; later appends are not checked.
    pub head_seq: u64,
    /// The head hash recomputed from the records, or the first break.
    pub result: Result<[u8; 32], ChainBreak>,
}

/// The first place where the stored log does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The first seq that cannot be trusted. A record that does not decode is found
    /// exactly; a hash mismatch is found per segment, so this is the segment's first seq.
    pub seq: u64,
    /// What is wrong, for a person.
    pub reason: String,
    /// The hash recomputed from the records before the break, where one applies.
    pub expected_hash: Option<[u8; 32]>,
    /// The hash stored in the segment, where one applies.
    pub stored_hash: Option<[u8; 32]>,
}

/// The answer of GetLogInfo: the durable head and how the read models were restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogInfo {
    /// The durable head seq (also the number of events).
    pub head_seq: u64,
    /// The chain hash at the head.
    pub head_hash: [u8; 32],
    /// When the head event was recorded; `None` for an empty log.
    pub head_recorded_at: Option<DateTime<Utc>>,
    /// The seq of the snapshot the read models started from (0: none).
    pub restored_snapshot_seq: u64,
    /// Events folded from the log at start, after the snapshot.
    pub replayed_events: u64,
    /// The head signed by the server, when it has a signing key.
    pub signed_head: Option<crate::domain::signed_head::SignedHead>,
}
