//! The single writer: grouping of queued requests, the validation guard, deduplication,
//! seq assignment and segment building, and the preparation callers do for it.
//!
//! One thread owns everything that decides what the log contains (head seq and hash, the
//! seq of the last event that affects validation), so none of it needs a lock. It writes each group to sled and
//! hands it to the committer (`commit.rs`), which flushes and answers; meanwhile it
//! decides the next group, so building a group overlaps the fsync of the one before.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::chain::Hash;
use super::dedup::{EventIdHasher, EventIdKey, SpillJob};
use super::record::{actor_field, encode_payload, recorded_at_field};
use super::segment::{SegmentBuilder, segment_key, widen};
use super::space::DiskSpace;
use super::{AppendError, Clock, LogHead, Outcome, Shared, StoreError, lock};
use crate::domain::Event;

/// Most requests in one group: bounds the time until the first of them hears back.
const MAX_GROUP_REQUESTS: usize = 1024;
/// Most events in one group, unless a single request is larger (requests are atomic and
/// never split across groups).
const MAX_GROUP_EVENTS: usize = 65_536;
/// Most events in one segment: bounds the work of reading one event (its segment's hashes
/// are all recomputed) and of the binary searches.
const MAX_SEGMENT_EVENTS: u32 = 4096;
/// Most bytes of records in one segment (before compression). sled keeps up to 17 items in
/// a leaf and writes a whole leaf that serialises to more than a quarter of its segment
/// size (128 KiB) to a blob file of its own. With segments of at most 6 KiB no leaf gets
/// there even when the records do not compress, so sled writes no blob files (which it
/// never fsyncs, see `durability.rs`) and its cache bounds its memory: with 100 KB values
/// it kept every leaf written since open (about the size of the data written), with 6 KB
/// values its resident memory stayed flat (BENCHMARKS.md).
pub const MAX_SEGMENT_BYTES: usize = 6 * 1024;
/// What builds before format 2 wrote: up to 120 KiB of uncompressed records.
const LEGACY_SEGMENT_BYTES: usize = 120 * 1024;

/// One caller's request, prepared on the caller's thread.
pub struct WriteRequest {
    /// The events to append, in order.
    pub events: Vec<Event>,
    /// Their encoded payloads and id keys.
    pub prepared: PreparedEvents,
    /// `AppendRequest::validation_unchanged_since`.
    pub guard: Option<u64>,
    /// Where the answer goes, after the group's flush.
    pub reply: oneshot::Sender<Reply>,
}

/// The writer's answer to one request. It hands the request's events back so that the
/// caller frees them: thousands of small frees on the writer thread cost as much as the
/// fsync, and memory freed on the thread that allocated it does not contend.
pub struct Reply {
    /// The outcomes, or why there are none.
    pub result: Result<Vec<Outcome>, AppendError>,
    /// The request's events and prepared data, for the caller to drop.
    pub spent: (Vec<Event>, PreparedEvents),
}

/// What a caller computes for the writer: for each event, the encoded `actor` field (the
/// request's, when it has one) and `payload` oneof field of its `EventRecord`, back to
/// back, and the dedup key of each event_id.
///
/// prost writes fields in tag order, so `recorded_at` (tag 1) followed by these bytes
/// (`actor`, tag 2, then the payload, tags 10 and up) is exactly the encoding of the whole
/// `EventRecord`; the writer only prepends the group's `recorded_at` bytes. Encoding and
/// hashing ids are the costly parts, so they run on the callers' threads, in parallel,
/// instead of on the single writer.
#[derive(Debug, Default)]
pub struct PreparedEvents {
    bytes: Vec<u8>,
    /// End offset of each event's bytes in `bytes`.
    ends: Vec<usize>,
    /// The dedup key of each event that has an event_id.
    ids: Vec<Option<EventIdKey>>,
}

impl PreparedEvents {
    /// Encodes the actor field and payload of every event and keys its event_id.
    pub fn prepare(events: &[Event], actor: Option<&str>, hasher: &EventIdHasher) -> Self {
        let actor = actor_field(actor.unwrap_or_default());
        // A measurement record is about 100 bytes.
        let mut prepared = Self {
            bytes: Vec::with_capacity(events.len() * (112 + actor.len())),
            ends: Vec::with_capacity(events.len()),
            ids: Vec::with_capacity(events.len()),
        };
        for event in events {
            prepared.bytes.extend_from_slice(&actor);
            encode_payload(event, &mut prepared.bytes);
            prepared.ends.push(prepared.bytes.len());
            prepared.ids.push(event.event_id().map(|id| hasher.key(id)));
        }
        prepared
    }

