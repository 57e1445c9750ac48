//! The kpi.v1.Audit service: the log itself, its digest and its verification.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::time::Duration;

use chrono::TimeDelta;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::follow::{self, LogCursor};
use crate::domain::{Event, Rejection, rfc3339};
use crate::proto::audit_server::Audit;
use crate::proto::{self, from_proto, replay_events_request, to_proto};
use crate::service::KpiService;
use crate::service::streams::{StreamHandle, StreamInfo, StreamKind};
use crate::store::{EventLog, StoredEvent};

/// Envelopes a replay may have ready before the client reads them; the reading thread
/// waits past this, so a slow auditor costs bounded memory.
const REPLAY_BUFFER: usize = 256;

/// Events a follower reads from the log per blocking read: bounds the memory of one read
/// and lets a follower that catches up interleave with its sends.
const REPLAY_CHUNK: u64 = 1024;

type ReplayItem = Result<proto::ReplayEventsResponse, Status>;

/// One ReplayEvents stream: reads the log from `next` up to the durable head, waits for the
/// head to move (or sends a checkpoint when idle), and reads again. Catching up and
/// following are one loop over the log, so the switch has no gap and no duplicate, and a
/// slow client only slows its own reads.
struct Follower {
    /// Where the follower reads; taken while a read runs.
    cursor: Option<LogCursor>,
    head: watch::Receiver<u64>,
    heartbeat: Duration,
    shutdown: CancellationToken,
    /// Only events about these KPIs, when set.
    filter: Option<HashSet<String>>,
    /// Target id -> KPI id of the TargetSet events seen, to place TargetRemoved events.
    targets: HashMap<String, String>,
    sender: mpsc::Sender<ReplayItem>,
    /// The next seq to consider.
    next: u64,
    /// The last seq to send; `None` follows forever.
    to_seq: Option<u64>,
    /// The stream's place among the open streams, where it reports its progress.
    handle: StreamHandle,
}

