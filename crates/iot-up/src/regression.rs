//! `--auto`: the end-to-end regression on the live platform, three ways (typed
//! applier, `--print | kubectl apply -f -`, a hand-written YAML manifest):
//! apply v1 -> HTTP 200 "v1" from the device -> v2 (container id changes, "v2",
//! aggregate counts the new spec) -> delete (container and keys gone).

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use harmony_reconciler_contracts::DESIRED_STATE_BUCKET;
use iot_api::{Deployment, DeploymentStatus};
use kube::Api;

use crate::up::Up;
use crate::{out, print_line};

const WAIT: Duration = Duration::from_secs(90);
const PORT: u16 = 8080;

#[derive(Clone, Copy, Debug)]
enum Via {
    TypedApplier,
    PrintedJson,
    YamlManifest,
}

pub async fn run(up: &Up) -> bool {
    let mut results: Vec<(String, Result<Duration, String>)> = Vec::new();
    for via in [Via::TypedApplier, Via::PrintedJson, Via::YamlManifest] {
        let t = Instant::now();
        let target = up.target().map(|(id, ip)| format!("{id} ({ip})")).unwrap_or_default();
        print_line(&format!("{} regression via {via:?} on {target}", out::step("==>")));
        let r = lifecycle(up, via)
            .await
            .map(|()| t.elapsed())
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &r {
            print_line(&format!("      {} {e}", out::fail("FAIL")));
        }
        results.push((
            format!("{via:?}: apply v1 -> HTTP 200 -> v2 (new container) -> delete"),
            r,
        ));
    }
    if let Some(r) = up.registry.as_ref().filter(|_| !up.devices.is_empty()) {
        let t = Instant::now();
        print_line(&format!("{} registry pull from {}", out::step("==>"), r.url()));
        let result = registry_pull(up, &r.url())
            .await
            .map(|()| t.elapsed())
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            print_line(&format!("      {} {e}", out::fail("FAIL")));
        }
        results.push((
            "registry: a tag pinned to a digest, pulled with a grant over TLS -> HTTP 200 -> delete".into(),
            result,
        ));
    }
    print_line(&format!("\n{}", out::bold("Regression summary")));
    let mut ok = true;
    for (name, r) in &results {
        match r {
            Ok(d) => print_line(&format!("  {} {name} ({:.1} s)", out::ok("PASS"), d.as_secs_f64())),
            Err(e) => {
                ok = false;
                print_line(&format!("  {} {name}: {e}", out::fail("FAIL")));
            }
        }
    }
    for v in &up.vms {
        match crate::vm::report_facts(v).await {
            Ok(facts) => print_line(&format!("  {facts}")),
            Err(e) => print_line(&format!("  {}: no facts from the guest: {e:#}", v.id)),
        }
    }
    print_line(&if ok {
        out::good("ALL PASSED")
    } else {
        out::bad("FAILED")
    });
    ok
}

async fn lifecycle(up: &Up, via: Via) -> anyhow::Result<()> {
    let (_, ip) = up.target().ok_or_else(|| anyhow::anyhow!("no device"))?;
    let kube = iot_launch::apiserver::kube_client_from(&up.kubeconfig()).await?;
    let api: Api<Deployment> = Api::namespaced(kube, "default");

    apply(up, via, "localhost/iot-web:v1")?;
    wait_http(&ip, "v1").await?;
    let v1 = up.target_containers().await;
    anyhow::ensure!(v1.len() == 1, "expected one container after v1, found {}", v1.len());
    let hash = wait_status(&api, "v1 counted as succeeded", |s| {
        s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1)
    })
    .await?;
    print_line(&format!(
        "      ok v1 answers on http://{}:{PORT}/, container {}, aggregate spec {hash}",
        ip,
        short(&v1[0])
    ));

    apply(up, via, "localhost/iot-web:v2")?;
    wait_http(&ip, "v2").await?;
    let v2 = eventually("one new container", || async {
        let ids = up.target_containers().await;
        (ids.len() == 1 && ids != v1).then_some(ids)
    })
    .await?;
    let hash2 = wait_status(&api, "v2 counted as succeeded", |s| {
        s.aggregate
            .as_ref()
            .is_some_and(|a| a.succeeded == 1 && a.spec_hash != hash)
    })
    .await?;
    print_line(&format!(
        "      ok upgraded: container {} -> {}, aggregate spec {hash2}",
        short(&v1[0]),
        short(&v2[0])
    ));

    delete(up, via)?;
    eventually("container removed", || async {
        up.target_containers().await.is_empty().then_some(())
    })
    .await?;
    eventually("desired-state keys removed", || async {
        (desired_keys(up).await.ok()? == 0).then_some(())
    })
    .await?;
    eventually("resource gone", || async {
        api.get_opt("web").await.ok().flatten().is_none().then_some(())
    })
    .await?;
    print_line("      ok deleted: no container, no keys, no resource");
    Ok(())
}