    /// The actor and payload bytes of event `index`.
    pub fn payload(&self, index: usize) -> &[u8] {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.bytes[start..self.ends[index]]
    }
}

/// What the writer needs besides the log's state.
pub struct Settings {
    /// The source of recorded_at.
    pub clock: Clock,
    /// The free-space guard asked before each group.
    pub space: DiskSpace,
    /// Write format 1 segments of up to 120 KiB, as older builds did (tests only).
    pub legacy_layout: bool,
}

/// The deciding stage of the write side, run on its own thread.
pub struct Writer {
    segments: sled::Tree,
    shared: Arc<Shared>,
    clock: Clock,
    space: DiskSpace,
    legacy_layout: bool,
    /// The head after the last group handed to the committer (not yet durable, maybe).
    head: LogHead,
    /// Seq of the last event that affects validation, appended since open (durable or
    /// on its way); 0 before any.
    last_validation_change_seq: u64,
    committer: std::sync::mpsc::SyncSender<Applied>,
    /// Frozen parts of the dedup index, for the spill thread.
    spills: std::sync::mpsc::Sender<SpillJob>,
}

/// What the writer decided for one request of a group.
pub enum Decision {
    /// The validation guard failed: nothing of the request is appended.
    Refused,
    /// One outcome per event.
    Outcomes(Vec<Outcome>),
}

/// A group whose segments are written to sled but not yet flushed: what the committer
/// needs to make it durable, publish it and answer it.
pub struct Applied {
    /// The requests, in order.
    pub group: Vec<WriteRequest>,
    /// One decision per request.
    pub decisions: Vec<Decision>,
    /// (request, event) indexes of the appended events, in seq order from `first_seq`.
    pub appended: Vec<(usize, usize)>,
    /// Seq of the first appended event.
    pub first_seq: u64,
    /// The recorded_at of every appended event.
    pub recorded_at: DateTime<Utc>,
    /// The head after this group.
    pub head: LogHead,
    /// Segments written.
    pub segments: u64,
}

impl Writer {
    /// A writer continuing the log at `head`, handing applied groups to `committer`.
    pub fn new(
        segments: sled::Tree,
        shared: Arc<Shared>,
        head: LogHead,
        settings: Settings,
        committer: std::sync::mpsc::SyncSender<Applied>,
        spills: std::sync::mpsc::Sender<SpillJob>,
    ) -> Self {
        Self {
            segments,
            shared,
            clock: settings.clock,
            space: settings.space,
            legacy_layout: settings.legacy_layout,
            head,
            last_validation_change_seq: 0,
            committer,
            spills,
        }
    }

