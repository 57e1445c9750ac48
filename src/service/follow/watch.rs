//! WatchKpis: a snapshot of the current bucket of every watched series, then an update for
//! every bucket that committed events change.
//!
//! A watcher follows the log like a ReplayEvents follower (see `replay.rs`): it takes
//! the events after its position in chunks (from the shared live window near the head,
//! from the log behind it), collects the (KPI, series, bucket) keys they touch (latest
//! wins) and sends each key's bucket as the projection has it now. It sends whenever it
//! has caught up with the head or holds [`WATCH_PENDING_LIMIT`] keys, so its memory is
//! bounded however far behind it is: the backlog stays in the log, and a watcher that
//! catches up gets the latest value of every bucket it missed, once per bucket when they
//! fit under the limit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::mpsc;

use super::{Following, LogCursor, StreamReceiver, StreamSender};
use crate::domain::calendar::{self, Bucket, Calendar};
use crate::domain::query::{
    AnsweredBucket, BucketChange, Labels, StreamKind, TargetAnswer, WatchQuery,
};
use crate::domain::{Catalog, Event, Grain};
use crate::projection::live::{Touch, WatcherGuard};
use crate::projection::{Aggregates, analysis};
use crate::service::streams::StreamHandle;
use crate::service::{KpiService, ServiceError};

/// Updates a watcher may have ready before its client reads them; past this the watcher
/// stops reading the log (its backlog stays there, not in memory).
const WATCH_BUFFER: usize = 256;

/// Events a watcher reads per chunk.
const WATCH_CHUNK: u64 = 1024;

/// Most bucket updates a watcher collects before it sends them: a watcher behind the head
/// coalesces across chunks (latest wins) up to this many distinct buckets, then sends
/// them and waits for its client before reading further.
pub const WATCH_PENDING_LIMIT: usize = 4096;

/// What a watcher sends.
#[derive(Debug)]
pub enum WatchItem {
    /// The current bucket of a watched series, before any update.
    Snapshot(BucketChange),
    /// The end of the snapshot: every event up to `head_seq` is in it.
    SnapshotComplete {
        /// The head the snapshot was taken at.
        head_seq: u64,
        /// When it was sent.
        at: DateTime<Utc>,
    },
    /// A bucket that committed events changed.
    Update(BucketChange),
    /// Nothing to send for a while; every event up to `head_seq` was handled.
    Heartbeat {
        /// The position.
        head_seq: u64,
        /// When it was sent.
        at: DateTime<Utc>,
    },
}

impl KpiService {
    /// WatchKpis: checks the watched KPIs, takes a place among the open streams and starts
    /// the watcher (from `query.from_seq`; 0 starts with a snapshot of the current
    /// buckets); its updates come through the receiver.
    pub fn watch_kpis(
        &self,
        query: WatchQuery,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<StreamReceiver<WatchItem>, ServiceError> {
        self.check_known_kpis(&query.kpi_ids, "kpi_ids")?;
        let from_seq = query.from_seq;
        let handle = self.open_stream(StreamKind::WatchKpis, peer, from_seq.saturating_sub(1))?;
        let filter = WatchFilter {
            kpi_ids: query.kpi_ids.into_iter().collect(),
            grain: query.grain,
            labels: query.labels,
        };
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher::new(self.clone(), filter, from_seq, sender, handle);
        tokio::spawn(watcher.run());
        Ok(receiver)
    }
}

/// What a watcher watches.
struct WatchFilter {
    /// Only these KPIs; empty watches all.
    kpi_ids: HashSet<String>,
    /// The grain of the buckets sent.
    grain: Grain,
    /// Only series whose labels have these values.
    labels: Labels,
}

impl WatchFilter {
    /// Whether `kpi_id` is watched.
    fn wants_kpi(&self, kpi_id: &str) -> bool {
        self.kpi_ids.is_empty() || self.kpi_ids.contains(kpi_id)
    }

