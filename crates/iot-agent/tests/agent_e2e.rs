//! The agent against real nats-server and real podman: lifecycle, drift, restarts,
//! outages, bad input, and device isolation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use harmony_reconciler_contracts::{Phase, Severity};
use iot_testkit::{free_port, podman::podman_cli, wait_until};

#[tokio::test]
async fn v1_then_v2_then_delete() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let web = dep("default", "web");
    let port = free_port()?;

    let h1 = stack.put(&dev, &web, &web_score("localhost/iot-web:v1", port)).await?;
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    wait_http(port, "v1").await?;
    let ids_v1 = guard.running_ids();
    assert_eq!(ids_v1.len(), 1, "one container for one service");

    let h2 = stack.put(&dev, &web, &web_score("localhost/iot-web:v2", port)).await?;
    assert_ne!(h1, h2);
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h2)).await?;
    wait_http(port, "v2").await?;
    let ids_v2 = guard.running_ids();
    assert_eq!(ids_v2.len(), 1);
    assert_ne!(ids_v1, ids_v2, "upgrade must replace the container");

    stack.delete(&dev, &web).await?;
    wait_until(WAIT, "containers removed", || async {
        guard.ids().is_empty().then_some(())
    })
    .await?;
    let status = stack
        .wait_status(&dev, "deployment dropped from status", |s| {
            !s.deployments.contains_key(&web)
        })
        .await?;
    assert!(
        status
            .recent_events
            .iter()
            .any(|e| e.message.contains("deployment deleted")),
        "{:?}",
        status.recent_events
    );
    assert!(
        status
            .inventory
            .as_ref()
            .is_some_and(|i| i.cpu_cores > 0 && !i.kernel.is_empty())
    );
    Ok(())
}

#[tokio::test]
async fn container_removed_out_of_band_is_restored_within_resync() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let (_, port, _) = web_v1_running(&stack, &dev).await?;
    let before = guard.running_ids();
    assert_eq!(before.len(), 1);

    podman_cli(&["rm", "-f", "-t", "0", &before[0]])?;
    let removed_at = Instant::now();
    let after = wait_until(WAIT, "replacement container", || async {
        let ids = guard.running_ids();
        (ids.len() == 1 && ids != before).then_some(ids)
    })
    .await?;
    let restore_latency = removed_at.elapsed();
    // The agent resyncs every 2 s in these tests; allow for one pass plus podman's work.
    assert!(
        restore_latency < Duration::from_secs(15),
        "restored after {restore_latency:?}"
    );
    eprintln!("out-of-band removal restored after {restore_latency:?}");
    wait_http(port, "v1").await?;
    let status = stack
        .wait_status(&dev, "restore event", |s| {
            s.recent_events.iter().any(|e| e.message.contains("restored container"))
        })
        .await?;
    let ev = status
        .recent_events
        .iter()
        .find(|e| e.message.contains("restored"))
        .expect("event");
    assert_eq!(ev.severity, Severity::Warning);
    assert_ne!(after, before);
    Ok(())
}

#[tokio::test]
async fn agent_restart_adopts_containers_without_recreating() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let mut agent = Agent::spawn(&stack, &dev)?;
    let (web, port, _) = web_v1_running(&stack, &dev).await?;
    let before = guard.running_ids();

    agent.kill();
    // Containers outlive the agent.
    wait_http(port, "v1").await?;
    let killed_at = chrono::Utc::now();
    agent.start(&stack)?;
    let status = stack
        .wait_status(&dev, "heartbeat from restarted agent", |s| {
            s.heartbeat_at > killed_at && s.deployments.get(&web).is_some_and(|p| p.phase == Phase::Running)
        })
        .await?;
    assert_eq!(
        guard.running_ids(),
        before,
        "restart must not recreate an unchanged container"
    );
    assert!(
        !status
            .recent_events
            .iter()
            .any(|e| e.message.contains("created container")),
        "restarted agent created something: {:?}",
        status.recent_events
    );
    Ok(())
}

