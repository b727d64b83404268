//! The dashboard in real headless Chromium (Debian's, driven through chromedriver
//! by fantoccini), against the real local stack: API server, operator, NATS, an
//! agent running podman. Pages show what `.status` and the devices say; an open
//! page follows a failure and its recovery, and a silent agent, without a reload.
//! Device objects mark devices (unregistered, revoked) and give them labels, live;
//! a selector deployment's targets come from its `.status`.
//! A progressive rollout's `.status.rollout` (written by the test, as the operator
//! would) shows as one bar per batch, its failures grouped, and the command to act.
//! Screenshots of every page land in target/screenshots/.

use std::time::Instant;

mod common;

use common::*;
use iot_api::{Deployment, Device, DeviceSpec, REVOKED_ANNOTATION};
use iot_e2e::stack::*;
use iot_testkit::{free_port, podman_cli, unique_id, wait_until};
use kube::api::{Patch, PatchParams, PostParams};
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
async fn unknown_pages_are_a_clear_404_and_a_rollout_shows_its_batches_and_failures() -> anyhow::Result<()> {
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

    // The rollout view. The test is the operator here: it writes .status.rollout
    // itself (the status subresource), after stopping the real one so that nothing
    // else writes it. The dashboard only reads it.
    stack.stop_operator();
    let api = stack.deployments("default");
    let dep: Deployment = serde_json::from_value(json!({
        "apiVersion": "iot.nationtech.io/v1alpha1", "kind": "Deployment",
        "metadata": {"name": "web-rollout", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"site": "madrid"}},
            "score": {"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v2"}]}},
            "rollout": {"batches": [{"limit": 1, "pause": {}}, {"limit": "50%"}]},
        },
    }))?;
    api.create(&PostParams::default(), &dep).await?;
    let now = chrono::Utc::now();
    let ago = |min: i64| (now - chrono::Duration::minutes(min)).to_rfc3339();
    let rollout = |phase: &str| {
        json!({"status": {"currentRevision": 2, "rollout": {
            "revision": 2, "stableRevision": 1, "phase": phase, "currentBatch": 2,
            "matchedAtStart": 10, "startedAt": ago(30),
            "batches": [
                {"selected": 1, "dispatched": 1, "succeeded": 1, "startedAt": ago(30), "passedAt": ago(25)},
                {"selected": 5, "dispatched": 5, "succeeded": 2, "failed": 2, "silent": 1, "startedAt": ago(20)},
                {"selected": 4},
            ],
            "message": "batch 2: 2 of 5 succeeded, 90 % needed",
            "failureClusters": [{
                "message": "exec format error in <b>web</b>",
                "devices": 3,
                "exampleDevices": ["pi-old-1", "pi-old-2"],
                "sharedLabels": {"hw": "rpi3"},
            }],
            "summary": "batch 2/3, 3/10",
        }}})
    };
    api.patch_status(
        "web-rollout",
        &PatchParams::default(),
        &Patch::Merge(rollout("Suspended")),
    )
    .await?;

    let b = browser(stack.dir.path()).await?;
    let c = &b.client;
    let base = format!("http://127.0.0.1:{port}");
    goto_until(
        c,
        &format!("{base}/deployments/default/web-rollout"),
        "#rollout-title",
        "the suspended rollout",
        |t| t.contains("suspended"),
    )
    .await?;
    // One bar per batch, with its numbers for assistive technology.
    let bars = eval_string(
        c,
        "return JSON.stringify([...document.querySelectorAll('#rollout-batches [role=progressbar]')]\
         .map(e => [e.getAttribute('aria-valuenow'), e.getAttribute('aria-valuemax'), e.getAttribute('aria-valuetext')]));",
    )
    .await;
    let want = json!([
        ["1", "1", "1 of 1 succeeded"],
        ["2", "5", "2 of 5 succeeded · 2 failed · 1 silent"],
        ["0", "4", "0 of 4 succeeded · 4 not dispatched yet"],
    ]);
    assert_eq!(
        bars.map(|b| serde_json::from_str::<serde_json::Value>(&b).ok()),
        Some(Some(want))
    );
    let current = r#"#rollout-batches li[aria-current="step"]"#;
    assert!(
        text(c, current)
            .await
            .is_some_and(|t| t.contains("Batch 2 of 3") && t.contains("did not pass"))
    );
    assert_eq!(
        text(c, &format!(r#"{current} [data-col="counts"]"#)).await.as_deref(),
        Some("2 of 5 succeeded · 2 failed · 1 silent")
    );
    // The failures, grouped: the device-provided message is text, not markup.
    assert_eq!(
        text(c, r#"#failure-clusters [data-col="message"]"#).await.as_deref(),
        Some("exec format error in <b>web</b>")
    );
    assert_eq!(
        eval_string(
            c,
            "return String(document.querySelectorAll('#failure-clusters b').length);"
        )
        .await
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        text(c, r#"#failure-clusters [data-col="devices"]"#).await.as_deref(),
        Some("3")
    );
    assert_eq!(
        text(c, r#"#failure-clusters [data-col="labels"]"#).await.as_deref(),
        Some("hw=rpi3")
    );
    assert!(
        text(c, r#"#failure-clusters a[href="/devices/pi-old-1"]"#)
            .await
            .is_some()
    );
    let cmds = text(c, "#rollout-commands").await.unwrap_or_default();
    assert!(cmds.contains("iotctl rollout abort default/web-rollout"), "{cmds}");
    assert!(
        cmds.contains("iotctl rollout undo default/web-rollout --to-revision 1"),
        "{cmds}"
    );
    // Read-only: nothing in the rollout view acts.
    assert_eq!(
        eval_string(
            c,
            "return String(document.querySelectorAll('#rollout button, #rollout form, #rollout input').length);"
        )
        .await
        .as_deref(),
        Some("0")
    );
    screenshot(c, "deployment-rollout").await?;
    // The open page follows the status: rolling back, without a reload.
    wait_text(c, "#live", "live", |t| t == "live").await?;
    api.patch_status(
        "web-rollout",
        &PatchParams::default(),
        &Patch::Merge(rollout("RollingBack")),
    )
    .await?;
    wait_text(c, "#rollout-title", "rolling back on the open page", |t| {
        t.contains("rolling back")
    })
    .await?;
    // The list: phase and summary in one compact column.
    c.goto(&format!("{base}/deployments")).await?;
    let cell = wait_text(
        c,
        r#"tr[data-deployment="default/web-rollout"] [data-col="rollout"]"#,
        "the rollout column",
        |t| t.contains("rolling back"),
    )
    .await?;
    assert!(cell.contains("batch 2/3, 3/10"), "{cell}");
    screenshot(c, "deployments-rollout").await?;
    Ok(())
}
