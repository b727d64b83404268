//! What a node changes on the machine, and how each change is undone: its network
//! namespace and uplink, its cgroups, three kernel settings the kubelet writes at
//! start, the mounts it leaves, and the pod logs under /var/log. A test suite and a
//! later run share this kernel, so teardown must leave it as it was.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How the node's namespace reaches the machine.
#[derive(Debug, Clone)]
pub enum HostEnd {
    /// The host end of the link gets the gateway address (a point-to-point link).
    Address,
    /// The host end joins this existing bridge (the devices' bridge), whose own
    /// address is the gateway.
    Bridge(String),
}

/// The node's link to the machine: `node_ip/prefix` inside the namespace, the
/// default route through `gateway`.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub node_ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub host_end: HostEnd,
}

impl Uplink {
    /// A point-to-point /30 out of `10.<second_octet>.0.0/16`, chosen by this
    /// process's id and `n`, so that runs in parallel (tests) take different ones.
    /// The host end gets the gateway address.
    pub fn point_to_point(second_octet: u8, n: u32) -> Self {
        let slot = (std::process::id().wrapping_add(n.wrapping_mul(7919)) % 16_000) * 4;
        let (a, b) = ((slot / 256) as u8, (slot % 256) as u8);
        Self {
            node_ip: Ipv4Addr::new(10, second_octet, a, b + 2),
            prefix: 30,
            gateway: Ipv4Addr::new(10, second_octet, a, b + 1),
            host_end: HostEnd::Address,
        }
    }
}

pub(crate) fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates network namespace `netns` with `lo` up and the uplink; the host end is
/// called `host_if` (at most 15 characters).
pub fn create_netns(netns: &str, host_if: &str, uplink: &Uplink) -> anyhow::Result<()> {
    run("ip", &["netns", "add", netns])?;
    run("ip", &["-n", netns, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &[
            "link", "add", host_if, "type", "veth", "peer", "name", "uplink0", "netns", netns,
        ],
    )?;
    let cidr = format!("{}/{}", uplink.node_ip, uplink.prefix);
    run("ip", &["-n", netns, "addr", "add", &cidr, "dev", "uplink0"])?;
    run("ip", &["-n", netns, "link", "set", "uplink0", "up"])?;
    match &uplink.host_end {
        HostEnd::Address => {
            let gw = format!("{}/{}", uplink.gateway, uplink.prefix);
            run("ip", &["addr", "add", &gw, "dev", host_if])?;
        }
        HostEnd::Bridge(bridge) => {
            run("ip", &["link", "set", host_if, "master", bridge])?;
        }
    }
    run("ip", &["link", "set", host_if, "up"])?;
    run(
        "ip",
        &[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &uplink.gateway.to_string(),
        ],
    )?;
    // Pods reach the uplink through the node: it routes for them.
    run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{netns}"),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    Ok(())
}

/// Deletes the namespace (and with it both ends of the uplink).
pub fn delete_netns(netns: &str) {
    if let Err(e) = run("ip", &["netns", "del", netns]) {
        tracing::debug!(netns, error = %e, "netns already gone");
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Every cgroup v1 hierarchy and the unified one, by directory (the
/// `cpu,cpuacct`-style names; their `cpu` and `cpuacct` symlinks are skipped).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Creates the node's cgroup parent in every hierarchy: the kubelet refuses a
/// cgroupRoot that does not exist. A new cpuset starts with no CPUs and no memory
/// nodes, so those are copied from the top.
pub fn create_cgroups(name: &str) -> anyhow::Result<()> {
    for h in hierarchies() {
        let dir = h.join(name);
        if let Err(e) = std::fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot create cgroup");
            continue;
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(file)) {
                std::fs::write(dir.join(file), v.trim())?;
            }
        }
    }
    Ok(())
}

/// Every process in the node's cgroups (pods, and their shims' children).
pub fn cgroup_pids(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for h in hierarchies() {
        walk(&h.join(name), &mut |dir| {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        });
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the node's cgroups, deepest first. A cgroup with a process left in it
/// stays (and is logged).
pub fn remove_cgroups(name: &str) {
    for h in hierarchies() {
        let mut dirs = Vec::new();
        walk(&h.join(name), &mut |d| dirs.push(d.to_owned()));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if let Err(e) = std::fs::remove_dir(&d) {
                tracing::warn!(cgroup = %d.display(), error = %e, "cgroup left behind");
            }
        }
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), f);
            }
        }
    }
}

/// The kernel settings the kubelet changes at start (once), which are global: the
/// node writes the old values back as soon as the kubelet has started.
pub const KUBELET_SYSCTLS: [&str; 3] = ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"];

pub fn read_sysctls() -> anyhow::Result<Vec<(String, String)>> {
    KUBELET_SYSCTLS
        .iter()
        .map(|k| {
            Ok((
                (*k).to_owned(),
                std::fs::read_to_string(format!("/proc/sys/{k}"))?.trim().to_owned(),
            ))
        })
        .collect()
}

pub fn write_sysctls(values: &[(String, String)]) {
    for (k, v) in values {
        if let Err(e) = std::fs::write(format!("/proc/sys/{k}"), v) {
            tracing::warn!(sysctl = %k, error = %e, "cannot restore kernel setting");
        }
    }
}

/// Held from reading the kernel settings until they are written back, so two
/// nodes starting at once never save each other's kubelet's values.
pub fn sysctl_lock() -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/iot-kube-node.sysctl.lock")?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| anyhow::anyhow!("flock: {e}"))
}

/// Unmounts everything mounted under `dir` (the kubelet's self bind mount of its
/// root, pods' volumes, containerd's rootfs and network namespace mounts), deepest
/// first.
pub fn unmount_under(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::debug!(mount = %p.display(), error = %e, "unmount");
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(n as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

/// Removes the kubelet's pod logs of the pods with these UIDs from the fixed
/// /var/log/pods, the symlinks to them in /var/log/containers, and either directory
/// once it is empty.
pub fn remove_pod_logs(uids: &[String]) {
    let pods = Path::new("/var/log/pods");
    if let Ok(entries) = std::fs::read_dir(pods) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if uids.iter().any(|u| name.ends_with(&format!("_{u}")))
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                tracing::warn!(dir = %e.path().display(), error = %err, "pod log left behind");
            }
        }
    }
    let containers = Path::new("/var/log/containers");
    if let Ok(entries) = std::fs::read_dir(containers) {
        for e in entries.flatten() {
            // A link whose pod directory is gone (ours, just removed).
            if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(pods) && !t.exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for d in [containers, pods] {
        // Fails (and stays) while another node's logs are in it.
        let _ = std::fs::remove_dir(d);
    }
}

/// The containerd shims serving the socket `socket`: they outlive containerd.
pub fn shim_pids(socket: &Path) -> Vec<u32> {
    let needle = socket.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("containerd-shim") && c.contains(&needle)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }
}
