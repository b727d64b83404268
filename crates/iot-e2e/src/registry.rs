//! A secured stack with the platform's private registry: docker-registry 2.8 with
//! TLS from the stack's CA and token authentication by `iot-registry-token`, on a
//! bridge that devices join from network namespaces of their own. Each device has
//! its own podman store (empty at first) inside its namespace, so its pulls cross
//! its own link, which a test can shape or cut.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iot_launch::registry::Publisher;
use iot_launch::{
    IsolatedPodman, PodmanService, Registry, RegistryKeys, RegistryOptions, RegistryToken, RegistryTokenOptions,
};
use iot_testkit::{Bridge, NetNs, cargo_bin};

use crate::stack::{Stack, run_ok};

/// The publisher the tests push as.
pub const PUBLISHER: &str = "ci";

pub struct RegistryStack {
    pub stack: Stack,
    /// Devices first: their namespaces are ports of the bridge.
    pub devices: Vec<RegistryDevice>,
    pub registry: Registry,
    pub token: RegistryToken,
    pub keys: RegistryKeys,
    pub bridge: Bridge,
    publisher_password: String,
    ca_file: PathBuf,
}

/// One device: its id, namespace and podman.
pub struct RegistryDevice {
    pub id: String,
    pub podman: PodmanService,
    pub net: NetNs,
}

/// Where a device keeps its images (default: a directory of its own).
#[derive(Debug, Clone, Default)]
pub struct DeviceStore {
    pub store_dir: Option<PathBuf>,
    pub tmp_dir: Option<PathBuf>,
}

impl RegistryStack {
    /// Stack, bridge, token service, registry, and the operator configured to pin
    /// the registry's tags and grant pulls from it.
    pub async fn start() -> anyhow::Result<Self> {
        let mut stack = Stack::start_secured().await?;
        let ca = stack
            .ca
            .clone()
            .ok_or_else(|| anyhow::anyhow!("a secured stack has a CA"))?;
        let bridge = Bridge::create()?;
        let keys = RegistryKeys::generate(&stack.dir.path().join("registry-keys"))?;
        let publisher_password = iot_testkit::unique_id("pw");
        let mut token_opts = RegistryTokenOptions::new(
            &ca,
            &keys,
            vec![Publisher {
                name: PUBLISHER.into(),
                password: publisher_password.clone(),
                patterns: vec!["iot/*".into()],
            }],
        );
        token_opts.ip = bridge.ip.clone();
        let token = RegistryToken::start(&cargo_bin("iot-registry-token")?, &token_opts).await?;
        let mut reg_opts = RegistryOptions::new(&ca, token.realm(), &keys.cert_pem);
        reg_opts.ip = bridge.ip.clone();
        let registry = Registry::start(&reg_opts).await?;
        let ca_file = ca.cert_file();
        stack.operator_env.extend([
            ("IOT_REGISTRIES".into(), registry.url()),
            ("IOT_REGISTRY_SIGNING_KEY".into(), keys.key_pem.display().to_string()),
            ("IOT_REGISTRY_CA_FILE".into(), ca_file.display().to_string()),
        ]);
        stack.start_operator()?;
        stack.wait_operator_ready().await?;
        Ok(Self {
            stack,
            devices: Vec::new(),
            registry,
            token,
            keys,
            bridge,
            publisher_password,
            ca_file,
        })
    }

    /// A device on the bridge with an empty store of its own; returns its index.
    pub async fn add_device(&mut self, store: DeviceStore) -> anyhow::Result<usize> {
        let net = self.bridge.join()?;
        let podman = PodmanService::start_isolated(IsolatedPodman {
            store_dir: store.store_dir,
            tmp_dir: store.tmp_dir,
            netns: Some(PathBuf::from(net.path())),
            ca_bundle: Some(self.ca_file.clone()),
        })
        .await?;
        let id = self.stack.start_enrolled_agent_on(&podman.socket()).await?;
        self.devices.push(RegistryDevice { id, podman, net });
        Ok(self.devices.len() - 1)
    }

    /// `registry/repo:tag`, as a Deployment names it.
    pub fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.registry.url())
    }

    /// Pushes a local image as the publisher; returns the digest the registry
    /// gives the tag now.
    pub fn push(&self, local: &str, repo_tag: &str) -> anyhow::Result<String> {
        self.registry
            .push(local, repo_tag, PUBLISHER, &self.publisher_password)?;
        self.digest_of(repo_tag)
    }

    /// The digest `repo:tag` names in the registry now: a token from the token
    /// service as the publisher, then a manifest HEAD, both with curl.
    pub fn digest_of(&self, repo_tag: &str) -> anyhow::Result<String> {
        let (repo, tag) = repo_tag
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("{repo_tag}: no tag"))?;
        let ca = self.ca_file.display().to_string();
        let mut get_token = Command::new("curl");
        get_token
            .args(["-sf", "--cacert", &ca, "-u"])
            .arg(format!("{PUBLISHER}:{}", self.publisher_password))
            .arg(format!(
                "{}?service=iot-registry&scope=repository:{repo}:pull",
                self.token.realm()
            ));
        let answer: serde_json::Value = serde_json::from_str(&run_ok(get_token)?)?;
        let token = answer["token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no token in {answer}"))?;
        let mut head = Command::new("curl");
        head.args(["-sfI", "--cacert", &ca, "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .arg("-H")
            .arg("Accept: application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
            .arg(format!("https://{}/v2/{repo}/manifests/{tag}", self.registry.url()));
        let headers = run_ok(head)?;
        headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("docker-content-digest")
                    .then(|| v.trim().to_owned())
            })
            .ok_or_else(|| anyhow::anyhow!("no Docker-Content-Digest in:\n{headers}"))
    }

    pub fn device(&self, i: usize) -> &RegistryDevice {
        &self.devices[i]
    }
}

