//! Bring-up and teardown of the local platform.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, Id, agent_status_key};
use iot_bao::enroll::{self, Enrollment, Role};
use iot_launch::auth::{CalloutKeys, CalloutLaunch, CalloutProcess, write_private};
use iot_launch::{ApiServer, LoggedProcess, NatsServer, OpenBao};
use iot_nats::{Anonymous, CredentialSource, UserPassword, connect};

use crate::net::Net;

/// Everything `up` started. Dropping it tears everything down, in the order that
/// leaves nothing behind: agents first (they would restore containers), then the
/// devices' containers, podman services, operator, NATS, API server, network.
pub struct Up {
    pub bin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub net: Net,
    pub devices: Vec<Device>,
    /// VM devices (`--vm`), on the same bridge.
    pub vms: Vec<crate::vm::VmDevice>,
    pub vm_arch: Option<iot_launch::vm::Arch>,
    pub api: Option<ApiServer>,
    /// With `--sso`: the OIDC stand-in and the full API server (instead of `api`).
    pub sso: Option<crate::sso::Sso>,
    pub want_sso: bool,
    pub nats: Option<NatsServer>,
    /// With `--nats-cluster N`: the cluster (instead of `nats`).
    pub nats_cluster: Option<iot_launch::NatsCluster>,
    /// How many NATS servers were asked for (1: a single server).
    pub nats_members: usize,
    /// On a cluster: the devices connected to each member, as its `/connz` said
    /// once every device reported (for the menu).
    pub nats_placement: Vec<Vec<String>>,
    pub operator: Option<LoggedProcess>,
    /// Where the operator serves /metrics, /healthz and /readyz.
    pub operator_http: Option<String>,
    pub dashboard: Option<LoggedProcess>,
    /// The dashboard's address (host:port).
    pub dashboard_addr: Option<String>,
    pub containers_conf: PathBuf,
    /// Keep logs (and only logs) in the state directory after teardown.
    pub keep_logs: bool,
    /// NATS behind the auth callout with per-identity credentials (the default);
    /// `None` with `--insecure`.
    pub security: Option<Security>,
    pub secure: bool,
    /// The stack's CA: NATS and OpenBao serve certificates it signed, every
    /// client trusts exactly it. `None` with `--insecure` (plain NATS).
    pub ca: Option<iot_launch::Ca>,
    /// With `--cluster`: a real single-node Kubernetes on the device bridge, running
    /// NATS (with the callout) and the operator as pods from the charts.
    pub want_cluster: bool,
    pub node: Option<iot_launch::KubeNode>,
    /// The operator chart's values as installed (the menu's upgrade starts from them).
    pub operator_sets: Vec<String>,
    /// The private registry on the bridge (secured mode without `--cluster`).
    pub registry: Option<crate::registry::UpRegistry>,
}

/// The node's address on the device bridge (the gateway is .1, devices .11 and up).
pub const NODE_HOST: u8 = 2;
/// Operator replicas in the cluster: a leader and a ready standby.
pub const CLUSTER_OPERATOR_REPLICAS: usize = 2;

/// OpenBao, the callout and the identities of a secured bring-up.
pub struct Security {
    pub bao: OpenBao,
    pub keys: CalloutKeys,
    pub callouts: Vec<CalloutProcess>,
}

/// Callout replicas started by `up`: two, so one can die.
pub const CALLOUT_REPLICAS: usize = 2;

pub struct Device {
    pub index: usize,
    pub id: String,
    pub ip: String,
    pub podman_socket: PathBuf,
    pub podman: Option<LoggedProcess>,
    pub agent: Option<LoggedProcess>,
}

/// Where each agent serves /metrics and /readyz, on its device's address.
pub const AGENT_METRICS_PORT: u16 = 9464;

/// Images every device gets in its own store.
pub const TEST_IMAGES: [&str; 2] = ["localhost/iot-web:v1", "localhost/iot-web:v2"];

/// Numbered progress lines: `[n/total] what`, then `ok detail (seconds)`.
pub struct Steps {
    n: usize,
    total: usize,
}

impl Steps {
    /// Says the next step has begun; pass the result to [`done`].
    pub fn next(&mut self, what: &str) -> Instant {
        crate::print_line(&format!(
            "{} {what}",
            crate::out::step(&format!("[{}/{}]", self.n, self.total))
        ));
        self.n += 1;
        Instant::now()
    }
}

