//! The node's configuration files, rendered as text from a [`Layout`]. Pure, so the
//! choices that this machine forces (see `shared/notes/kubelet-here.md`) are pinned
//! by unit tests rather than found again in a failing bring-up.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The pod network inside the node's namespace. Every node has its own namespace,
/// so every node may use the same ranges.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The pods' bridge address, their gateway.
pub const POD_GATEWAY: &str = "10.244.0.1";
/// Service cluster IPs; the first is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The API server's port on the node's address.
pub const API_PORT: u16 = 6443;
/// The sandbox image every pod starts with, built locally (scripts/build-image.sh).
pub const PAUSE_IMAGE: &str = "localhost/iot-pause:3.2";

/// Where one node keeps everything, and what it is called.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The node's state directory.
    pub dir: PathBuf,
    /// The Node object's name.
    pub node_name: String,
    /// The node's address on its uplink: kubelet's, the API server's advertised
    /// one, and where hostPorts answer.
    pub node_ip: Ipv4Addr,
    /// The node's cgroup parent in every hierarchy (a name of its own, so two nodes
    /// on one machine never share `kubepods`).
    pub cgroup_root: String,
}

impl Layout {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.path("containerd/containerd.sock")
    }

    pub fn kubelet_root(&self) -> PathBuf {
        self.path("kubelet")
    }
}

/// containerd's own configuration: root, state and socket in the node's directory
/// (the package's /etc/containerd is never read).
pub fn containerd_toml(l: &Layout) -> String {
    let d = l.dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # containerd sets -998 on sandboxes; without CAP_SYS_RESOURCE runc then fails
  # with "can't get final child's PID from pipe". This clamps to containerd's own 0.
  restrict_oom_score_adj = true
  # Pod network namespaces under the state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
"#,
        sock = l.containerd_socket().display(),
    )
}

/// The pod network: one bridge, host-local addresses, and portmap for hostPorts.
/// `loopback` is not listed: containerd brings up each pod's `lo` itself.
/// Masquerading lets pods reach the uplink's side (OpenBao, the devices' bridge)
/// with the node's address.
pub fn cni_conflist(l: &Layout) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "iot-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": l.path("cni/ipam"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
    .to_string()
}

/// Files the kubelet is given (all in the node's directory).
pub struct KubeletFiles<'a> {
    pub ca: &'a Path,
    pub serving_cert: &'a Path,
    pub serving_key: &'a Path,
}

/// The KubeletConfiguration. What this machine needs: cgroupfs (cgroup v1), no
/// negative oom_score_adj (no CAP_SYS_RESOURCE), swap tolerated, and no iptables
/// chains of its own (kube-proxy's are enough). Eviction and image garbage
/// collection are set so that imported images are never removed: nothing can pull
/// them back.
pub fn kubelet_config(l: &Layout, f: &KubeletFiles<'_>) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
makeIPTablesUtilChains: false
oomScoreAdj: 0
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
volumePluginDir: {d}/kubelet-plugins
evictionHard:
  imagefs.available: "2%"
  nodefs.available: "2%"
  nodefs.inodesFree: "2%"
  memory.available: "100Mi"
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
serializeImagePulls: false
"#,
        ip = l.node_ip,
        cgroup = l.cgroup_root,
        ca = f.ca.display(),
        cert = f.serving_cert.display(),
        key = f.serving_key.display(),
        d = l.dir.display(),
    )
}

/// A kubeconfig for a client certificate.
pub fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: iot-node\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: iot-node\n  context:\n    cluster: iot-node\n    user: user\ncurrent-context: iot-node\n",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            dir: PathBuf::from("/run/x/node"),
            node_name: "n1".into(),
            node_ip: Ipv4Addr::new(10, 77, 0, 5),
            cgroup_root: "iot-node-n1".into(),
        }
    }

    #[test]
    fn containerd_keeps_everything_in_the_node_directory() {
        let t = containerd_toml(&layout());
        assert!(
            t.contains(r#"address = "/run/x/node/containerd/containerd.sock""#),
            "{t}"
        );
        assert!(t.contains("restrict_oom_score_adj = true"));
        assert!(t.contains("SystemdCgroup = false"));
        assert!(t.contains(r#"sandbox_image = "localhost/iot-pause:3.2""#));
        assert!(t.contains(r#"conf_dir = "/run/x/node/cni/net.d""#));
        // Nothing outside the node's directory but the CNI plugins.
        for line in t.lines().filter(|l| l.contains("= \"/")) {
            assert!(line.contains("/run/x/node") || line.contains("/usr/lib/cni"), "{line}");
        }
    }

    #[test]
    fn the_pod_network_maps_host_ports_and_masquerades() -> anyhow::Result<()> {
        let v: serde_json::Value = serde_json::from_str(&cni_conflist(&layout()))?;
        let plugins = v["plugins"].as_array().cloned().unwrap_or_default();
        let types: Vec<&str> = plugins.iter().filter_map(|p| p["type"].as_str()).collect();
        assert_eq!(types, ["bridge", "portmap"]);
        assert_eq!(plugins[0]["ipMasq"], true);
        assert_eq!(plugins[0]["ipam"]["ranges"][0][0]["subnet"], POD_CIDR);
        assert_eq!(plugins[0]["ipam"]["dataDir"], "/run/x/node/cni/ipam");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
        Ok(())
    }

    #[test]
    fn the_kubelet_uses_its_own_cgroup_root_and_never_collects_images() {
        let f = KubeletFiles {
            ca: Path::new("/ca.crt"),
            serving_cert: Path::new("/k.crt"),
            serving_key: Path::new("/k.key"),
        };
        let t = kubelet_config(&layout(), &f);
        for want in [
            "cgroupRoot: /iot-node-n1",
            "cgroupDriver: cgroupfs",
            "oomScoreAdj: 0",
            "address: 10.77.0.5",
            "imageGCHighThresholdPercent: 99",
            "clientCAFile: /ca.crt",
            "readOnlyPort: 0",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
    }
}
