//! The dedup index at scale (plain `main`, not criterion): appends N measurements through
//! `EventLog::append_blocking` from two threads in batches of 10,000, every one with a
//! unique 36-character id (or none, for the baseline), all inside the 24 h window; prints
//! the rate, the index's sizes (`EventLog::dedup_stats`) and the process's RSS, then the
//! time a reopen takes to the first answered lookup.
//!
//! ```text
//! cargo bench --bench dedup -- fill DIR N ids|none [abort]   # abort: no close, as kill -9
//! cargo bench --bench dedup -- open DIR                      # a restart, timed
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use chrono::Utc;
use kpi_service::domain::{Event, Measurement};
use kpi_service::store::{AppendRequest, EventLog, StoreOptions};

const BATCH: u64 = 10_000;

fn measurement(index: u64, with_id: bool) -> Event {
    Event::MeasurementRecorded(Measurement {
        kpi_id: "website_visitors".into(),
        value: f64::from(u32::try_from(index % 1000).unwrap()) * 0.25,
        occurred_at: Utc::now(),
        labels: BTreeMap::from([("channel".into(), "newsletter".into())]),
        subject: None,
        // UUID-like: 36 characters.
        event_id: with_id.then(|| {
            let h = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                h >> 32,
                (h >> 16) & 0xffff,
                h & 0xffff,
                index & 0xffff,
                index
            )
        }),
    })
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn fill(dir: &Path, n: u64, with_ids: bool, abort: bool) {
    let log = EventLog::open(dir, StoreOptions::default()).unwrap();
    let started = Instant::now();
    let threads = 2;
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let log = log.clone();
            scope.spawn(move || {
                let mut first = thread * BATCH;
                while first < n {
                    let events = (first..(first + BATCH).min(n))
                        .map(|index| measurement(index, with_ids))
                        .collect();
                    log.append_blocking(AppendRequest {
                        events,
                        validation_unchanged_since: None,
                        ..Default::default()
                    })
                    .unwrap();
                    first += threads * BATCH;
                    if thread == 0 && (first / BATCH).is_multiple_of(500) {
                        eprintln!(
                            "{first} events, {:.0}/s, {:?}, RSS {:.0} MiB",
                            first as f64 / started.elapsed().as_secs_f64(),
                            log.dedup_stats(),
                            rss_mib()
                        );
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let stats = log.dedup_stats();
    println!(
        "fill: {n} events ({}) in {:.1} s = {:.0} events/s; dedup {stats:?} = {:.1} MiB; RSS {:.0} MiB",
        if with_ids { "ids" } else { "no ids" },
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        stats.memory_bytes as f64 / 1048576.0,
        rss_mib()
    );
    if abort {
        // As kill -9: no close, no final spill.
        std::process::abort();
    }
    let closing = Instant::now();
    log.close().unwrap();
    println!("close: {:.2} s", closing.elapsed().as_secs_f64());
}

fn open(dir: &Path) {
    let started = Instant::now();
    let log = EventLog::open(dir, StoreOptions::default()).unwrap();
    let opened = started.elapsed();
    let found = log.find_event_id(&{
        let Event::MeasurementRecorded(m) = measurement(7, true) else {
            unreachable!()
        };
        m.event_id.unwrap()
    });
    let answered = started.elapsed();
    let stats = log.dedup_stats();
    println!(
        "open: {:.3} s, first lookup answered after {:.3} s (id 7 at {found:?}); dedup {stats:?} = {:.1} MiB; RSS {:.0} MiB",
        opened.as_secs_f64(),
        answered.as_secs_f64(),
        stats.memory_bytes as f64 / 1048576.0,
        rss_mib()
    );
    log.close().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["fill", dir, n, mode, rest @ ..] => fill(
            Path::new(dir),
            n.parse().unwrap(),
            *mode == "ids",
            rest.first() == Some(&"abort"),
        ),
        ["open", dir] => open(Path::new(dir)),
        _ => eprintln!("usage: dedup fill DIR N ids|none [abort] | dedup open DIR"),
    }
}