#[tokio::test]
async fn nats_outage_keeps_containers_and_converges_after() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let (dev, guard) = device();
    let mut agent = Agent::spawn(&stack, &dev)?;
    let (web, port, _) = web_v1_running(&stack, &dev).await?;

    stack.nats.stop();
    // Several resync periods without NATS: the service keeps answering, the agent lives.
    tokio::time::sleep(Duration::from_secs(6)).await;
    wait_http(port, "v1").await?;
    assert!(agent.is_running(), "agent died during the outage");
    assert_eq!(guard.running_ids().len(), 1);

    stack.nats.restart().await?;
    stack.reconnect().await?;
    let h2 = stack.put(&dev, &web, &web_score("localhost/iot-web:v2", port)).await?;
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h2)).await?;
    wait_http(port, "v2").await?;
    assert!(
        agent.log_text().contains("NATS disconnected"),
        "agent never noticed the outage"
    );
    Ok(())
}

#[tokio::test]
async fn each_bad_input_fails_only_its_deployment() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let mut agent = Agent::spawn(&stack, &dev)?;
    let good = dep("default", "good");
    let good_port = free_port()?;
    let hg = stack
        .put(&dev, &good, &web_score("localhost/iot-web:v1", good_port))
        .await?;
    stack.wait_phase(&dev, &good, Phase::Running, Some(&hg)).await?;
    let good_ids = guard.running_ids();

    // A port something else already holds.
    let taken_port = free_port()?;
    let _holder = std::net::TcpListener::bind(("0.0.0.0", taken_port))?;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"{not json".to_vec(), "does not parse"),
        (
            "future",
            br#"{"format":1,"deployment":"default/future","score":{"OkdApplyV0":{"manifests":[]}}}"#.to_vec(),
            "score variant OkdApplyV0 is not supported",
        ),
        (
            "noimage",
            br#"{"deployment":"default/noimage","score":{"PodmanV0":{"services":[{"name":"web","image":""}]}}}"#.to_vec(),
            "services[0].image: must not be empty",
        ),
        (
            "badimage",
            br#"{"deployment":"default/badimage","score":{"PodmanV0":{"services":[{"name":"web","image":"UPPER CASE!"}]}}}"#.to_vec(),
            "services[0].image",
        ),
        (
            "missingimage",
            serde_json::to_vec(&serde_json::json!({"deployment": "default/missingimage", "score": {"PodmanV0": {"services": [
                {"name": "web", "image": "localhost/iot-web:does-not-exist"}]}}}))?,
            "image localhost/iot-web:does-not-exist not found",
        ),
        (
            "porttaken",
            serde_json::to_vec(&serde_json::json!({"deployment": "default/porttaken", "score": {"PodmanV0": {"services": [
                {"name": "web", "image": "localhost/iot-web:v1", "ports": [{"host_port": taken_port, "container_port": 80}]}]}}}))?,
            "address already in use",
        ),
        (
            "dupnames",
            br#"{"deployment":"default/dupnames","score":{"PodmanV0":{"services":[{"name":"web","image":"localhost/iot-web:v1"},{"name":"web","image":"localhost/iot-web:v2"}]}}}"#.to_vec(),
            "duplicate service name \"web\"",
        ),
    ];
    for (name, bytes, _) in &cases {
        stack.put_raw(&dev, &dep("default", name), bytes.clone()).await?;
    }
    for (name, _, expected) in &cases {
        let d = dep("default", name);
        let status = stack
            .wait_status(&dev, &format!("{name} Failed"), |s| {
                s.deployments.get(&d).is_some_and(|p| {
                    p.phase == Phase::Failed && p.last_error.as_deref().is_some_and(|e| e.contains(expected))
                })
            })
            .await?;
        let err = status.deployments[&d].last_error.clone().unwrap_or_default();
        eprintln!("{name}: {err}");
    }
    // Everything else is untouched and the agent still works.
    assert!(agent.is_running());
    let status = stack.status_of(&dev).await.expect("status");
    assert_eq!(status.deployments[&good].phase, Phase::Running);
    let running = guard.running_ids();
    assert!(
        good_ids.iter().all(|id| running.contains(id)),
        "good deployment's container changed"
    );
    wait_http(good_port, "v1").await?;
    // And it still acts on new input.
    let later = dep("default", "later");
    let later_port = free_port()?;
    let hl = stack
        .put(&dev, &later, &web_score("localhost/iot-web:v2", later_port))
        .await?;
    stack.wait_phase(&dev, &later, Phase::Running, Some(&hl)).await?;
    wait_http(later_port, "v2").await?;
    Ok(())
}

