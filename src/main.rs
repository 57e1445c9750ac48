//! `kpi-server`: parses flags and environment, starts tracing, and runs the service until
//! SIGINT or SIGTERM (or, with `recover`, repairs a data directory and exits; with
//! `token`, prints a new bearer token and its auth file entry).

use std::process::ExitCode;

use kpi_service::Config;
use kpi_service::api::auth::Role;
use kpi_service::config::Command;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the read models free old buckets and allocate new
/// ones all the time from several threads, and glibc's per-thread arenas kept the freed
/// memory (resident 600 MiB for a 337 MiB peak heap in the history benchmark). Built
/// without transparent huge pages (the `no_thp` feature), and tuned by
/// [`return_freed_memory_soon`]: with mimalloc's defaults a 4 M ingest ended at 476 MiB
/// resident, with those settings at 329 MiB (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc's `mimalloc.h` (libmimalloc-sys names no constant
/// for it): how many milliseconds freed memory waits before it is returned to the system.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `mi_option_generic_collect` of the same header: a thread collects its heap (frees its
/// retired pages and takes back pages other threads freed into) every N of its
/// allocations that miss the fast path.
const MI_OPTION_GENERIC_COLLECT: libmimalloc_sys::mi_option_t = 34;

/// Sets mimalloc's purge delay to 0 (its default is 10 ms, and arenas wait ten times
/// that): the buckets that leave memory are freed in bursts, and with the delay the next
/// burst of allocations came before the last one's memory was returned. And collects
/// every 1,000 slow allocations instead of 10,000: an 8 M ingest ended 20 MiB smaller, at
/// the same rate (BENCHMARKS.md).
#[allow(unsafe_code)]
fn return_freed_memory_soon() {
    // SAFETY: mi_option_set only stores the value in mimalloc's option table (an atomic
    // store); mimalloc reads these options each time it purges or collects.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_GENERIC_COLLECT, 1000);
    }
}

fn main() -> ExitCode {
    return_freed_memory_soon();
    let config = Config::load().unwrap_or_else(|error| error.exit());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    match config.command {
        Some(Command::Recover {
            accept_other_history,
        }) => match kpi_service::recover::recover(&config, accept_other_history) {
            Ok(recovery) => {
                println!("{recovery}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(%error, "recovery stopped");
                ExitCode::FAILURE
            }
        },
        Some(Command::Token { name, roles }) => {
            let roles: Vec<Role> = roles.iter().filter_map(|r| Role::from_name(r)).collect();
            match kpi_service::api::auth::new_token(&name, &roles) {
                Ok((token, entry)) => {
                    eprintln!(
                        "# The token below is shown once and stored nowhere: give it to the client\n\
                         # (header 'authorization: Bearer <token>'). Add the entry after it to the\n\
                         # auth file (--auth-file); the server reloads the file when it changes."
                    );
                    println!("{token}\n\n{entry}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    tracing::error!(%error, "no token made");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::PublicKey) => {
            let Some(path) = &config.signing_key else {
                tracing::error!("public-key needs --signing-key");
                return ExitCode::FAILURE;
            };
            match kpi_service::signing::load(path, false) {
                Ok(key) => {
                    print!("{}", kpi_service::signing::public_key_text(&key));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    tracing::error!(%error, "no public key");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Serve) | None => serve(config),
    }
}

/// Serves until a signal; the process ends within the shutdown timeout after it.
fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    // Checked before binding too, so that a refused start never listens at all.
    if let Err(error) = config.refuse_insecure(config.listen) {
        tracing::error!(%error, "kpi-server not started");
        return ExitCode::FAILURE;
    }
    let result = runtime.block_on(async {
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(address = %config.listen, %error, "cannot listen");
                return Err(None);
            }
        };
        kpi_service::run(config, listener, shutdown_signal())
            .await
            .map_err(Some)
    });
    // A thread stuck in the log (a disk that no longer answers) must not keep the process
    // alive: the runtime is not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Some(error)) => {
            tracing::error!(%error, "kpi-server stopped");
            ExitCode::FAILURE
        }
        Err(None) => ExitCode::FAILURE,
    }
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM; stop with Ctrl-C");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
