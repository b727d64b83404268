//! A private podman API socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tempfile::TempDir;

use crate::paths::containers_conf;
use crate::process::kill_child;

/// `podman system service` on a socket of its own. All services share the host's
/// container store, so tests isolate by device-id labels, never by names alone;
/// except an isolated one ([`PodmanService::start_isolated`]), which has a store of
/// its own, as a device has.
pub struct PodmanService {
    child: Option<Child>,
    dir: TempDir,
    isolation: Option<Isolation>,
}

/// What an isolated service gets ([`PodmanService::start_isolated`]); every field
/// has a default.
#[derive(Debug, Clone, Default)]
pub struct IsolatedPodman {
    /// Holds the image and container store (`root/`), its run state (`run/`) and
    /// libpod's state (`tmp/`); default a directory inside the service's own, which
    /// goes with it. A given one is kept (unmounted) at teardown: a restarted
    /// service on it finds its images again.
    pub store_dir: Option<PathBuf>,
    /// Where pulls stage blobs (containers.conf `[engine] image_copy_tmp_dir`, and
    /// `TMPDIR`), e.g. a small filesystem; default `<store_dir>/copy-tmp`.
    pub tmp_dir: Option<PathBuf>,
    /// A network namespace to run in: a path (`/var/run/netns/NAME`) or a name
    /// under `/var/run/netns`. Pulls then leave through that namespace's links.
    pub netns: Option<PathBuf>,
    /// The CA bundle registries are verified with (`SSL_CERT_FILE`); it replaces the
    /// system roots. Default: the system roots.
    pub ca_bundle: Option<PathBuf>,
}

/// The resolved settings of an isolated service.
#[derive(Debug, Clone)]
struct Isolation {
    store: PathBuf,
    copy_tmp: PathBuf,
    conf: PathBuf,
    netns: Option<PathBuf>,
    ca_bundle: Option<PathBuf>,
}

impl Isolation {
    fn root(&self) -> PathBuf {
        self.store.join("root")
    }
    fn runroot(&self) -> PathBuf {
        self.store.join("run")
    }
    fn libpod_tmp(&self) -> PathBuf {
        self.store.join("tmp")
    }
}

/// The dev containers.conf with `image_copy_tmp_dir` set in its `[engine]` table.
fn conf_with_copy_tmp(base: &str, copy_tmp: &Path) -> String {
    let setting = format!(
        "image_copy_tmp_dir = {}",
        serde_json::Value::String(copy_tmp.display().to_string())
    );
    let mut out = String::new();
    let mut placed = false;
    for line in base.lines() {
        if line.trim_start().starts_with("image_copy_tmp_dir") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.trim() == "[engine]" && !placed {
            out.push_str(&setting);
            out.push('\n');
            placed = true;
        }
    }
    if !placed {
        out.push_str(&format!("\n[engine]\n{setting}\n"));
    }
    out
}

impl PodmanService {
    pub async fn start() -> anyhow::Result<Self> {
        let mut me = Self::unstarted()?;
        me.spawn().await?;
        Ok(me)
    }

