//! Live fan-out, moved by the log's publisher after each durable group:
//! - the durable head seq as a `tokio::sync::watch` value; followers wait on it and then
//!   read the new events, so a slow follower never makes the writer buffer anything, and
//!   catching up after a lag is the same code as following live (no gap, no duplicate);
//! - while WatchKpis streams are open, the (KPI, labels, occurred_at) of the latest
//!   measurements and retractions in a bounded window, so a thousand watchers at the head
//!   share one copy instead of each reading and decoding the same events from the log.
//!   A watcher whose position fell out of the window reads the log instead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::domain::Event;
use crate::domain::query::Labels;
use crate::store::{CommitListener, Committed};

/// Touches kept in the window: at 10,000 events/s about three seconds of history, a few
/// MiB of memory.
const WINDOW: usize = 32_768;

/// What a committed event changes, as a watcher needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Touch {
    /// A measurement was recorded.
    Recorded {
        /// Its KPI.
        kpi_id: Arc<str>,
        /// Its labels.
        labels: Arc<Labels>,
        /// When it happened.
        occurred_at: DateTime<Utc>,
    },
    /// The measurement at `retracted_seq` was withdrawn.
    Retracted {
        /// The seq of the withdrawn measurement.
        retracted_seq: u64,
    },
}

impl Touch {
    /// What `event` touches, if it is a measurement or a retraction.
    pub fn of(event: &Event) -> Option<Self> {
        match event {
            Event::MeasurementRecorded(m) => Some(Self::Recorded {
                kpi_id: m.kpi_id.as_str().into(),
                labels: Arc::new(m.labels.clone()),
                occurred_at: m.occurred_at,
            }),
            Event::MeasurementRetracted { retracted_seq, .. } => Some(Self::Retracted {
                retracted_seq: *retracted_seq,
            }),
            _ => None,
        }
    }
}

/// The window: every touch of the seqs `from..` up to the head, in seq order.
#[derive(Debug, Default)]
struct Window {
    /// First seq covered; `None` while no watcher is open.
    from: Option<u64>,
    touches: VecDeque<(u64, Touch)>,
}

/// Publishes the durable head and the recent touches.
#[derive(Debug)]
pub struct LiveFeed {
    head: watch::Sender<u64>,
    window: Mutex<Window>,
    watchers: AtomicUsize,
}

