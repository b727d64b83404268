//! What every daemon's `main` does the same way: logging set up from `RUST_LOG`,
//! and waiting for the signal to stop.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `RUST_LOG` (`default_filter` when unset), as JSON
/// lines when `json` (for log collectors) and as text otherwise.
pub fn init_logging(json: bool, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

/// Waits for SIGTERM (what systemd and Kubernetes send) or Ctrl-C. A handler
/// that cannot be installed is logged, and the other one still works.
pub async fn shutdown_signal() {
    shutdown_signal_with(|problem| tracing::warn!("{problem}")).await;
}

/// As [`shutdown_signal`], telling `warn` about handler problems (for a
/// program that talks to people without a log).
pub async fn shutdown_signal_with(warn: impl Fn(&str)) {
    use tokio::signal::unix::{SignalKind, signal};
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn(&format!(
                "cannot listen for Ctrl-C ({e}); only SIGTERM stops this process"
            ));
            std::future::pending::<()>().await;
        }
    };
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                () = ctrl_c => {}
            }
        }
        Err(e) => {
            warn(&format!(
                "cannot listen for SIGTERM ({e}); only Ctrl-C stops this process"
            ));
            ctrl_c.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sigterm_ends_the_wait() {
        let waiting = tokio::spawn(shutdown_signal_with(|p| panic!("{p}")));
        // The handler is installed on the first poll; give the task that poll.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap_or_else(|e| panic!("not stopped by SIGTERM: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
