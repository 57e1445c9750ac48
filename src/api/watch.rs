//! Query.WatchKpis: a snapshot of the current bucket of every watched series, then an
//! update for every bucket that committed events change.
//!
//! A watcher follows the log like a ReplayEvents follower (see `api/audit.rs`): it reads
//! the events after its position in chunks, collects the (KPI, series, bucket) keys they
//! touch (latest wins), and sends each key's bucket as the projection has it now. Its
//! memory is bounded by one chunk's keys however far behind it is: the backlog stays in
//! the log, and a watcher that catches up gets the latest value of every bucket it missed.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::domain::calendar::{self, Bucket};
use crate::domain::{Catalog, Event, Grain};
use crate::projection::aggregates::Labels;
use crate::projection::{Aggregates, AnsweredBucket, analysis};
use crate::proto::{self, watch_kpis_response::Item};
use crate::service::KpiService;

/// Events a watcher reads per chunk; also the bound of its pending updates.
const WATCH_CHUNK: u64 = 1024;

type WatchItem = Result<proto::WatchKpisResponse, Status>;

/// What a watcher watches.
pub struct WatchFilter {
    /// Only these KPIs; empty watches all.
    pub kpi_ids: HashSet<String>,
    /// The grain of the buckets sent.
    pub grain: Grain,
    /// Only series whose labels have these values.
    pub labels: Labels,
}

