//! The fleet CLI against a real running stack.

use std::process::Command;

use iot_e2e::stack::*;
use iot_testkit::{cargo_bin, free_port};

fn iotctl(stack: &Stack, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(cargo_bin("iotctl")?);
    stack.trust(&mut cmd);
    let out = cmd
        .env("NATS_URL", stack.nats.url())
        .env("KUBECONFIG", stack.kubeconfig())
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn iotctl_shows_kv_devices_and_deployments() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.start_operator()?;
    let (dev, _guard) = stack.start_agent()?;
    let port = free_port()?;
    let mut cmd = stack.applier()?;
    cmd.args([
        "--name",
        "web",
        "--target-device",
        &dev,
        "--image",
        "localhost/iot-web:v1",
        "--port",
        &port.to_string(),
    ]);
    run_ok(cmd)?;
    let mut broken = stack.applier()?;
    broken.args([
        "--name",
        "broken",
        "--target-device",
        &dev,
        "--image",
        "localhost/iot-web:missing",
    ]);
    run_ok(broken)?;
    stack
        .wait_resource_status("default", "broken", "broken failed", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.failed == 1)
        })
        .await?;
    stack
        .wait_resource_status("default", "web", "web succeeded", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1)
        })
        .await?;

    // kv ls / get
    let (ok, out, err) = iotctl(&stack, &["kv", "ls", "desired"])?;
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [format!("{dev}.default_broken"), format!("{dev}.default_web")]
    );
    let (ok, out, err) = iotctl(&stack, &["kv", "ls", "status", "-o", "json"])?;
    assert!(ok, "{err}");
    let keys: Vec<String> = serde_json::from_str(&out)?;
    assert!(keys.contains(&format!("status.{dev}")), "{keys:?}");
    let (ok, out, err) = iotctl(&stack, &["kv", "get", "desired", &dev, "default/web"])?;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["score"]["PodmanV0"]["services"][0]["image"], "localhost/iot-web:v1");
    let (ok, out, err) = iotctl(&stack, &["kv", "get", "status", &dev])?;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["device_id"], dev.as_str());

    // devices: table and JSON
    let (ok, out, err) = iotctl(&stack, &["devices"])?;
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "DEVICE",
            "REPORTED",
            "STATE",
            "RUNTIME",
            "DEPLOYMENTS",
            "ARCH",
            "CPUS",
            "MEM",
            "OS",
            "AGENT"
        ]
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(&dev))
        .unwrap_or_else(|| panic!("no row for {dev}:\n{out}"));
    assert!(
        row.contains("fresh")
            && row.contains("Available")
            && row.contains("default/web=Running")
            && row.contains("default/broken=Failed"),
        "{row}"
    );
    let (ok, out, _) = iotctl(&stack, &["devices", "-o", "json"])?;
    assert!(ok);
    let devices: Vec<harmony_reconciler_contracts::AgentStatus> = serde_json::from_str(&out)?;
    assert_eq!(devices.len(), 1);
    assert!(devices[0].inventory.as_ref().is_some_and(|i| i.cpu_cores > 0));

    // deployments: aggregate counts and the top error
    let (ok, out, err) = iotctl(&stack, &["deployments"])?;
    assert!(ok, "{err}");
    let broken_row = out
        .lines()
        .find(|l| l.contains(" broken "))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = broken_row.split_whitespace().collect();
    assert_eq!(
        &cols[..8],
        ["default", "broken", "1", "0", "1", "0", "0", "False"],
        "{broken_row}"
    );
    assert!(
        broken_row.contains("1 device(s): service web: image localhost/iot-web:missing"),
        "{broken_row}"
    );
    let web_row = out
        .lines()
        .find(|l| l.contains(" web "))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        &web_row.split_whitespace().collect::<Vec<_>>()[..8],
        ["default", "web", "1", "1", "0", "0", "0", "True"]
    );
    let (ok, out, _) = iotctl(&stack, &["deployments", "-n", "default", "-o", "json"])?;
    assert!(ok);
    let items: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(items.len(), 2);
    assert!(
        items
            .iter()
            .any(|i| i["status"]["aggregate"]["topErrors"][0]["devices"] == 1)
    );
    assert!(items.iter().all(|i| i["targetDevices"].is_array()));
    Ok(())
}

async fn consumers(stack: &Stack, bucket: &str) -> anyhow::Result<usize> {
    let mut stream = stack
        .js
        .get_stream(harmony_reconciler_contracts::keys::kv_stream_name(bucket))
        .await?;
    Ok(stream.info().await?.state.consumer_count)
}

