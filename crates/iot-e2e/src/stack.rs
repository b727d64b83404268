//! The whole platform on real servers: API server + etcd, nats-server, podman, the
//! operator binary and agent binaries. Everything is killed when the stack drops.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use harmony_reconciler_contracts::*;
use iot_api::{Deployment, DeploymentStatus, Device, DeviceSpec};
use iot_bao::enroll::Role;
use iot_nats::{Anonymous, connect};
use iot_testkit::auth::{CalloutKeys, CalloutLaunch, CalloutProcess};
use iot_testkit::{
    ApiServer, DeviceContainers, KubeApiServer, LoggedProcess, NatsServer, OpenBao, PodmanService, cargo_bin,
    unique_id, wait_until,
};
use kube::Api;
use tempfile::TempDir;

pub const WAIT: Duration = Duration::from_secs(90);

/// The secured variant's parts: OpenBao, the callout and everyone's enrollment.
pub struct Security {
    pub bao: OpenBao,
    pub keys: CalloutKeys,
    pub callouts: Vec<CalloutProcess>,
    pub operator_enrollment: PathBuf,
    /// Enrollment file per enrolled device.
    pub enrollments: std::collections::HashMap<String, PathBuf>,
}

/// The Kubernetes API the stack runs against.
pub enum Cluster {
    /// The CRD-only 1.36 server (CEL validation, today's semantics).
    CrdOnly(ApiServer),
    /// The full kube-apiserver 1.20.2 (RBAC, ServiceAccounts, Leases, audit log).
    Full(KubeApiServer),
    /// A real single-node Kubernetes 1.20.2 whose pods run the platform.
    Node(Box<iot_launch::KubeNode>),
}

impl Cluster {
    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        match self {
            Cluster::CrdOnly(a) => a.kubeconfig(),
            Cluster::Full(a) => a.kubeconfig(),
            Cluster::Node(n) => n.kubeconfig(),
        }
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
        match self {
            Cluster::CrdOnly(a) => a.kubectl(args, stdin),
            Cluster::Full(a) => a.kubectl(args, stdin),
            Cluster::Node(n) => n.kubectl(args, stdin),
        }
    }

    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        match self {
            Cluster::CrdOnly(a) => a.kube_client().await,
            Cluster::Full(a) => a.kube_client().await,
            Cluster::Node(n) => n.kube_client().await,
        }
    }
}

pub struct Stack {
    pub api: Cluster,
    /// The operator's kubeconfig when not the admin's (a ServiceAccount's token).
    pub operator_kubeconfig: Option<PathBuf>,
    /// The NATS server, or member 0 of a cluster ([`Stack::start_secured_cluster`]).
    pub nats: NatsServer,
    /// The other members of a cluster (member `i` is `nats_peers[i - 1]`), with
    /// every member's monitoring port; empty for a single server.
    pub nats_peers: Vec<NatsServer>,
    pub nats_monitors: Vec<u16>,
    pub podman: PodmanService,
    pub kube: kube::Client,
    pub js: jetstream::Context,
    pub desired: kv::Store,
    pub status: kv::Store,
    pub operator: Option<LoggedProcess>,
    pub agents: Vec<LoggedProcess>,
    pub dir: TempDir,
    /// The stack's CA when secured (NATS and OpenBao); a plain stack's NATS has its
    /// own ([`NatsServer::ca_file`]).
    pub ca: Option<iot_testkit::Ca>,
    /// Extra operator arguments (for tests of the aggregator's threshold).
    pub operator_env: Vec<(String, String)>,
    operator_starts: u32,
    /// Where the running operator serves /metrics, /healthz and /readyz.
    pub operator_http: Option<u16>,
    /// Removes device containers after the agents are killed (see Drop).
    cleanups: Vec<DeviceContainers>,
    /// Set by [`Stack::start_secured`]: NATS behind the auth callout, every daemon
    /// with its own identity.
    pub security: Option<Security>,
    pub(crate) secured_dir: Option<TempDir>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Tests that fail by returning an error do not panic, so process logs are not
        // printed for them; IOT_E2E_LOGS=1 prints the operator's and agents' logs.
        if std::env::var_os("IOT_E2E_LOGS").is_some() {
            for p in self.operator.iter().chain(self.agents.iter()) {
                eprintln!("---- {} log ----\n{}", p.name, p.log_text());
            }
        }
        // Agents first: a live agent would restore containers we remove.
        for a in &mut self.agents {
            a.kill();
        }
        for c in &self.cleanups {
            c.remove_all();
        }
    }
}

