//! The plan's in-cluster shape, for real: a single-node Kubernetes 1.20 (kubelet,
//! containerd, kube-proxy) where chart `iot-nats` runs NATS with the auth callout
//! as a pod and chart `iot-operator` runs the operator's two replicas as pods.
//! Devices are real podman agents on the machine with their own identities, reaching
//! NATS through the node's hostPort.
//!
//! One bring-up serves every case, in order: the Chapter 1 regression three ways;
//! `helm upgrade` to a new operator image and `helm rollback`; the leader pod
//! deleted by force and its process killed on the node, mid-rollout; the NATS pod
//! deleted; `helm uninstall` of the operator and its reinstall.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harmony_reconciler_contracts::{DeploymentRef, Phase};
use iot_api::rollout::RolloutSpec;
use iot_api::{Deployment, DeploymentSpec};
use iot_e2e::in_cluster::InCluster;
use iot_e2e::lifecycle::{Via, lifecycle_on};
use iot_e2e::stack::*;
use iot_launch::in_cluster::{
    NAMESPACE, NATS_DEPLOYMENT, OPERATOR_DEPLOYMENT, OPERATOR_RELEASE, helm_release, wait_rollout,
};
use iot_testkit::{DeviceContainers, podman_cli, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::Value;

/// The operator's Lease: the chart names it after the release's full name.
const LEASE: &str = "iot-iot-operator";
const STEADY: &str = "steady";
/// The chart's lease duration plus its renew grace, and room for a loaded machine.
const TAKEOVER: Duration = Duration::from_secs(60);

fn phase(name: &str) -> Instant {
    eprintln!("==> {name}");
    Instant::now()
}

fn phase_done(t: Instant) {
    eprintln!("    ({:.1} s)", t.elapsed().as_secs_f64());
}

/// A Deployment on every device, rolled out one device at a time.
async fn apply_steady(stack: &Stack, devices: &[String], mode: &str) -> anyhow::Result<()> {
    let mut spec = DeploymentSpec::for_devices(devices.iter().cloned(), web_score("localhost/iot-web:v1", mode));
    spec.rollout = Some(RolloutSpec {
        max_unavailable: Some(IntOrString::Int(1)),
        ..Default::default()
    });
    let dep = Deployment::new(STEADY, spec);
    stack
        .deployments("default")
        .patch(
            STEADY,
            &PatchParams::apply("in-cluster-test").force(),
            &Patch::Apply(&dep),
        )
        .await?;
    Ok(())
}

/// Waits until every device runs `STEADY` with this mode and `.status` counts them.
async fn wait_steady(stack: &Stack, devices: &[String], mode: &str, within: Duration) -> anyhow::Result<()> {
    let dep = DeploymentRef::new("default", STEADY)?;
    for d in devices {
        let guard = DeviceContainers::observer(d);
        wait_until(within, &format!("{d} runs {STEADY} in mode {mode}"), || async {
            let st = stack.agent_status(d).await?;
            let running = st.deployments.get(&dep)?.phase == Phase::Running;
            let ids = guard.running_ids();
            let env = podman_cli(&["inspect", "--format", "{{.Config.Env}}", ids.first()?]).ok()?;
            (running && env.contains(&format!("MODE={mode}"))).then_some(())
        })
        .await?;
    }
    let n = devices.len() as u32;
    stack
        .wait_resource_status("default", STEADY, "every device counted as succeeded", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == n && a.targets == n)
        })
        .await?;
    Ok(())
}

async fn holder(stack: &Stack) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(stack.kube.clone(), NAMESPACE);
    leases.get(LEASE).await.ok()?.spec?.holder_identity
}

/// When the Lease was last renewed, as the API server has it.
async fn lease_renewed(stack: &Stack) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(stack.kube.clone(), NAMESPACE);
    let spec = leases.get(LEASE).await.ok()?.spec?;
    spec.renew_time.map(|t| format!("{:?}", t.0))
}

