//! ReplayEvents: the log from a seq or a recorded time, optionally filtered by KPI, up to
//! the head or a last seq, or following the head for ever.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;

use super::{Following, LogCursor, StreamReceiver};
use crate::domain::query::{ReplayQuery, ReplayStart, StreamKind};
use crate::domain::signed_head::SignedHead;
use crate::domain::{Event, Rejection, rfc3339};
use crate::service::{KpiService, ServiceError};
use crate::store::{EventLog, Hash, StoredEvent};

/// What a replay sends.
// Nearly every item is an event: boxing it would cost an allocation per event to save
// channel slots' bytes on the rare checkpoint.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ReplayItem {
    /// A stored event, with its record bytes verbatim.
    Event(StoredEvent),
    /// Every event up to `seq` was sent or filtered out (a follower that is idle).
    Checkpoint {
        /// The seq.
        seq: u64,
        /// When it was sent.
        at: DateTime<Utc>,
        /// `seq` and the chain hash after it, signed, when the server has a signing key.
        signed: Option<SignedHead>,
    },
}

impl KpiService {
    /// ReplayEvents: checks the question, takes a place among the open streams and starts
    /// the replay; its events come through the receiver.
    pub async fn replay_events(
        &self,
        query: ReplayQuery,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<StreamReceiver<ReplayItem>, ServiceError> {
        let head = self.log.head();
        let from_seq = match query.start {
            None => 1,
            Some(ReplayStart::Seq(seq)) => {
                if !query.follow && seq > head.seq + 1 {
                    return Err(Rejection::out_of_range(
                        "from_seq",
                        format!(
                            "seq {seq} is beyond the log's head seq {} (follow to wait for it)",
                            head.seq
                        ),
                    )
                    .into());
                }
                seq.max(1)
            }
            Some(ReplayStart::RecordedAt(at)) => {
                let now = Utc::now();
                if !query.follow && at > now {
                    return Err(Rejection::out_of_range(
                        "from_recorded_at",
                        format!(
                            "{} is later than the server's clock ({}) (follow to wait for it)",
                            rfc3339(at),
                            rfc3339(now)
                        ),
                    )
                    .into());
                }
                // The first event recorded at or after `at` follows the last one before it.
                let before = self.seq_at(at - TimeDelta::nanoseconds(1)).await?;
                before + 1
            }
        };
        let to_seq = query.to_seq.filter(|seq| *seq > 0);
        if let Some(to) = to_seq
            && to < from_seq
        {
            return Err(Rejection::invalid(
                "to_seq",
                format!("{to} is before the first seq to send ({from_seq})"),
            )
            .into());
        }
        self.check_known_kpis(&query.kpi_ids, "kpi_ids")?;
        let filter = (!query.kpi_ids.is_empty())
            .then(|| query.kpi_ids.into_iter().collect::<HashSet<String>>());
        // Without follow, the replay ends at the head as it is now (or at to_seq before it).
        let to_seq = match (to_seq, query.follow) {
            (to, true) => to,
            (to, false) => Some(to.map_or(head.seq, |to| to.min(head.seq))),
        };
        let handle =
            self.open_stream(StreamKind::ReplayEvents, peer, from_seq.saturating_sub(1))?;
        let (sender, receiver) = mpsc::channel(REPLAY_BUFFER);
        let follower = Follower {
            stream: Following::new(self, sender, handle),
            cursor: Some(LogCursor::new(self.log.clone())),
            filter,
            targets: HashMap::new(),
            next: from_seq,
            to_seq,
            signing_key: self.signing_key.clone(),
            hash: (from_seq == 1).then_some([0; 32]),
        };
        tokio::spawn(follower.run());
        Ok(receiver)
    }
}

/// Envelopes a replay may have ready before the client reads them; the reading thread
/// waits past this, so a slow auditor costs bounded memory.
const REPLAY_BUFFER: usize = 256;

/// Events a follower reads from the log per blocking read: bounds the memory of one read
/// and lets a follower that catches up interleave with its sends.
const REPLAY_CHUNK: u64 = 1024;

/// One ReplayEvents stream: reads the log from `next` up to the durable head, waits for the
/// head to move (or sends a checkpoint when idle), and reads again. Catching up and
/// following are one loop over the log, so the switch has no gap and no duplicate, and a
/// slow client only slows its own reads.
struct Follower {
    /// The stream it sends on.
    stream: Following<ReplayItem>,
    /// Where the follower reads; taken while a read runs.
    cursor: Option<LogCursor>,
    /// Only events about these KPIs, when set.
    filter: Option<HashSet<String>>,
    /// Target id -> KPI id of the TargetSet events seen, to place TargetRemoved events.
    targets: HashMap<String, String>,
    /// The next seq to consider.
    next: u64,
    /// The last seq to send; `None` follows forever.
    to_seq: Option<u64>,
    /// Signs the checkpoints, when the server has a key.
    signing_key: Option<std::sync::Arc<ed25519_dalek::SigningKey>>,
    /// The chain hash after `next - 1`, once read (known from the start at seq 1).
    hash: Option<Hash>,
}

impl Follower {
    async fn run(mut self) {
        loop {
            let head = self.stream.head();
            let end = self.to_seq.map_or(head, |to| to.min(head));
            while self.next <= end {
                let chunk_end = end.min(self.next.saturating_add(REPLAY_CHUNK - 1));
                if !self.send_range(chunk_end).await {
                    return;
                }
            }
            if self.to_seq.is_some_and(|to| self.next > to) {
                return;
            }
            let (key, hash, next) = (self.signing_key.clone(), self.hash, self.next);
            let log = self.cursor.as_ref().map(|cursor| cursor.log().clone());
            let checkpoint = move |seq: u64| {
                let at = Utc::now();
                // The hash after `seq`: the last one read, or the head's when the stream
                // waits past the head (a follower that starts beyond it).
                let hash_at_seq = hash.filter(|_| seq + 1 == next).or_else(|| {
                    let head = log.as_ref()?.head();
                    (head.seq == seq).then_some(head.hash)
                });
                let signed = key
                    .as_ref()
                    .zip(hash_at_seq)
                    .map(|(key, hash)| SignedHead::sign(key, seq, hash, at));
                ReplayItem::Checkpoint { seq, at, signed }
            };
            if !self.stream.for_more(self.next - 1, checkpoint).await {
                return;
            }
        }
    }

