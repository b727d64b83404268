//! What every daemon's `main` does the same way: logging set up from `RUST_LOG`,
//! and waiting for the signal to stop.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Logs to stderr, filtered by `RUST_LOG` (`default_filter` when unset or
/// unreadable), as JSON lines when `json` (for log collectors) and as text
/// otherwise.
///
/// `RUST_LOG` takes a level and per-target levels: `info`,
/// `warn,iot_agent=debug`. Span and field filters (`[span{field=x}]`) are not
/// read: the regex engine they need was a tenth of the agent's binary.
pub fn init_logging(json: bool, default_filter: &str) {
    let (filter, unreadable) = log_filter(std::env::var("RUST_LOG").ok().as_deref(), default_filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    if let Some(why) = unreadable {
        tracing::warn!("RUST_LOG is not a filter ({why}); logging at {default_filter}");
    }
}

/// The filter `RUST_LOG` asks for, or `default_filter` (and why) when it is
/// unset or unreadable.
fn log_filter(rust_log: Option<&str>, default_filter: &str) -> (Targets, Option<String>) {
    let fallback = || {
        default_filter
            .parse()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => (fallback(), None),
        Some(asked) => match asked.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (fallback(), Some(e.to_string())),
        },
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
    use tracing::Level;

    use super::*;

    #[test]
    fn rust_log_reads_levels_per_target_and_falls_back_on_nonsense() {
        let (f, why) = log_filter(Some("warn,iot_agent=debug"), "info");
        assert!(why.is_none());
        assert!(f.would_enable("iot_agent::reconciler", &Level::DEBUG));
        assert!(!f.would_enable("async_nats", &Level::INFO));
        assert!(f.would_enable("async_nats", &Level::WARN));
        let (f, why) = log_filter(None, "info");
        assert!(why.is_none() && f.would_enable("x", &Level::INFO) && !f.would_enable("x", &Level::DEBUG));
        let (f, why) = log_filter(Some("iot_agent=loud"), "error");
        assert!(why.is_some(), "an unreadable filter is said");
        assert!(f.would_enable("x", &Level::ERROR) && !f.would_enable("x", &Level::WARN));
    }

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