impl Stack {
    /// API server with the CRD installed (through `iot-operator install`), NATS, podman.
    pub async fn start() -> anyhow::Result<Self> {
        let api = Cluster::CrdOnly(ApiServer::start().await?);
        Self::start_on(api, true).await
    }

    /// The stack on a given API server; `install_crd`: run `iot-operator install`
    /// (false when a Helm chart installed it).
    pub async fn start_on(api: Cluster, install_crd: bool) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let conn = connect(&[nats.url()], &Anonymous, "e2e-admin", nats.ca_file()).await?;
        Self::start_with(api, install_crd, nats, conn.client, None, Vec::new()).await
    }

    /// [`Stack::start`] with NATS listening on `host` only: the host end of an
    /// [`iot_testkit::NetNs`], so an agent inside the namespace
    /// ([`Stack::start_agent_in`]) reaches it over the namespace's link. Everything
    /// on the host (operator, test, other agents) reaches it whatever the link's
    /// state: the host keeps its local address when the link goes down.
    pub async fn start_with_nats_on(host: &str) -> anyhow::Result<Self> {
        let api = Cluster::CrdOnly(ApiServer::start().await?);
        let nats = NatsServer::start_on(host).await?;
        let conn = connect(&[nats.url()], &Anonymous, "e2e-admin", nats.ca_file()).await?;
        Self::start_with(api, true, nats, conn.client, None, Vec::new()).await
    }

    /// [`Stack::start`] with NATS guarded by the auth callout (backed by a real
    /// OpenBao): the operator and each agent started with
    /// [`Stack::start_enrolled_agent`] connect with their own identity. The test
    /// itself uses the development `admin` user for setup and inspection.
    pub async fn start_secured() -> anyhow::Result<Self> {
        Self::start_secured_cluster(1).await
    }

    /// [`Stack::start_secured`] on a JetStream cluster of `members` nats-servers
    /// (routes in mutual TLS, the callout configured on each, buckets with
    /// `min(members, 3)` replicas). Every daemon is given all the URLs.
    pub async fn start_secured_cluster(members: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // One CA for the stack: NATS and OpenBao serve certificates it signed, and
        // every client is given exactly it.
        let ca = iot_testkit::Ca::create(&dir.path().join("ca"))?;
        let bao = OpenBao::start_temp(iot_testkit::TlsMode::Ca(&ca)).await?;
        let root = bao.root()?;
        let callout = iot_bao::enroll::enroll_service(&root, "callout", Role::Callout).await?;
        let callout_file = dir.path().join("callout.json");
        iot_testkit::auth::write_private(&callout_file, &serde_json::to_string(&callout)?)?;
        let operator = iot_bao::enroll::enroll_service(&root, "operator", Role::Operator).await?;
        let operator_enrollment = dir.path().join("operator.json");
        iot_testkit::auth::write_private(&operator_enrollment, &serde_json::to_string(&operator)?)?;
        let keys = CalloutKeys::generate()?;
        let (nats, peers, monitors) = if members <= 1 {
            let nats = NatsServer::start_custom(
                "127.0.0.1",
                &std::env::temp_dir(),
                Some(&keys.nats_config()),
                &[],
                iot_testkit::TlsMode::Ca(&ca),
            )
            .await?;
            (nats, Vec::new(), Vec::new())
        } else {
            let cluster = iot_testkit::NatsCluster::start(
                &iot_testkit::ClusterOptions {
                    size: members,
                    host: "127.0.0.1",
                    parent: &std::env::temp_dir(),
                    shared_config: Some(keys.nats_config()),
                    sync_interval: None,
                },
                &ca,
            )
            .await?;
            let (mut all, monitors) = cluster.into_parts();
            let first = all.remove(0);
            (first, all, monitors)
        };
        let urls: Vec<String> = std::iter::once(&nats).chain(&peers).map(NatsServer::url).collect();
        let binary = cargo_bin("iot-auth-callout")?;
        let callout = CalloutProcess::spawn(
            &CalloutLaunch {
                binary: &binary,
                nats_url: &urls.join(","),
                ca_file: nats.ca_file(),
                keys: &keys,
                dir: dir.path(),
                secrets_dir: dir.path(),
                bao_addr: &bao.addr(),
                enrollment_file: &callout_file,
                oidc_issuer: None,
                user_ttl: Duration::from_secs(600),
                env: vec![("RUST_LOG".into(), "info".into())],
            },
            "callout-0",
        )
        .await?;
        let admin = async_nats::ConnectOptions::with_user_and_password("admin".into(), keys.admin_password.clone())
            .add_root_certificates(ca.cert_file())
            .require_tls(true)
            .connect(urls)
            .await?;
        let security = Security {
            bao,
            keys,
            callouts: vec![callout],
            operator_enrollment,
            enrollments: Default::default(),
        };
        let api = Cluster::CrdOnly(ApiServer::start().await?);
        let mut me = Self::start_with(api, true, nats, admin, Some(security), peers).await?;
        me.nats_monitors = monitors;
        if !me.nats_peers.is_empty() {
            me.operator_env
                .push(("IOT_KV_REPLICAS".into(), (me.nats_peers.len() + 1).min(3).to_string()));
        }
        me.ca = Some(ca);
        me.secured_dir = Some(dir);
        Ok(me)
    }

    pub(crate) async fn start_with(
        api: Cluster,
        install_crd: bool,
        nats: NatsServer,
        admin: async_nats::Client,
        security: Option<Security>,
        nats_peers: Vec<NatsServer>,
    ) -> anyhow::Result<Self> {
        let podman = PodmanService::start().await?;
        let kube = api.kube_client().await?;
        if install_crd {
            iot_launch::operator::install_crd(&cargo_bin("iot-operator")?, &api.kubeconfig())?;
        }
        let js = jetstream::new(admin);
        let replicas = (nats_peers.len() + 1).min(3);
        let (desired, status) = iot_nats::buckets::ensure_buckets_replicated(&js, replicas).await?;
        Ok(Self {
            api,
            operator_kubeconfig: None,
            nats,
            nats_peers,
            nats_monitors: Vec::new(),
            podman,
            kube,
            js,
            desired,
            status,
            operator: None,
            agents: Vec::new(),
            dir: tempfile::tempdir()?,
            ca: None,
            operator_env: Vec::new(),
            operator_starts: 0,
            operator_http: None,
            cleanups: Vec::new(),
            security,
            secured_dir: None,
        })
    }

    pub fn start_operator(&mut self) -> anyhow::Result<()> {
        let http = iot_testkit::free_port()?;
        let kubeconfig = self
            .operator_kubeconfig
            .clone()
            .unwrap_or_else(|| self.api.kubeconfig());
        let enrollment = self.security.as_ref().map(|sec| sec.operator_enrollment.as_path());
        let mut cmd = iot_launch::operator::run_command(
            &cargo_bin("iot-operator")?,
            &kubeconfig,
            &self.nats_url(),
            http,
            enrollment,
        );
        self.trust(&mut cmd);
        cmd.env("IOT_RESYNC_INTERVAL", "5s");
        self.operator_http = Some(http);
        for (k, v) in &self.operator_env {
            cmd.env(k, v);
        }
        self.operator_starts += 1;
        let log = self.dir.path().join(format!("operator-{}.log", self.operator_starts));
        self.operator = Some(LoggedProcess::spawn("iot-operator", cmd, log)?);
        Ok(())
    }

    /// Waits until the operator says it is ready (its `/readyz`), not for a log line.
    pub async fn wait_operator_ready(&self) -> anyhow::Result<()> {
        let port = self
            .operator_http
            .ok_or_else(|| anyhow::anyhow!("operator not started"))?;
        wait_until(WAIT, "operator /readyz", || async {
            (iot_testkit::http::get_status("127.0.0.1", port, "/readyz").await.ok()? == 200).then_some(())
        })
        .await
    }

    /// The operator's `/metrics` text.
    pub async fn operator_metrics(&self) -> anyhow::Result<String> {
        let port = self
            .operator_http
            .ok_or_else(|| anyhow::anyhow!("operator not started"))?;
        iot_testkit::http::get_text("127.0.0.1", port, "/metrics").await
    }

    pub fn stop_operator(&mut self) {
        if let Some(mut op) = self.operator.take() {
            op.kill();
        }
    }

    pub fn operator_log(&self) -> String {
        self.operator.as_ref().map(LoggedProcess::log_text).unwrap_or_default()
    }

    /// Starts an agent for a fresh device id; returns the id and a view of the
    /// device's containers. The stack removes them (after killing agents) on drop.
    pub fn start_agent(&mut self) -> anyhow::Result<(String, DeviceContainers)> {
        let device = unique_id("dev");
        self.cleanups.push(DeviceContainers::new(&device));
        self.spawn_agent(&device)?;
        Ok((device.clone(), DeviceContainers::observer(&device)))
    }

    /// On a secured stack: enrolls a fresh device in OpenBao and starts its agent
    /// with that identity (`NATS_IDENTITY`).
    pub async fn start_enrolled_agent(&mut self) -> anyhow::Result<(String, DeviceContainers)> {
        let device = self.enroll_device().await?;
        self.cleanups.push(DeviceContainers::new(&device));
        self.spawn_agent(&device)?;
        Ok((device.clone(), DeviceContainers::observer(&device)))
    }

    /// An enrolled device whose agent drives the podman service at `podman_socket`
    /// (a device with a store of its own; its service removes its containers).
    pub async fn start_enrolled_agent_on(&mut self, podman_socket: &std::path::Path) -> anyhow::Result<String> {
        let device = self.enroll_device().await?;
        let cmd = Command::new(cargo_bin("iot-agent")?);
        self.launch_agent_on(&device, cmd, podman_socket)?;
        Ok(device)
    }

    /// Enrolls a fresh device id in OpenBao (secured stacks) and keeps its file.
    async fn enroll_device(&mut self) -> anyhow::Result<String> {
        let sec = self
            .security
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("not a secured stack"))?;
        let device = unique_id("dev");
        let enrollment = iot_bao::enroll::enroll_device_identity(&sec.bao.root()?, &device).await?;
        let file = self.dir.path().join(format!("{device}.json"));
        iot_testkit::auth::write_private(&file, &serde_json::to_string(&enrollment)?)?;
        sec.enrollments.insert(device.clone(), file);
        Ok(device)
    }

    pub fn spawn_agent(&mut self, device: &str) -> anyhow::Result<()> {
        self.spawn_agent_with_clock(device, None)
    }

    /// [`start_agent`](Self::start_agent) for a device whose clock is off by `skew`.
    pub fn start_agent_with_clock(&mut self, prefix: &str, skew: &str) -> anyhow::Result<String> {
        let device = unique_id(prefix);
        self.cleanups.push(DeviceContainers::new(&device));
        self.spawn_agent_with_clock(&device, Some(skew))?;
        Ok(device)
    }

    /// An agent whose wall clock is off by `skew` (like `-1h` or `+1h`), through
    /// libfaketime preloaded into it: the real binary, with a device clock nobody set.
    /// (Not the `faketime` command: it forks, and killing it would leave the agent.)
    pub fn spawn_agent_with_clock(&mut self, device: &str, skew: Option<&str>) -> anyhow::Result<()> {
        let mut cmd = Command::new(cargo_bin("iot-agent")?);
        if let Some(skew) = skew {
            cmd.env("LD_PRELOAD", libfaketime()?)
                .env("FAKETIME", skew)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        self.launch_agent(device, cmd)
    }

    /// Starts an agent for a fresh device inside the network namespace `net` (its
    /// network only: podman's socket is reached through the shared filesystem), so
    /// a test can cut the device's link with [`iot_testkit::NetNs::link_down`]. NATS
    /// must listen where the namespace reaches it ([`Stack::start_with_nats_on`]).
    pub fn start_agent_in(&mut self, net: &iot_testkit::NetNs) -> anyhow::Result<(String, DeviceContainers)> {
        let device = unique_id("dev");
        self.cleanups.push(DeviceContainers::new(&device));
        // nsenter enters the namespace and execs the agent: the process is the agent.
        self.launch_agent(&device, net.command(cargo_bin("iot-agent")?))?;
        Ok((device.clone(), DeviceContainers::observer(&device)))
    }

    /// Gives an agent command the stack's settings and starts it as `agent <device>`.
    fn launch_agent(&mut self, device: &str, cmd: Command) -> anyhow::Result<()> {
        let socket = self.podman.socket();
        self.launch_agent_on(device, cmd, &socket)
    }

    fn launch_agent_on(
        &mut self,
        device: &str,
        mut cmd: Command,
        podman_socket: &std::path::Path,
    ) -> anyhow::Result<()> {
        self.trust(&mut cmd);
        cmd.env("IOT_DEVICE_ID", device)
            .env("NATS_URL", self.nats_url())
            .env("PODMAN_SOCKET", podman_socket)
            .env("IOT_HEARTBEAT_INTERVAL", "1s")
            .env("IOT_RESYNC_INTERVAL", "2s")
            .env("IOT_STOP_TIMEOUT", "1s")
            .env("RUST_LOG", "info");
        if let Some(file) = self.security.as_ref().and_then(|s| s.enrollments.get(device)) {
            cmd.env("NATS_IDENTITY", file);
        }
        let log = self.dir.path().join(format!("agent-{device}.log"));
        self.agents
            .push(LoggedProcess::spawn(&format!("agent {device}"), cmd, log)?);
        Ok(())
    }

    /// Kills a device's agent (its containers keep running).
    pub fn kill_agent(&mut self, device: &str) {
        let name = format!("agent {device}");
        self.agents.retain_mut(|a| {
            if a.name == name {
                a.kill();
                false
            } else {
                true
            }
        });
    }

    /// The pid of a device's agent (to stop it with SIGSTOP, say), if it runs.
    pub fn agent_pid(&self, device: &str) -> Option<u32> {
        let name = format!("agent {device}");
        self.agents.iter().find(|a| a.name == name).and_then(LoggedProcess::pid)
    }

    /// `NATS_URL` for a daemon: the server's URL, or every member's (clients
    /// shuffle them).
    pub fn nats_url(&self) -> String {
        std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i` of the NATS cluster (0 is [`Stack::nats`]).
    pub fn nats_member_mut(&mut self, i: usize) -> &mut NatsServer {
        match i.checked_sub(1) {
            None => &mut self.nats,
            Some(peer) => &mut self.nats_peers[peer],
        }
    }

    /// Gives a process the stack's CA for NATS and OpenBao (or, on a plain-TCP
    /// stack, leave to talk without TLS).
    pub fn trust(&self, cmd: &mut Command) {
        let bao_ca = self.security.as_ref().and_then(|s| s.bao.ca_file());
        iot_launch::tls::trust_env(cmd, self.nats.ca_file(), bao_ca);
    }

    pub fn applier(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(cargo_bin("example_iot_apply_deployment")?);
        cmd.env("KUBECONFIG", self.api.kubeconfig());
        Ok(cmd)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.api.kubeconfig()
    }

    pub fn devices(&self) -> Api<Device> {
        Api::all(self.kube.clone())
    }

    /// Registers a device as `iotctl device enroll` does on the Kubernetes side: a
    /// `Device` named by its id, with these labels.
    pub async fn register_device(&self, id: &str, labels: &[(&str, &str)]) -> anyhow::Result<Device> {
        let mut device = Device::new(id, DeviceSpec::default());
        device.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        Ok(self.devices().create(&Default::default(), &device).await?)
    }

    /// Sets (`Some`) or removes (`None`) one label of a Device.
    pub async fn label_device(&self, id: &str, key: &str, value: Option<&str>) -> anyhow::Result<()> {
        let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
        self.devices()
            .patch(id, &Default::default(), &kube::api::Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    pub fn deployments(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.kube.clone(), ns)
    }

    /// Desired-state keys of one deployment (any device).
    pub async fn keys_of(&self, dep: &DeploymentRef) -> anyhow::Result<Vec<String>> {
        let suffix = format!(".{}", dep.to_token());
        Ok(collect_keys(&self.desired)
            .await?
            .into_iter()
            .filter(|k| k.ends_with(&suffix))
            .collect())
    }

    pub async fn status_of(&self, ns: &str, name: &str) -> Option<DeploymentStatus> {
        self.deployments(ns).get(name).await.ok()?.status
    }

    /// Waits until the resource's status satisfies `pred`.
    pub async fn wait_resource_status(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        pred: impl Fn(&DeploymentStatus) -> bool,
    ) -> anyhow::Result<DeploymentStatus> {
        let res = wait_until(WAIT, what, || async {
            self.status_of(ns, name).await.filter(|s| pred(s))
        })
        .await;
        if res.is_err() {
            eprintln!("last status of {ns}/{name}: {:#?}", self.status_of(ns, name).await);
        }
        res
    }

    pub async fn agent_status(&self, device: &str) -> Option<AgentStatus> {
        let bytes = self.status.get(agent_status_key(&Id::new(device).ok()?)).await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stream sequence of the desired-state bucket: grows with every write.
    pub async fn desired_last_sequence(&self) -> anyhow::Result<u64> {
        let mut stream = self.js.get_stream(keys::kv_stream_name(DESIRED_STATE_BUCKET)).await?;
        Ok(stream.info().await?.state.last_sequence)
    }
}

/// Debian's libfaketime (package `faketime`, installed by scripts/setup-host.sh).
fn libfaketime() -> anyhow::Result<PathBuf> {
    std::fs::read_dir("/usr/lib")?
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("libfaketime not found; run scripts/setup-host.sh (package faketime)"))
}

/// Every key in a bucket (a transient consumer; fine for a test).
pub async fn collect_keys(store: &kv::Store) -> anyhow::Result<Vec<String>> {
    use futures::TryStreamExt;
    let keys = store.keys().await.map_err(|e| anyhow::anyhow!("listing keys: {e}"))?;
    Ok(keys.try_collect().await?)
}

/// Waits for HTTP 200 with `body` on 127.0.0.1:port.
pub async fn wait_http(port: u16, body: &str) -> anyhow::Result<()> {
    iot_testkit::http::wait_http("127.0.0.1", port, body, WAIT).await
}

/// Runs a command, failing with its stderr if it fails; returns stdout.
pub fn run_ok(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sum of the samples of `name` (a metric name with or without labels) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One `web` service of `image` with `MODE=<mode>` in its environment and no ports:
/// a deployment that many devices sharing one podman can run at once, and whose
/// every change of `mode` is a new spec.
pub fn web_score(image: &str, mode: &str) -> iot_api::IotScore {
    iot_api::IotScore::PodmanV0(iot_api::PodmanV0Score {
        services: vec![iot_api::PodmanService {
            name: "web".into(),
            image: image.into(),
            ports: vec![],
            env: [("MODE".to_owned(), mode.to_owned())].into(),
            command: None,
            args: None,
            restart_policy: iot_api::RestartPolicy::Always,
            resources: None,
        }],
    })
}