impl WatchFilter {
    fn wants(&self, kpi_id: &str, labels: &Labels) -> bool {
        (self.kpi_ids.is_empty() || self.kpi_ids.contains(kpi_id))
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A touched bucket waiting to be sent: the seq that last changed it and whether it is a
/// revision of a past bucket.
type Pending = BTreeMap<(String, Labels, i64), (Bucket, u64, bool)>;

/// One WatchKpis stream.
pub struct Watcher {
    /// The service.
    pub service: KpiService,
    /// What to watch.
    pub filter: WatchFilter,
    /// The next seq to look at.
    pub next: u64,
    /// Whether to start with a snapshot.
    pub snapshot: bool,
    /// The durable head.
    pub head: watch::Receiver<u64>,
    /// Idle interval.
    pub heartbeat: Duration,
    /// Server shutdown.
    pub shutdown: CancellationToken,
    /// Where the items go.
    pub sender: mpsc::Sender<WatchItem>,
}

fn bucket_update(
    kpi_id: &str,
    answered: &AnsweredBucket,
    seq: u64,
    revised: bool,
    targets: Vec<proto::TargetStatus>,
) -> proto::BucketUpdate {
    proto::BucketUpdate {
        kpi_id: kpi_id.to_owned(),
        bucket: Some(super::query::bucket(answered)),
        seq,
        revised,
        targets,
    }
}

/// The status of every target of `kpi_id` now, for the updates of that KPI.
fn target_statuses(
    catalog: &Catalog,
    aggregates: &Aggregates,
    kpi_id: &str,
    now: DateTime<Utc>,
) -> Vec<proto::TargetStatus> {
    catalog
        .targets(Some(kpi_id))
        .filter_map(|target| analysis::target_status(aggregates, target, now).ok())
        .map(|answer| super::query::target_status(&answer))
        .collect()
}

fn heartbeat(head_seq: u64) -> proto::Heartbeat {
    proto::Heartbeat {
        head_seq,
        at: Some(crate::proto::to_proto::timestamp(Utc::now())),
    }
}

impl Watcher {
    async fn send(&self, item: Item) -> bool {
        self.sender
            .send(Ok(proto::WatchKpisResponse { item: Some(item) }))
            .await
            .is_ok()
    }

    /// Runs until the client goes away or the server shuts down.
    pub async fn run(mut self) {
        let head = *self.head.borrow_and_update();
        if self.snapshot {
            if !self.send_snapshot(head).await {
                return;
            }
            self.next = head + 1;
        }
        loop {
            let head = *self.head.borrow_and_update();
            while self.next <= head {
                let to = head.min(self.next.saturating_add(WATCH_CHUNK - 1));
                if !self.send_changes(to).await {
                    return;
                }
            }
            match super::wait_for_more(&mut self.head, self.heartbeat, &self.shutdown, &self.sender)
                .await
            {
                super::Wake::HeadMoved => {}
                super::Wake::Stop => return,
                super::Wake::Idle => {
                    let head_seq = (self.next - 1).min(*self.head.borrow());
                    if !self.send(Item::Heartbeat(heartbeat(head_seq))).await {
                        return;
                    }
                }
            }
        }
    }

    /// The current bucket of every watched series, then the end-of-snapshot marker.
    async fn send_snapshot(&self, head: u64) -> bool {
        let now = Utc::now();
        let updates: Vec<proto::BucketUpdate> = {
            let catalog = self.service.catalog().read();
            let aggregates = self.service.aggregates().read();
            let mut updates = Vec::new();
            let kpis: Vec<String> = aggregates.measured_kpis().map(str::to_owned).collect();
            for kpi_id in kpis {
                let Ok((definition, _)) = aggregates.definition(&kpi_id) else {
                    continue;
                };
                let current = calendar::bucket_of(self.filter.grain, definition.timezone, now);
                let targets = target_statuses(&catalog, &aggregates, &kpi_id, now);
                for labels in aggregates.series_of(&kpi_id) {
                    if !self.filter.wants(&kpi_id, labels) {
                        continue;
                    }
                    if let Some(answered) =
                        aggregates.series_bucket(&kpi_id, labels, self.filter.grain, current)
                    {
                        updates.push(bucket_update(
                            &kpi_id,
                            &answered,
                            head,
                            false,
                            targets.clone(),
                        ));
                    }
                }
            }
            updates
        };
        for update in updates {
            if !self.send(Item::Snapshot(update)).await {
                return false;
            }
        }
        self.send(Item::SnapshotComplete(heartbeat(head))).await
    }

    /// Reads `next..=to`, and sends the buckets those events changed.
    async fn send_changes(&mut self, to: u64) -> bool {
        let log = self.service.log().clone();
        let from = self.next;
        let Some(touched) = super::read_for_stream(&self.sender, move || {
            let mut touched = Vec::new();
            for stored in log.read(from, to) {
                let stored = stored?;
                match stored.event {
                    Event::MeasurementRecorded(m) => touched.push((stored.seq, m, false)),
                    Event::MeasurementRetracted { retracted_seq, .. } => {
                        if let Some(Ok(original)) = log.read(retracted_seq, retracted_seq).next()
                            && let Event::MeasurementRecorded(m) = original.event
                        {
                            touched.push((stored.seq, m, true));
                        }
                    }
                    _ => {}
                }
            }
            Ok(touched)
        })
        .await
        else {
            return false;
        };
        let now = Utc::now();
        let updates: Vec<proto::BucketUpdate> = {
            let catalog = self.service.catalog().read();
            let aggregates = self.service.aggregates().read();
            let mut pending = Pending::new();
            for (seq, measurement, retraction) in touched {
                if !self.filter.wants(&measurement.kpi_id, &measurement.labels) {
                    continue;
                }
                let Ok((definition, _)) = aggregates.definition(&measurement.kpi_id) else {
                    continue;
                };
                let bucket = calendar::bucket_of(
                    self.filter.grain,
                    definition.timezone,
                    measurement.occurred_at,
                );
                let revised = retraction || bucket.end <= now;
                let key = (
                    measurement.kpi_id,
                    measurement.labels,
                    bucket.key().unix_seconds(),
                );
                let entry = pending.entry(key).or_insert((bucket, seq, revised));
                entry.1 = seq;
                entry.2 |= revised;
            }
            // Target status once per KPI of the chunk, not once per bucket.
            let mut statuses: BTreeMap<String, Vec<proto::TargetStatus>> = BTreeMap::new();
            pending
                .into_iter()
                .filter_map(|((kpi_id, labels, _), (bucket, seq, revised))| {
                    let targets = statuses
                        .entry(kpi_id.clone())
                        .or_insert_with(|| target_statuses(&catalog, &aggregates, &kpi_id, now))
                        .clone();
                    aggregates
                        .series_bucket(&kpi_id, &labels, self.filter.grain, bucket)
                        .map(|answered| bucket_update(&kpi_id, &answered, seq, revised, targets))
                })
                .collect()
        };
        for update in updates {
            if !self.send(Item::Update(update)).await {
                return false;
            }
        }
        self.next = to + 1;
        true
    }
}
