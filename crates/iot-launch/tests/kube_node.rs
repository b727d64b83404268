//! A real single-node Kubernetes comes up, runs a pod from an image imported out of
//! podman's store, serves it on a hostPort over the node's uplink, and leaves the
//! machine as it found it: kernel settings, its network namespace, cgroups, mounts
//! and pod logs; also when the process that started it was SIGKILLed.

use std::path::Path;
use std::time::Duration;

use iot_launch::kube_node::{KubeNode, NodeOptions, Uplink};

/// What a node may change on the machine, read before and after. Only this node's
/// own traces count (its namespace, cgroups, mounts, pod logs), so other nodes on
/// the machine (another test binary, a user's `up.sh --cluster`) do not disturb it.
#[derive(Debug, PartialEq)]
struct MachineState {
    sysctls: Vec<String>,
    netns: Vec<String>,
    cgroups: Vec<String>,
    mounts_under_parent: usize,
    pod_log_dirs: Vec<String>,
}

fn read_state(parent: &Path, cgroup: &str) -> MachineState {
    read_state_of(parent, cgroup, &[])
}

/// [`read_state`], with the pod log directories of these pod UIDs.
fn read_state_of(parent: &Path, cgroup: &str, pod_uids: &[String]) -> MachineState {
    // Read while no node is between saving and restoring the kernel settings.
    let sysctls = {
        let _lock = iot_launch::kube_node::host::sysctl_lock().ok();
        ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"]
            .iter()
            .map(|k| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default())
            .collect()
    };
    let name = cgroup.trim_start_matches("iot-node-");
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| *n == format!("iotk-{name}"))
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
                .filter(|n| pod_uids.iter().any(|u| n.ends_with(&format!("_{u}"))))
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

fn uplink_n(n: u32) -> Uplink {
    Uplink::point_to_point(212, n)
}

fn uplink() -> Uplink {
    uplink_n(0)
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

    let (ok, uid, err) = node.kubectl(
        &["get", "pod", "web", "-n", "default", "-o", "jsonpath={.metadata.uid}"],
        None,
    )?;
    anyhow::ensure!(ok, "kubectl get pod: {err}");
    let uids = vec![uid.trim().to_owned()];
    let during = read_state_of(parent.path(), &cgroup, &uids);
    assert_eq!(
        during.pod_log_dirs.len(),
        1,
        "the kubelet logs the pod under /var/log/pods"
    );
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
    let after = read_state_of(parent.path(), &cgroup, &uids);
    assert_eq!(after, before);
    Ok(())
}

/// Run only as the child of the test below (it sets IOT_NODE_CHILD_DIR): starts a
/// node, says so in a file, and waits to be killed.
#[tokio::test]
#[ignore = "the child process of a_node_whose_owner_was_killed_is_cleaned_up_by_the_next_start"]
async fn child_node_waiting_to_be_killed() -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("IOT_NODE_CHILD_DIR") else {
        return Ok(());
    };
    let dir = std::path::PathBuf::from(dir);
    let name = std::env::var("IOT_NODE_CHILD_NAME")?;
    let node = KubeNode::start(&NodeOptions {
        name,
        parent: dir.clone(),
        uplink: uplink_n(1),
        images: Vec::new(),
    })
    .await?;
    std::fs::write(dir.join("ready"), node.dir().display().to_string())?;
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}

#[tokio::test]
async fn a_node_whose_owner_was_killed_is_cleaned_up_by_the_next_start() -> anyhow::Result<()> {
    let parent = tempfile::tempdir()?;
    let name = format!("k{}", std::process::id() % 100_000);
    let cgroup = format!("iot-node-{name}");
    let before = read_state(parent.path(), &cgroup);
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--ignored", "--exact", "child_node_waiting_to_be_killed", "--nocapture"])
        .env("IOT_NODE_CHILD_DIR", parent.path())
        .env("IOT_NODE_CHILD_NAME", &name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let ready = parent.path().join("ready");
    let started = iot_launch::wait_until(Duration::from_secs(120), "the child's node to be Ready", || {
        let ok = ready.exists();
        async move { ok.then_some(()) }
    })
    .await;
    // SIGKILL: no destructor runs; the node's processes, mounts, cgroups and
    // namespace stay behind.
    child.kill()?;
    child.wait()?;
    started?;
    let left = read_state(parent.path(), &cgroup);
    assert_ne!(left, before, "a killed owner leaves its node behind");
    let reaped = iot_launch::kube_node::ledger::reap_dead("");
    assert!(reaped.contains(&name), "{reaped:?}");
    assert_eq!(read_state(parent.path(), &cgroup), before);
    let leftover: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|c| c.contains(&parent.path().display().to_string()))
        .collect();
    assert!(leftover.is_empty(), "processes left: {leftover:?}");
    Ok(())
}
