//! Issue 4 on the real stack: device reports folded into `.status`.

use std::time::{Duration, Instant};

use iot_api::DeploymentStatus;
use iot_api::conditions::{DEGRADED, PROGRESSING, READY};
use iot_e2e::stack::*;
use iot_testkit::{free_port, podman::podman_cli};

fn cond<'a>(s: &'a DeploymentStatus, t: &str) -> Option<&'a str> {
    s.conditions.iter().find(|c| c.type_ == t).map(|c| c.status.as_str())
}

async fn stack_with_operator(stale_after: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::start().await?;
    stack.operator_env.push(("IOT_STALE_AFTER".into(), stale_after.into()));
    stack.start_operator()?;
    Ok(stack)
}

fn apply(stack: &Stack, name: &str, devices: &[&str], image: &str, port: Option<u16>) -> anyhow::Result<()> {
    let mut cmd = stack.applier()?;
    cmd.args(["--name", name, "--image", image]);
    for d in devices {
        cmd.args(["--target-device", d]);
    }
    if let Some(p) = port {
        cmd.args(["--port", &p.to_string()]);
    }
    run_ok(cmd).map(drop)
}

#[tokio::test]
async fn ready_after_apply_and_printer_columns_read_like_a_fleet_summary() -> anyhow::Result<()> {
    let mut stack = stack_with_operator("6s").await?;
    let (dev, _guard) = stack.start_agent()?;
    apply(
        &stack,
        "web",
        &[&dev, "never-seen"],
        "localhost/iot-web:v1",
        Some(free_port()?),
    )?;
    let st = stack
        .wait_resource_status("default", "web", "1 succeeded, 1 unreported", |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.succeeded == 1 && a.unreported == 1)
        })
        .await?;
    assert_eq!(cond(&st, READY), Some("False"), "one silent target means not Ready");
    assert_eq!(cond(&st, DEGRADED), Some("True"));
    let agg = st.aggregate.as_ref().expect("aggregate");
    assert!(agg.last_heartbeat_at.is_some());
    assert!(agg.recent_events.iter().any(|e| e.device.as_str() == dev));

    // Now only the real device: Ready.
    apply(&stack, "web", &[&dev], "localhost/iot-web:v1", None)?;
    let st = stack
        .wait_resource_status("default", "web", "Ready", |s| cond(s, READY) == Some("True"))
        .await?;
    assert_eq!(st.observed_generation, Some(2));
    let (ok, out, err) = stack
        .api
        .kubectl(&["get", "deployments.iot.nationtech.io", "-n", "default"], None)?;
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TARGETS",
            "SUCCEEDED",
            "FAILED",
            "PENDING",
            "UNREPORTED",
            "READY",
            "REVISION",
            "ROLLOUT",
            "AGE"
        ]
    );
    let row: Vec<&str> = out.lines().nth(1).unwrap_or("").split_whitespace().collect();
    assert_eq!(&row[..7], ["web", "1", "1", "0", "0", "0", "True"], "{out}");
    // Two scores, two revisions: the device runs the second.
    assert_eq!(&row[7..11], ["1/1", "on", "rev", "2"], "{out}");
    Ok(())
}

