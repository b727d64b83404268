//! The fleet CLI against a real running stack.

use std::path::Path;
use std::process::Command;

use iot_api::revision::DEPLOYMENT_LABEL;
use iot_api::{
    Deployment, DeploymentRevision, DeploymentRevisionSpec, DeploymentSpec, Device, DeviceSpec, IotScore,
    REVOKED_ANNOTATION,
};
use iot_e2e::stack::*;
use iot_testkit::{ApiServer, OpenBao, cargo_bin, free_port};
use kube::Api;
use kube::api::{Patch, PatchParams};

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

/// Runs iotctl until it succeeds with an output `ok` accepts; returns that output.
async fn iotctl_until(stack: &Stack, args: &[&str], what: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    iot_testkit::wait_until(WAIT, what, || async {
        let (success, out, _) = iotctl(stack, args).ok()?;
        (success && ok(&out)).then_some(out)
    })
    .await
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

    // devices: table and JSON; a reporting device without a Device object is
    // unregistered.
    let (ok, out, err) = iotctl(&stack, &["devices"])?;
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "DEVICE",
            "REPORTED",
            "STATE",
            "REGISTRATION",
            "RUNTIME",
            "DEPLOYMENTS",
            "ARCH",
            "CPUS",
            "MEM",
            "OS",
            "AGENT"
        ]
    );
    let row_of = |out: &str| out.lines().find(|l| l.starts_with(&dev)).unwrap_or("").to_owned();
    // The agent retries the missing image's pull, so "broken" turns Pending during
    // each attempt: look until a listing catches it Failed.
    let out = iotctl_until(&stack, &["devices"], "devices: broken Failed", |out| {
        let row = row_of(out);
        row.contains("fresh")
            && row.contains(" unregistered ")
            && row.contains("Available")
            && row.contains("default/web=Running")
            && row.contains("default/broken=Failed")
    })
    .await;
    assert!(out.is_ok(), "{}", row_of(&iotctl(&stack, &["devices"])?.1));
    let (ok, out, _) = iotctl(&stack, &["devices", "-o", "json"])?;
    assert!(ok);
    let devices: Vec<harmony_reconciler_contracts::AgentStatus> = serde_json::from_str(&out)?;
    assert_eq!(devices.len(), 1);
    assert!(devices[0].inventory.as_ref().is_some_and(|i| i.cpu_cores > 0));
    let raw: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(raw[0]["registration"], "unregistered");
    // Registered, then revoked.
    stack.register_device(&dev, &[("site", "lab")]).await?;
    // The column after STATE ("0s ago" is two words).
    let registration = |out: &str| -> String {
        let cols: Vec<&str> = out
            .lines()
            .find(|l| l.starts_with(&dev))
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let state = cols.iter().position(|c| *c == "fresh").unwrap_or(usize::MAX - 1);
        cols.get(state + 1).map(|c| c.to_string()).unwrap_or_default()
    };
    let (ok, out, err) = iotctl(&stack, &["devices"])?;
    assert!(ok, "{err}");
    assert_eq!(registration(&out), "registered", "{out}");
    stack
        .devices()
        .patch(
            &dev,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {REVOKED_ANNOTATION: "2026-01-01T00:00:00Z"}}}),
            ),
        )
        .await?;
    let (ok, out, err) = iotctl(&stack, &["devices"])?;
    assert!(ok, "{err}");
    assert_eq!(registration(&out), "revoked", "{out}");
    // Without Kubernetes: as before, without the column.
    let mut cmd = Command::new(cargo_bin("iotctl")?);
    stack.trust(&mut cmd);
    let plain = cmd
        .env("NATS_URL", stack.nats.url())
        .env_remove("KUBECONFIG")
        .arg("devices")
        .output()?;
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.starts_with("DEVICE") && !plain.contains("REGISTRATION"),
        "{plain}"
    );
    assert!(plain.contains(&dev) && !plain.contains("revoked"), "{plain}");

    // deployments: aggregate counts and the top error (again while broken is
    // Failed, between the agent's pull attempts).
    let broken_failed = |out: &str| {
        out.lines()
            .find(|l| l.contains(" broken "))
            .is_some_and(|l| l.split_whitespace().nth(4) == Some("1"))
    };
    let out = iotctl_until(&stack, &["deployments"], "deployments: broken Failed", broken_failed).await?;
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
        broken_row.contains("1 device(s): service web: image localhost/iot-web:missing not found"),
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
    let out = iotctl_until(
        &stack,
        &["deployments", "-n", "default", "-o", "json"],
        "a top error",
        |out| out.contains("topErrors"),
    )
    .await?;
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