#[tokio::test]
async fn two_agents_on_one_podman_host_never_touch_each_other() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev_a, guard_a) = device();
    let (dev_b, guard_b) = device();
    let _a = Agent::spawn(&stack, &dev_a)?;
    let _b = Agent::spawn(&stack, &dev_b)?;
    // Same deployment name on both devices.
    let web = dep("default", "web");
    let (pa, pb) = (free_port()?, free_port()?);
    let ha = stack.put(&dev_a, &web, &web_score("localhost/iot-web:v1", pa)).await?;
    let hb = stack.put(&dev_b, &web, &web_score("localhost/iot-web:v2", pb)).await?;
    stack.wait_phase(&dev_a, &web, Phase::Running, Some(&ha)).await?;
    stack.wait_phase(&dev_b, &web, Phase::Running, Some(&hb)).await?;
    let b_ids = guard_b.running_ids();
    assert_eq!((guard_a.running_ids().len(), b_ids.len()), (1, 1));

    // Deleting A's deployment removes only A's container.
    stack.delete(&dev_a, &web).await?;
    wait_until(WAIT, "A's container removed", || async {
        guard_a.ids().is_empty().then_some(())
    })
    .await?;
    // Give B several passes to misbehave.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(guard_b.running_ids(), b_ids, "B's container was touched");
    wait_http(pb, "v2").await?;
    Ok(())
}

#[tokio::test]
async fn the_revision_that_runs_is_reported_and_survives_an_agent_restart() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let mut agent = Agent::spawn(&stack, &dev)?;
    let web = dep("default", "web");
    let port = free_port()?;
    let h1 = stack
        .put_revision(&dev, &web, &web_score("localhost/iot-web:v1", port), 1)
        .await?;
    let running = stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    assert_eq!(running.deployments[&web].revision, Some(1));
    let ids = guard.running_ids();
    let label = podman_cli(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"iot.nationtech.io/revision\"}}",
        &ids[0],
    ])?;
    assert_eq!(label.trim(), "1", "stored next to the spec hash");

    // Revision 2 cannot be had: revision 1 keeps serving, and is what is reported.
    let h2 = stack
        .put_revision(&dev, &web, &web_score("localhost/iot-web:no-such-tag", port), 2)
        .await?;
    let failed = stack.wait_phase(&dev, &web, Phase::Failed, Some(&h2)).await?;
    assert_eq!(failed.deployments[&web].revision, Some(1));

    // After a restart the agent knows it from the container's label alone.
    agent.kill();
    let killed_at = chrono::Utc::now();
    agent.start(&stack)?;
    let after = stack
        .wait_status(&dev, "a report of the restarted agent after its first pass", |s| {
            s.heartbeat_at > killed_at
                && s.last_reconcile_at.is_some_and(|t| t > killed_at)
                && s.deployments.contains_key(&web)
        })
        .await?;
    assert_eq!(
        after.deployments[&web].revision,
        Some(1),
        "{:?}",
        after.deployments[&web]
    );
    assert_eq!(guard.running_ids(), ids);
    wait_http(port, "v1").await?;

    // Revision 3 works: it is what runs and what is reported.
    let h3 = stack
        .put_revision(&dev, &web, &web_score("localhost/iot-web:v2", port), 3)
        .await?;
    let upgraded = stack.wait_phase(&dev, &web, Phase::Running, Some(&h3)).await?;
    assert_eq!(upgraded.deployments[&web].revision, Some(3));
    wait_http(port, "v2").await?;
    Ok(())
}
