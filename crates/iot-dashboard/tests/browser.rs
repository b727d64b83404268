//! The dashboard in real headless Chromium (Debian's, driven through chromedriver
//! by fantoccini), against the real local stack: API server, operator, NATS, an
//! agent running podman. Pages show what `.status` and the devices say; an open
//! page follows a failure and its recovery, and a silent agent, without a reload.
//! Device objects mark devices (unregistered, revoked) and give them labels, live;
//! a selector deployment's targets come from its `.status`.
//! Screenshots of every page land in target/screenshots/.

use std::time::Instant;

mod common;

use common::*;
use iot_api::{Device, DeviceSpec, REVOKED_ANNOTATION};
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
    // The device reports without a Device object (the stack does not register it).
    assert_eq!(
        text(c, r#"[data-stat="unregistered"] .value"#).await.as_deref(),
        Some("1")
    );
    assert_eq!(text(c, r#"[data-stat="revoked"] .value"#).await.as_deref(), Some("0"));
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

    // The registry, on an open devices page: the device is unregistered until its
    // Device object comes, with its labels; a revoked Device is marked.
    c.goto(&format!("{base}/devices")).await?;
    let marks = format!(r#"tr[data-device="{dev}"] [data-col="marks"]"#);
    let labels = format!(r#"tr[data-device="{dev}"] [data-col="labels"]"#);
    wait_text(c, &marks, "unregistered", |t| t.contains("unregistered")).await?;
    wait_text(c, "#live", "live", |t| t == "live").await?;
    stack
        .register_device(&dev, &[("site", "lab"), ("ring", "canary")])
        .await?;
    let gone = unique_id("gone");
    let mut revoked = Device::new(&gone, DeviceSpec::default());
    revoked.metadata.annotations = Some(
        [(REVOKED_ANNOTATION.to_owned(), "2026-01-02T03:04:05Z".to_owned())]
            .into_iter()
            .collect(),
    );
    stack.devices().create(&Default::default(), &revoked).await?;
    wait_text(c, &labels, "labels on the open page", |t| t.contains("site=lab")).await?;
    assert_eq!(text(c, &marks).await.as_deref(), Some(""), "registered now");
    let gone_marks = format!(r#"tr[data-device="{gone}"] [data-col="marks"]"#);
    wait_text(c, &gone_marks, "revoked", |t| t.contains("revoked")).await?;
    screenshot(c, "devices-registry").await?;

    // A selector deployment lists no device in its spec: its targets come from
    // .status, and its page and the device's show the selector.
    let mut cmd = stack.applier()?;
    cmd.args(["--name", "web-lab", "--namespace", "default", "--selector", "site=lab"])
        .args(["--image", "localhost/iot-web:v1"]);
    run_ok(cmd)?;
    stack
        .wait_resource_status("default", "web-lab", "matched and counted", |s| {
            s.matched_devices == Some(1) && s.aggregate.as_ref().is_some_and(|a| a.targets == 1)
        })
        .await?;
    // From here the device starts web-lab's container, and Chromium may abort a
    // load when that adds a network interface: pages are loaded until they show.
    let row = r#"tr[data-deployment="default/web-lab"]"#;
    let targets = format!(r#"{row} [data-col="targets"]"#);
    goto_until(c, &format!("{base}/deployments"), &targets, "1 target", |t| t == "1").await?;
    assert_eq!(
        text(c, &format!(r#"{row} [data-col="selector"]"#)).await.as_deref(),
        Some("label site=lab")
    );
    wait_text(c, &format!(r#"{row} [data-col="revision"]"#), "revision 1", |t| {
        t.contains("rev 1")
    })
    .await?;
    screenshot(c, "deployments-selector").await?;
    goto_until(
        c,
        &format!("{base}/deployments/default/web-lab"),
        "#targeting",
        "the selector",
        |t| t.contains("site=lab"),
    )
    .await?;
    wait_text(
        c,
        &format!(r#"tr[data-device="{dev}"]"#),
        "the device it selects",
        |_| true,
    )
    .await?;

    // The device page, then its agent falls silent: stale, on the open page.
    goto_until(c, &format!("{base}/devices/{dev}"), "h1", "device heading", |t| {
        t.contains("online")
    })
    .await?;
    assert!(text(c, "#labels").await.is_some_and(|t| t.contains("ring=canary")));
    assert_eq!(text(c, "#unregistered-note").await, None);
    let by = r#"tr[data-deployment="default/web-lab"] [data-col="by"]"#;
    wait_text(c, by, "the selector deployment on the device", |t| {
        t.contains("site=lab")
    })
    .await?;
    screenshot(c, "device").await?;
    goto_until(
        c,
        &format!("{base}/devices/{gone}"),
        "#revoked-note",
        "the revoked note",
        |t| t.contains("Revoked"),
    )
    .await?;
    let state = format!(r#"tr[data-device="{dev}"] [data-col="state"]"#);
    goto_until(c, &format!("{base}/devices"), &state, "online", |t| {
        t.contains("online")
    })
    .await?;
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