/// Runs iotctl with OpenBao's address, CA and root token, and KUBECONFIG when given
/// (removed from the environment otherwise); returns (success, stdout, stderr).
fn iotctl_admin(bao: &OpenBao, kubeconfig: Option<&Path>, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(cargo_bin("iotctl")?);
    cmd.env("BAO_ADDR", bao.addr())
        .env("BAO_CACERT", bao.ca_file().unwrap_or(Path::new("")))
        .env("BAO_TOKEN", bao.root_token())
        .env_remove("NATS_SYSTEM_PASSWORD")
        .env_remove("KUBECONFIG");
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let out = cmd.args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// An API server with the platform's CRDs, as `iot-operator install` puts them.
async fn api_server() -> anyhow::Result<(ApiServer, kube::Client)> {
    let api = ApiServer::start().await?;
    iot_launch::operator::install_crd(&cargo_bin("iot-operator")?, &api.kubeconfig())?;
    let client = api.kube_client().await?;
    Ok((api, client))
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The row of `id` in a table, split on whitespace.
fn row<'a>(table: &'a str, id: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
}

#[tokio::test]
async fn iotctl_enrolls_lists_and_revokes_devices_in_openbao_and_kubernetes() -> anyhow::Result<()> {
    let bao = OpenBao::start().await?;
    let (api, kube) = api_server().await?;
    let devices: Api<Device> = Api::all(kube.clone());
    let k = Some(api.kubeconfig());
    let k = k.as_deref();
    let run = |args: &[&str]| iotctl_admin(&bao, k, args);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pi-1.json");
    let path = file.to_string_lossy().into_owned();

    // Enroll: a Device with the labels, and an OpenBao identity.
    let (ok, _, err) = run(&[
        "device",
        "enroll",
        "pi-1",
        "--label",
        "site=lab",
        "--label",
        "ring=canary",
        "--out",
        &path,
    ])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("Device pi-1 created with labels ring=canary,site=lab"),
        "{err}"
    );
    let created = devices.get("pi-1").await?;
    assert_eq!(created.label_map(), &labels(&[("site", "lab"), ("ring", "canary")]));
    assert_eq!(created.spec, DeviceSpec::default());
    assert_eq!(created.revoked_at(), None);
    // OpenBao's record holds the identity, not the labels.
    let record = bao
        .root()?
        .kv_read(iot_bao::setup::KV_MOUNT, &iot_bao::enroll::device_record_path("pi-1"))
        .await?
        .expect("a record");
    assert_eq!(record["deviceId"], "pi-1");
    assert!(record["subject"].is_string(), "{record}");
    assert!(record.get("labels").is_none(), "labels written to OpenBao: {record}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file)?.permissions().mode() & 0o777,
        0o600,
        "the enrollment holds a secret"
    );
    // What it wrote is what a device needs: it gets an identity token with it.
    let creds = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&file, bao.ca_file(), false)?;
    assert_eq!(creds.token().await?.split('.').count(), 3);

    // Enrolling again keeps the Device and merges the labels (the secret rotates).
    let (ok, _, err) = run(&[
        "device",
        "enroll",
        "pi-1",
        "--label",
        "site=lab2",
        "--label",
        "floor=1",
        "--out",
        &path,
    ])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("Device pi-1 already existed and was kept; labels merged, now: floor=1,ring=canary,site=lab2"),
        "{err}"
    );
    let merged = devices.get("pi-1").await?;
    assert_eq!(merged.metadata.uid, created.metadata.uid, "the Device was replaced");
    assert_eq!(
        merged.label_map(),
        &labels(&[("site", "lab2"), ("ring", "canary"), ("floor", "1")])
    );

    // Ids that cannot name a Kubernetes object are refused before anything exists.
    let before = devices.list(&Default::default()).await?.items.len();
    for bad in ["Pi_Kitchen", "pi_2", "a.b"] {
        let (ok, _, err) = run(&["device", "enroll", bad, "--label", "site=lab"])?;
        assert!(!ok, "{bad} was enrolled");
        assert!(
            err.contains(&format!("device id {bad:?} cannot be enrolled")) && err.contains("DNS-1123 label"),
            "{err}"
        );
    }
    assert_eq!(devices.list(&Default::default()).await?.items.len(), before);
    assert_eq!(iot_bao::enroll::list_devices(&bao.root()?).await?, ["pi-1"]);
    // A label the API server refuses: no Device, and no identity either.
    let (ok, _, err) = run(&["device", "enroll", "pi-bad-label", "--label", "bad key=x"])?;
    assert!(!ok);
    assert!(err.contains("Nothing was created"), "{err}");
    assert!(devices.get_opt("pi-bad-label").await?.is_none());
    assert_eq!(iot_bao::enroll::list_devices(&bao.root()?).await?, ["pi-1"]);

    // An identity without a Device, and a Device without an identity.
    let (ok, _, err) = run(&["device", "enroll", "pi-3", "--no-device", "--out", "/dev/null"])?;
    assert!(ok, "{err}");
    assert!(err.contains("no Device object (--no-device)"), "{err}");
    assert!(devices.get_opt("pi-3").await?.is_none());
    let (ok, _, err) = run(&["device", "enroll", "pi-4", "--no-device", "--label", "a=b"])?;
    assert!(!ok && err.contains("--no-device"), "{err}");
    devices
        .create(&Default::default(), &Device::new("pi-9", DeviceSpec::default()))
        .await?;

    // list: every id from either side.
    let (ok, out, err) = run(&["device", "list"])?;
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().next().unwrap_or("").split_whitespace().collect::<Vec<_>>(),
        ["DEVICE", "IDENTITY", "REGISTRATION", "REVOKED-AT", "LABELS"]
    );
    assert_eq!(out.lines().count(), 4, "{out}");
    assert_eq!(
        row(&out, "pi-1"),
        ["pi-1", "enrolled", "registered", "-", "floor=1,ring=canary,site=lab2"]
    );
    assert_eq!(row(&out, "pi-3"), ["pi-3", "enrolled", "unregistered", "-", "-"]);
    assert_eq!(row(&out, "pi-9"), ["pi-9", "-", "registered", "-", "-"]);
    let (ok, out, _) = run(&["device", "list", "-o", "json"])?;
    assert!(ok);
    let items: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(items.len(), 3);
    assert_eq!(
        items[0],
        serde_json::json!({"device": "pi-1", "enrolled": true, "registration": "registered",
            "labels": {"floor": "1", "ring": "canary", "site": "lab2"}, "revokedAt": null})
    );

    // Revoke: the identity goes, the Device stays, annotated with the time.
    let (ok, _, err) = run(&["device", "revoke", "pi-1"])?;
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("Device pi-1 kept and marked {REVOKED_ANNOTATION}=")),
        "{err}"
    );
    let revoked = devices.get("pi-1").await?;
    assert_eq!(revoked.metadata.uid, created.metadata.uid);
    assert_eq!(revoked.label_map(), merged.label_map(), "labels untouched");
    let at = chrono::DateTime::parse_from_rfc3339(revoked.revoked_at().expect("the revoked-at annotation"))?;
    let ago = chrono::Utc::now().signed_duration_since(at);
    assert!(ago.num_seconds() >= -5 && ago.num_seconds() < 120, "revoked-at {at}");
    let fresh = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&file, bao.ca_file(), false)?;
    assert!(fresh.token().await.is_err(), "a revoked enrollment still logs in");
    // Without a Device object: said, and the identity is revoked all the same.
    let (ok, _, err) = run(&["device", "revoke", "pi-3"])?;
    assert!(ok, "{err}");
    assert!(err.contains("there is no Device object pi-3"), "{err}");
    assert!(devices.get_opt("pi-3").await?.is_none(), "revoke created a Device");
    let (_, out, _) = run(&["device", "list"])?;
    let pi1 = row(&out, "pi-1");
    assert_eq!(&pi1[..3], ["pi-1", "-", "revoked"], "{out}");
    assert_eq!(pi1[3], revoked.revoked_at().unwrap_or_default());
    assert!(!out.contains("pi-3"), "{out}");

    // Enrolled again: the revoked mark goes (its Deployments may select it again).
    let (ok, _, err) = run(&["device", "enroll", "pi-1", "--out", "/dev/null"])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("labels unchanged") && err.contains("its revoked mark"),
        "{err}"
    );
    assert_eq!(devices.get("pi-1").await?.revoked_at(), None);

    // OpenBao unreachable after the Device was made: the error says so, and the same
    // command run again finishes the enrollment.
    let out = Command::new(cargo_bin("iotctl")?)
        .env("BAO_ADDR", format!("https://127.0.0.1:{}", free_port()?))
        .env("BAO_CACERT", bao.ca_file().unwrap_or(Path::new("")))
        .env("BAO_TOKEN", bao.root_token())
        .env("KUBECONFIG", api.kubeconfig())
        .args(["device", "enroll", "pi-5", "--label", "site=lab"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(
        err.contains(
            "The Device object pi-5 exists, but the OpenBao identity was not created: run the same command again"
        ),
        "{err}"
    );
    let half = devices.get("pi-5").await?;
    let (ok, _, err) = run(&["device", "enroll", "pi-5", "--label", "site=lab", "--out", "/dev/null"])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("Device pi-5 already existed and was kept; labels unchanged: site=lab"),
        "{err}"
    );
    assert_eq!(devices.get("pi-5").await?.metadata.uid, half.metadata.uid);
    assert!(
        iot_bao::enroll::list_devices(&bao.root()?)
            .await?
            .contains(&"pi-5".to_owned())
    );

    // Without a token: a clear message.
    let out = Command::new(cargo_bin("iotctl")?)
        .env("BAO_ADDR", bao.addr())
        .env("BAO_CACERT", bao.ca_file().unwrap_or(Path::new("")))
        .env_remove("BAO_TOKEN")
        .args(["device", "list"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BAO_TOKEN"));

    // Attack: a seed that was copied (or a VM's ISO left attached) keeps its secret.
    // Enrolling the device again must void it, not add a second valid secret.
    let first = dir.path().join("pi-2-first.json");
    let second = dir.path().join("pi-2-second.json");
    for (f, said) in [
        (&first, "Device pi-2 created, without labels"),
        (
            &second,
            "Device pi-2 already existed and was kept; labels unchanged: none",
        ),
    ] {
        let (ok, _, err) = run(&["device", "enroll", "pi-2", "--out", &f.to_string_lossy()])?;
        assert!(ok, "{err}");
        assert!(err.contains(said), "{err}");
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

#[tokio::test]
async fn iotctl_device_commands_say_what_happened_without_kubernetes() -> anyhow::Result<()> {
    let bao = OpenBao::start().await?;
    let dir = tempfile::tempdir()?;
    // A kubeconfig naming an API server that is not there.
    let dead = dir.path().join("dead-kubeconfig");
    std::fs::write(
        &dead,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    \
             insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  \
             context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
            free_port()?
        ),
    )?;
    let root = bao.root()?;
    let enrolled = || iot_bao::enroll::list_devices(&root);

    // Enroll refuses, and says that nothing was created and how to finish.
    let (ok, out, err) = iotctl_admin(&bao, None, &["device", "enroll", "pi-1", "--label", "site=lab"])?;
    assert!(!ok);
    assert!(out.is_empty(), "an enrollment was printed: {out}");
    assert!(
        err.contains("no Kubernetes API server is configured to create the Device object pi-1 in (set KUBECONFIG)")
            && err.contains("Nothing was created, neither the Device object nor the OpenBao identity")
            && err.contains("--no-device"),
        "{err}"
    );
    let (ok, _, err) = iotctl_admin(&bao, Some(&dead), &["device", "enroll", "pi-1"])?;
    assert!(!ok);
    assert!(
        err.contains("cannot create Device pi-1") && err.contains("Nothing was created"),
        "{err}"
    );
    assert!(enrolled().await?.is_empty(), "an identity was created");
    // --no-device enrolls the identity alone.
    let (ok, out, err) = iotctl_admin(&bao, Some(&dead), &["device", "enroll", "pi-1", "--no-device"])?;
    assert!(ok, "{err}");
    assert!(out.contains("\"secretId\""), "{out}");
    assert_eq!(enrolled().await?, ["pi-1"]);
    // list: identities only, the Device columns left out.
    let (ok, out, err) = iotctl_admin(&bao, None, &["device", "list"])?;
    assert!(ok, "{err}");
    assert_eq!(out, "DEVICE   IDENTITY\npi-1     enrolled\n");
    let (ok, out, err) = iotctl_admin(&bao, Some(&dead), &["device", "list"])?;
    assert!(ok, "{err}");
    assert!(err.contains("Device objects not shown"), "{err}");
    assert_eq!(out, "DEVICE   IDENTITY\npi-1     enrolled\n");

    // Revoke with an API server that does not answer: the identity is revoked, the
    // command fails, and it says both and how to finish.
    let (ok, _, err) = iotctl_admin(&bao, Some(&dead), &["device", "revoke", "pi-1"])?;
    assert!(!ok);
    assert!(
        err.contains("revoked pi-1 in OpenBao, but its Device object was not marked revoked")
            && err.contains("run `iotctl device revoke pi-1` again"),
        "{err}"
    );
    assert!(enrolled().await?.is_empty(), "the identity survived");
    // With no Kubernetes configured at all, revoking is complete (and said so).
    iotctl_admin(&bao, None, &["device", "enroll", "pi-2", "--no-device"])?;
    let (ok, _, err) = iotctl_admin(&bao, None, &["device", "revoke", "pi-2"])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("was not marked revoked") && err.contains("revoked pi-2"),
        "{err}"
    );
    assert!(enrolled().await?.is_empty());
    Ok(())
}

fn score(image: &str, env: &[(&str, &str)]) -> anyhow::Result<IotScore> {
    let env: serde_json::Map<String, serde_json::Value> =
        env.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    Ok(serde_json::from_value(serde_json::json!({
        "PodmanV0": {"services": [{"name": "web", "image": image, "env": env}]}
    }))?)
}

fn revision(deployment: &str, n: u64, score: IotScore) -> DeploymentRevision {
    let mut r = DeploymentRevision::new(
        &iot_api::revision_name(deployment, n),
        DeploymentRevisionSpec {
            revision: n,
            spec_hash: score.spec_hash().to_string(),
            score,
            rollout_plan: None,
            source_hash: None,
            resolved_for: None,
            images: Default::default(),
        },
    );
    r.metadata.labels = Some(labels(&[(DEPLOYMENT_LABEL, deployment)]));
    r
}

#[tokio::test]
async fn iotctl_rollout_lists_revisions_and_undo_writes_an_old_score_back() -> anyhow::Result<()> {
    let (api, kube) = api_server().await?;
    let ns = "default";
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), ns);
    let revisions: Api<DeploymentRevision> = Api::namespaced(kube.clone(), ns);
    let run = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = Command::new(cargo_bin("iotctl")?)
            .env("KUBECONFIG", api.kubeconfig())
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let v1 = score("localhost/iot-web:v1", &[])?;
    let v2 = score("localhost/iot-web:v2", &[("MODE", "two")])?;
    let v3 = score("localhost/iot-web:v3", &[("MODE", "three")])?;
    deployments
        .create(
            &Default::default(),
            &Deployment::new("web", DeploymentSpec::for_devices(["pi-1", "pi-2"], v3.clone())),
        )
        .await?;
    // Revisions as the operator records them (made by hand here), out of order, and
    // one of another Deployment that must not show.
    for r in [
        revision("web", 3, v3.clone()),
        revision("web", 1, v1.clone()),
        revision("web", 2, v2.clone()),
        revision("api", 1, v2.clone()),
    ] {
        revisions.create(&Default::default(), &r).await?;
    }
    deployments
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"currentRevision": 3}})),
        )
        .await?;

    // history: sorted by number, the current one marked.
    let (ok, out, err) = run(&["rollout", "history", "default/web"])?;
    assert!(ok, "{err}");
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], ["REVISION", "CURRENT", "SPEC-HASH", "CREATED", "IMAGES"]);
    assert_eq!(lines.len(), 4, "{out}");
    for (line, (n, current, s)) in lines[1..].iter().zip([(1, "-", &v1), (2, "-", &v2), (3, "yes", &v3)]) {
        assert_eq!(line[0], n.to_string(), "{out}");
        assert_eq!(line[1], current, "{out}");
        assert_eq!(line[2], s.spec_hash().to_string(), "{out}");
        assert!(chrono::DateTime::parse_from_rfc3339(line[3]).is_ok(), "{out}");
        assert_eq!(line[4], format!("localhost/iot-web:v{n}"), "{out}");
    }
    let (ok, out, _) = run(&["rollout", "history", "default/web", "-o", "json"])?;
    assert!(ok);
    let items: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(
        items
            .iter()
            .map(|i| (i["revision"].clone(), i["current"].clone()))
            .collect::<Vec<_>>(),
        [
            (1.into(), false.into()),
            (2.into(), false.into()),
            (3.into(), true.into())
        ]
    );
    assert_eq!(items[0]["images"], serde_json::json!(["localhost/iot-web:v1"]));

    // undo --to-revision 1: revision 1's score, exactly, in the Deployment.
    let (ok, _, err) = run(&["rollout", "undo", "default/web", "--to-revision", "1"])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("default/web: spec.score set to the score of revision 1 (was revision 3)")
            && err.contains("localhost/iot-web:v3 -> localhost/iot-web:v1"),
        "{err}"
    );
    let back = deployments.get("web").await?;
    assert_eq!(back.spec.score, v1, "the score of revision 1, without revision 3's env");
    assert_eq!(back.spec.target_devices, ["pi-1", "pi-2"], "only the score changes");
    // Again: already there, nothing written.
    let rv = back.metadata.resource_version.clone();
    let (ok, _, err) = run(&["rollout", "undo", "default/web", "--to-revision", "1"])?;
    assert!(ok, "{err}");
    assert!(err.contains("already runs the score of revision 1"), "{err}");
    assert_eq!(deployments.get("web").await?.metadata.resource_version, rv, "it wrote");
    // Default: the revision before the current one (3, as the status still says).
    let (ok, out, err) = run(&["rollout", "undo", "default/web", "-o", "json"])?;
    assert!(ok, "{err}");
    let said: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        (said["from"].clone(), said["to"].clone(), said["written"].clone()),
        (3.into(), 2.into(), true.into())
    );
    assert_eq!(deployments.get("web").await?.spec.score, v2);

    // What undo's write relies on: a merge patch that carries a resourceVersion is
    // refused (409) once the object moved past it, so a score changed in between is
    // never overwritten unseen.
    let stale = back.metadata.resource_version.clone().unwrap_or_default();
    let refused = deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"resourceVersion": stale}, "spec": {"score": v3}})),
        )
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 409),
        "{refused:?}"
    );

    // Refusals, each writing nothing.
    let rv = deployments.get("web").await?.metadata.resource_version;
    let (ok, _, err) = run(&["rollout", "undo", "default/web", "--to-revision", "9"])?;
    assert!(!ok);
    assert!(
        err.contains("cannot undo default/web: no revision 9 (kept: 1, 2, 3)"),
        "{err}"
    );
    let (ok, _, err) = run(&["rollout", "undo", "default/nope"])?;
    assert!(!ok);
    assert!(err.contains("no Deployment default/nope"), "{err}");
    let (ok, _, err) = run(&["rollout", "history", "default/nope"])?;
    assert!(!ok);
    assert!(err.contains("no Deployment default/nope"), "{err}");
    let (ok, _, err) = run(&["rollout", "undo", "web"])?;
    assert!(!ok);
    assert!(err.contains("NAMESPACE/NAME"), "{err}");
    assert_eq!(deployments.get("web").await?.metadata.resource_version, rv);
    Ok(())
}
