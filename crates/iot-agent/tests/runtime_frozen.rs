//! A podman service that stops answering, on real podman: its process frozen with
//! SIGSTOP, so its socket still accepts connections and nothing is ever answered.
//! The agent must notice, say so in its status while its heartbeat goes on, and
//! recover by itself once podman answers again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use harmony_reconciler_contracts::{Phase, RuntimeState};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The agent's default resync interval and runtime call timeout: the bound the
/// test checks is the one a device gets out of the box.
const RESYNC: &str = "10s";
const CALL_TIMEOUT: &str = "5s";
/// How long the agent may take to report a frozen runtime.
const NOTICE_WITHIN: Duration = Duration::from_secs(30);

/// A frozen process, thawed (SIGCONT) when dropped: on success, on a failed
/// assertion and on an early return alike, so no test leaves podman stopped.
struct Frozen {
    pid: Pid,
    thawed: bool,
}

impl Frozen {
    fn freeze(pid: u32) -> anyhow::Result<Self> {
        let pid = Pid::from_raw(i32::try_from(pid)?);
        kill(pid, Signal::SIGSTOP)?;
        Ok(Self { pid, thawed: false })
    }

    fn thaw(&mut self) -> anyhow::Result<()> {
        kill(self.pid, Signal::SIGCONT)?;
        self.thawed = true;
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed
            && let Err(e) = kill(self.pid, Signal::SIGCONT)
        {
            eprintln!("could not SIGCONT podman service {}: {e}", self.pid);
        }
    }
}

/// Open file descriptors of a process (connections given up on must be closed).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[tokio::test]
async fn a_podman_that_stops_answering_is_reported_within_30s_and_recovers_by_itself() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let mut agent = Agent::spawn_with(
        &stack,
        &dev,
        &[
            ("IOT_RESYNC_INTERVAL", RESYNC.into()),
            ("IOT_RUNTIME_CALL_TIMEOUT", CALL_TIMEOUT.into()),
        ],
    )?;
    let (web, port, h1) = web_v1_running(&stack, &dev).await?;
    let before = guard.running_ids();
    assert_eq!(before.len(), 1);
    let agent_pid = agent.pid().ok_or_else(|| anyhow::anyhow!("agent not running"))?;
    let podman_pid = stack
        .podman
        .pid()
        .ok_or_else(|| anyhow::anyhow!("podman service not running"))?;
    let fds_before = open_fds(agent_pid);

    let mut frozen = Frozen::freeze(podman_pid)?;
    let frozen_at = Instant::now();
    let reason = format!("container runtime did not answer within {CALL_TIMEOUT}");
    let failed = stack
        .wait_status(&dev, "the frozen runtime reported", |s| {
            s.runtime.state == RuntimeState::Unavailable
                && s.deployments
                    .get(&web)
                    .is_some_and(|p| p.phase != Phase::Running && p.last_error.as_deref() == Some(reason.as_str()))
        })
        .await?;
    let noticed = frozen_at.elapsed();
    eprintln!("frozen podman reported after {noticed:?}");
    assert!(noticed < NOTICE_WITHIN, "reported after {noticed:?}");
    let p = &failed.deployments[&web];
    assert_eq!(p.phase, Phase::Failed, "{p:?}");
    assert_eq!(p.spec_hash.as_ref(), Some(&h1));
    assert_eq!(failed.runtime.message.as_deref(), Some(reason.as_str()));

    // The heartbeat goes on while podman stays frozen, and still says so.
    let later = stack
        .wait_status(&dev, "heartbeats while podman is frozen", |s| {
            s.heartbeat_at > failed.heartbeat_at + chrono::Duration::seconds(3)
        })
        .await?;
    assert_eq!(later.deployments[&web].phase, Phase::Failed);
    assert_eq!(later.runtime.state, RuntimeState::Unavailable);
    // Containers do not need their podman service to serve.
    wait_http(port, "v1").await?;
    assert!(agent.is_running(), "the agent must not give up on a frozen runtime");
    let fds_frozen = open_fds(agent_pid);
    eprintln!(
        "agent file descriptors: {fds_before} before, {fds_frozen} after {:?} frozen",
        frozen_at.elapsed()
    );
    assert!(
        fds_frozen <= fds_before + 4,
        "calls given up on leave connections open: {fds_before} -> {fds_frozen}"
    );

    frozen.thaw()?;
    let thawed_at = Instant::now();
    let back = stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    let recovered = thawed_at.elapsed();
    eprintln!("Running again {recovered:?} after podman answered again");
    assert_eq!(back.runtime.state, RuntimeState::Available);
    assert_eq!(back.runtime.message, None);
    assert!(
        back.recent_events
            .iter()
            .any(|e| e.message == "container runtime reachable again"),
        "{:?}",
        back.recent_events
    );
    assert_eq!(guard.running_ids(), before, "the container was left alone");
    wait_http(port, "v1").await?;
    Ok(())
}
