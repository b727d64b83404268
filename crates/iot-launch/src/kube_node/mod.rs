//! A real single-node Kubernetes 1.20.2: etcd, kube-apiserver, containerd, kubelet,
//! kube-controller-manager, kube-scheduler and kube-proxy (scripts/build-kube-node.sh),
//! all inside a network namespace of the node's own. Pods really run, from images
//! imported out of podman's store (no registry), and reach the machine through the
//! node's uplink (a point-to-point link, or the devices' bridge).
//!
//! Inside its namespace every component has a fixed port: the API server answers on
//! `https://<node ip>:6443`, which the machine reaches over the uplink. Processes are
//! started with `nsenter --net` only, so they share the machine's mount namespace:
//! the kubelet's volume mounts must be visible to containerd.
//!
//! Dropping the node stops everything and undoes what it changed on the machine
//! (see [`host`]).

pub mod config;
pub mod host;
pub mod ledger;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::paths::find_binary;
use crate::process::{LoggedProcess, run_captured, wait_until};
use crate::tls::Ca;
use config::{API_PORT, KUBERNETES_SERVICE_IP, Layout, PAUSE_IMAGE, POD_CIDR, SERVICE_CIDR};
pub use host::{HostEnd, Uplink};

/// What a node is and where it lives.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Letters, digits and `-`, at most 10 characters: it names the Node, the
    /// network namespace (`iotk-<name>`), the uplink's host end and the cgroups.
    pub name: String,
    /// The node's directory is made under this one.
    pub parent: PathBuf,
    pub uplink: Uplink,
    /// podman images imported into the node (the pause image always is).
    pub images: Vec<String>,
}

/// A running node. Dropping it tears it down.
pub struct KubeNode {
    layout: Layout,
    ca: Ca,
    /// In start order; stopped in reverse, the kubelet first.
    processes: Vec<LoggedProcess>,
    /// What the node changed, kept on disk for whoever cleans up after a killed run.
    ledger: ledger::Ledger,
    dir: Option<tempfile::TempDir>,
}

/// The components, by binary name and the variable that may point elsewhere.
const BINARIES: [(&str, &str); 6] = [
    ("kube-apiserver", "IOT_KUBE_APISERVER"),
    ("kubelet", "IOT_KUBELET"),
    ("kube-controller-manager", "IOT_KUBE_CONTROLLER_MANAGER"),
    ("kube-scheduler", "IOT_KUBE_SCHEDULER"),
    ("kube-proxy", "IOT_KUBE_PROXY"),
    ("etcd", "IOT_ETCD"),
];