    /// Reads `next..=to` from the log (off the executor), filters, and sends. False when the
    /// stream is over (client gone or an error sent).
    async fn send_range(&mut self, to: u64) -> bool {
        let from = self.next;
        let filter = self.filter.clone();
        let mut targets = std::mem::take(&mut self.targets);
        let Some(mut cursor) = self.cursor.take() else {
            return false;
        };
        let Some((events, targets, cursor, damage, last_hash)) =
            self.stream
                .read(move || {
                    let log = cursor.log().clone();
                    let mut events = Vec::new();
                    let mut last_hash = None;
                    // The events before damage in the chunk are sent before its error.
                    let damage = cursor
                        .read(from, to, |stored| {
                            last_hash = Some(stored.hash);
                            if filter.as_ref().is_none_or(|kpis| {
                                concerns(&log, &mut targets, kpis, &stored.event)
                            }) {
                                events.push(stored);
                            }
                            Ok(())
                        })
                        .err();
                    Ok((events, targets, cursor, damage, last_hash))
                })
                .await
        else {
            return false;
        };
        self.targets = targets;
        self.cursor = Some(cursor);
        for stored in events {
            if !self.stream.send(ReplayItem::Event(stored)).await {
                return false;
            }
        }
        if let Some(error) = damage {
            self.stream.fail(error.into()).await;
            return false;
        }
        self.next = to + 1;
        self.hash = last_hash.or(self.hash);
        self.stream.stats().set_position(to);
        true
    }
}

/// Whether `event` is about one of `kpis`. A retraction is about the KPI of the measurement
/// it withdraws; a target removal about the KPI of its target when this stream saw the
/// target set (otherwise it is sent: an auditor gets too much rather than too little).
fn concerns(
    log: &EventLog,
    targets: &mut HashMap<String, String>,
    kpis: &HashSet<String>,
    event: &Event,
) -> bool {
    match event {
        Event::KpiDefined { definition } | Event::KpiUpdated { definition, .. } => {
            kpis.contains(&definition.id)
        }
        Event::KpiRetired { kpi_id, .. } => kpis.contains(kpi_id),
        Event::MeasurementRecorded(m) => kpis.contains(&m.kpi_id),
        Event::TargetSet { target, .. } => {
            targets.insert(target.id.clone(), target.kpi_id.clone());
            kpis.contains(&target.kpi_id)
        }
        Event::TargetRemoved { target_id, .. } => {
            targets.get(target_id).is_none_or(|kpi| kpis.contains(kpi))
        }
        // A lost event may have been about any KPI: an auditor is always told.
        Event::EventsLost { .. } => true,
        Event::MeasurementRetracted { retracted_seq, .. } => {
            match log.read(*retracted_seq, *retracted_seq).next() {
                Some(Ok(stored)) => match stored.event {
                    Event::MeasurementRecorded(m) => kpis.contains(&m.kpi_id),
                    _ => true,
                },
                _ => true,
            }
        }
    }
}