    /// Takes groups of requests until every sender is gone. Dropping `self` at the end
    /// lets the committer finish the groups in flight and stop.
    pub fn run(mut self, mut requests: mpsc::Receiver<WriteRequest>) {
        let mut carried: Option<WriteRequest> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match requests.blocking_recv() {
                    Some(request) => request,
                    None => break,
                },
            };
            let mut events = first.events.len();
            let mut group = vec![first];
            while group.len() < MAX_GROUP_REQUESTS {
                let Ok(request) = requests.try_recv() else {
                    break;
                };
                if events + request.events.len() > MAX_GROUP_EVENTS {
                    carried = Some(request);
                    break;
                }
                events += request.events.len();
                group.push(request);
            }
            self.write(group);
        }
        // A graceful close spills the newest ids, so the next open reads no log for them.
        if !self.shared.failed.load(Ordering::Acquire) {
            let job = lock(&self.shared.dedup).freeze_for_spill((self.head.seq, self.head.hash));
            let _ = self.spills.send(job);
        }
    }

    /// Decides one group, writes its segments in one atomic sled batch and hands it to
    /// the committer, which flushes and answers it. Groups with nothing to append go the
    /// same way, so that their answers (duplicates of events in flight, refusals caused
    /// by definitions in flight) also wait for the flush before them.
    fn write(&mut self, mut group: Vec<WriteRequest>) {
        if self.shared.failed.load(Ordering::Acquire) {
            reply_all(group, || StoreError::WriterFailed);
            return;
        }
        // Before anything is decided (the dedup index takes the group's ids): a full disk
        // refuses the whole group and leaves no trace of it.
        let bytes: usize = group
            .iter()
            .map(|request| request.prepared.bytes.len())
            .sum();
        if let Err(refusal) = self.space.admit(widen(bytes)) {
            tracing::warn!(error = %refusal(), "refusing writes: disk space");
            reply_all(group, refusal);
            return;
        }
        // recorded_at never decreases, even if the clock steps back.
        let now = (self.clock)();
        let recorded_at = self.head.recorded_at.map_or(now, |last| now.max(last));
        let first_seq = self.head.seq + 1;
        let (decisions, appended, last_validation_change_seq) =
            self.decide(&mut group, recorded_at);

        let mut segments = 0;
        if !appended.is_empty() {
            let (batch, segment_count, head_hash) =
                self.build_segments(&group, &appended, recorded_at);
            if let Err(error) = self.segments.apply_batch(batch) {
                tracing::error!(
                    %error,
                    first_seq,
                    events = appended.len(),
                    "writing to the event log failed; the writer stops"
                );
                self.shared.failed.store(true, Ordering::Release);
                reply_all(group, || StoreError::WriterFailed);
                return;
            }
            segments = segment_count;
            self.head = LogHead {
                seq: self.head.seq + widen(appended.len()),
                hash: head_hash,
                recorded_at: Some(recorded_at),
            };
            self.last_validation_change_seq = last_validation_change_seq;
            // The group is in sled: a frozen part up to its head can go to a run file.
            let mut dedup = lock(&self.shared.dedup);
            dedup.note_appended(widen(appended.len()));
            if dedup.should_freeze() {
                let job = dedup.freeze_for_spill((self.head.seq, self.head.hash));
                drop(dedup);
                // The spill thread is gone only if it panicked; the ids then stay in the
                // frozen part, consulted as before.
                let _ = self.spills.send(job);
            }
        }
        let applied = Applied {
            group,
            decisions,
            appended,
            first_seq,
            recorded_at,
            head: self.head,
            segments,
        };
        if let Err(std::sync::mpsc::SendError(applied)) = self.committer.send(applied) {
            // The committer is gone only if it panicked.
            reply_all(applied.group, || StoreError::WriterStopped);
        }
    }

    /// Decides each request in order: the guard, then for each event whether it is a
    /// duplicate (of a committed event, or of one earlier in flight or in this group) or
    /// gets the next seq. New ids go into the shared index right away, so later groups
    /// see them; readers only trust entries up to the committed head. Returns the
    /// decisions, the (request, event) indexes to append in seq order, and the last
    /// seq of an event that affects validation after the group.
    fn decide(
        &self,
        group: &mut [WriteRequest],
        recorded_at: DateTime<Utc>,
    ) -> (Vec<Decision>, Vec<(usize, usize)>, u64) {
        let mut dedup = lock(&self.shared.dedup);
        dedup.expire(recorded_at);
        let mut next_seq = self.head.seq + 1;
        let mut last_validation_change_seq = self.last_validation_change_seq;
        let mut appended = Vec::new();
        let mut decisions = Vec::with_capacity(group.len());
        for (index, request) in group.iter_mut().enumerate() {
            if request
                .guard
                .is_some_and(|since| last_validation_change_seq > since)
            {
                decisions.push(Decision::Refused);
                continue;
            }
            let mut outcomes = Vec::with_capacity(request.events.len());
            for (event_index, (event, key)) in request
                .events
                .iter()
                .zip(&mut request.prepared.ids)
                .enumerate()
            {
                if let Some(key) = key.take() {
                    if let Some(seq) = dedup.get(&key, &self.segments) {
                        outcomes.push(Outcome::Duplicate { seq });
                        continue;
                    }
                    dedup.insert(key, next_seq, recorded_at);
                }
                if event.affects_validation() {
                    last_validation_change_seq = next_seq;
                }
                outcomes.push(Outcome::Appended { seq: next_seq });
                appended.push((index, event_index));
                next_seq += 1;
            }
            decisions.push(Decision::Outcomes(outcomes));
        }
        (decisions, appended, last_validation_change_seq)
    }

    /// Builds the segments of the appended events into one sled batch; returns it, the
    /// number of segments and the new head hash.
    fn build_segments(
        &self,
        group: &[WriteRequest],
        appended: &[(usize, usize)],
        recorded_at: DateTime<Utc>,
    ) -> (sled::Batch, u64, Hash) {
        let recorded_at = recorded_at_field(recorded_at);
        let payload = |&(request, event): &(usize, usize)| group[request].prepared.payload(event);
        // Each record costs its length varint (at most 3 bytes below 2 MiB) and its bytes.
        let mut remaining: usize = appended
            .iter()
            .map(|index| payload(index).len() + recorded_at.len() + 3)
            .sum();

        let mut batch = sled::Batch::default();
        let mut segment_count = 0;
        let max_bytes = if self.legacy_layout {
            LEGACY_SEGMENT_BYTES
        } else {
            MAX_SEGMENT_BYTES
        };
        let finish = |builder: SegmentBuilder| {
            if self.legacy_layout {
                builder.finish_raw()
            } else {
                builder.finish()
            }
        };
        let mut builder =
            SegmentBuilder::new(self.head.seq + 1, self.head.hash, remaining.min(max_bytes));
        for index in appended {
            let payload = payload(index);
            let record_len = recorded_at.len() + payload.len() + 3;
            let full = builder.count() >= MAX_SEGMENT_EVENTS
                || builder.len_bytes() + record_len > max_bytes;
            if full && builder.count() > 0 {
                let next = SegmentBuilder::new(
                    builder.next_seq(),
                    builder.head_hash(),
                    remaining.min(max_bytes),
                );
                let done = std::mem::replace(&mut builder, next);
                batch.insert(&segment_key(done.first_seq()), finish(done));
                segment_count += 1;
            }
            builder.push(&[&recorded_at, payload]);
            remaining = remaining.saturating_sub(record_len);
        }
        let head_hash = builder.head_hash();
        batch.insert(&segment_key(builder.first_seq()), finish(builder));
        segment_count += 1;
        (batch, segment_count, head_hash)
    }
}

