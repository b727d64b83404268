//! The Chapter 1 regression, shared by the tests that run it on different stacks
//! (processes on the machine, pods in a real cluster): the same lifecycle three
//! ways, through the typed applier, its `--print | kubectl apply -f -` output, and a
//! hand-written YAML manifest.

use harmony_reconciler_contracts::DeploymentRef;
use iot_testkit::{DeviceContainers, free_port, wait_until};

use crate::stack::*;

/// How a user drives the resource.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Applier,
    PrintedJson,
    HandWrittenYaml,
}

pub fn yaml_manifest(ns: &str, name: &str, device: &str, image: &str, port: u16) -> String {
    // Written the way a user who never touches Rust would write it.
    format!(
        r#"apiVersion: iot.nationtech.io/v1alpha1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  targetDevices:
    - {device}
  score:
    PodmanV0:
      services:
        - name: web
          image: {image}
          ports:
            - hostPort: {port}
              containerPort: 80
"#
    )
}

pub fn apply(
    stack: &Stack,
    via: Via,
    ns: &str,
    name: &str,
    device: &str,
    image: &str,
    port: u16,
) -> anyhow::Result<()> {
    let port_s = port.to_string();
    let base = [
        "--name",
        name,
        "--namespace",
        ns,
        "--target-device",
        device,
        "--image",
        image,
        "--port",
        &port_s,
    ];
    match via {
        Via::Applier => {
            let mut cmd = stack.applier()?;
            cmd.args(base);
            run_ok(cmd)?;
        }
        Via::PrintedJson => {
            let mut cmd = stack.applier()?;
            cmd.args(base).arg("--print");
            let json = run_ok(cmd)?;
            let (ok, _, err) = stack.api.kubectl(&["apply", "-f", "-"], Some(&json))?;
            anyhow::ensure!(ok, "kubectl apply of printed JSON failed: {err}");
        }
        Via::HandWrittenYaml => {
            let (ok, _, err) = stack.api.kubectl(
                &["apply", "-f", "-"],
                Some(&yaml_manifest(ns, name, device, image, port)),
            )?;
            anyhow::ensure!(ok, "kubectl apply of YAML failed: {err}");
        }
    }
    Ok(())
}

pub fn delete(stack: &Stack, via: Via, ns: &str, name: &str) -> anyhow::Result<()> {
    match via {
        Via::Applier => {
            let mut cmd = stack.applier()?;
            cmd.args(["--name", name, "--namespace", ns, "--delete"]);
            run_ok(cmd)?;
        }
        Via::PrintedJson | Via::HandWrittenYaml => {
            let (ok, _, err) = stack.api.kubectl(
                &[
                    "delete",
                    "deployments.iot.nationtech.io",
                    "-n",
                    ns,
                    name,
                    "--wait=false",
                ],
                None,
            )?;
            anyhow::ensure!(ok, "kubectl delete failed: {err}");
        }
    }
    Ok(())
}

/// Apply v1 -> HTTP 200 "v1" from the device -> `.status` counts it -> v2 (a new
/// container, "v2", counted on the new spec) -> delete (container, keys and the
/// resource gone), as a user drives it `via`, for `name` in `default` on `dev`.
pub async fn lifecycle_on(
    stack: &Stack,
    via: Via,
    name: &str,
    dev: &str,
    guard: &DeviceContainers,
) -> anyhow::Result<()> {
    let port = free_port()?;
    let dep = DeploymentRef::new("default", name)?;

    apply(stack, via, "default", name, dev, "localhost/iot-web:v1", port)?;
    wait_http(port, "v1").await?;
    let v1 = guard.running_ids();
    assert_eq!(v1.len(), 1);
    // The fleet's truth reaches .status.
    let st = stack
        .wait_resource_status("default", name, "aggregate.succeeded == 1", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1 && a.targets == 1)
        })
        .await?;
    let agg = st.aggregate.expect("aggregate");
    assert_eq!((agg.failed, agg.pending, agg.unreported), (0, 0, 0));
    assert_eq!(stack.keys_of(&dep).await?, vec![format!("{dev}.default_{name}")]);

    apply(stack, via, "default", name, dev, "localhost/iot-web:v2", port)?;
    wait_http(port, "v2").await?;
    let v2 = wait_until(WAIT, "one new container", || async {
        let ids = guard.running_ids();
        (ids.len() == 1 && ids != v1).then_some(ids)
    })
    .await?;
    assert_ne!(v1, v2, "upgrade must replace the container");
    let v2_hash = stack
        .deployments("default")
        .get(name)
        .await?
        .spec
        .score
        .spec_hash()
        .to_string();
    stack
        .wait_resource_status("default", name, "succeeded on v2", |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.succeeded == 1 && a.spec_hash == v2_hash)
        })
        .await?;

    delete(stack, via, "default", name)?;
    wait_until(WAIT, "container gone", || async {
        guard.ids().is_empty().then_some(())
    })
    .await?;
    wait_until(WAIT, "keys gone", || async {
        stack.keys_of(&dep).await.ok().filter(|k| k.is_empty())
    })
    .await?;
    wait_until(WAIT, "resource gone (finalizer released)", || async {
        stack
            .deployments("default")
            .get_opt(name)
            .await
            .ok()
            .filter(Option::is_none)
            .map(drop)
    })
    .await?;
    Ok(())
}
