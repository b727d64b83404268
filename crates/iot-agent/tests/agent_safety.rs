//! The agent on real podman and a real nats-server, where things go wrong: upgrades
//! that cannot work, containers changed behind its back, a runtime that goes away,
//! shutdown while NATS is down.

mod common;

use std::time::{Duration, Instant};

use common::*;
use harmony_reconciler_contracts::{Phase, RuntimeState, Severity};
use iot_testkit::{PodmanService, free_port, podman::podman_cli, wait_until};

fn web_with(image: &str, port: u16, extra: serde_json::Value) -> harmony_reconciler_contracts::IotScore {
    let mut svc =
        serde_json::json!({"name": "web", "image": image, "ports": [{"host_port": port, "container_port": 80}]});
    if let (Some(obj), Some(extra)) = (svc.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    service_score(svc)
}

#[tokio::test]
async fn upgrade_to_a_missing_image_keeps_v1_serving_and_reports_the_registry_error() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let (web, port, _) = web_v1_running(&stack, &dev).await?;
    let before = guard.running_ids();

    let h2 = stack
        .put(&dev, &web, &web_score("localhost/iot-web:no-such-tag", port))
        .await?;
    let status = stack.wait_phase(&dev, &web, Phase::Failed, Some(&h2)).await?;
    let err = status.deployments[&web].last_error.clone().unwrap_or_default();
    eprintln!("error: {err}");
    assert!(err.contains("localhost/iot-web:no-such-tag"), "{err}");
    assert!(
        err.contains("image localhost/iot-web:no-such-tag not found")
            && err.contains("localhost/ images are never pulled"),
        "{err}"
    );
    // podman's own answer is in it (nothing listens on localhost:443 here).
    assert!(err.contains("connection refused"), "{err}");
    wait_http(port, "v1").await?;
    assert_eq!(guard.running_ids(), before, "the working container was touched");
    // And it stays that way across resyncs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_http(port, "v1").await?;
    assert_eq!(guard.running_ids(), before);
    Ok(())
}

#[tokio::test]
async fn upgrade_whose_command_exits_at_once_is_rolled_back_to_v1() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let (web, port, _) = web_v1_running(&stack, &dev).await?;
    let before = guard.running_ids();

    // Same image, a command that exits with 3 at once; podman's restart policy
    // would restart it in a tight loop.
    let broken = web_with(
        "localhost/iot-web:v2",
        port,
        serde_json::json!({"command": ["/bin/sh", "-c", "exit 3"]}),
    );
    let h2 = stack.put(&dev, &web, &broken).await?;
    let status = stack.wait_phase(&dev, &web, Phase::Failed, Some(&h2)).await?;
    let err = status.deployments[&web].last_error.clone().unwrap_or_default();
    eprintln!("error: {err}");
    // Podman restarts it at once (policy Always): the settle check sees it either
    // between two runs or in one.
    assert!(
        err.contains("the new container kept exiting") || err.contains("the new container exited with code 3"),
        "{err}"
    );
    assert!(err.contains("previous version keeps running"), "{err}");
    wait_http(port, "v1").await?;
    assert_eq!(
        guard.running_ids(),
        before,
        "the old container is the one running again"
    );
    assert_eq!(guard.ids().len(), 1, "the failed replacement was removed");

    // The retry waits 30 s. v1 stops meanwhile (`podman stop`: podman's own
    // restart policy leaves a container a person stopped alone); the agent starts
    // it again at once, without waiting for the upgrade's retry.
    let stopped_at = Instant::now();
    if let Err(e) = podman_cli(&["stop", "-t", "0", &before[0]]) {
        // The agent may start it again before `podman stop` has done its own
        // cleanup, which then fails with "is running ... refusing to clean up":
        // the stop happened, which is what this test needs.
        anyhow::ensure!(e.to_string().contains("refusing to clean up"), e);
    }
    wait_http(port, "v1").await?;
    let back_after = stopped_at.elapsed();
    eprintln!("v1 serves again {back_after:?} after it stopped");
    assert!(
        back_after < Duration::from_secs(25),
        "v1 waited for the upgrade's backoff"
    );
    assert_eq!(guard.running_ids(), before, "the same v1 container runs again");
    // v1 may answer before the pass that started it has published its report.
    let status = stack
        .wait_status(&dev, "the restart of the previous version reported", |s| {
            s.recent_events
                .iter()
                .any(|e| e.message.contains("of the previous version, which had stopped"))
        })
        .await?;
    let p = &status.deployments[&web];
    assert_eq!((p.phase, p.spec_hash.as_ref()), (Phase::Failed, Some(&h2)));
    Ok(())
}

