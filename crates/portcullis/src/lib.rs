//! The `portcullis` binary's library half: configuration loading and checking, the commands
//! (`run`, `validate`, `demo`, `inject-webhook`) and the signal handling around them, kept
//! here so integration tests drive the same code paths as the CLI.

pub mod cmd;
pub mod config;
pub mod demo;
pub mod webhook;

use std::time::Duration;

/// `EX_USAGE` (sysexits.h): the configuration or policies are invalid.
pub const EXIT_CONFIG: u8 = 64;
/// `EX_SOFTWARE`: a runtime failure (could not bind, audit sink unusable).
pub const EXIT_RUNTIME: u8 = 70;

/// Resolves when the process is asked to stop (SIGTERM, or Ctrl-C / SIGINT).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the proxy from a checked configuration until a shutdown signal, then drains.
pub async fn run(
    options: portcullis_proxy::ProxyOptions,
    drain: Duration,
) -> Result<(), portcullis_proxy::StartError> {
    let running = portcullis_proxy::start(options).await?;
    shutdown_signal().await;
    tracing::info!(?drain, "shutting down: draining in-flight requests");
    running.shutdown(drain).await;
    Ok(())
}

/// Default drain deadline for commands that do not read one from a config.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