#[tokio::test]
async fn iotctl_reads_without_consumers_and_ends_quietly_in_a_pipe() -> anyhow::Result<()> {
    use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};
    let stack = Stack::start().await?;
    // More keys than one batched read returns, and more output than a pipe buffers.
    let ops: Vec<iot_nats::KvOp> = (0..3000)
        .map(|i| iot_nats::KvOp::Put {
            key: format!("device-with-a-long-name-{i:05}.default_app"),
            value: bytes::Bytes::from_static(b"{}"),
        })
        .collect();
    let (_, err) = iot_nats::write_batch(&stack.js, DESIRED_STATE_BUCKET, &ops, 512).await;
    assert!(err.is_none(), "{err:?}");
    let before = (
        consumers(&stack, DESIRED_STATE_BUCKET).await?,
        consumers(&stack, AGENT_STATUS_BUCKET).await?,
    );
    let (ok, out, err) = iotctl(&stack, &["kv", "ls", "desired"])?;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3000, "every key, past the 1024 of one batch");
    let (ok, _, err) = iotctl(&stack, &["devices"])?;
    assert!(ok, "{err}");
    let after = (
        consumers(&stack, DESIRED_STATE_BUCKET).await?,
        consumers(&stack, AGENT_STATUS_BUCKET).await?,
    );
    assert_eq!(before, after, "iotctl created JetStream consumers");

    // `| head -1` closes the pipe long before iotctl is done writing.
    let bin = cargo_bin("iotctl")?;
    let mut cmd = Command::new("bash");
    stack.trust(&mut cmd);
    let out = cmd
        .args(["-o", "pipefail", "-c"])
        .arg(format!("'{}' kv ls desired | head -1", bin.display()))
        .env("NATS_URL", stack.nats.url())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "device-with-a-long-name-00000.default_app"
    );
    Ok(())
}

#[tokio::test]
async fn iotctl_errors_clearly_when_nothing_is_reachable() -> anyhow::Result<()> {
    let port = free_port()?;
    let out = Command::new(cargo_bin("iotctl")?)
        .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .arg("devices")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach NATS at nats://127.0.0.1:{port}")),
        "{err}"
    );
    let out = Command::new(cargo_bin("iotctl")?)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .arg("deployments")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach a Kubernetes API server"), "{err}");
    Ok(())
}

#[tokio::test]
async fn iotctl_enrolls_lists_and_revokes_devices_in_openbao() -> anyhow::Result<()> {
    let bao = iot_testkit::OpenBao::start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pi-1.json");
    let run = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = Command::new(cargo_bin("iotctl")?)
            .env("BAO_ADDR", bao.addr())
            .env("BAO_CACERT", bao.ca_file().unwrap_or(std::path::Path::new("")))
            .env("BAO_TOKEN", bao.root_token())
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let path = file.to_string_lossy().into_owned();
    let (ok, _, err) = run(&["device", "enroll", "pi-1", "--label", "site=lab", "--out", &path])?;
    assert!(ok, "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file)?.permissions().mode() & 0o777,
        0o600,
        "the enrollment holds a secret"
    );
    // What it wrote is what a device needs: it gets an identity token with it.
    let creds = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&file, bao.ca_file(), false)?;
    let token = creds.token().await?;
    assert_eq!(token.split('.').count(), 3);
    let (ok, out, _) = run(&["device", "list"])?;
    assert!(ok);
    assert_eq!(out.trim(), "pi-1");
    // A bad id is refused before anything is created.
    let (ok, _, err) = run(&["device", "enroll", "a.b"])?;
    assert!(!ok);
    assert!(err.contains("a.b"), "{err}");
    // Without a token: a clear message.
    let out = Command::new(cargo_bin("iotctl")?)
        .env("BAO_ADDR", bao.addr())
        .env("BAO_CACERT", bao.ca_file().unwrap_or(std::path::Path::new("")))
        .env_remove("BAO_TOKEN")
        .args(["device", "list"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BAO_TOKEN"));

    let (ok, _, err) = run(&["device", "revoke", "pi-1"])?;
    assert!(ok, "{err}");
    let (_, out, _) = run(&["device", "list"])?;
    assert_eq!(out.trim(), "");
    let fresh = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&file, bao.ca_file(), false)?;
    assert!(fresh.token().await.is_err(), "a revoked enrollment still logs in");

    // Attack: a seed that was copied (or a VM's ISO left attached) keeps its secret.
    // Enrolling the device again must void it, not add a second valid secret.
    let first = dir.path().join("pi-2-first.json");
    let second = dir.path().join("pi-2-second.json");
    for f in [&first, &second] {
        let (ok, _, err) = run(&["device", "enroll", "pi-2", "--out", &f.to_string_lossy()])?;
        assert!(ok, "{err}");
    }
    let old = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&first, bao.ca_file(), false)?;
    let err = old.token().await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("invalid") || err.contains("400") || err.contains("403"),
        "the first enrollment still logs in: {err}"
    );
    let new = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&second, bao.ca_file(), false)?;
    assert_eq!(new.token().await?.split('.').count(), 3, "the new one works");
    Ok(())
}