pub fn done(t: Instant, detail: &str) {
    crate::print_line(&format!(
        "      {} {detail} ({:.1} s)",
        crate::out::ok("ok"),
        t.elapsed().as_secs_f64()
    ));
}

impl Up {
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }

    /// `NATS_URL`: the server's URL, or every cluster member's, comma-separated.
    pub fn nats_url(&self) -> String {
        self.nats_urls().join(",")
    }

    /// The URL of every NATS server (clients shuffle them, so a fleet spreads).
    pub fn nats_urls(&self) -> Vec<String> {
        if let Some(node) = &self.node {
            return vec![iot_launch::in_cluster::nats_device_url(node)];
        }
        match (&self.nats_cluster, &self.nats) {
            (Some(cluster), _) => cluster.urls(),
            (None, Some(nats)) => vec![nats.url()],
            (None, None) => Vec::new(),
        }
    }

    /// Replicas of each KV bucket: 3 on a cluster, 1 on a single server.
    pub fn kv_replicas(&self) -> usize {
        self.nats_cluster.as_ref().map_or(1, |c| c.len().min(3))
    }

    /// The CA certificate clients are given (`NATS_CA_FILE`, `BAO_CACERT`).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(iot_launch::Ca::cert_file)
    }

    /// Gives a process the stack's CA for NATS and OpenBao, or (with --insecure)
    /// leave to talk to the plain NATS.
    pub fn trust(&self, cmd: &mut Command) {
        let ca = self.ca_file();
        iot_launch::tls::trust_env(cmd, ca.as_deref(), ca.as_deref());
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    fn nsenter(&self, index: usize) -> Command {
        nsenter(&self.net, index)
    }

    /// Where enrollment files (secrets, mode 0600) live.
    pub fn identities_dir(&self) -> PathBuf {
        self.state_dir.join("identities")
    }

    /// Credentials for the launcher's own checks and the menu's tools: on a secured
    /// NATS the development `admin` user, which bypasses the callout.
    pub fn admin_credentials(&self) -> Box<dyn CredentialSource> {
        match &self.security {
            Some(s) => Box::new(UserPassword {
                user: "admin".into(),
                password: s.keys.admin_password.clone(),
            }),
            None => Box::new(Anonymous),
        }
    }

    fn write_enrollment(&self, e: &Enrollment) -> anyhow::Result<PathBuf> {
        let path = self.identities_dir().join(format!("{}.json", e.name));
        write_private(&path, &serde_json::to_string_pretty(e)?)?;
        Ok(path)
    }

    pub async fn start(&mut self, device_count: usize) -> anyhow::Result<()> {
        let total =
            8 + usize::from(self.secure) + usize::from(self.wants_registry()) + usize::from(self.vm_arch.is_some())
                - usize::from(device_count == 0);
        let mut steps = Steps { n: 1, total };
        if self.want_cluster {
            // The node joins the device bridge: the bridge comes first.
            self.start_network(&mut steps)?;
            self.start_api_server(&mut steps).await?;
        } else {
            self.start_api_server(&mut steps).await?;
            self.start_network(&mut steps)?;
        }
        if self.secure {
            self.start_identity(&mut steps).await?;
        }
        self.start_nats(&mut steps).await?;
        if self.wants_registry() {
            self.start_registry(&mut steps).await?;
        }
        self.start_operator(&mut steps).await?;
        self.start_dashboard(&mut steps).await?;
        if device_count > 0 {
            self.start_devices(&mut steps, device_count).await?;
        }
        if let Some(arch) = self.vm_arch {
            let t = steps.next(&format!(
                "VM device ({}): Debian guest under qemu (TCG), agent installed by cloud-init from its seed",
                arch.name()
            ));
            self.start_vm(arch).await?;
            let vm = self
                .vms
                .last()
                .map(|v| format!("{}@{}", v.id, v.ip))
                .unwrap_or_default();
            done(t, &vm);
        }
        let t = steps.next("sanity: every device has published status.<device>");
        self.wait_device_status(Duration::from_secs(60)).await?;
        done(t, "all devices reporting");
        self.nats_placement = self.device_placement().await;
        Ok(())
    }

    /// The devices connected to each cluster member (the agents' connection names in
    /// the members' `/connz`); empty for a single server.
    pub async fn device_placement(&self) -> Vec<Vec<String>> {
        let Some(cluster) = &self.nats_cluster else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in 0..cluster.len() {
            let path = "/connz?limit=100000";
            let text =
                iot_launch::http::get_text(iot_launch::nats_cluster::MONITOR_HOST, cluster.monitor_port(i), path)
                    .await
                    .unwrap_or_default();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let mut devices: Vec<String> = json["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str()?.strip_prefix("iot-agent-").map(str::to_owned))
                .collect();
            devices.sort();
            out.push(devices);
        }
        out
    }

    /// The Kubernetes API server: the full kube-apiserver with OIDC and RBAC for
    /// single sign-on, the CRD-only API server otherwise.
    async fn start_api_server(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        if self.want_cluster {
            let node_ip = format!("{}.{NODE_HOST}", self.net.prefix);
            let t = steps.next(&format!(
                "single-node Kubernetes 1.20 on the device bridge at {node_ip}: etcd, kube-apiserver, containerd, kubelet, controller manager, scheduler, kube-proxy"
            ));
            let node = iot_launch::KubeNode::start(&iot_launch::NodeOptions {
                name: format!("up{}", self.net.name),
                parent: self.state_dir.clone(),
                uplink: iot_launch::kube_node::Uplink {
                    node_ip: node_ip.parse()?,
                    prefix: 24,
                    gateway: self.net.gateway().parse()?,
                    host_end: iot_launch::kube_node::HostEnd::Bridge(self.net.bridge()),
                },
                images: iot_launch::in_cluster::images(),
            })
            .await?;
            std::fs::copy(node.kubeconfig(), self.kubeconfig())?;
            done(t, &format!("node {} Ready, API server {}", node.name(), node.api_url()));
            self.node = Some(node);
            return Ok(());
        }
        if self.want_sso {
            let t = steps
                .next("single sign-on: OIDC stand-in for Zitadel, full kube-apiserver 1.20 with --oidc-* and RBAC");
            // Under the state directory, so even a killed run leaves nothing in /tmp.
            let oidc = iot_launch::OidcStandIn::start_in(&self.state_dir, iot_launch::OidcOptions::default()).await?;
            let api = iot_launch::KubeApiServer::start_in(&self.state_dir, Some(oidc.api_server_flags())).await?;
            std::fs::copy(api.kubeconfig(), self.kubeconfig())?;
            let applied = crate::sso::apply_fleet_roles(&api)?;
            done(
                t,
                &format!(
                    "issuer {}, API server {}, {applied} roles and bindings from the chart",
                    oidc.issuer(),
                    api.url()
                ),
            );
            self.sso = Some(crate::sso::Sso { oidc, api });
        } else {
            let t = steps.next("Kubernetes API server (apiextensions-apiserver + etcd) on 127.0.0.1");
            // Under the state directory, so even a killed run leaves nothing in /tmp.
            let api = ApiServer::start_in(&self.state_dir).await?;
            // A stable path for users; the certificates it names live until teardown.
            std::fs::copy(api.kubeconfig(), self.kubeconfig())?;
            done(t, &api.url());
            self.api = Some(api);
        }
        Ok(())
    }

    /// The bridge the devices' network namespaces hang off.
    fn start_network(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        let t = steps.next(&format!(
            "device network: bridge {} {}/24",
            self.net.bridge(),
            self.net.gateway()
        ));
        self.net.check_free()?;
        self.net.create_bridge()?;
        done(t, &format!("gateway {}", self.net.gateway()));
        Ok(())
    }

    /// OpenBao, a CA, the nats-server that sends every client through the auth
    /// callout, and the callout replicas.
    async fn start_identity(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        let t = steps.next("OpenBao (raft storage on disk, initialised and unsealed) and the NATS auth callout");
        std::fs::create_dir_all(self.identities_dir())?;
        let ca = iot_launch::Ca::create(&self.state_dir.join("tls"))?;
        let bao = OpenBao::start_in_on_with(
            &self.state_dir.join("bao"),
            &self.net.gateway(),
            iot_launch::TlsMode::Ca(&ca),
        )
        .await?;
        let keys = CalloutKeys::generate()?;
        if let Some(node) = &self.node {
            let root = bao.root()?;
            let callout = enroll::enroll_service(&root, "callout", Role::Callout).await?;
            let operator = enroll::enroll_service(&root, "operator", Role::Operator).await?;
            let opts = iot_launch::in_cluster::PlatformOptions {
                ca: &ca,
                keys: &keys,
                bao_addr: &bao.addr(),
                callout_enrollment: &serde_json::to_string(&callout)?,
                operator_enrollment: &serde_json::to_string(&operator)?,
                nats_store: &self.state_dir.join("nats-store"),
                secrets_dir: &self.identities_dir().join("cluster"),
                operator_sets: vec![format!("replicas={CLUSTER_OPERATOR_REPLICAS}"), "staleAfter=30s".into()],
            };
            iot_launch::in_cluster::install_nats_chart(node, &opts)?;
            self.operator_sets = iot_launch::in_cluster::operator_sets(&opts);
            done(
                t,
                &format!(
                    "{}; NATS with the callout beside it in pod {} (chart iot-nats)",
                    bao.addr(),
                    iot_launch::in_cluster::NATS_DEPLOYMENT
                ),
            );
            self.security = Some(Security {
                bao,
                keys,
                callouts: Vec::new(),
            });
            self.ca = Some(ca);
            return Ok(());
        }
        if self.nats_members > 1 {
            let cluster = iot_launch::NatsCluster::start(
                &iot_launch::ClusterOptions {
                    size: self.nats_members,
                    host: &self.net.gateway(),
                    parent: &self.state_dir,
                    shared_config: Some(keys.nats_config()),
                    sync_interval: None,
                },
                &ca,
            )
            .await?;
            self.nats_cluster = Some(cluster);
        } else {
            let nats = NatsServer::start_custom(
                &self.net.gateway(),
                &self.state_dir,
                Some(&keys.nats_config()),
                &[],
                iot_launch::TlsMode::Ca(&ca),
            )
            .await?;
            self.nats = Some(nats);
        }
        let nats_url = self.nats_url();
        let callout = enroll::enroll_service(&bao.root()?, "callout", Role::Callout).await?;
        let callout_file = self.write_enrollment(&callout)?;
        let binary = self.bin("iot-auth-callout");
        let mut callouts = Vec::new();
        for i in 0..CALLOUT_REPLICAS {
            let launch = CalloutLaunch {
                binary: &binary,
                nats_url: &nats_url,
                ca_file: Some(&ca.cert_file()),
                keys: &keys,
                dir: &self.logs_dir(),
                secrets_dir: &self.identities_dir(),
                bao_addr: &bao.addr(),
                enrollment_file: &callout_file,
                oidc_issuer: None,
                user_ttl: Duration::from_secs(600),
                env: vec![("RUST_LOG".into(), "info".into())],
            };
            callouts.push(CalloutProcess::spawn(&launch, &format!("callout-{i}")).await?);
        }
        done(t, &format!("{} with {CALLOUT_REPLICAS} callout replicas", bao.addr()));
        self.security = Some(Security { bao, keys, callouts });
        self.ca = Some(ca);
        Ok(())
    }

    /// The nats-server (already running when secured: say so, with its URL).
    async fn start_nats(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        if self.node.is_some() {
            let t = steps.next(
                "NATS in the cluster: devices on the node's hostPort, pods on the Service's cluster IP, JetStream on a hostPath",
            );
            done(
                t,
                &format!("{} (pods: {})", self.nats_url(), iot_launch::in_cluster::nats_pod_url()),
            );
            return Ok(());
        }
        if let Some(cluster) = &self.nats_cluster {
            let t = steps.next(&format!(
                "NATS: a JetStream cluster of {} servers (routes in mutual TLS), buckets with {} replicas, every client through the callout",
                cluster.len(),
                self.kv_replicas()
            ));
            done(t, &self.nats_url());
            return Ok(());
        }
        let t = steps.next(if self.secure {
            "nats-server with JetStream on file storage, on the gateway address, every client through the callout"
        } else {
            "nats-server with JetStream on file storage, on the gateway address, no authentication (--insecure)"
        });
        if self.nats.is_none() {
            self.nats = Some(
                NatsServer::start_custom(
                    &self.net.gateway(),
                    &self.state_dir,
                    None,
                    &[],
                    iot_launch::TlsMode::Plain,
                )
                .await?,
            );
        }
        done(t, &self.nats_url());
        Ok(())
    }

    /// The private registry runs with the secured stack on the host (it needs the
    /// stack's CA); `--cluster` and `--insecure` go without.
    fn wants_registry(&self) -> bool {
        self.secure && !self.want_cluster
    }

    async fn start_registry(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        let t = steps.next(
            "private registry: docker-registry on the gateway address (TLS, token auth by iot-registry-token), test images pushed",
        );
        let ca = self
            .ca
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the registry needs the stack's CA"))?;
        let r = crate::registry::UpRegistry::start(self, &ca).await?;
        done(t, &format!("https://{} (iot/web:v1, iot/web:v2)", r.url()));
        self.registry = Some(r);
        Ok(())
    }

    /// The CRD, then `iot-operator run` until it is ready.
    async fn start_operator(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        if let Some(node) = &self.node {
            let t = steps.next(&format!(
                "chart iot-operator: the CRDs, RBAC and {CLUSTER_OPERATOR_REPLICAS} operator pods (a leader and a standby)"
            ));
            iot_launch::in_cluster::install_operator(node, &self.operator_sets)?;
            iot_launch::in_cluster::wait_rollout(
                node,
                iot_launch::in_cluster::OPERATOR_DEPLOYMENT,
                Duration::from_secs(180),
            )?;
            done(t, "every replica Ready");
            return Ok(());
        }
        let t = steps.next("CRD deployments.iot.nationtech.io via `iot-operator install`");
        iot_launch::operator::install_crd(&self.bin("iot-operator"), &self.kubeconfig())?;
        done(t, "Established");

        let t = steps.next("iot-operator run");
        let http = iot_launch::free_port()?;
        self.operator_http = Some(format!("127.0.0.1:{http}"));
        let enrollment = match &self.security {
            Some(sec) => {
                let e = enroll::enroll_service(&sec.bao.root()?, "operator", Role::Operator).await?;
                Some(self.write_enrollment(&e)?)
            }
            None => None,
        };
        let mut cmd = iot_launch::operator::run_command(
            &self.bin("iot-operator"),
            &self.kubeconfig(),
            &self.nats_url(),
            http,
            enrollment.as_deref(),
        );
        self.trust(&mut cmd);
        cmd.env("IOT_STALE_AFTER", "30s")
            .env("IOT_KV_REPLICAS", self.kv_replicas().to_string());
        if let (Some(r), Some(ca)) = (&self.registry, self.ca_file()) {
            cmd.envs(r.operator_env(&ca));
        }
        self.operator = Some(LoggedProcess::spawn(
            "iot-operator",
            cmd,
            self.logs_dir().join("operator.log"),
        )?);
        wait_ready(self.operator.as_mut(), "127.0.0.1", http, Duration::from_secs(60)).await?;
        done(t, &format!("ready (http://127.0.0.1:{http}/readyz)"));
        Ok(())
    }

    /// The dashboard, on 127.0.0.1:8090 when that is free.
    async fn start_dashboard(&mut self, steps: &mut Steps) -> anyhow::Result<()> {
        let t = steps.next("iot-dashboard (the live fleet view; read-only identity)");
        let identity = match &self.security {
            Some(sec) => {
                let e = enroll::enroll_service(&sec.bao.root()?, "dashboard", Role::Viewer).await?;
                Some(self.write_enrollment(&e)?)
            }
            None => None,
        };
        // A stable address when it is free, so a bookmark survives restarts; another
        // bring-up may hold it (or take it first), then any free port.
        let mut ports = vec![iot_launch::free_port()?];
        if std::net::TcpListener::bind(("127.0.0.1", 8090)).is_ok() {
            ports.insert(0, 8090);
        }
        let mut last = None;
        for port in ports {
            let mut cmd = Command::new(self.bin("iot-dashboard"));
            self.trust(&mut cmd);
            cmd.env("KUBECONFIG", self.kubeconfig())
                .env("NATS_URL", self.nats_url())
                .env("IOT_STALE_AFTER", "30s")
                .env("IOT_DASHBOARD_ADDR", format!("127.0.0.1:{port}"))
                .env("RUST_LOG", "info");
            if let Some(file) = &identity {
                cmd.env("NATS_IDENTITY", file);
            }
            if let Some(sso) = &self.sso {
                // People sign in and change deployments as themselves.
                cmd.env("IOT_DASHBOARD_OIDC_ISSUER", sso.oidc.issuer())
                    .env("IOT_DASHBOARD_OIDC_CA_FILE", sso.oidc.ca_file());
            }
            self.dashboard = Some(LoggedProcess::spawn(
                "iot-dashboard",
                cmd,
                self.logs_dir().join("dashboard.log"),
            )?);
            match wait_ready(self.dashboard.as_mut(), "127.0.0.1", port, Duration::from_secs(60)).await {
                Ok(()) => {
                    self.dashboard_addr = Some(format!("127.0.0.1:{port}"));
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        let addr = self.dashboard_addr.clone().unwrap_or_default();
        done(t, &format!("http://{addr}"));
        Ok(())
    }

    /// `count` devices, each in its own network namespace with its own podman.
    async fn start_devices(&mut self, steps: &mut Steps, count: usize) -> anyhow::Result<()> {
        let t = steps.next(&format!(
            "{count} device(s): network namespace + podman service + iot-agent each"
        ));
        for index in 1..=count {
            self.start_device(index).await?;
        }
        for d in &mut self.devices {
            wait_ready(d.agent.as_mut(), &d.ip, AGENT_METRICS_PORT, Duration::from_secs(60)).await?;
        }
        done(
            t,
            &self
                .devices
                .iter()
                .map(|d| format!("{}@{}", d.id, d.ip))
                .collect::<Vec<_>>()
                .join(", "),
        );
        Ok(())
    }

    /// The test images, saved once from the host's store, for loading into each
    /// device's own store (as if the device had pulled them).
    fn images_archive(&self) -> anyhow::Result<PathBuf> {
        let archive = self.state_dir.join("images.tar");
        if !archive.exists() {
            let out = Command::new("podman")
                .env("CONTAINERS_CONF", &self.containers_conf)
                // -m: one archive with each image as itself (without it both tags
                // would name the first image).
                .args(["save", "--multi-image-archive", "--quiet", "-o"])
                .arg(&archive)
                .args(TEST_IMAGES)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "podman save {}: {} (run scripts/setup-host.sh, which builds them)",
                TEST_IMAGES.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(archive)
    }

    async fn start_device(&mut self, index: usize) -> anyhow::Result<()> {
        self.net.create_device(index)?;
        let id = self.net.device_id(index);
        let dir = self.state_dir.join(&id);
        std::fs::create_dir_all(&dir)?;
        // Each device has its own container store, so its podman sees only its own
        // containers and images, as on a separate machine.
        let archive = self.images_archive()?;
        let out = device_podman(&self.net, index, &dir, &self.containers_conf)
            .args(["load", "--quiet", "-i"])
            .arg(&archive)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "loading the test images into {id}'s store: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let socket = dir.join("podman.sock");
        let mut podman = device_podman(&self.net, index, &dir, &self.containers_conf);
        if let (Some(_), Some(ca)) = (&self.registry, self.ca_file()) {
            // Trust the registry's CA (a real device would put it in
            // /etc/containers/certs.d/<registry>/ca.crt).
            podman.env("SSL_CERT_FILE", ca);
        }
        podman
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()));
        let podman = LoggedProcess::spawn(
            &format!("podman {id}"),
            podman,
            self.logs_dir().join(format!("podman-{id}.log")),
        )?;
        let mut agent = self.nsenter(index);
        self.trust(&mut agent);
        agent
            .arg(self.bin("iot-agent"))
            .env("IOT_DEVICE_ID", &id)
            .env("NATS_URL", self.nats_url())
            .env("PODMAN_SOCKET", &socket)
            .env("IOT_STOP_TIMEOUT", "2s")
            .env(
                "IOT_METRICS_ADDR",
                format!("{}:{AGENT_METRICS_PORT}", self.net.device_ip(index)),
            )
            .env("RUST_LOG", "info");
        if let Some(sec) = &self.security {
            let e = enroll::enroll_device_identity(&sec.bao.root()?, &id).await?;
            agent.env("NATS_IDENTITY", self.write_enrollment(&e)?);
        }
        // The first device is the canary ring: the menu's selector examples use it.
        let ring = if index == 1 { "canary" } else { "main" };
        self.register_device(&id, &[("site", "lab"), ("ring", ring), ("kind", "netns")])
            .await?;
        let agent = LoggedProcess::spawn(
            &format!("agent {id}"),
            agent,
            self.logs_dir().join(format!("agent-{id}.log")),
        )?;
        self.devices.push(Device {
            index,
            ip: self.net.device_ip(index),
            id,
            podman_socket: socket,
            podman: Some(podman),
            agent: Some(agent),
        });
        Ok(())
    }

    /// The device's `Device` resource, labelled, as `iotctl device enroll --label`
    /// makes it (server-side apply: a re-run changes nothing).
    async fn register_device(&self, id: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let kube = iot_launch::apiserver::kube_client_from(&self.kubeconfig()).await?;
        let mut device = iot_api::Device::new(id, iot_api::DeviceSpec::default());
        device.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        kube::Api::<iot_api::Device>::all(kube)
            .patch(
                id,
                &kube::api::PatchParams::apply("iot-up").force(),
                &kube::api::Patch::Apply(&device),
            )
            .await
            .map_err(|e| anyhow::anyhow!("registering the Device {id}: {e}"))?;
        Ok(())
    }

    async fn start_vm(&mut self, arch: iot_launch::vm::Arch) -> anyhow::Result<()> {
        let index = self.vms.len() + 1;
        let id = self.net.vm_id(index);
        let enrollment = match &self.security {
            Some(sec) => {
                let e = enroll::enroll_device_identity(&sec.bao.root()?, &id).await?;
                Some(serde_json::to_string(&e)?)
            }
            None => None,
        };
        self.register_device(&id, &[("site", "lab"), ("ring", "main"), ("kind", "vm")])
            .await?;
        let agent = crate::vm::agent_for(&self.bin_dir, arch);
        let mut vm = crate::vm::start(&crate::vm::VmLaunch {
            net: &self.net,
            index,
            arch,
            agent: &agent,
            nats_urls: self.nats_urls(),
            enrollment,
            ca_pem: match self.ca_file() {
                Some(f) => Some(std::fs::read_to_string(f)?),
                None => None,
            },
            state_dir: &self.state_dir,
        })?;
        // TCG: about a minute on x86_64, several on aarch64.
        let powered_on = Instant::now();
        let boot = crate::vm::watch_boot(&mut vm, Duration::from_secs(900)).await;
        let ip = vm.ip.clone();
        self.vms.push(vm);
        boot?;
        let start = Instant::now();
        while iot_launch::http::get_status(&ip, AGENT_METRICS_PORT, "/readyz")
            .await
            .ok()
            != Some(200)
        {
            anyhow::ensure!(
                self.vms.last_mut().is_some_and(|v| v.vm.is_running()),
                "{id} powered off; see its console log"
            );
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(300),
                "{id}'s agent not ready at http://{ip}:{AGENT_METRICS_PORT}/readyz; see its console log"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(v) = self.vms.last_mut() {
            v.boot_to_ready = Some(powered_on.elapsed());
        }
        Ok(())
    }

    /// The device the regression (and the menu's first examples) use: the VM when
    /// there is one, since that is what `--vm` asks to exercise.
    pub fn target(&self) -> Option<(String, String)> {
        self.vms
            .first()
            .map(|v| (v.id.clone(), v.ip.clone()))
            .or_else(|| self.devices.first().map(|d| (d.id.clone(), d.ip.clone())))
    }

    /// Container ids on the target device, as its own podman lists them.
    pub async fn target_containers(&self) -> Vec<String> {
        if let Some(v) = self.vms.first() {
            return match v.vm.containers().await {
                Ok(list) => list.into_iter().map(|c| c.id).collect(),
                Err(e) => {
                    crate::print_line(&format!("      (listing {}'s containers failed: {e:#})", v.id));
                    Vec::new()
                }
            };
        }
        match self.devices.first() {
            Some(d) => self.device_containers(d.index, &d.id),
            None => Vec::new(),
        }
    }

    async fn wait_device_status(&self, timeout: Duration) -> anyhow::Result<()> {
        let conn = connect(
            &self.nats_urls(),
            self.admin_credentials().as_ref(),
            "iot-up",
            self.ca_file().as_deref(),
        )
        .await?;
        let store = jetstream::new(conn.client).get_key_value(AGENT_STATUS_BUCKET).await?;
        let deadline = Instant::now() + timeout;
        let ids = self
            .devices
            .iter()
            .map(|d| d.id.as_str())
            .chain(self.vms.iter().map(|v| v.id.as_str()));
        for id in ids {
            let key = agent_status_key(&Id::new(id)?);
            loop {
                if store.get(&key).await.ok().flatten().is_some() {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "no {key} in {AGENT_STATUS_BUCKET} after {timeout:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Container ids (running or not) of a device, from inside its namespace.
    pub fn device_containers(&self, index: usize, id: &str) -> Vec<String> {
        device_container_ids(&self.net, index, &self.state_dir.join(id), &self.containers_conf)
    }

    pub fn teardown(&mut self) {
        crate::print_line(&format!("{} tearing down", crate::out::step("==>")));
        // A VM is a machine of its own: its containers go with its disk.
        for v in self.vms.drain(..) {
            drop(v);
        }
        for d in &mut self.devices {
            if let Some(mut a) = d.agent.take() {
                a.stop(Duration::from_secs(5));
            }
        }
        let ids: Vec<(usize, String)> = self.devices.iter().map(|d| (d.index, d.id.clone())).collect();
        for (index, id) in ids {
            remove_device_containers(&self.net, index, &self.state_dir.join(&id), &self.containers_conf);
        }
        for d in &mut self.devices {
            if let Some(mut p) = d.podman.take() {
                p.kill();
            }
        }
        self.devices.clear();
        if let Some(mut d) = self.dashboard.take() {
            d.kill();
        }
        if let Some(mut op) = self.operator.take() {
            op.stop(Duration::from_secs(12));
        }
        self.registry = None;
        // Its pods (operator, NATS) go with it.
        self.node = None;
        self.nats = None;
        self.nats_cluster = None;
        self.security = None;
        self.api = None;
        self.sso = None;
        self.net.remove_all();
        if self.keep_logs {
            crate::print_line(&format!("      logs kept in {}", self.logs_dir().display()));
        } else if let Err(e) = std::fs::remove_dir_all(&self.state_dir) {
            crate::print_line(&format!(
                "      warning: could not remove {}: {e}",
                self.state_dir.display()
            ));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes a device's containers from inside its namespace (so podman tears down
/// their networking where it was set up). Its store is plain files afterwards and
/// goes with the state directory. (Not `podman system reset`: that also resets
/// network state that all devices on this host share, and breaks the removal of the
/// next device's containers.)
pub fn remove_device_containers(net: &Net, index: usize, device_dir: &Path, containers_conf: &Path) {
    for cid in device_container_ids(net, index, device_dir, containers_conf) {
        let status = device_podman(net, index, device_dir, containers_conf)
            .args(["rm", "-f", "-t", "0", &cid])
            .output();
        if !status.is_ok_and(|o| o.status.success()) {
            crate::print_line(&format!(
                "  warning: could not remove container {cid} in {}",
                device_dir.display()
            ));
        }
    }
}

/// Container ids (any state) of a device, listed from inside its namespace.
fn device_container_ids(net: &Net, index: usize, device_dir: &Path, containers_conf: &Path) -> Vec<String> {
    device_podman(net, index, device_dir, containers_conf)
        .args(["ps", "-a", "-q", "--no-trunc"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The podman CLI of one device: its network namespace, its own store and run
/// directory under `device_dir`.
pub fn device_podman(net: &Net, index: usize, device_dir: &Path, containers_conf: &Path) -> Command {
    let mut cmd = nsenter(net, index);
    cmd.env("CONTAINERS_CONF", containers_conf)
        .arg("podman")
        .arg("--root")
        .arg(device_dir.join("storage"))
        .arg("--runroot")
        .arg(device_dir.join("run"));
    cmd
}

/// A command run inside a device's network namespace. Only the network namespace:
/// `ip netns exec` would also remount /sys and hide the cgroup mounts podman needs.
pub fn nsenter(net: &Net, index: usize) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", net.netns_path(index)));
    cmd
}

/// Waits until a process answers 200 on its `/readyz`, failing early if it exits.
pub async fn wait_ready(
    proc_: Option<&mut LoggedProcess>,
    host: &str,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<()> {
    let p = proc_.ok_or_else(|| anyhow::anyhow!("process not started"))?;
    let start = Instant::now();
    loop {
        if iot_launch::http::get_status(host, port, "/readyz").await.ok() == Some(200) {
            // On loopback, make sure the answer came from our process and not from
            // another bring-up's that took the port first.
            let ours = host != "127.0.0.1" || p.pid().is_some_and(|pid| iot_launch::process::listens_on(pid, port));
            anyhow::ensure!(
                ours || p.is_running(),
                "{} exited and another process answers on {host}:{port}; see {}",
                p.name,
                p.log.display()
            );
            if ours {
                return Ok(());
            }
        }
        anyhow::ensure!(p.is_running(), "{} exited; see {}", p.name, p.log.display());
        anyhow::ensure!(
            start.elapsed() < timeout,
            "{} not ready after {timeout:?} (http://{host}:{port}/readyz); see {}",
            p.name,
            p.log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