    /// Whether a series with `labels` passes the label filter.
    fn wants_labels(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether the series `labels` of `kpi_id` is watched.
    fn wants(&self, kpi_id: &str, labels: &Labels) -> bool {
        self.wants_kpi(kpi_id) && self.wants_labels(labels)
    }
}

/// A watched RATIO KPI: its id and its dimensions.
type WatchedRatio = (Arc<str>, Vec<String>);

/// The watched RATIO KPIs by operand: a measurement of an operand changes the bucket of
/// the ratio's series that its labels, restricted to the ratio's dimensions, name.
#[derive(Default)]
struct WatchedRatios {
    /// Operand KPI id -> (ratio KPI id, the ratio's dimensions).
    by_operand: HashMap<String, Vec<WatchedRatio>>,
    /// The catalog's last event that affects validation when this was built.
    built_at: Option<u64>,
}

impl WatchedRatios {
    /// Builds the index again when the catalog may have changed since it was built (an
    /// event that affects validation came after).
    fn refresh(&mut self, filter: &WatchFilter, aggregates: &Aggregates, catalog_changed_at: u64) {
        if self.built_at == Some(catalog_changed_at) {
            return;
        }
        self.by_operand.clear();
        for (id, definition) in aggregates.ratio_kpis() {
            let Some(ratio) = definition.ratio.as_ref().filter(|_| filter.wants_kpi(id)) else {
                continue;
            };
            let watched: WatchedRatio = (id.into(), definition.dimensions.clone());
            for operand in [&ratio.numerator_kpi_id, &ratio.denominator_kpi_id] {
                self.by_operand
                    .entry(operand.clone())
                    .or_default()
                    .push(watched.clone());
            }
        }
        self.built_at = Some(catalog_changed_at);
    }

