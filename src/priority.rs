//! CPU priority of the background threads: the dedup index's run merges and the
//! read-model snapshots run at a lower priority than the commit path and the queries, so
//! that on a busy machine (two cores shared by the fold, the requests and the clients)
//! those win a contended core and the background work takes what is left. The work is the
//! same; it finishes later while the cores are busy. The as-of checkpoint thread keeps the
//! normal priority: an as-of fold reads what its checkpoints do not cover, so a thread
//! that lagged would make as-of questions slower (measured: as-of p99 23 ms with it lowered,
//! 8 ms without, BENCHMARKS.md).

/// How much nicer (Linux nice levels) a background thread runs than the rest: at 5 it
/// gets about a third of the share of a normal thread on a contended core, so it still
/// keeps up with sustained ingest.
const BACKGROUND_NICENESS: i32 = 5;

/// Lowers the calling thread's CPU priority to the background's, for good (an
/// unprivileged process cannot raise it again): call it only on a thread of its own.
/// Best effort: a failure is logged and the thread runs at the normal priority.
pub fn lower_this_thread() {
    // On Linux, PRIO_PROCESS with a thread id sets that thread's nice value alone.
    let thread = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
    let wanted = current.saturating_add(BACKGROUND_NICENESS).min(19);
    if let Err(error) = rustix::process::setpriority_process(Some(thread), wanted) {
        tracing::debug!(%error, "a background thread keeps the normal priority");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_background_thread_runs_nicer_than_the_one_that_started_it() {
        let normal = rustix::process::getpriority_process(None).expect("own priority");
        let lowered = std::thread::spawn(|| {
            super::lower_this_thread();
            rustix::process::getpriority_process(Some(rustix::thread::gettid()))
                .expect("the thread's priority")
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (normal + super::BACKGROUND_NICENESS).min(19));
        assert_eq!(
            rustix::process::getpriority_process(Some(rustix::thread::gettid()))
                .expect("this thread's priority"),
            normal,
            "only the background thread changed"
        );
    }
}