/// Sends every request its decision.
pub fn answer(group: Vec<WriteRequest>, decisions: Vec<Decision>) {
    for (request, decision) in group.into_iter().zip(decisions) {
        let result = match decision {
            // The events travel back in the reply's `spent`; `finish` puts them in here.
            Decision::Refused => Err(AppendError::ValidationStale { events: Vec::new() }),
            Decision::Outcomes(outcomes) => Ok(outcomes),
        };
        request.answer(result);
    }
}

/// Sends every request the same error.
pub fn reply_all(group: Vec<WriteRequest>, error: impl Fn() -> StoreError) {
    for request in group {
        request.answer(Err(AppendError::Store(error())));
    }
}

impl WriteRequest {
    fn answer(self, result: Result<Vec<Outcome>, AppendError>) {
        let reply = Reply {
            result,
            spent: (self.events, self.prepared),
        };
        // A caller that stopped waiting (its task was cancelled) needs no answer; then
        // the reply, events included, is dropped here after all.
        let _ = self.reply.send(reply);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use prost::Message;

    use super::*;
    use crate::domain::Measurement;
    use crate::proto::{self, to_proto};

    #[test]
    fn prepending_recorded_at_gives_the_whole_record_encoding() {
        let at = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
            + chrono::TimeDelta::nanoseconds(123_456_789);
        let events = vec![
            Event::MeasurementRecorded(Measurement {
                kpi_id: "website_visitors".into(),
                value: 1.0,
                occurred_at: at,
                labels: BTreeMap::from([("channel".into(), "email".into())]),
                subject: Some("visitor-17".into()),
                event_id: Some("visit-17".into()),
            }),
            Event::MeasurementRetracted {
                retracted_seq: 1,
                reason: "test".into(),
            },
        ];
        let prefix = recorded_at_field(at);
        for actor in [None, Some(""), Some("ingest-svc")] {
            let prepared = PreparedEvents::prepare(&events, actor, &EventIdHasher::default());
            for (index, event) in events.iter().enumerate() {
                let mut record = prefix.clone();
                record.extend_from_slice(prepared.payload(index));
                let expected = proto::EventRecord {
                    actor: actor.unwrap_or_default().to_owned(),
                    ..to_proto::event_record(at, event)
                };
                assert_eq!(record, expected.encode_to_vec(), "{actor:?}");
            }
        }
    }
}