impl KubeNode {
    /// Starts the node and waits until it is Ready and its `default`
    /// ServiceAccount exists (about 20-30 s).
    pub async fn start(opts: &NodeOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !opts.name.is_empty()
                && opts.name.len() <= 10
                && opts
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "node name {:?}: 1-10 of a-z, 0-9 and -",
            opts.name
        );
        for (bin, var) in BINARIES {
            find_binary(bin, var).map_err(|e| anyhow::anyhow!("{e} (scripts/build-kube-node.sh builds it)"))?;
        }
        for tool in ["containerd", "ctr", "nsenter", "ip", "openssl"] {
            find_binary(tool, "IOT_UNUSED")
                .map_err(|_| anyhow::anyhow!("{tool} not found; run scripts/setup-host.sh --cluster"))?;
        }
        // Nodes of runs that were killed, and a node of the same name, go first.
        for name in ledger::reap_dead(&opts.name) {
            tracing::info!(node = %name, "removed a node a killed run left behind");
        }
        let dir = tempfile::Builder::new().prefix("iot-node-").tempdir_in(&opts.parent)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Pods' non-root users traverse to hostPath volumes under it.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        }
        let layout = Layout {
            dir: dir.path().to_owned(),
            node_name: opts.name.clone(),
            node_ip: opts.uplink.node_ip,
            cgroup_root: format!("iot-node-{}", opts.name),
        };
        let netns = format!("iotk-{}", opts.name);
        let ca = Ca::create(&layout.path("pki"))?;
        let ledger = ledger::Ledger {
            name: opts.name.clone(),
            owner: std::process::id(),
            dir: layout.dir.clone(),
            netns,
            cgroup_root: layout.cgroup_root.clone(),
            saved_sysctls: None,
            run_containerd_existed: Path::new("/run/containerd").exists(),
        };
        ledger.save()?;
        let mut me = Self {
            layout,
            ca,
            processes: Vec::new(),
            ledger,
            dir: Some(dir),
        };
        me.bring_up(opts).await?;
        Ok(me)
    }

    async fn bring_up(&mut self, opts: &NodeOptions) -> anyhow::Result<()> {
        let l = self.layout.clone();
        for sub in ["logs", "cni/net.d", "cni/ipam", "kubelet", "kubelet-plugins", "images"] {
            std::fs::create_dir_all(l.path(sub))?;
        }
        self.write_pki()?;
        // A leftover of a killed run under the same name is removed first.
        let netns = self.ledger.netns.clone();
        host::delete_netns(&netns);
        host::create_netns(&netns, &netns, &opts.uplink)?;
        host::create_cgroups(&l.cgroup_root)?;

        self.spawn(
            "etcd",
            "etcd",
            &[
                "--data-dir",
                &p(&l.path("etcd")),
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )?;
        self.spawn_apiserver()?;
        self.wait_api().await?;

        std::fs::write(l.path("containerd.toml"), config::containerd_toml(&l))?;
        std::fs::write(l.path("cni/net.d/10-iot-node.conflist"), config::cni_conflist(&l))?;
        self.spawn(
            "containerd",
            "containerd",
            &["--config", &p(&l.path("containerd.toml"))],
        )?;
        let sock = l.containerd_socket();
        wait_until(Duration::from_secs(30), "containerd to answer", || {
            let ok = sock.exists() && self.ctr(&["version"]).is_ok();
            async move { ok.then_some(()) }
        })
        .await?;
        let mut images = vec![PAUSE_IMAGE.to_owned()];
        images.extend(opts.images.iter().cloned());
        self.import_images(&images)?;

        let kc = |n: &str| p(&l.path(&format!("{n}.kubeconfig")));
        self.spawn(
            "kube-controller-manager",
            "kube-controller-manager",
            &[
                "--kubeconfig",
                &kc("kcm"),
                "--use-service-account-credentials",
                "--service-account-private-key-file",
                &p(&l.path("pki/sa.key")),
                "--root-ca-file",
                &p(&self.ca.cert_file()),
                "--leader-elect=false",
                "--port=0",
                "--bind-address=127.0.0.1",
            ],
        )?;
        self.spawn(
            "kube-scheduler",
            "kube-scheduler",
            &[
                "--kubeconfig",
                &kc("scheduler"),
                "--leader-elect=false",
                "--port=0",
                "--bind-address=127.0.0.1",
            ],
        )?;
        self.spawn(
            "kube-proxy",
            "kube-proxy",
            &[
                "--kubeconfig",
                &kc("proxy"),
                "--hostname-override",
                &l.node_name,
                "--proxy-mode",
                "iptables",
                "--cluster-cidr",
                POD_CIDR,
                // Pods on one bridge reach each other's Services: without masquerading,
                // the reply would skip the node and its reverse NAT.
                "--masquerade-all",
                // These keep it from writing the machine-wide nf_conntrack_max.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--healthz-bind-address",
                "127.0.0.1:10256",
            ],
        )?;

        let files = config::KubeletFiles {
            ca: &self.ca.cert_file(),
            serving_cert: &l.path("pki/kubelet.crt"),
            serving_key: &l.path("pki/kubelet.key"),
        };
        std::fs::write(l.path("kubelet.yaml"), config::kubelet_config(&l, &files))?;
        {
            // The kubelet writes three global kernel settings once, at start; they
            // are put back once it runs. The lock keeps two nodes starting at once
            // from saving each other's kubelet's values.
            let _lock = host::sysctl_lock()?;
            self.ledger.saved_sysctls = Some(host::read_sysctls()?);
            self.ledger.save()?;
            self.spawn(
                "kubelet",
                "kubelet",
                &[
                    "--config",
                    &p(&l.path("kubelet.yaml")),
                    "--kubeconfig",
                    &kc("kubelet"),
                    "--container-runtime=remote",
                    &format!("--container-runtime-endpoint=unix://{}", sock.display()),
                    "--root-dir",
                    &p(&l.kubelet_root()),
                    "--cert-dir",
                    &p(&l.path("pki/kubelet-certs")),
                    "--hostname-override",
                    &l.node_name,
                    "--node-ip",
                    &l.node_ip.to_string(),
                    "--pod-infra-container-image",
                    PAUSE_IMAGE,
                ],
            )?;
            self.wait_node_ready(Duration::from_secs(120)).await?;
            self.restore_sysctls();
        }
        // The controller manager's token controller makes it; pods are refused
        // until their ServiceAccount exists.
        wait_until(Duration::from_secs(60), "the default ServiceAccount", || {
            let ok = self
                .kubectl(&["get", "serviceaccount", "default", "-n", "default"], None)
                .is_ok_and(|(ok, _, _)| ok);
            async move { ok.then_some(()) }
        })
        .await?;
        Ok(())
    }

    fn write_pki(&self) -> anyhow::Result<()> {
        let l = &self.layout;
        let ip = l.node_ip.to_string();
        self.ca.issue(
            "apiserver",
            &[
                &ip,
                "127.0.0.1",
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "localhost",
            ],
        )?;
        self.ca.issue("kubelet", &[&ip, "127.0.0.1"])?;
        let inner = format!("https://127.0.0.1:{API_PORT}");
        let clients: [(&str, String, Option<&str>, &str); 5] = [
            ("admin", "iot-node-admin".into(), Some("system:masters"), "admin"),
            (
                "kubelet-client",
                format!("system:node:{}", l.node_name),
                Some("system:nodes"),
                "kubelet",
            ),
            ("kcm", "system:kube-controller-manager".into(), None, "kcm"),
            ("scheduler", "system:kube-scheduler".into(), None, "scheduler"),
            ("proxy", "system:kube-proxy".into(), None, "proxy"),
        ];
        for (file, cn, org, kubeconfig) in clients {
            let (crt, key) = self.ca.issue_client(file, &cn, org)?;
            let text = config::kubeconfig(&inner, &self.ca.cert_file(), &crt, &key);
            crate::auth::write_private(&l.path(&format!("{kubeconfig}.kubeconfig")), &text)?;
        }
        // The machine's kubeconfig reaches the API server over the uplink.
        let outer = config::kubeconfig(
            &self.api_url(),
            &self.ca.cert_file(),
            &l.path("pki/admin.crt"),
            &l.path("pki/admin.key"),
        );
        crate::auth::write_private(&self.kubeconfig(), &outer)?;
        let pki = l.path("pki");
        let pki = p(&pki);
        host::run("openssl", &["genrsa", "-out", &format!("{pki}/sa.key"), "2048"])?;
        host::run(
            "openssl",
            &[
                "rsa",
                "-in",
                &format!("{pki}/sa.key"),
                "-pubout",
                "-out",
                &format!("{pki}/sa.pub"),
            ],
        )?;
        Ok(())
    }

    fn spawn_apiserver(&mut self) -> anyhow::Result<()> {
        let l = self.layout.clone();
        let pki = |f: &str| p(&l.path(&format!("pki/{f}")));
        std::fs::write(
            l.path("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;
        let issuer = crate::kube_apiserver::SERVICE_ACCOUNT_ISSUER;
        self.spawn(
            "kube-apiserver",
            "kube-apiserver",
            &[
                "--etcd-servers",
                "http://127.0.0.1:2379",
                "--bind-address",
                "0.0.0.0",
                "--advertise-address",
                &l.node_ip.to_string(),
                "--secure-port",
                &API_PORT.to_string(),
                "--insecure-port",
                "0",
                "--tls-cert-file",
                &pki("apiserver.crt"),
                "--tls-private-key-file",
                &pki("apiserver.key"),
                "--client-ca-file",
                &pki("ca.crt"),
                "--authorization-mode",
                "Node,RBAC",
                "--enable-admission-plugins",
                "NodeRestriction",
                "--kubelet-client-certificate",
                &pki("admin.crt"),
                "--kubelet-client-key",
                &pki("admin.key"),
                "--kubelet-certificate-authority",
                &pki("ca.crt"),
                // Without it, `kubectl logs` and `exec` look the node's name up in DNS.
                "--kubelet-preferred-address-types",
                "InternalIP",
                "--service-account-issuer",
                issuer,
                "--service-account-signing-key-file",
                &pki("sa.key"),
                "--service-account-key-file",
                &pki("sa.pub"),
                "--api-audiences",
                issuer,
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--audit-log-path",
                &p(&l.path("audit.log")),
                "--audit-policy-file",
                &p(&l.path("audit-policy.yaml")),
                "--audit-log-mode",
                "blocking",
                "--profiling=false",
            ],
        )
    }

    /// Starts `bin` in the node's namespace, its output in `logs/<name>.log`.
    fn spawn(&mut self, name: &str, bin: &str, args: &[&str]) -> anyhow::Result<()> {
        let var = BINARIES
            .iter()
            .find(|(b, _)| *b == bin)
            .map_or("IOT_UNUSED", |(_, v)| v);
        let path = find_binary(bin, var)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(path)
            .args(args);
        let log = self.layout.path(&format!("logs/{name}.log"));
        self.processes.push(LoggedProcess::spawn(name, cmd, log)?);
        Ok(())
    }

    async fn wait_api(&mut self) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            if self
                .kubectl(&["get", "--raw", "/readyz"], None)
                .is_ok_and(|(ok, _, _)| ok)
            {
                return Ok(());
            }
            self.ensure_running()?;
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(90),
                "the API server was not ready in 90 s; its log:\n{}",
                self.log_tail("kube-apiserver")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the Node reports Ready (the kubelet registered and its runtime
    /// and network are up).
    pub async fn wait_node_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        let path = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
        loop {
            let name = self.layout.node_name.clone();
            if self
                .kubectl(&["get", "node", &name, "-o", path], None)
                .is_ok_and(|(ok, out, _)| ok && out.trim() == "True")
            {
                return Ok(());
            }
            self.ensure_running()?;
            anyhow::ensure!(
                start.elapsed() < timeout,
                "node {name} was not Ready in {timeout:?}; kubelet log:\n{}",
                self.log_tail("kubelet")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        for proc in &mut self.processes {
            if !proc.is_running() {
                let tail: Vec<String> = proc.log_text().lines().rev().take(30).map(str::to_owned).collect();
                let tail: Vec<String> = tail.into_iter().rev().collect();
                anyhow::bail!("{} exited; its log:\n{}", proc.name, tail.join("\n"));
            }
        }
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.layout.path(&format!("logs/{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn restore_sysctls(&mut self) {
        if let Some(saved) = self.ledger.saved_sysctls.take() {
            host::write_sysctls(&saved);
            if let Err(e) = self.ledger.save() {
                tracing::warn!(error = %e, "cannot update the node's ledger");
            }
        }
    }

    /// Copies podman images into the node's containerd (namespace `k8s.io`, where
    /// the kubelet looks), under the same names. Pods use them with
    /// `imagePullPolicy: IfNotPresent` or `Never`.
    pub fn import_images(&self, images: &[String]) -> anyhow::Result<()> {
        for image in images {
            let archive = self.layout.path("images/import.tar");
            let _ = std::fs::remove_file(&archive);
            host::run(
                "podman",
                &["save", "-q", "--format", "oci-archive", "-o", &p(&archive), image],
            )
            .map_err(|e| anyhow::anyhow!("exporting {image} from podman: {e}"))?;
            // podman names the archive's image by its reference; --index-name names it
            // in full, as pods ask for it. Once in about eight bring-ups on a loaded
            // machine the unpack failed ("failed to resolve rootfs: content digest
            // ... not found"; cause not found): the half-imported image is removed and
            // the import tried once more.
            let import = || self.ctr(&["images", "import", "--index-name", image, &p(&archive)]);
            if let Err(first) = import() {
                tracing::warn!(image, error = %first, "image import failed; retrying once");
                let _ = self.ctr(&["images", "rm", image]);
                import().map_err(|e| {
                    anyhow::anyhow!(
                        "importing {image} into the node: {e} (first attempt: {first}); containerd's log:\n{}",
                        self.log_tail("containerd")
                    )
                })?;
            }
            std::fs::remove_file(&archive)?;
        }
        Ok(())
    }

    /// Runs `ctr` against the node's containerd, namespace `k8s.io`.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let sock = p(&self.layout.containerd_socket());
        let mut all = vec!["--address", &sock, "--namespace", "k8s.io"];
        all.extend_from_slice(args);
        host::run("ctr", &all)
    }

    /// The PID, on this machine, of a container's main process
    /// (`containerd://<id>` as a pod's status names it, or the bare id).
    pub fn container_pid(&self, container_id: &str) -> anyhow::Result<u32> {
        let id = container_id.trim_start_matches("containerd://");
        let tasks = self.ctr(&["tasks", "ls"])?;
        tasks
            .lines()
            .skip(1)
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next()? == id).then(|| cols.next()?.parse().ok())?
            })
            .ok_or_else(|| anyhow::anyhow!("no running task {id} in\n{tasks}"))
    }

    /// The API server's audit log so far (every request, its user and decision).
    pub fn audit(&self) -> anyhow::Result<Vec<crate::kube_apiserver::AuditEntry>> {
        let text = std::fs::read_to_string(self.layout.path("audit.log"))?;
        Ok(text
            .lines()
            .filter_map(crate::kube_apiserver::parse_audit_line)
            .collect())
    }

    /// Runs kubectl as the node's admin; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig()).args(args);
        run_captured(cmd, stdin)
    }

    /// An admin kube client (over the uplink).
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        crate::apiserver::kube_client_from(&self.kubeconfig()).await
    }

    /// The admin kubeconfig (client certificate in system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.layout.path("admin.kubeconfig")
    }

    pub fn api_url(&self) -> String {
        format!("https://{}:{API_PORT}", self.layout.node_ip)
    }

    /// The node's CA: it signed the API server's certificate, and pods trust it.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        self.layout.node_ip
    }

    pub fn name(&self) -> &str {
        &self.layout.node_name
    }

    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ledger.netns)
    }

    /// A command that runs in the node's network namespace.
    pub fn command_in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path())).arg("--").arg(program);
        cmd
    }

    /// PIDs of the node's own processes, by component name.
    pub fn component_pid(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .and_then(LoggedProcess::pid)
    }

    fn teardown(&mut self) {
        // The kubelet first: it would restart what is killed next.
        if let Some(kubelet) = self.processes.iter_mut().find(|p| p.name == "kubelet") {
            kubelet.kill();
        }
        ledger::undo(&self.ledger, &[]);
        // Already dead; this reaps them.
        for proc in self.processes.iter_mut().rev() {
            proc.kill();
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.teardown();
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            tracing::warn!(error = %e, "node directory left behind");
        }
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}