impl Follower {
    async fn run(mut self) {
        loop {
            let head = *self.head.borrow_and_update();
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
            let mut waiting = follow::Waiting {
                head: &mut self.head,
                heartbeat: self.heartbeat,
                shutdown: &self.shutdown,
                sender: &self.sender,
                stats: self.handle.stats(),
            };
            let checkpoint = |seq| proto::ReplayEventsResponse {
                item: Some(proto::replay_events_response::Item::Checkpoint(
                    proto::Checkpoint {
                        seq,
                        at: Some(to_proto::timestamp(chrono::Utc::now())),
                    },
                )),
            };
            if !waiting.for_more(self.next - 1, checkpoint).await {
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
        let Some((events, targets, cursor, damage)) =
            follow::read_for_stream(&self.sender, move || {
                let log = cursor.log().clone();
                let mut events = Vec::new();
                // The events before damage in the chunk are sent before its error.
                let damage = cursor
                    .read(from, to, |stored| {
                        if filter
                            .as_ref()
                            .is_none_or(|kpis| concerns(&log, &mut targets, kpis, &stored.event))
                        {
                            events.push(stored);
                        }
                        Ok(())
                    })
                    .err();
                Ok((events, targets, cursor, damage))
            })
            .await
        else {
            return false;
        };
        self.targets = targets;
        self.cursor = Some(cursor);
        let failed_at = damage.map(|error| super::status::store_status(&error));
        for stored in events {
            let item = envelope(stored).map(|event| proto::ReplayEventsResponse {
                item: Some(proto::replay_events_response::Item::Event(event)),
            });
            let failed = item.is_err();
            if self.sender.send(item).await.is_err() || failed {
                return false;
            }
            self.handle.stats().sent_one();
        }
        if let Some(status) = failed_at {
            let _ = self.sender.send(Err(status)).await;
            return false;
        }
        self.next = to + 1;
        self.handle.stats().set_position(to);
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

/// gRPC adapter of the audit reads.
pub struct AuditApi {
    service: KpiService,
}

impl AuditApi {
    /// Serves the audit reads of `service`.
    pub fn new(service: KpiService) -> Self {
        Self { service }
    }
}

/// The envelope of a stored event, with the record bytes verbatim.
fn envelope(stored: StoredEvent) -> Result<proto::EventEnvelope, Status> {
    let event = proto::EventRecord::decode(stored.record.as_ref())
        .map_err(|error| super::status::undecodable_record_status(stored.seq, &error))?;
    Ok(proto::EventEnvelope {
        seq: stored.seq,
        recorded_at: Some(to_proto::timestamp(stored.recorded_at)),
        prev_hash: stored.prev_hash.to_vec(),
        hash: stored.hash.to_vec(),
        record: stored.record.to_vec(),
        event: Some(event),
    })
}

#[tonic::async_trait]
impl Audit for AuditApi {
    type ReplayEventsStream =
        Pin<Box<dyn Stream<Item = Result<proto::ReplayEventsResponse, Status>> + Send>>;

    async fn replay_events(
        &self,
        request: Request<proto::ReplayEventsRequest>,
    ) -> Result<Response<Self::ReplayEventsStream>, Status> {
        let remote_addr = request.remote_addr();
        let request = request.into_inner();
        let log = self.service.log().clone();
        let head = log.head();
        let from_seq = match request.start {
            None => 1,
            Some(replay_events_request::Start::FromSeq(seq)) => {
                if !request.follow && seq > head.seq + 1 {
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
            Some(replay_events_request::Start::FromRecordedAt(at)) => {
                let at = from_proto::timestamp(&at, "from_recorded_at")?;
                let now = chrono::Utc::now();
                if !request.follow && at > now {
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
                let before = self.service.seq_at(at - TimeDelta::nanoseconds(1)).await?;
                before + 1
            }
        };
        let to_seq = request.to_seq.filter(|seq| *seq > 0);
        if let Some(to) = to_seq
            && to < from_seq
        {
            return Err(Rejection::invalid(
                "to_seq",
                format!("{to} is before the first seq to send ({from_seq})"),
            )
            .into());
        }
        self.service.check_known_kpis(&request.kpi_ids, "kpi_ids")?;
        let filter = (!request.kpi_ids.is_empty())
            .then(|| request.kpi_ids.into_iter().collect::<HashSet<String>>());
        // Without follow, the replay ends at the head as it is now (or at to_seq before it).
        let to_seq = match (to_seq, request.follow) {
            (to, true) => to,
            (to, false) => Some(to.map_or(head.seq, |to| to.min(head.seq))),
        };
        let handle = self.service.open_stream(
            StreamKind::ReplayEvents,
            remote_addr,
            from_seq.saturating_sub(1),
        )?;
        let (sender, receiver) = mpsc::channel(REPLAY_BUFFER);
        let follower = Follower {
            cursor: Some(LogCursor::new(log)),
            head: self.service.watch_head(),
            heartbeat: self.service.heartbeat(),
            shutdown: self.service.shutdown_token(),
            filter,
            targets: HashMap::new(),
            sender,
            next: from_seq,
            to_seq,
            handle,
        };
        tokio::spawn(follower.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn verify_log(
        &self,
        _request: Request<proto::VerifyLogRequest>,
    ) -> Result<Response<proto::VerifyLogResponse>, Status> {
        let verification = self.service.verify_log().await?;
        let mut response = proto::VerifyLogResponse {
            ok: verification.result.is_ok(),
            checked_events: verification.checked_events,
            head_seq: verification.head_seq,
            ..Default::default()
        };
        match verification.result {
            Ok(hash) => response.head_hash = hash.to_vec(),
            Err(chain_break) => {
                response.chain_break = Some(proto::ChainBreak {
                    seq: chain_break.seq,
                    reason: chain_break.reason,
                    expected_hash: chain_break
                        .expected_hash
                        .map(|h| h.to_vec())
                        .unwrap_or_default(),
                    stored_hash: chain_break
                        .stored_hash
                        .map(|h| h.to_vec())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(Response::new(response))
    }

    async fn get_log_info(
        &self,
        _request: Request<proto::GetLogInfoRequest>,
    ) -> Result<Response<proto::GetLogInfoResponse>, Status> {
        let head = self.service.log().head();
        let restored = self.service.restored();
        Ok(Response::new(proto::GetLogInfoResponse {
            head_seq: head.seq,
            head_hash: head.hash.to_vec(),
            event_count: head.seq,
            head_recorded_at: head.recorded_at.map(to_proto::timestamp),
            restored_snapshot_seq: restored.snapshot_seq,
            replayed_events: restored.replayed_events,
        }))
    }

    async fn list_streams(
        &self,
        _request: Request<proto::ListStreamsRequest>,
    ) -> Result<Response<proto::ListStreamsResponse>, Status> {
        let streams = self.service.streams();
        Ok(Response::new(proto::ListStreamsResponse {
            streams: streams.list().iter().map(stream_info).collect(),
            head_seq: self.service.log().head().seq,
            max_streams: u32::try_from(streams.limit()).unwrap_or(u32::MAX),
            watch_pending_limit: super::watch::WATCH_PENDING_LIMIT as u64,
        }))
    }
}

fn stream_info(info: &StreamInfo) -> proto::StreamInfo {
    proto::StreamInfo {
        id: info.id,
        kind: match info.kind {
            StreamKind::WatchKpis => proto::StreamKind::WatchKpis,
            StreamKind::ReplayEvents => proto::StreamKind::ReplayEvents,
        } as i32,
        peer: info.peer.map(|peer| peer.to_string()).unwrap_or_default(),
        opened_at: Some(to_proto::timestamp(info.opened_at)),
        position_seq: info.position,
        messages_sent: info.sent,
        pending_updates: info.pending,
        max_pending_updates: info.max_pending,
    }
}
