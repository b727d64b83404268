//! The dashboard in real headless Chromium (Debian's, driven through chromedriver
//! by fantoccini), against the real local stack: API server, operator, NATS, an
//! agent running podman. Pages show what `.status` and the devices say; an open
//! page follows a failure and its recovery, and a silent agent, without a reload.
//! Screenshots of every page land in target/screenshots/.

use std::time::Instant;

mod common;

use common::*;
use iot_e2e::stack::*;
use iot_testkit::{free_port, podman_cli, unique_id, wait_until};
use serde_json::json;

#[tokio::test]
async fn pages_match_kubectl_and_follow_failures_and_silence_live() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.operator_env.push(("IOT_STALE_AFTER".into(), "6s".into()));
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let (dev, guard) = stack.start_agent()?;
    // A tag of our own: the test takes it away to make the device fail.
    let image = format!("localhost/iot-web:{}", unique_id("dash"));
    podman_cli(&["tag", "localhost/iot-web:v1", &image])?;
    let http = free_port()?;
    let mut cmd = stack.applier()?;
    cmd.args([
        "--name",
        "web",
        "--namespace",
        "default",
        "--target-device",
        &dev,
        "--image",
        &image,
    ])
    .args(["--port", &http.to_string()]);
    run_ok(cmd)?;
    let st = stack
        .wait_resource_status("default", "web", "succeeded", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1)
        })
        .await?;
    let agg = st.aggregate.clone().unwrap_or_default();

    let (_dashboard, port) = spawn_dashboard(&stack, "6s")?;
    wait_until(WAIT, "dashboard /readyz", || async {
        (iot_testkit::http::get_status("127.0.0.1", port, "/readyz").await.ok()? == 200).then_some(())
    })
    .await?;
    let b = browser(stack.dir.path()).await?;
    let c = &b.client;
    let base = format!("http://127.0.0.1:{port}");

    // Overview: the counts the fleet has.
    c.goto(&format!("{base}/")).await?;
    wait_text(c, "#live", "live indicator", |t| t == "live").await?;
    assert_eq!(text(c, r#"[data-stat="online"] .value"#).await.as_deref(), Some("1"));
    assert_eq!(text(c, r#"[data-stat="ready"] .value"#).await.as_deref(), Some("1"));
    assert_eq!(text(c, r#"[data-stat="stale"] .value"#).await.as_deref(), Some("0"));
    screenshot(c, "overview").await?;

    // The list shows what .status says (what `kubectl get iotdep` prints).
    c.goto(&format!("{base}/deployments")).await?;
    let row = r#"tr[data-deployment="default/web"]"#;
    for (col, want) in [
        ("targets", agg.targets),
        ("succeeded", agg.succeeded),
        ("failed", agg.failed),
        ("pending", agg.pending),
        ("unreported", agg.unreported),
    ] {
        assert_eq!(
            text(c, &format!(r#"{row} [data-col="{col}"]"#)).await,
            Some(want.to_string()),
            "{col}"
        );
    }
    screenshot(c, "deployments").await?;

    // The deployment's page, left open: a failure and its recovery arrive live.
    c.goto(&format!("{base}/deployments/default/web")).await?;
    let phase = format!(r#"tr[data-device="{dev}"] [data-col="phase"]"#);
    wait_text(c, &phase, "running", |t| t.contains("running")).await?;
    wait_text(c, "#live", "live", |t| t == "live").await?;
    c.execute("window.__sameDocument = 42; return null;", vec![]).await?;
    let ids = guard.running_ids();
    anyhow::ensure!(!ids.is_empty(), "no running container");
    // `podman untag IMAGE` alone would strip every name of the image, v1 included.
    podman_cli(&["untag", &image, &image])?;
    podman_cli(&["rm", "-f", "-t", "0", &ids[0]])?;
    let t = Instant::now();
    wait_text(c, &phase, "failed on the open page", |t| t.contains("failed")).await?;
    let to_failed = t.elapsed();
    screenshot(c, "deployment-failed").await?;
    podman_cli(&["tag", "localhost/iot-web:v1", &image])?;
    let t = Instant::now();
    wait_text(c, &phase, "running again on the open page", |t| t.contains("running")).await?;
    let to_recovered = t.elapsed();
    let same = c.execute("return window.__sameDocument === 42;", vec![]).await?;
    assert_eq!(same, json!(true), "the page was reloaded");
    eprintln!("open page: failed {to_failed:?} after the removal, running {to_recovered:?} after the image was back");
    screenshot(c, "deployment").await?;

    // The failed-only filter.
    c.goto(&format!("{base}/deployments/default/web?phase=failed")).await?;
    assert_eq!(text(c, &phase).await, None, "a running device is filtered out");

    // The device page, then its agent falls silent: stale, on the open page.
    c.goto(&format!("{base}/devices/{dev}")).await?;
    wait_text(c, "h1", "device heading", |t| t.contains("online")).await?;
    screenshot(c, "device").await?;
    c.goto(&format!("{base}/devices")).await?;
    let state = format!(r#"tr[data-device="{dev}"] [data-col="state"]"#);
    wait_text(c, &state, "online", |t| t.contains("online")).await?;
    wait_text(c, "#live", "live", |t| t == "live").await?;
    stack.kill_agent(&dev);
    let t = Instant::now();
    wait_text(c, &state, "stale on the open page", |t| t.contains("stale")).await?;
    eprintln!(
        "open page: stale {:?} after the agent stopped (threshold 6 s)",
        t.elapsed()
    );
    screenshot(c, "devices").await?;
    let _ = podman_cli(&["untag", &image, &image]);
    Ok(())
}

#[tokio::test]
async fn an_unknown_deployment_or_device_is_a_clear_404() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    // The dashboard reads device reports from the operator's snapshot: ready once
    // it has one.
    stack.start_operator()?;
    let (_dashboard, port) = spawn_dashboard(&stack, "30s")?;
    wait_until(WAIT, "dashboard /readyz", || async {
        (iot_testkit::http::get_status("127.0.0.1", port, "/readyz").await.ok()? == 200).then_some(())
    })
    .await?;
    for path in ["/deployments/default/nope", "/devices/nope", "/devices/not%20an%20id"] {
        let (status, body) = iot_testkit::http::get("127.0.0.1", port, path).await?;
        assert_eq!(status, 404, "{path}");
        assert!(body.contains("Not found"), "{path}: {body}");
    }
    let (status, body) = iot_testkit::http::get("127.0.0.1", port, "/").await?;
    assert_eq!(status, 200);
    // Complete without JavaScript: the numbers are in the HTML itself.
    assert!(body.contains(r#"data-stat="online""#), "{body}");
    Ok(())
}
