//! What a node changed on the machine, written down before it changes it, so that a
//! run killed with SIGKILL (a test binary, `iot-up`) is cleaned up by the next node
//! that starts: its processes outlive it (they are in the node's network namespace),
//! and so do its mounts, cgroups, pod logs and kernel settings.
//!
//! One JSON file per node under [`LEDGER_DIR`]. A node's own teardown and the
//! reaping of a dead one are the same function, [`undo`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::host;

pub const LEDGER_DIR: &str = "/run/iot-kube-node";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ledger {
    pub name: String,
    /// The process that started the node; when it is gone, so is the node's owner.
    pub owner: u32,
    pub dir: PathBuf,
    pub netns: String,
    pub cgroup_root: String,
    /// Kernel settings saved before the kubelet started, while not yet put back.
    #[serde(default)]
    pub saved_sysctls: Option<Vec<(String, String)>>,
    pub run_containerd_existed: bool,
}

impl Ledger {
    fn path(name: &str) -> PathBuf {
        Path::new(LEDGER_DIR).join(format!("{name}.json"))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(LEDGER_DIR)?;
        let tmp = Self::path(&format!(".{}", self.name));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path(&self.name))?;
        Ok(())
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(Self::path(&self.name));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Undoes every node whose owner is gone (or that has the name `also`: a node of
/// that name is about to start again). Returns the names reaped.
pub fn reap_dead(also: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(LEDGER_DIR) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for e in entries.flatten() {
        let Ok(text) = std::fs::read(e.path()) else { continue };
        let Ok(ledger) = serde_json::from_slice::<Ledger>(&text) else {
            continue;
        };
        if ledger.name == also || !alive(ledger.owner) {
            tracing::info!(node = %ledger.name, owner = ledger.owner, "cleaning up a node left behind");
            undo(&ledger, &[]);
            let _ = std::fs::remove_dir_all(&ledger.dir);
            reaped.push(ledger.name);
        }
    }
    reaped
}

/// Every process in the network namespace `netns` (all of the node's components
/// run there, whoever started them).
fn netns_pids(netns: &str) -> Vec<u32> {
    let Ok(ino) = std::fs::metadata(format!("/run/netns/{netns}")).map(|m| m.ino()) else {
        return Vec::new();
    };
    let want = format!("net:[{ino}]");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.as_os_str() == want.as_str()))
        .collect()
}

fn kill_all(pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        let _ = crate::process::kill_pid(pid);
    }
}

/// Stops everything the node runs and puts the machine back: pods (by cgroup),
/// every process in its namespace, its containerd shims; then mounts, cgroups, pod
/// logs of `pod_uids` (or of every pod the kubelet's directory names), kernel
/// settings, the namespace and /run/containerd. The kubelet must be dead first: it
/// would restart what is killed here.
pub fn undo(l: &Ledger, pod_uids: &[String]) {
    let uids: Vec<String> = if pod_uids.is_empty() {
        std::fs::read_dir(l.dir.join("kubelet/pods"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        pod_uids.to_vec()
    };
    // The kubelet first (in a reaped node it may still run).
    let kubelet: Vec<u32> = netns_pids(&l.netns)
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "kubelet"))
        .collect();
    kill_all(kubelet);
    for _ in 0..40 {
        let pids = host::cgroup_pids(&l.cgroup_root);
        if pids.is_empty() {
            break;
        }
        kill_all(pids);
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_all(netns_pids(&l.netns));
    kill_all(host::shim_pids(&l.dir.join("containerd/containerd.sock")));
    host::unmount_under(&l.dir);
    host::remove_cgroups(&l.cgroup_root);
    host::remove_pod_logs(&uids);
    if let Some(saved) = &l.saved_sysctls {
        host::write_sysctls(saved);
    }
    host::delete_netns(&l.netns);
    // containerd's shims make /run/containerd whatever the state directory; removed
    // when this node made it and no other shim is left.
    if !l.run_containerd_existed && host::shim_pids(Path::new("")).is_empty() {
        let _ = std::fs::remove_dir_all("/run/containerd");
    }
    l.remove();
}
