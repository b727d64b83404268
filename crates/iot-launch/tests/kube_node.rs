//! A real single-node Kubernetes comes up, runs a pod from an image imported out of
//! podman's store, serves it on a hostPort over the node's uplink, and leaves the
//! machine as it found it: kernel settings, network namespaces, cgroups, mounts
//! and pod logs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use iot_launch::kube_node::{HostEnd, KubeNode, NodeOptions, Uplink};

/// What a node may change on the machine, read before and after.
#[derive(Debug, PartialEq)]
struct MachineState {
    sysctls: Vec<String>,
    netns: Vec<String>,
    cgroups: Vec<String>,
    mounts_under_parent: usize,
    pod_log_dirs: Vec<String>,
}

fn read_state(parent: &Path, cgroup: &str) -> MachineState {
    let sysctls = ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"]
        .iter()
        .map(|k| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default())
        .collect();
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join(cgroup).exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    cgroups.sort();
    let parent = parent.display().to_string();
    let mounts_under_parent = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&parent)))
        .count();
    let mut pod_log_dirs: Vec<String> = std::fs::read_dir("/var/log/pods")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    pod_log_dirs.sort();
    MachineState {
        sysctls,
        netns,
        cgroups,
        mounts_under_parent,
        pod_log_dirs,
    }
}

/// A /30 for the uplink that depends on the process, so parallel runs differ.
fn uplink() -> Uplink {
    let slot = (std::process::id() % 16_000) * 4;
    let (a, b) = ((slot / 256) as u8, (slot % 256) as u8);
    Uplink {
        node_ip: Ipv4Addr::new(10, 212, a, b + 2),
        prefix: 30,
        gateway: Ipv4Addr::new(10, 212, a, b + 1),
        host_end: HostEnd::Address,
    }
}

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: localhost/iot-web:v1
    imagePullPolicy: Never
    ports:
    - containerPort: 80
      hostPort: 18080
"#;

#[tokio::test]
async fn a_node_runs_a_pod_on_a_host_port_and_leaves_the_machine_as_it_was() -> anyhow::Result<()> {
    let parent = tempfile::tempdir()?;
    let name = format!("t{}", std::process::id() % 100_000);
    let cgroup = format!("iot-node-{name}");
    let before = read_state(parent.path(), &cgroup);
    let uplink = uplink();
    let node_ip = uplink.node_ip;
    let node = KubeNode::start(&NodeOptions {
        name: name.clone(),
        parent: parent.path().to_owned(),
        uplink,
        images: vec!["localhost/iot-web:v1".into()],
    })
    .await?;
    // The kubelet's kernel settings were put back as soon as it ran.
    assert_eq!(read_state(parent.path(), &cgroup).sysctls, before.sysctls);

    let (ok, _, err) = node.kubectl(&["apply", "-f", "-"], Some(POD))?;
    anyhow::ensure!(ok, "kubectl apply: {err}");
    let (ok, out, err) = node.kubectl(
        &[
            "wait",
            "--for=condition=Ready",
            "pod/web",
            "-n",
            "default",
            "--timeout=90s",
        ],
        None,
    )?;
    anyhow::ensure!(ok, "the pod never became Ready: {out}{err}");
    // The hostPort answers on the node's uplink address, from the machine.
    let body = iot_launch::wait_until(Duration::from_secs(30), "the hostPort to answer", || async move {
        iot_launch::http::get_text(&node_ip.to_string(), 18080, "/").await.ok()
    })
    .await?;
    assert_eq!(body.trim(), "v1");
    // kubectl logs goes API server -> kubelet by the node's address.
    let (ok, _, err) = node.kubectl(&["logs", "web", "-n", "default"], None)?;
    anyhow::ensure!(ok, "kubectl logs: {err}");

    let during = read_state(parent.path(), &cgroup);
    assert_ne!(
        during.netns, before.netns,
        "the node has a network namespace of its own"
    );
    assert!(!during.cgroups.is_empty(), "the node has cgroups of its own");
    assert!(
        during.mounts_under_parent > 0,
        "the kubelet and containerd mount under the node"
    );

    drop(node);
    let after = read_state(parent.path(), &cgroup);
    assert_eq!(after, before);
    Ok(())
}
