//! The whole loop with NATS secured: the operator and the agent connect with their
//! own OpenBao-issued identities through the auth callout, each confined to its own
//! subjects. Apply, HTTP 200, upgrade, delete and `.status.aggregate` all work, and
//! the device never needed a JetStream consumer.

use harmony_reconciler_contracts::DeploymentRef;
use iot_e2e::stack::*;
use iot_testkit::{free_port, wait_until};

#[tokio::test]
async fn the_whole_loop_runs_with_per_identity_credentials() -> anyhow::Result<()> {
    let mut stack = Stack::start_secured().await?;
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let (dev, guard) = stack.start_enrolled_agent().await?;
    let port = free_port()?;
    let dep = DeploymentRef::new("default", "web")?;
    let apply = |image: &str| -> anyhow::Result<()> {
        let mut cmd = stack.applier()?;
        cmd.args([
            "--name",
            "web",
            "--namespace",
            "default",
            "--target-device",
            &dev,
            "--image",
            image,
        ])
        .args(["--port", &port.to_string()]);
        run_ok(cmd).map(drop)
    };

    apply("localhost/iot-web:v1")?;
    wait_http(port, "v1").await?;
    stack
        .wait_resource_status("default", "web", "aggregate.succeeded == 1", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1 && a.targets == 1)
        })
        .await?;

    apply("localhost/iot-web:v2")?;
    wait_http(port, "v2").await?;
    let v2_hash = stack
        .deployments("default")
        .get("web")
        .await?
        .spec
        .score
        .spec_hash()
        .to_string();
    stack
        .wait_resource_status("default", "web", "succeeded on v2", |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.succeeded == 1 && a.spec_hash == v2_hash)
        })
        .await?;

    let mut cmd = stack.applier()?;
    cmd.args(["--name", "web", "--namespace", "default", "--delete"]);
    run_ok(cmd)?;
    wait_until(WAIT, "container gone", || async {
        guard.ids().is_empty().then_some(())
    })
    .await?;
    wait_until(WAIT, "keys gone", || async {
        stack.keys_of(&dep).await.ok().filter(|k| k.is_empty())
    })
    .await?;

    // Both daemons really ran under their identities.
    assert!(stack.operator_log().contains("identity operator (operator)"));
    let agent_log = stack.agents[0].log_text();
    assert!(agent_log.contains(&format!("identity {dev} (device)")), "{agent_log}");
    // The device read its state through the responder: no consumer on the stream
    // is filtered to the device (the operator's index watch and this test's key
    // listings cover the whole bucket).
    use futures::TryStreamExt;
    let stream = stack.js.get_stream("KV_desired-state").await?;
    let consumers: Vec<_> = stream.consumers().try_collect().await?;
    for c in &consumers {
        let filters = format!("{} {:?}", c.config.filter_subject, c.config.filter_subjects);
        assert!(!filters.contains(&dev), "a consumer for the device: {filters}");
    }
    let log = stack
        .security
        .as_ref()
        .map(|s| s.callouts[0].process.log_text())
        .unwrap_or_default();
    assert!(!log.contains("NATS connect refused"), "{log}");
    Ok(())
}