/// The operator's pods: name -> (image, ready, container id).
fn operator_pods(stack: &Stack) -> anyhow::Result<BTreeMap<String, (String, bool, String)>> {
    let (ok, out, err) = stack.api.kubectl(
        &[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/instance=iot",
            "-o",
            "json",
        ],
        None,
    )?;
    anyhow::ensure!(ok, "kubectl get pods: {err}");
    let v: Value = serde_json::from_str(&out)?;
    let mut pods = BTreeMap::new();
    for p in v["items"].as_array().into_iter().flatten() {
        if p["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let c = &p["status"]["containerStatuses"][0];
        pods.insert(
            p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            (
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                c["ready"].as_bool().unwrap_or(false),
                c["containerID"].as_str().unwrap_or_default().to_owned(),
            ),
        );
    }
    Ok(pods)
}

/// Records every change of the Deployments' conditions (type -> status) while it
/// runs; a flap is any condition whose status changed.
struct ConditionWatch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl ConditionWatch {
    fn start(stack: &Stack, names: &[&str]) -> Self {
        let api = stack.deployments("default");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last: BTreeMap<(String, String), String> = BTreeMap::new();
            let mut changes = Vec::new();
            while !*stopped.borrow() {
                for n in &names {
                    let Ok(d) = api.get(n).await else { continue };
                    for c in d.status.map(|s| s.conditions).unwrap_or_default() {
                        let key = (n.clone(), c.type_.clone());
                        if let Some(prev) = last.insert(key, c.status.clone())
                            && prev != c.status
                        {
                            changes.push(format!("{n}: {} {prev} -> {} ({})", c.type_, c.status, c.reason));
                        }
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            changes
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Vec<String>> {
        self.stop.send(true).ok();
        Ok(self.task.await?)
    }
}

/// `helm upgrade` (or `rollback`): the pods roll, the Lease moves to a new pod, no
/// condition flaps, no desired-state key is rewritten.
async fn roll_and_check(
    ic: &InCluster,
    what: &str,
    act: impl FnOnce() -> anyhow::Result<()>,
    image: &str,
) -> anyhow::Result<()> {
    let stack = &ic.stack;
    let before = operator_pods(stack)?;
    let old_holder = holder(stack).await;
    let seq = stack.desired_last_sequence().await?;
    let watch = ConditionWatch::start(stack, &[STEADY]);
    act()?;
    wait_rollout(ic.node(), OPERATOR_DEPLOYMENT, Duration::from_secs(180))?;
    let after = wait_until(Duration::from_secs(120), "only new pods, all ready", || async {
        let pods = operator_pods(stack).ok()?;
        (pods.len() == 2 && pods.keys().all(|p| !before.contains_key(p)) && pods.values().all(|(_, ready, _)| *ready))
            .then_some(pods)
    })
    .await?;
    for (pod, (img, _, _)) in &after {
        assert_eq!(img, image, "{what}: pod {pod} runs {img}");
    }
    let new_holder = wait_until(TAKEOVER, "the Lease held by a new pod", || async {
        holder(stack).await.filter(|h| after.contains_key(h))
    })
    .await?;
    eprintln!("    {what}: lease {old_holder:?} -> {new_holder}");
    // The new leader has reconciled by now (its status write marks it); a few
    // resyncs of the new pods must still write nothing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let flaps = watch.finish().await?;
    assert!(flaps.is_empty(), "{what}: conditions flapped: {flaps:#?}");
    assert_eq!(
        stack.desired_last_sequence().await?,
        seq,
        "{what}: desired-state keys were rewritten"
    );
    Ok(())
}

#[tokio::test]
async fn the_platform_runs_in_a_real_cluster() -> anyhow::Result<()> {
    let t = phase("bring-up: node, OpenBao, chart iot-nats, chart iot-operator (2 replicas)");
    let mut ic = InCluster::start(2, &["resyncInterval=5s"]).await?;
    phase_done(t);
    let pods = operator_pods(&ic.stack)?;
    assert_eq!(pods.len(), 2, "{pods:?}");
    let lead = wait_until(TAKEOVER, "one operator pod holds the Lease", || async {
        holder(&ic.stack).await.filter(|h| pods.contains_key(h))
    })
    .await?;
    eprintln!("    leader {lead}");

    let t = phase("devices: two enrolled agents through the callout in the NATS pod");
    let (dev_a, guard_a) = ic.stack.start_enrolled_agent().await?;
    let (dev_b, _guard_b) = ic.stack.start_enrolled_agent().await?;
    let devices = vec![dev_a.clone(), dev_b.clone()];
    for d in &devices {
        wait_until(WAIT, &format!("{d} reports"), || async {
            ic.stack.agent_status(d).await
        })
        .await?;
        eprintln!("    {d} reports after {:.1} s", t.elapsed().as_secs_f64());
    }
    phase_done(t);

    for (via, name) in [
        (Via::Applier, "web-applier"),
        (Via::PrintedJson, "web-printed"),
        (Via::HandWrittenYaml, "web-yaml"),
    ] {
        let t = phase(&format!("Chapter 1 regression via {via:?}"));
        lifecycle_on(&ic.stack, via, name, &dev_a, &guard_a).await?;
        phase_done(t);
    }

    let t = phase("the operator pods' ServiceAccount: its calls allowed, nothing more");
    let sa_user = format!("system:serviceaccount:{NAMESPACE}:iot-iot-operator");
    let audit = ic.node().audit()?;
    let mine: Vec<_> = audit.iter().filter(|e| e.user == sa_user).collect();
    for (what, seen) in [
        (
            "wrote status",
            mine.iter().any(|e| e.verb == "patch" && e.uri.contains("/status")),
        ),
        ("took the lease", mine.iter().any(|e| e.uri.contains("/leases/"))),
        (
            "recorded revisions",
            mine.iter()
                .any(|e| e.verb == "create" && e.uri.contains("/deploymentrevisions")),
        ),
    ] {
        assert!(seen, "the operator pods {what} as {sa_user}");
    }
    let forbidden: Vec<_> = mine.iter().filter(|e| e.decision == "forbid").collect();
    assert!(forbidden.is_empty(), "forbidden calls: {forbidden:#?}");
    iot_e2e::chart::assert_operator_rbac(&ic.stack.kube, &sa_user, NAMESPACE).await?;
    phase_done(t);

    let t = phase("a steady deployment on both devices");
    apply_steady(&ic.stack, &devices, "one").await?;
    wait_steady(&ic.stack, &devices, "one", WAIT).await?;
    phase_done(t);

    // The "new" operator image is the same image under a second tag.
    let tag = iot_launch::in_cluster::image_tag();
    let old_image = format!("localhost/iot-operator:{tag}");
    let new_image = format!("localhost/iot-operator:{tag}-next");
    podman_cli(&["tag", &old_image, &new_image])?;
    ic.node().import_images(std::slice::from_ref(&new_image))?;
    let chart = iot_launch::helm::chart_dir("iot-operator");

    let t = phase("helm upgrade to a new operator image");
    let mut sets = ic.operator_sets.clone();
    sets.push(format!("image.tag={tag}-next"));
    roll_and_check(
        &ic,
        "upgrade",
        || helm_release(ic.node(), "upgrade", OPERATOR_RELEASE, &chart, &sets),
        &new_image,
    )
    .await?;
    phase_done(t);

    let t = phase("helm rollback to revision 1");
    let kc = ic.node().kubeconfig().display().to_string();
    let rollback = || {
        iot_launch::helm::helm_ok(&[
            "rollback",
            "--release",
            OPERATOR_RELEASE,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            &kc,
            "--revision",
            "1",
        ])
        .map(drop)
    };
    roll_and_check(&ic, "rollback", rollback, &old_image).await?;
    phase_done(t);

    let t = phase("the leader pod deleted by force mid-rollout; the standby finishes it");
    let leader = wait_until(TAKEOVER, "a leader", || async { holder(&ic.stack).await }).await?;
    apply_steady(&ic.stack, &devices, "two").await?;
    let (ok, _, err) = ic.stack.api.kubectl(
        &["delete", "pod", &leader, "-n", NAMESPACE, "--grace-period=0", "--force"],
        None,
    )?;
    anyhow::ensure!(ok, "kubectl delete pod: {err}");
    let killed = Instant::now();
    let next = wait_until(TAKEOVER, "another pod takes the Lease", || async {
        holder(&ic.stack).await.filter(|h| *h != leader)
    })
    .await?;
    eprintln!(
        "    lease {leader} -> {next} after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    wait_steady(&ic.stack, &devices, "two", WAIT).await?;
    phase_done(t);

    let t = phase("the leader's process killed on the node (SIGKILL by PID) mid-rollout");
    wait_rollout(ic.node(), OPERATOR_DEPLOYMENT, Duration::from_secs(120))?;
    let leader = wait_until(TAKEOVER, "a leader", || async { holder(&ic.stack).await }).await?;
    let container = operator_pods(&ic.stack)?
        .get(&leader)
        .map(|(_, _, c)| c.clone())
        .ok_or_else(|| anyhow::anyhow!("leader {leader} is not a running operator pod"))?;
    apply_steady(&ic.stack, &devices, "three").await?;
    let pid = ic.node().container_pid(&container)?;
    iot_launch::process::kill_pid(pid)?;
    let killed = Instant::now();
    // Read after the kill: the dead process cannot change it any more, and no live
    // one can take it this soon (the standby waits out the lease; a container
    // restart takes longer than this read).
    let renewed_at_kill = lease_renewed(&ic.stack).await;
    // A SIGKILLed leader cannot release or renew the Lease: the next renewal is a live
    // process's, the standby's once the lease expires, or the same pod's restarted
    // container (same name, so same identity) if it confirms its hold first.
    let renewer = wait_until(TAKEOVER, "the Lease renewed by a live process", || {
        let before = renewed_at_kill.clone();
        let stack = &ic.stack;
        async move {
            let now = lease_renewed(stack).await;
            if now.is_some() && now != before {
                holder(stack).await
            } else {
                None
            }
        }
    })
    .await?;
    eprintln!(
        "    lease renewed by {renewer} {:.1} s after the kill (the killed pod was {leader})",
        killed.elapsed().as_secs_f64()
    );
    wait_steady(&ic.stack, &devices, "three", WAIT).await?;
    eprintln!(
        "    rollout done {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    phase_done(t);

    let t = phase("the NATS pod deleted: back with its JetStream state, devices reconnect");
    let keys_before = collect_keys(&ic.stack.desired).await?;
    let seq_before = ic.stack.desired_last_sequence().await?;
    let (ok, _, err) = ic.stack.api.kubectl(
        &[
            "delete",
            "pod",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/instance=nats",
            "--wait=true",
        ],
        None,
    )?;
    anyhow::ensure!(ok, "kubectl delete nats pod: {err}");
    eprintln!("    old pod gone after {:.1} s", t.elapsed().as_secs_f64());
    wait_rollout(ic.node(), NATS_DEPLOYMENT, Duration::from_secs(120))?;
    eprintln!("    new pod ready after {:.1} s", t.elapsed().as_secs_f64());
    let keys_after = wait_until(WAIT, "the desired-state bucket answers again", || async {
        collect_keys(&ic.stack.desired).await.ok()
    })
    .await?;
    assert_eq!(keys_after, keys_before, "the store survived the pod");
    assert!(ic.stack.desired_last_sequence().await? >= seq_before);
    apply_steady(&ic.stack, &devices, "four").await?;
    wait_steady(&ic.stack, &devices, "four", WAIT).await?;
    phase_done(t);

    let t = phase("helm uninstall of the operator: the fleet keeps running");
    let running_before: Vec<Vec<String>> = devices
        .iter()
        .map(|d| DeviceContainers::observer(d).running_ids())
        .collect();
    iot_launch::helm::helm_ok(&[
        "uninstall",
        "--release",
        OPERATOR_RELEASE,
        "--namespace",
        NAMESPACE,
        "--kubeconfig",
        &kc,
    ])?;
    wait_until(WAIT, "operator pods gone", || async {
        operator_pods(&ic.stack).ok().filter(|p| p.is_empty()).map(drop)
    })
    .await?;
    let (ok, _, err) = ic
        .stack
        .api
        .kubectl(&["get", "crd", "deployments.iot.nationtech.io"], None)?;
    assert!(ok, "the CRD is kept: {err}");
    let kept = ic.stack.deployments("default").get(STEADY).await?;
    assert!(kept.metadata.deletion_timestamp.is_none());
    assert_eq!(
        collect_keys(&ic.stack.desired).await?,
        keys_after,
        "desired state is kept"
    );
    // Devices keep serving what they run: give them several resyncs without an operator.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let running_after: Vec<Vec<String>> = devices
        .iter()
        .map(|d| DeviceContainers::observer(d).running_ids())
        .collect();
    assert_eq!(running_after, running_before, "no container was touched");

    let t2 = phase("reinstall: the operator adopts the fleet without restarting anything");
    let seq = ic.stack.desired_last_sequence().await?;
    iot_launch::in_cluster::install_operator(ic.node(), &ic.operator_sets)?;
    wait_rollout(ic.node(), OPERATOR_DEPLOYMENT, Duration::from_secs(120))?;
    ic.stack
        .wait_resource_status("default", STEADY, "status from the new operator", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 2)
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let running_again: Vec<Vec<String>> = devices
        .iter()
        .map(|d| DeviceContainers::observer(d).running_ids())
        .collect();
    assert_eq!(
        running_again, running_before,
        "the reinstalled operator restarted containers"
    );
    assert_eq!(
        ic.stack.desired_last_sequence().await?,
        seq,
        "the reinstalled operator rewrote keys"
    );
    phase_done(t2);
    phase_done(t);
    // Naming the tag: `podman untag IMAGE` alone strips every name of the image.
    podman_cli(&["untag", &new_image, &new_image])?;
    Ok(())
}