#[tokio::test]
async fn container_killed_out_of_band_shows_in_status_and_recovers() -> anyhow::Result<()> {
    let mut stack = stack_with_operator("6s").await?;
    let (dev, guard) = stack.start_agent()?;
    let port = free_port()?;
    apply(&stack, "web", &[&dev], "localhost/iot-web:v1", Some(port))?;
    stack
        .wait_resource_status("default", "web", "Ready", |s| cond(s, READY) == Some("True"))
        .await?;
    let ids = guard.running_ids();
    assert_eq!(ids.len(), 1);

    // Stop it behind the agent's back: podman does not restart a user-stopped container.
    if let Err(e) = podman_cli(&["stop", "-t", "0", &ids[0]]) {
        // The agent may start it again before `podman stop` has done its own
        // cleanup ("is running ... refusing to clean up"): the stop happened.
        anyhow::ensure!(e.to_string().contains("refusing to clean up"), e);
    }
    let t = Instant::now();
    // The plan: an out-of-band kill makes `.failed` increment within 30 s, however
    // fast the agent repairs it (a restart seen within a minute counts as failed).
    let st = stack
        .wait_resource_status("default", "web", "restart event and failed in .status", |s| {
            s.aggregate.as_ref().is_some_and(|a| {
                a.failed == 1
                    && a.restarts >= 1
                    && a.recent_events.iter().any(|e| e.message.contains("which had stopped"))
            })
        })
        .await?;
    let latency = t.elapsed();
    eprintln!("out-of-band stop visible in .status after {latency:?}");
    assert!(
        latency < Duration::from_secs(30),
        "plan requires < 30 s, took {latency:?}"
    );
    let agg = st.aggregate.expect("aggregate");
    assert_eq!(agg.targets, 1);

    // Remove it entirely: restored, with a warning event, and the aggregate recovers.
    let ids = guard.running_ids();
    podman_cli(&["rm", "-f", "-t", "0", &ids[0]])?;
    let t = Instant::now();
    stack
        .wait_resource_status("default", "web", "restore event", |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.recent_events.iter().any(|e| e.message.contains("restored container")))
        })
        .await?;
    eprintln!("out-of-band removal visible in .status after {:?}", t.elapsed());
    stack
        .wait_resource_status("default", "web", "Ready again", |s| {
            cond(s, READY) == Some("True") && s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1)
        })
        .await?;
    wait_http(port, "v1").await?;
    Ok(())
}

#[tokio::test]
async fn silent_agent_becomes_unreported_then_recovers() -> anyhow::Result<()> {
    let mut stack = stack_with_operator("5s").await?;
    let (dev, _guard) = stack.start_agent()?;
    apply(&stack, "web", &[&dev], "localhost/iot-web:v1", None)?;
    stack
        .wait_resource_status("default", "web", "Ready", |s| cond(s, READY) == Some("True"))
        .await?;

    stack.kill_agent(&dev);
    let t = Instant::now();
    let st = stack
        .wait_resource_status("default", "web", "unreported", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.unreported == 1)
        })
        .await?;
    let after = t.elapsed();
    eprintln!("silent device unreported after {after:?} (threshold 5 s)");
    assert!(
        after >= Duration::from_secs(3),
        "marked unreported too early: {after:?}"
    );
    assert_eq!(cond(&st, READY), Some("False"));
    assert_eq!(
        st.aggregate.as_ref().map(|a| a.succeeded),
        Some(0),
        "a silent device must not count as succeeded"
    );

    stack.spawn_agent(&dev)?;
    stack
        .wait_resource_status("default", "web", "recovered", |s| {
            cond(s, READY) == Some("True")
                && s.aggregate
                    .as_ref()
                    .is_some_and(|a| a.unreported == 0 && a.succeeded == 1)
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn during_an_upgrade_devices_on_the_old_spec_are_pending_not_succeeded() -> anyhow::Result<()> {
    let mut stack = stack_with_operator("20s").await?;
    let (fast, _g1) = stack.start_agent()?;
    let (slow, _g2) = stack.start_agent()?;
    apply(&stack, "web", &[&fast, &slow], "localhost/iot-web:v1", None)?;
    stack
        .wait_resource_status("default", "web", "2 succeeded", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 2)
        })
        .await?;

    // The slow device's agent is down (within the stale threshold) while v2 rolls out.
    stack.kill_agent(&slow);
    apply(&stack, "web", &[&fast, &slow], "localhost/iot-web:v2", None)?;
    let st = stack
        .wait_resource_status("default", "web", "1 succeeded on v2, 1 pending", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1 && a.pending == 1)
        })
        .await?;
    assert_eq!(cond(&st, PROGRESSING), Some("True"));
    assert_eq!(cond(&st, READY), Some("False"));
    // Its heartbeat said Running (old hash) just before: still not succeeded.
    let slow_status = stack.agent_status(&slow).await.expect("slow device reported before");
    assert!(
        slow_status
            .deployments
            .values()
            .all(|p| p.phase == harmony_reconciler_contracts::Phase::Running)
    );

    stack.spawn_agent(&slow)?;
    stack
        .wait_resource_status("default", "web", "rollout complete", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 2) && cond(s, PROGRESSING) == Some("False")
        })
        .await?;
    Ok(())
}
