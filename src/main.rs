//! `kpi-server`: parses flags and environment, starts tracing, and runs the service until
//! SIGINT or SIGTERM (or, with `recover`, repairs a data directory and exits; with
//! `token`, prints a new bearer token and its auth file entry).

use std::process::ExitCode;

use kpi_service::Config;
use kpi_service::api::auth::Role;
use kpi_service::config::Command;
use tokio::net::TcpListener;

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
    let _telemetry = match kpi_service::telemetry::init(
        config.log_format == "json",
        config.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("kpi-server: {error}");
            return ExitCode::FAILURE;
        }
    };
    match config.command.clone() {
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
        Some(Command::Backup {
            to,
            server,
            token_file,
            server_ca,
        }) => backup(&to, server, token_file.as_deref(), server_ca.as_deref()),
        Some(Command::Restore { from }) => {
            let options = kpi_service::store::StoreOptions {
                min_free_bytes: config.min_free_bytes(),
                ..Default::default()
            };
            match kpi_service::backup::restore(&from, &config.data_dir, &options) {
                Ok(manifest) => {
                    println!(
                        "restored {} events into {} (head hash {}); the next start rebuilds the read models",
                        manifest.head_seq,
                        config.data_dir.display(),
                        manifest.head_hash
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    tracing::error!(%error, "restore refused");
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

/// `kpi-server backup`: copies the log of the server at `server` into `to`.
fn backup(
    to: &std::path::Path,
    server: String,
    token_file: Option<&std::path::Path>,
    server_ca: Option<&std::path::Path>,
) -> ExitCode {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))
    };
    let token = match token_file.map(read).transpose() {
        Ok(token) => token.map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned()),
        Err(error) => {
            tracing::error!(%error, "cannot read the token");
            return ExitCode::FAILURE;
        }
    };
    let ca_pem = match server_ca.map(read).transpose() {
        Ok(pem) => pem,
        Err(error) => {
            tracing::error!(%error, "cannot read the server CA");
            return ExitCode::FAILURE;
        }
    };
    let options = kpi_service::backup::BackupOptions {
        server,
        token,
        ca_pem,
        to: to.to_owned(),
    };
    let taken = tokio::runtime::Runtime::new()
        .map_err(|error| kpi_service::backup::BackupError::Server(error.to_string()))
        .and_then(|runtime| runtime.block_on(kpi_service::backup::backup(&options)));
    match taken {
        Ok(manifest) => {
            println!(
                "backed up {} events to {} (head hash {})",
                manifest.head_seq,
                to.display(),
                manifest.head_hash
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "backup failed");
            ExitCode::FAILURE
        }
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