#[tokio::test]
async fn v1_that_stops_while_its_upgrade_image_is_missing_comes_back() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let (web, port, _) = web_v1_running(&stack, &dev).await?;
    let v1 = guard.running_ids();
    let h2 = stack
        .put(&dev, &web, &web_score("localhost/iot-web:no-such-tag", port))
        .await?;
    stack.wait_phase(&dev, &web, Phase::Failed, Some(&h2)).await?;
    wait_http(port, "v1").await?;

    // v1 goes down twice while the upgrade cannot happen: stopped (as a person or
    // a shutdown would), then killed (as the OOM killer would).
    for how in [["stop", "-t", "0"], ["kill", "-s", "KILL"]] {
        let mut args = how.to_vec();
        args.push(&v1[0]);
        podman_cli(&args)?;
        wait_http(port, "v1").await?;
        assert_eq!(
            guard.running_ids(),
            v1,
            "after {how:?}: the same v1 container serves again"
        );
    }
    let status = stack.wait_phase(&dev, &web, Phase::Failed, Some(&h2)).await?;
    let err = status.deployments[&web].last_error.clone().unwrap_or_default();
    assert!(
        err.contains("no-such-tag"),
        "the upgrade's problem is still the one reported: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn container_removed_with_rm_f_is_reported_missing_then_restored_and_counted() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    // A long resync: only podman's event stream can make the agent react quickly.
    let _agent = Agent::spawn_with(&stack, &dev, &[("IOT_RESYNC_INTERVAL", "60s".into())])?;
    let (web, port, _) = web_v1_running(&stack, &dev).await?;
    let before = guard.running_ids();
    let recorder = StatusRecorder::start(&stack, &dev).await?;

    podman_cli(&["rm", "-f", "-t", "0", &before[0]])?;
    let removed_at = Instant::now();
    let status = stack
        .wait_status(&dev, "restore counted", |s| {
            s.deployments
                .get(&web)
                .is_some_and(|p| p.phase == Phase::Running && p.restores == 1)
        })
        .await?;
    eprintln!("restored and reported after {:?}", removed_at.elapsed());
    assert!(
        removed_at.elapsed() < Duration::from_secs(30),
        "the agent waited for its 60 s resync instead of reacting to the event"
    );
    assert_eq!(status.deployments[&web].recent_restarts, 1);
    let published = recorder.all();
    // Published while missing (a restore is only counted once it worked).
    let missing = published.iter().find(|s| {
        s.deployments
            .get(&web)
            .is_some_and(|p| p.phase != Phase::Running && p.restores == 0 && p.detail.is_some())
    });
    assert!(
        missing.is_some(),
        "the missing container was never published: {:#?}",
        published.iter().map(|s| &s.deployments[&web]).collect::<Vec<_>>()
    );
    let after = guard.running_ids();
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
    wait_http(port, "v1").await?;
    assert!(
        status
            .recent_events
            .iter()
            .any(|e| e.severity == Severity::Warning && e.message.contains("removed outside the agent"))
    );
    Ok(())
}

#[tokio::test]
async fn paused_container_is_not_running_and_is_unpaused() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn_with(&stack, &dev, &[("IOT_RESYNC_INTERVAL", "60s".into())])?;
    let (web, port, h1) = web_v1_running(&stack, &dev).await?;
    let id = guard.running_ids()[0].clone();
    podman_cli(&["pause", &id])?;
    let status = stack
        .wait_status(&dev, "unpause event", |s| {
            s.recent_events.iter().any(|e| e.message.contains("unpaused container"))
        })
        .await?;
    assert!(status.recent_events.iter().any(|e| e.severity == Severity::Warning));
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    wait_http(port, "v1").await?;
    assert_eq!(guard.running_ids(), [id], "unpaused, not re-created");
    Ok(())
}

#[tokio::test]
async fn crash_looping_service_is_failed_never_running() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, _guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let web = dep("default", "loop");
    let score = service_score(serde_json::json!({
        "name": "web", "image": "localhost/iot-web:v1",
        "command": ["/bin/sh", "-c", "sleep 0.3; exit 4"]
    }));
    let h = stack.put(&dev, &web, &score).await?;
    let status = stack.wait_phase(&dev, &web, Phase::Failed, Some(&h)).await?;
    let p = &status.deployments[&web];
    eprintln!("{p:?}");
    assert!(
        p.last_error.as_deref().is_some_and(|e| e.contains("crash loop")),
        "{p:?}"
    );
    assert!(p.restarts >= 3, "{p:?}");
    // It stays Failed while it keeps crashing: sample a few reports.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = stack.status_of(&dev).await.expect("status");
        assert_eq!(s.deployments[&web].phase, Phase::Failed, "{:?}", s.deployments[&web]);
    }
    Ok(())
}

#[tokio::test]
async fn podman_going_away_fails_the_deployments_and_they_recover() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let (dev, _guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let (web, port, h1) = web_v1_running(&stack, &dev).await?;

    stack.podman.stop();
    let status = stack.wait_phase(&dev, &web, Phase::Failed, Some(&h1)).await?;
    assert_eq!(status.runtime.state, RuntimeState::Unavailable);
    let err = status.deployments[&web].last_error.clone().unwrap_or_default();
    assert!(err.contains("container runtime unavailable"), "{err}");
    // The heartbeat goes on: the device is alive, it just cannot vouch for containers.
    let later = stack
        .wait_status(&dev, "heartbeats during the outage", |s| {
            s.heartbeat_at > status.heartbeat_at
        })
        .await?;
    assert_eq!(later.deployments[&web].phase, Phase::Failed);

    stack.podman.spawn().await?;
    let back = stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    assert_eq!(back.runtime.state, RuntimeState::Available);
    wait_http(port, "v1").await?;
    Ok(())
}