/// A Deployment naming the private registry's `iot/web:v1`: the operator pins the
/// tag, the device pulls it with a grant, serves it, and it goes again.
async fn registry_pull(up: &Up, registry: &str) -> anyhow::Result<()> {
    const NAME: &str = "pulled";
    const PULL_PORT: u16 = 8081;
    // A device of this machine: its podman trusts the stack's CA. (A VM's would
    // need the CA on its seed; the VM regression runs without the registry.)
    let d = up
        .devices
        .first()
        .ok_or_else(|| anyhow::anyhow!("no network-namespace device to pull on"))?;
    let (device, ip) = (d.id.clone(), d.ip.clone());
    let kube = iot_launch::apiserver::kube_client_from(&up.kubeconfig()).await?;
    let api: Api<Deployment> = Api::namespaced(kube, "default");
    let yaml = format!(
        "apiVersion: iot.nationtech.io/v1alpha1\nkind: Deployment\nmetadata:\n  name: {NAME}\n  namespace: default\nspec:\n  targetDevices:\n    - {device}\n  score:\n    PodmanV0:\n      services:\n        - name: web\n          image: {registry}/iot/web:v1\n          ports:\n            - hostPort: {PULL_PORT}\n              containerPort: 80\n"
    );
    run_ok(kubectl(up, &["apply", "-f", "-"]), Some(&yaml))?;
    let digest = eventually("the tag pinned in status.images", || async {
        let s = api.get(NAME).await.ok()?.status?;
        s.images.first().map(|i| i.digest.clone())
    })
    .await?;
    iot_launch::http::wait_http(&ip, PULL_PORT, "v1", WAIT).await?;
    print_line(&format!(
        "      ok pinned to {digest}; v1 answers on http://{ip}:{PULL_PORT}/"
    ));
    run_ok(
        kubectl(up, &["delete", "deployments.iot.nationtech.io", NAME, "-n", "default"]),
        None,
    )?;
    eventually("resource gone", || async {
        api.get_opt(NAME).await.ok().flatten().is_none().then_some(())
    })
    .await?;
    // The agent removes the container on its own time; a teardown racing that
    // removal could leave it behind.
    eventually("the pulled container removed", || async {
        up.device_containers(d.index, &d.id).is_empty().then_some(())
    })
    .await?;
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn apply(up: &Up, via: Via, image: &str) -> anyhow::Result<()> {
    let (device, _) = up.target().ok_or_else(|| anyhow::anyhow!("no device"))?;
    let device = device.as_str();
    let port = PORT.to_string();
    let flags = [
        "--name",
        "web",
        "--target-device",
        device,
        "--image",
        image,
        "--port",
        &port,
    ];
    match via {
        Via::TypedApplier => {
            let mut cmd = applier(up);
            cmd.args(flags);
            run_ok(cmd, None).map(drop)
        }
        Via::PrintedJson => {
            let mut cmd = applier(up);
            cmd.args(flags).arg("--print");
            let json = run_ok(cmd, None)?;
            run_ok(kubectl(up, &["apply", "-f", "-"]), Some(&json)).map(drop)
        }
        Via::YamlManifest => {
            let yaml = format!(
                "apiVersion: iot.nationtech.io/v1alpha1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  targetDevices:\n    - {device}\n  score:\n    PodmanV0:\n      services:\n        - name: web\n          image: {image}\n          ports:\n            - hostPort: {PORT}\n              containerPort: 80\n"
            );
            run_ok(kubectl(up, &["apply", "-f", "-"]), Some(&yaml)).map(drop)
        }
    }
}

fn delete(up: &Up, via: Via) -> anyhow::Result<()> {
    match via {
        Via::TypedApplier => {
            let mut cmd = applier(up);
            cmd.args(["--name", "web", "--delete"]);
            run_ok(cmd, None).map(drop)
        }
        Via::PrintedJson | Via::YamlManifest => run_ok(
            kubectl(up, &["delete", "deployments.iot.nationtech.io", "web", "-n", "default"]),
            None,
        )
        .map(drop),
    }
}

fn applier(up: &Up) -> Command {
    let mut cmd = Command::new(up.bin("example_iot_apply_deployment"));
    cmd.env("KUBECONFIG", up.kubeconfig());
    cmd
}

fn kubectl(up: &Up, args: &[&str]) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", up.kubeconfig()).args(args);
    cmd
}

fn run_ok(cmd: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let (ok, stdout, stderr) = iot_launch::process::run_captured(cmd, stdin)?;
    anyhow::ensure!(ok, "{what} failed: {}", stderr.trim());
    Ok(stdout)
}

async fn desired_keys(up: &Up) -> anyhow::Result<usize> {
    let conn = iot_nats::connect(
        &up.nats_urls(),
        up.admin_credentials().as_ref(),
        "iot-up-check",
        up.ca_file().as_deref(),
    )
    .await?;
    let records = iot_nats::last_values_for(&conn.client, DESIRED_STATE_BUCKET, ">", Duration::from_secs(5)).await?;
    Ok(records.iter().filter(|r| r.value.is_some()).count())
}

async fn wait_status(
    api: &Api<Deployment>,
    what: &str,
    pred: impl Fn(&DeploymentStatus) -> bool,
) -> anyhow::Result<String> {
    eventually(what, || async {
        let s = api.get("web").await.ok()?.status?;
        pred(&s).then(|| s.aggregate.map(|a| a.spec_hash).unwrap_or_default())
    })
    .await
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(start.elapsed() < WAIT, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_http(ip: &str, body: &str) -> anyhow::Result<()> {
    iot_launch::http::wait_http(ip, PORT, body, WAIT).await
}