impl RegistryDevice {
    /// `podman` against this device's store.
    pub fn podman(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.podman.command();
        cmd.args(args);
        run_ok(cmd)
    }

    /// The image reference each running container of the device was created from.
    pub fn running_images(&self) -> anyhow::Result<Vec<String>> {
        let out = self.podman(&["ps", "--format", "{{.Image}}"])?;
        Ok(out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
    }

    /// The digests of the images in the device's store.
    pub fn image_digests(&self) -> anyhow::Result<Vec<String>> {
        let out = self.podman(&["images", "--format", "{{.Digest}}"])?;
        Ok(out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
    }

    /// The body the device serves on `port` (from the host, over the bridge).
    pub async fn http_body(&self, port: u16) -> Option<String> {
        iot_testkit::http::get_text(&self.net.ns_ip, port, "/").await.ok()
    }
}

/// One `web` service of `image` publishing `port` (-> 80), with `MODE=<mode>` in
/// its environment when given (a new mode is a new spec).
pub fn web_score(image: &str, port: u16, mode: Option<&str>) -> iot_api::IotScore {
    iot_api::IotScore::PodmanV0(iot_api::PodmanV0Score {
        services: vec![iot_api::PodmanService {
            name: "web".into(),
            image: image.into(),
            ports: vec![iot_api::PortMapping {
                host_port: port,
                container_port: 80,
                protocol: Default::default(),
            }],
            env: mode
                .map(|m| [("MODE".to_owned(), m.to_owned())].into())
                .unwrap_or_default(),
            command: None,
            args: None,
            restart_policy: iot_api::RestartPolicy::Always,
            resources: None,
        }],
    })
}

/// A Deployment of `score` to the listed devices.
pub fn deployment_to(
    name: &str,
    devices: &[String],
    score: iot_api::IotScore,
    rollout: Option<iot_api::RolloutSpec>,
) -> iot_api::Deployment {
    iot_api::Deployment::new(
        name,
        iot_api::DeploymentSpec {
            target_devices: devices.to_vec(),
            selector: None,
            score,
            revision_history_limit: None,
            max_shrink_percent: None,
            rollout,
        },
    )
}

/// A local image `localhost/iot-reg:<tag>`: iot-web:v1 whose page says `page`, with
/// `pad_mib` MiB of random bytes (incompressible: the pushed layer is that big).
pub fn build_image(tag: &str, page: &str, pad_mib: usize) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("index.html"), format!("{page}\n"))?;
    let mut pad = vec![0u8; pad_mib << 20];
    fill_random(&mut pad);
    std::fs::write(dir.path().join("pad"), &pad)?;
    std::fs::write(
        dir.path().join("Containerfile"),
        "FROM localhost/iot-web:v1\nCOPY index.html /www/index.html\nCOPY pad /pad\n",
    )?;
    let name = format!("localhost/iot-reg:{tag}");
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", iot_launch::paths::containers_conf())
        .args(["build", "-q", "--pull=never", "-t", &name])
        .arg(dir.path());
    run_ok(cmd)?;
    Ok(name)
}

fn fill_random(buf: &mut [u8]) {
    // xorshift: random enough that gzip cannot shrink it, and fast.
    let mut x: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Removes local test images made by [`build_image`].
pub fn remove_local_image(name: &str) {
    let _ = Command::new("podman")
        .env("CONTAINERS_CONF", iot_launch::paths::containers_conf())
        .args(["rmi", "-f", name])
        .output();
}

/// A small ext4 filesystem on a loop device, mounted at `mount`: a device whose
/// disk fills up. Unmounted and detached on drop.
pub struct SmallDisk {
    pub mount: PathBuf,
    image: PathBuf,
}

impl SmallDisk {
    pub fn create(dir: &Path, mib: u64) -> anyhow::Result<Self> {
        let image = dir.join("disk.img");
        let mount = dir.join("disk");
        std::fs::create_dir_all(&mount)?;
        let f = std::fs::File::create(&image)?;
        f.set_len(mib << 20)?;
        drop(f);
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F"]).arg(&image);
        run_ok(mkfs)?;
        let mut m = Command::new("mount");
        m.args(["-o", "loop"]).arg(&image).arg(&mount);
        run_ok(m)?;
        Ok(Self { mount, image })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        for _ in 0..10 {
            let ok = Command::new("umount")
                .arg(&self.mount)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok || !is_mounted(&self.mount) {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(&path.display().to_string()))
        })
        .unwrap_or(false)
}