#[tokio::test]
async fn agent_started_before_its_podman_socket_waits_without_an_error() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut late = PodmanService::unstarted()?;
    let (dev, _guard) = device();
    let _agent = Agent::spawn_with(&stack, &dev, &[("PODMAN_SOCKET", late.socket().display().to_string())])?;
    let web = dep("default", "web");
    let port = free_port()?;
    let h1 = stack.put(&dev, &web, &web_score("localhost/iot-web:v1", port)).await?;
    let waiting = stack
        .wait_status(&dev, "waiting for the runtime", |s| {
            s.runtime.state == RuntimeState::Starting
                && s.deployments.get(&web).is_some_and(|p| p.phase == Phase::Pending)
        })
        .await?;
    assert!(
        !waiting.recent_events.iter().any(|e| e.severity == Severity::Error),
        "{:?}",
        waiting.recent_events
    );
    late.spawn().await?;
    let status = stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    assert!(
        !status.recent_events.iter().any(|e| e.severity == Severity::Error),
        "{:?}",
        status.recent_events
    );
    assert!(status.last_reconcile_at.is_some());
    wait_http(port, "v1").await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_ends_the_agent_within_seconds_while_nats_is_down() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let (dev, _guard) = device();
    let mut agent = Agent::spawn(&stack, &dev)?;
    wait_until(WAIT, "first status", || async { stack.status_of(&dev).await }).await?;
    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, took) = agent
        .terminate(Duration::from_secs(20))
        .ok_or_else(|| anyhow::anyhow!("agent still running 20 s after SIGTERM"))?;
    eprintln!("exited {status} after {took:?}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    Ok(())
}

#[tokio::test]
async fn metrics_and_readiness_are_served_when_asked_for() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, _guard) = device();
    let mport = free_port()?;
    let _agent = Agent::spawn_with(&stack, &dev, &[("IOT_METRICS_ADDR", format!("127.0.0.1:{mport}"))])?;
    web_v1_running(&stack, &dev).await?;
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let first = iot_testkit::http::get_text("127.0.0.1", mport, "/metrics").await?;
    assert!(
        metric(&first, "iot_agent_actions_total{action=\"create\",result=\"ok\"}") >= 1.0,
        "{first}"
    );
    assert!(metric(&first, "iot_agent_nats_connects_total") >= 1.0, "{first}");
    let passes = metric(&first, "iot_agent_reconcile_passes_total");
    assert!(passes >= 1.0, "{first}");
    // Resyncs every 2 s: the pass counter moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = iot_testkit::http::get_text("127.0.0.1", mport, "/metrics").await?;
    assert!(metric(&second, "iot_agent_reconcile_passes_total") > passes, "{second}");
    assert!(metric(&second, "iot_agent_status_publishes_total{result=\"ok\"}") >= 1.0);
    let ready = iot_testkit::http::get_status("127.0.0.1", mport, "/readyz").await?;
    assert_eq!(ready, 200);
    Ok(())
}

#[tokio::test]
async fn a_taken_metrics_port_is_a_clear_startup_error() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let holder = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = holder.local_addr()?;
    let (dev, _guard) = device();
    let mut agent = Agent::spawn_with(&stack, &dev, &[("IOT_METRICS_ADDR", taken.to_string())])?;
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .ok_or_else(|| anyhow::anyhow!("agent did not exit"))?;
    assert!(!status.success());
    let log = agent.log_text();
    assert!(log.contains(&format!("cannot serve metrics on {taken}")), "{log}");
    Ok(())
}

#[tokio::test]
async fn the_same_failure_on_two_devices_reads_the_same() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev_a, _ga) = device();
    let (dev_b, _gb) = device();
    let _a = Agent::spawn(&stack, &dev_a)?;
    let _b = Agent::spawn(&stack, &dev_b)?;
    let taken = free_port()?;
    let _holder = std::net::TcpListener::bind(("0.0.0.0", taken))?;
    let web = dep("default", "web");
    let h = stack
        .put(&dev_a, &web, &web_score("localhost/iot-web:v1", taken))
        .await?;
    stack
        .put(&dev_b, &web, &web_score("localhost/iot-web:v1", taken))
        .await?;
    let a = stack.wait_phase(&dev_a, &web, Phase::Failed, Some(&h)).await?;
    let b = stack.wait_phase(&dev_b, &web, Phase::Failed, Some(&h)).await?;
    let (ea, eb) = (
        a.deployments[&web].last_error.clone().unwrap_or_default(),
        b.deployments[&web].last_error.clone().unwrap_or_default(),
    );
    eprintln!("{ea}");
    assert!(ea.contains("address already in use"), "{ea}");
    assert_eq!(ea, eb, "no device id or container id may differ");
    assert!(!ea.contains(&dev_a), "{ea}");
    Ok(())
}