    /// A socket path with no service behind it yet (see [`spawn`](Self::spawn)), for
    /// tests of an agent that starts before podman does.
    pub fn unstarted() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("iot-podman-").tempdir()?;
        Ok(Self {
            child: None,
            dir,
            isolation: None,
        })
    }

    /// A service with a store of its own (empty at first, like a new device's),
    /// its own containers.conf, optionally inside a network namespace and trusting a
    /// CA bundle. Dropping it removes its containers and unmounts its store.
    pub async fn start_isolated(opts: IsolatedPodman) -> anyhow::Result<Self> {
        let mut me = Self::unstarted_isolated(opts)?;
        me.spawn().await?;
        Ok(me)
    }

    /// [`Self::start_isolated`] without starting it yet (see [`spawn`](Self::spawn)).
    pub fn unstarted_isolated(opts: IsolatedPodman) -> anyhow::Result<Self> {
        let mut me = Self::unstarted()?;
        let store = opts.store_dir.unwrap_or_else(|| me.dir.path().join("store"));
        let copy_tmp = opts.tmp_dir.unwrap_or_else(|| store.join("copy-tmp"));
        let netns = opts.netns.map(|n| {
            if n.components().count() == 1 {
                Path::new("/var/run/netns").join(n)
            } else {
                n
            }
        });
        if let Some(ns) = &netns {
            anyhow::ensure!(ns.exists(), "network namespace {} does not exist", ns.display());
        }
        for d in [&store, &copy_tmp] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let base_path = containers_conf();
        let base = std::fs::read_to_string(&base_path).with_context(|| format!("reading {}", base_path.display()))?;
        let conf = me.dir.path().join("containers.conf");
        std::fs::write(&conf, conf_with_copy_tmp(&base, &copy_tmp))
            .with_context(|| format!("writing {}", conf.display()))?;
        me.isolation = Some(Isolation {
            store,
            copy_tmp,
            conf,
            netns,
            ca_bundle: opts.ca_bundle,
        });
        Ok(me)
    }

    /// The podman CLI on this service's store and settings (inside its network
    /// namespace, if it has one): add the subcommand and its arguments. For a
    /// service that is not isolated, the CLI on the host's shared store.
    pub fn command(&self) -> Command {
        let Some(iso) = &self.isolation else {
            let mut cmd = Command::new("podman");
            cmd.env("CONTAINERS_CONF", containers_conf());
            return cmd;
        };
        let mut cmd = match &iso.netns {
            // A namespace deleted meanwhile (teardown after the test's NetNs went):
            // the store is still reachable from here.
            Some(ns) if ns.exists() => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("podman");
                c
            }
            _ => Command::new("podman"),
        };
        cmd.env("CONTAINERS_CONF", &iso.conf)
            .env("TMPDIR", &iso.copy_tmp)
            .arg("--root")
            .arg(iso.root())
            .arg("--runroot")
            .arg(iso.runroot())
            .arg("--tmpdir")
            .arg(iso.libpod_tmp());
        if let Some(bundle) = &iso.ca_bundle {
            cmd.env("SSL_CERT_FILE", bundle);
        }
        cmd
    }

    /// The isolated service's store directory (`None` when it shares the host's).
    pub fn store_dir(&self) -> Option<&Path> {
        self.isolation.as_ref().map(|i| i.store.as_path())
    }

    /// Where the isolated service's pulls stage blobs.
    pub fn copy_tmp_dir(&self) -> Option<&Path> {
        self.isolation.as_ref().map(|i| i.copy_tmp.as_path())
    }

    /// The service's log (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("podman-service.log")).unwrap_or_default()
    }

    /// Starts (or restarts) the service on this socket and waits until it answers.
    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        self.stop();
        let socket = self.socket();
        if socket.exists() {
            std::fs::remove_file(&socket)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("podman-service.log"))?;
        let child = self
            .command()
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("starting podman system service: {e} (is podman installed? run scripts/setup-host.sh)")
            })?;
        self.child = Some(child);
        for _ in 0..400 {
            if socket.exists() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("podman service socket {} never came up", socket.display())
    }

    /// Stops the service (containers keep running: they are not its children).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl PodmanService {
    /// An isolated service's teardown: its pods and containers removed, then every
    /// mount under its store undone (the overlay driver bind-mounts `root/overlay`
    /// onto itself), so that nothing outlives it.
    fn remove_isolated(&self) {
        let Some(iso) = &self.isolation else { return };
        for args in [&["pod", "rm", "-af", "-t", "0"][..], &["rm", "-af", "-t", "0"][..]] {
            let mut cmd = self.command();
            cmd.args(args).stdin(Stdio::null());
            match cmd.output() {
                Ok(out) if !out.status.success() => tracing::warn!(
                    store = %iso.store.display(),
                    stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                    "podman {} failed in an isolated store", args.join(" ")
                ),
                Err(e) => tracing::warn!(error = %e, "podman {} could not run", args.join(" ")),
                Ok(_) => {}
            }
        }
        unmount_under(&iso.store);
    }
}

/// Detaches every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    // Field 5 is the mount point, with spaces and the like octal-escaped.
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    // Deepest first; a point mounted twice is in the list twice, and unmounted twice.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
            && e != nix::errno::Errno::EINVAL
            && e != nix::errno::Errno::ENOENT
        {
            tracing::warn!(mount = %p.display(), error = %e, "could not unmount under an isolated podman store");
        }
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        self.stop();
        self.remove_isolated();
    }
}