/// A registered watcher; the window is kept while one exists.
#[derive(Debug)]
pub struct WatcherGuard(Arc<LiveFeed>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl LiveFeed {
    /// A feed starting at the log's current head.
    pub fn new(head: u64) -> Self {
        Self {
            head: watch::Sender::new(head),
            window: Mutex::new(Window::default()),
            watchers: AtomicUsize::new(0),
        }
    }

    /// A receiver that sees every later head (only the latest, which is all a follower
    /// needs: it reads everything up to it).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Keeps the window filled while the guard lives (from the next commit on).
    pub fn register_watcher(self: &Arc<Self>) -> WatcherGuard {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        WatcherGuard(self.clone())
    }

    /// Appends the touches of `from..=to` (a range at or below the published head) that
    /// `wanted` accepts to `out`, when the window covers the range; `false` (and `out`
    /// untouched) when it does not, and the caller must read the log.
    pub fn touches(
        &self,
        from: u64,
        to: u64,
        wanted: impl Fn(&Touch) -> bool,
        out: &mut Vec<(u64, Touch)>,
    ) -> bool {
        let window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if window.from.is_none_or(|first| from < first) {
            return false;
        }
        let start = window.touches.partition_point(|(seq, _)| *seq < from);
        out.extend(
            window
                .touches
                .range(start..)
                .take_while(|(seq, _)| *seq <= to)
                .filter(|(_, touch)| wanted(touch))
                .cloned(),
        );
        true
    }
}

/// The touches of one committed group, in seq order, with the measurements of one series
/// in one second folded into the last of them: every calendar bucket (whole seconds in
/// every timezone) that one touches, the last touches too, so watchers lose nothing and a
/// batch of measurements "now" costs them one touch per series. Measurements of one series
/// share their KPI id and labels.
fn group_touches(events: &[Committed<'_>]) -> Vec<(u64, Touch)> {
    type Series<'a> = (&'a str, &'a Labels);
    let mut shared: HashMap<Series<'_>, (Arc<str>, Arc<Labels>)> = HashMap::new();
    // (series, second) -> index in `touches`.
    let mut folded: HashMap<(Series<'_>, i64), usize> = HashMap::new();
    let mut touches: Vec<Option<(u64, Touch)>> = Vec::new();
    for committed in events {
        match committed.event {
            Event::MeasurementRecorded(m) => {
                let series = (m.kpi_id.as_str(), &m.labels);
                let second = m.occurred_at.timestamp();
                if let Some(&earlier) = folded.get(&(series, second)) {
                    touches[earlier] = None;
                }
                folded.insert((series, second), touches.len());
                let (kpi_id, labels) = shared
                    .entry(series)
                    .or_insert_with(|| (m.kpi_id.as_str().into(), Arc::new(m.labels.clone())))
                    .clone();
                touches.push(Some((
                    committed.seq,
                    Touch::Recorded {
                        kpi_id,
                        labels,
                        occurred_at: m.occurred_at,
                    },
                )));
            }
            event => touches.extend(Touch::of(event).map(|touch| Some((committed.seq, touch)))),
        }
    }
    touches.into_iter().flatten().collect()
}

impl CommitListener for LiveFeed {
    fn committed(&self, events: &[Committed<'_>]) {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return;
        };
        {
            let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            if self.watchers.load(Ordering::Relaxed) == 0 {
                *window = Window::default();
            } else {
                window.from.get_or_insert(first.seq);
                window.touches.extend(group_touches(events));
                while window.touches.len() > WINDOW {
                    if let Some((seq, _)) = window.touches.pop_front() {
                        window.from = Some(seq + 1);
                    }
                }
            }
        }
        // After the window, so a follower woken by the head finds its events there.
        // `send_replace` never blocks and works without receivers.
        self.head.send_replace(last.seq);
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone};

    use super::*;
    use crate::domain::Measurement;

    fn recorded(kpi_id: &str, channel: &str, occurred_at: DateTime<Utc>) -> Event {
        Event::MeasurementRecorded(Measurement {
            kpi_id: kpi_id.into(),
            value: 1.0,
            occurred_at,
            labels: Labels::from([("channel".into(), channel.into())]),
            subject: None,
            event_id: None,
        })
    }

    fn touched(touch: &Touch) -> (&str, &str, DateTime<Utc>) {
        match touch {
            Touch::Recorded {
                kpi_id,
                labels,
                occurred_at,
            } => (kpi_id, labels["channel"].as_str(), *occurred_at),
            Touch::Retracted { .. } => panic!("a recorded touch"),
        }
    }

    #[test]
    fn a_series_measurements_within_one_second_of_a_group_fold_into_the_last() {
        let t = Utc.with_ymd_and_hms(2026, 3, 29, 0, 59, 59).unwrap();
        let events = [
            recorded("orders", "web", t),
            recorded("orders", "shop", t),
            recorded("orders", "web", t + TimeDelta::milliseconds(500)),
            recorded("visits", "web", t + TimeDelta::milliseconds(600)),
            // The next second may be another bucket (here the next hour and day).
            recorded("orders", "web", t + TimeDelta::seconds(1)),
            // Another second of the same hour: buckets of sub-hour timezone offsets (India,
            // Nepal) split hours, so only the second is safe to fold on.
            recorded("orders", "web", t + TimeDelta::seconds(2)),
            Event::MeasurementRetracted {
                retracted_seq: 1,
                reason: "test".into(),
            },
        ];
        let committed: Vec<Committed<'_>> = events
            .iter()
            .zip(10..)
            .map(|(event, seq)| Committed {
                seq,
                recorded_at: t,
                event,
            })
            .collect();
        let touches = group_touches(&committed);
        let seqs: Vec<u64> = touches.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [11, 12, 13, 14, 15, 16]);
        assert_eq!(touched(&touches[0].1), ("orders", "shop", t));
        assert_eq!(
            touched(&touches[1].1),
            ("orders", "web", t + TimeDelta::milliseconds(500))
        );
        assert_eq!(
            touched(&touches[2].1),
            ("visits", "web", t + TimeDelta::milliseconds(600))
        );
        assert_eq!(
            touched(&touches[3].1),
            ("orders", "web", t + TimeDelta::seconds(1))
        );
        assert_eq!(
            touched(&touches[4].1),
            ("orders", "web", t + TimeDelta::seconds(2))
        );
        assert_eq!(touches[5].1, Touch::Retracted { retracted_seq: 1 });
    }

    #[test]
    fn the_window_serves_only_what_it_covers_and_only_while_watchers_are_open() {
        let feed = Arc::new(LiveFeed::new(0));
        let t = Utc.with_ymd_and_hms(2026, 3, 29, 0, 0, 0).unwrap();
        let event = recorded("orders", "web", t);
        let commit = |seq| {
            feed.committed(&[Committed {
                seq,
                recorded_at: t,
                event: &event,
            }]);
        };
        let mut out = Vec::new();
        commit(1);
        assert!(
            !feed.touches(1, 1, |_| true, &mut out),
            "no watcher, no window"
        );
        let guard = feed.register_watcher();
        commit(2);
        commit(3);
        assert!(
            !feed.touches(1, 3, |_| true, &mut out),
            "seq 1 came before the window"
        );
        assert!(out.is_empty());
        assert!(feed.touches(2, 3, |_| true, &mut out));
        assert_eq!(out.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [2, 3]);
        out.clear();
        assert!(feed.touches(3, 3, |_| false, &mut out));
        assert!(out.is_empty(), "filtered under the lock");
        assert_eq!(*feed.subscribe().borrow(), 3);
        drop(guard);
        commit(4);
        assert!(
            !feed.touches(4, 4, |_| true, &mut out),
            "emptied without watchers"
        );
    }
}
