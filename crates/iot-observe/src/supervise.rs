//! Supervision shared by the daemons: every task they spawn is essential, so the
//! first one that ends, for whatever reason, ends the process with an error naming
//! it. A supervisor (systemd `Restart=on-failure`, a Kubernetes Deployment) then
//! restarts the whole process, which is simpler to reason about than a half-alive one.

use thiserror::Error;
use tokio::task::{JoinError, JoinSet};

/// Why a task ended: whatever error type the daemon uses.
pub type TaskError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Named essential tasks. A task returns its name and why it ended.
pub type Tasks = JoinSet<(&'static str, Result<(), TaskError>)>;

/// An essential task ended.
#[derive(Debug, Error)]
pub enum Ended {
    #[error("{task} ended")]
    Returned { task: &'static str },
    #[error("{task} ended")]
    Failed {
        task: &'static str,
        #[source]
        why: TaskError,
    },
    #[error("a task panicked: {0}")]
    Panicked(JoinError),
    #[error("a task was cancelled: {0}")]
    Cancelled(JoinError),
}

/// Waits until one of `tasks` ends and says which and why. Pending forever when
/// there are none, so it can sit in a `select!` next to the real work.
pub async fn next_ending(tasks: &mut Tasks) -> Ended {
    match tasks.join_next().await {
        Some(joined) => ended(joined),
        None => std::future::pending().await,
    }
}

/// The error for a task that ended.
pub fn ended(joined: Result<(&'static str, Result<(), TaskError>), JoinError>) -> Ended {
    match joined {
        Ok((task, Ok(()))) => Ended::Returned { task },
        Ok((task, Err(why))) => Ended::Failed { task, why },
        Err(e) if e.is_panic() => Ended::Panicked(e),
        Err(e) => Ended::Cancelled(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real follower or index cannot be made to die on demand against real servers,
    // so these tasks stand in for them; what is under test is that any ending is
    // reported and named.

    /// The whole chain, as a daemon's log shows it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_its_reason() {
        let mut tasks = Tasks::new();
        tasks.spawn(async { ("desired-state follower", Err("subscription closed".into())) });
        tasks.spawn(async {
            std::future::pending::<()>().await;
            ("status reporter", Ok(()))
        });
        let text = chain(&next_ending(&mut tasks).await);
        assert_eq!(text, "desired-state follower ended: subscription closed");
    }

    #[tokio::test]
    async fn a_panic_or_a_clean_return_is_an_ending_too() {
        let mut tasks = Tasks::new();
        tasks.spawn(async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
            ("x", Ok(()))
        });
        assert!(next_ending(&mut tasks).await.to_string().contains("panicked"));
        let mut tasks = Tasks::new();
        tasks.spawn(async { ("aggregator", Ok(())) });
        assert_eq!(next_ending(&mut tasks).await.to_string(), "aggregator ended");
    }

    #[tokio::test]
    async fn no_tasks_means_no_ending() {
        let mut tasks = Tasks::new();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), next_ending(&mut tasks)).await;
        assert!(waited.is_err());
    }
}