    /// The watched ratios over `operand`.
    fn over(&self, operand: &str) -> &[WatchedRatio] {
        self.by_operand.get(operand).map_or(&[], Vec::as_slice)
    }
}

/// A touched bucket waiting to be sent: the seq that last changed it and whether it is a
/// revision of a past bucket.
type Pending = BTreeMap<(Arc<str>, Arc<Labels>, i64), (Bucket, u64, bool)>;

/// One WatchKpis stream.
struct Watcher {
    service: KpiService,
    filter: WatchFilter,
    /// The next seq to look at.
    next: u64,
    /// Whether to start with a snapshot.
    snapshot: bool,
    /// The stream it sends on.
    stream: Following<WatchItem>,
    /// Where the watcher reads the log behind the live window; taken while a read runs.
    cursor: Option<LogCursor>,
    /// Bucket lookups per timezone of the watched KPIs.
    calendars: HashMap<Tz, Calendar>,
    /// The watched RATIO KPIs, found through their operands' measurements.
    ratios: WatchedRatios,
    /// Keeps the live window filled while the watcher runs.
    _live: WatcherGuard,
}

fn bucket_change(
    kpi_id: &str,
    bucket: AnsweredBucket,
    seq: u64,
    revised: bool,
    targets: Vec<TargetAnswer>,
) -> BucketChange {
    BucketChange {
        kpi_id: kpi_id.to_owned(),
        bucket,
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
) -> Vec<TargetAnswer> {
    catalog
        .targets(Some(kpi_id))
        .filter_map(|target| analysis::target_status(aggregates, target, now).ok())
        .collect()
}

impl Watcher {
    /// A watcher of `filter` from `from_seq` (0: start with a snapshot) that sends to
    /// `sender` and reports through `handle`.
    fn new(
        service: KpiService,
        filter: WatchFilter,
        from_seq: u64,
        sender: StreamSender<WatchItem>,
        handle: StreamHandle,
    ) -> Self {
        Self {
            stream: Following::new(&service, sender, handle),
            _live: service.models.live.register_watcher(),
            cursor: Some(LogCursor::new(service.log.clone())),
            calendars: HashMap::new(),
            ratios: WatchedRatios::default(),
            next: from_seq.max(1),
            snapshot: from_seq == 0,
            service,
            filter,
        }
    }

    /// Runs until the client goes away or the server shuts down.
    async fn run(mut self) {
        let head = self.stream.head();
        if self.snapshot {
            if !self.send_snapshot(head).await {
                return;
            }
            self.next = head + 1;
            self.stream.stats().set_position(head);
        }
        let mut pending = Pending::new();
        loop {
            let head = self.stream.head();
            while self.next <= head {
                let to = head.min(self.next.saturating_add(WATCH_CHUNK - 1));
                let Some(touched) = self.read(to).await else {
                    return;
                };
                let mut touched = touched.into_iter().peekable();
                loop {
                    self.collect(&mut pending, &mut touched);
                    self.stream.stats().set_pending(pending.len());
                    if touched.peek().is_none() {
                        break;
                    }
                    // Full: send what is pending before collecting the rest of the chunk.
                    if !self.flush(&mut pending).await {
                        return;
                    }
                }
                self.next = to + 1;
                if pending.len() >= WATCH_PENDING_LIMIT && !self.flush(&mut pending).await {
                    return;
                }
            }
            if !pending.is_empty() && !self.flush(&mut pending).await {
                return;
            }
            let beat = |head_seq| WatchItem::Heartbeat {
                head_seq,
                at: Utc::now(),
            };
            if !self.stream.for_more(self.next - 1, beat).await {
                return;
            }
        }
    }

    /// The current bucket of every watched series, then the end-of-snapshot marker.
    async fn send_snapshot(&self, head: u64) -> bool {
        let now = Utc::now();
        let updates: Vec<BucketChange> = {
            let catalog = self.service.catalog.read();
            let aggregates = self.service.aggregates.read();
            let mut updates = Vec::new();
            let kpis: Vec<String> = aggregates
                .measured_kpis()
                .chain(aggregates.ratio_kpis().map(|(id, _)| id))
                .filter(|id| self.filter.wants_kpi(id))
                .map(str::to_owned)
                .collect();
            for kpi_id in kpis {
                let Ok((definition, _)) = aggregates.definition(&kpi_id) else {
                    continue;
                };
                let grain = self.filter.grain;
                let current = calendar::bucket_of(grain, definition.timezone, now);
                let targets = target_statuses(&catalog, &aggregates, &kpi_id, now);
                let buckets: Vec<AnsweredBucket> = if definition.ratio.is_some() {
                    aggregates.ratio_series_buckets(&kpi_id, grain, current)
                } else {
                    aggregates
                        .series_of(&kpi_id)
                        .filter_map(|labels| {
                            aggregates.series_bucket(&kpi_id, labels, grain, current)
                        })
                        .collect()
                };
                for answered in buckets {
                    if self.filter.wants_labels(&answered.labels) {
                        updates.push(bucket_change(
                            &kpi_id,
                            answered,
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
            if !self.stream.send(WatchItem::Snapshot(update)).await {
                return false;
            }
        }
        self.stream
            .send(WatchItem::SnapshotComplete {
                head_seq: head,
                at: Utc::now(),
            })
            .await
    }

    /// The measurements that `next..=to` records or retracts, from the live window when it
    /// covers the range, else from the log. `None` when the stream is over.
    async fn read(&mut self, to: u64) -> Option<Vec<(u64, Measured)>> {
        let from = self.next;
        let mut touches = Vec::new();
        {
            let catalog_changed_at = self.service.catalog.read().last_validation_change_seq();
            let aggregates = self.service.aggregates.read();
            self.ratios
                .refresh(&self.filter, &aggregates, catalog_changed_at);
        }
        let (filter, ratios) = (&self.filter, &self.ratios);
        let in_window = self.service.models.live.touches(
            from,
            to,
            |touch| match touch {
                Touch::Recorded { kpi_id, labels, .. } => {
                    filter.wants(kpi_id, labels) || !ratios.over(kpi_id).is_empty()
                }
                Touch::Retracted { .. } => true,
            },
            &mut touches,
        );
        let needs_log = !in_window
            || touches
                .iter()
                .any(|(_, touch)| matches!(touch, Touch::Retracted { .. }));
        if !needs_log {
            return Some(touches.into_iter().filter_map(resolved).collect());
        }
        let mut cursor = self.cursor.take()?;
        let (touched, cursor) = self
            .stream
            .read(move || {
                if !in_window {
                    cursor.read(from, to, |stored| {
                        touches.extend(Touch::of(&stored.event).map(|touch| (stored.seq, touch)));
                        Ok(())
                    })?;
                }
                let log = cursor.log();
                let mut touched = Vec::with_capacity(touches.len());
                for (seq, touch) in touches {
                    match touch {
                        Touch::Retracted { retracted_seq } => {
                            if let Some(original) = log.read(retracted_seq, retracted_seq).next()
                                && let Event::MeasurementRecorded(m) = original?.event
                            {
                                touched.push((
                                    seq,
                                    Measured {
                                        kpi_id: m.kpi_id.into(),
                                        labels: Arc::new(m.labels),
                                        occurred_at: m.occurred_at,
                                        retraction: true,
                                    },
                                ));
                            }
                        }
                        recorded => touched.extend(resolved((seq, recorded))),
                    }
                }
                Ok((touched, cursor))
            })
            .await?;
        self.cursor = Some(cursor);
        Some(touched)
    }

    /// Adds the watched buckets of `touched` to `pending` (latest seq wins), taking
    /// touches while they cannot take `pending` past [`WATCH_PENDING_LIMIT`] keys: the
    /// rest stays in `touched` for after a flush.
    fn collect(
        &mut self,
        pending: &mut Pending,
        touched: &mut std::iter::Peekable<impl Iterator<Item = (u64, Measured)>>,
    ) {
        let now = Utc::now();
        let aggregates = self.service.aggregates.read();
        let calendars = &mut self.calendars;
        let grain = self.filter.grain;
        let mut add = |pending: &mut Pending,
                       kpi_id: Arc<str>,
                       labels: Arc<Labels>,
                       seq: u64,
                       measured: &Measured| {
            let Ok((definition, _)) = aggregates.definition(&kpi_id) else {
                return;
            };
            let bucket = calendars
                .entry(definition.timezone)
                .or_insert_with(|| Calendar::new(definition.timezone))
                .bucket_of(grain, measured.occurred_at);
            let revised = measured.retraction || bucket.end <= now;
            let key = (kpi_id, labels, bucket.key().unix_seconds());
            let entry = pending.entry(key).or_insert((bucket, seq, revised));
            entry.1 = seq;
            entry.2 |= revised;
        };
        while let Some((_, next)) = touched.peek() {
            // A touch adds at most one key, and one per ratio over its KPI.
            let most = 1 + self.ratios.over(&next.kpi_id).len();
            if !pending.is_empty() && pending.len() + most > WATCH_PENDING_LIMIT {
                return;
            }
            let Some((seq, measured)) = touched.next() else {
                return;
            };
            if self.filter.wants(&measured.kpi_id, &measured.labels) {
                add(
                    pending,
                    measured.kpi_id.clone(),
                    measured.labels.clone(),
                    seq,
                    &measured,
                );
            }
            // A ratio's series: the operand's labels restricted to the ratio's dimensions.
            for (ratio_id, dimensions) in self.ratios.over(&measured.kpi_id) {
                let labels: Labels = measured
                    .labels
                    .iter()
                    .filter(|(key, _)| dimensions.contains(key))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                if self.filter.wants_labels(&labels) {
                    add(pending, ratio_id.clone(), Arc::new(labels), seq, &measured);
                }
            }
        }
    }

    /// Sends the current value of every pending bucket; empties `pending`.
    async fn flush(&self, pending: &mut Pending) -> bool {
        let now = Utc::now();
        let updates: Vec<BucketChange> = {
            let catalog = self.service.catalog.read();
            let aggregates = self.service.aggregates.read();
            // Target status once per KPI of the flush, not once per bucket.
            let mut statuses: BTreeMap<Arc<str>, Vec<TargetAnswer>> = BTreeMap::new();
            std::mem::take(pending)
                .into_iter()
                .filter_map(|((kpi_id, labels, _), (bucket, seq, revised))| {
                    let targets = statuses
                        .entry(kpi_id.clone())
                        .or_insert_with(|| target_statuses(&catalog, &aggregates, &kpi_id, now))
                        .clone();
                    aggregates
                        .series_bucket(&kpi_id, &labels, self.filter.grain, bucket)
                        .map(|answered| bucket_change(&kpi_id, answered, seq, revised, targets))
                })
                .collect()
        };
        let mut left = updates.len();
        for update in updates {
            if !self.stream.send(WatchItem::Update(update)).await {
                return false;
            }
            left -= 1;
            self.stream.stats().set_pending(left);
        }
        self.stream.stats().set_position(self.next - 1);
        true
    }
}

/// The measurement a touch is about, as a watcher buckets it.
struct Measured {
    kpi_id: Arc<str>,
    labels: Arc<Labels>,
    occurred_at: DateTime<Utc>,
    /// Whether the touch withdrew it (a retraction) rather than recorded it.
    retraction: bool,
}

/// A recorded touch as (seq, measurement); retractions need the log.
fn resolved((seq, touch): (u64, Touch)) -> Option<(u64, Measured)> {
    match touch {
        Touch::Recorded {
            kpi_id,
            labels,
            occurred_at,
        } => Some((
            seq,
            Measured {
                kpi_id,
                labels,
                occurred_at,
                retraction: false,
            },
        )),
        Touch::Retracted { .. } => None,
    }
}
