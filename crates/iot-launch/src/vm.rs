//! VM devices: qemu (TCG: this machine's /dev/kvm cannot run guests) booting the
//! cached Debian guest image (`scripts/build-guest-image.sh`) with a NoCloud seed.
//! Each VM boots a qcow2 overlay on the shared read-only image, so its disk, and
//! everything the agent and podman wrote, survives resets and power cycles.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub use crate::guest::GuestOutput;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => anyhow::bail!("unknown architecture {s:?} (x86_64 or aarch64)"),
        }
    }

    /// The Rust target whose binaries this guest runs.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The OCI architecture name (for `podman import --arch`).
    pub fn oci(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    fn qemu(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Arch::X86_64 => ("qemu-system-x86_64", &[], "ttyS0"),
            // virt has no firmware needs with a direct kernel boot; `max` gives the
            // guest every CPU feature TCG can emulate.
            Arch::Aarch64 => ("qemu-system-aarch64", &["-machine", "virt", "-cpu", "max"], "ttyAMA0"),
        }
    }
}

/// Creates `dir` if need be and makes it private (0700): a VM's directory holds
/// its seed and disk, and both hold the device's enrollment.
pub fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}

/// The cached guest image of one architecture.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub arch: Arch,
    pub dir: PathBuf,
}

impl GuestImage {
    /// Finds the image, building it first if this recipe has no cached build
    /// (minutes; `scripts/setup-host.sh --vm` does it ahead of time).
    pub fn ensure(arch: Arch) -> anyhow::Result<Self> {
        let script = crate::paths::repo_root().join("scripts/build-guest-image.sh");
        // One build per architecture at a time: two would share its package cache
        // and replace each other's finished image. Per architecture, so a cached
        // x86_64 image is not kept waiting behind a cold arm64 build.
        let guests = crate::paths::cache_dir().join("guest");
        std::fs::create_dir_all(&guests)?;
        let out = Command::new("flock")
            .arg(guests.join(format!(".build-{}.lock", arch.name())))
            .arg(&script)
            .args(["--arch", arch.name()])
            .env("IOT_CACHE", crate::paths::cache_dir())
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| anyhow::anyhow!("flock {}: {e}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} --arch {} failed",
            script.display(),
            arch.name()
        );
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        anyhow::ensure!(
            dir.join("done").exists(),
            "guest image build printed {}, which is not a finished image",
            dir.display()
        );
        Ok(GuestImage { arch, dir })
    }

    /// `localhost/iot-web:v1` and `:v2` for this guest's architecture, saved in one
    /// archive for the seed (no registry is reachable here, so a VM device gets its
    /// images the way a device off the internet would: preloaded). Built once per
    /// image from the guest's own static busybox, in a private podman store.
    pub fn test_images(&self) -> anyhow::Result<PathBuf> {
        let archive = self.dir.join("iot-web-images.tar");
        if archive.exists() {
            return Ok(archive);
        }
        // In /tmp: podman refuses a run root path longer than 50 characters.
        let work = tempfile::Builder::new().prefix("iot-web-").tempdir()?;
        let store = work.path().join("store");
        let podman = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("podman")
                .env("CONTAINERS_CONF", crate::paths::containers_conf())
                .arg("--root")
                .arg(store.join("root"))
                .arg("--runroot")
                .arg(store.join("run"))
                .args(args)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "podman {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        for tag in ["v1", "v2"] {
            let root = work.path().join(tag);
            std::fs::create_dir_all(root.join("bin"))?;
            std::fs::create_dir_all(root.join("www"))?;
            std::fs::create_dir_all(root.join("tmp"))?;
            std::fs::copy(self.dir.join("busybox"), root.join("bin/busybox"))?;
            for app in ["sh", "httpd", "sleep", "cat", "echo", "ls", "env"] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(app))?;
            }
            std::fs::write(root.join("www/index.html"), format!("{tag}\n"))?;
            let tar = work.path().join(format!("{tag}.tar"));
            let out = Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg(".")
                .output()?;
            anyhow::ensure!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
            let image = format!("localhost/iot-web:{tag}");
            let tar = tar.display().to_string();
            podman(&[
                "import",
                "--quiet",
                "--arch",
                self.arch.oci(),
                "--change",
                r#"CMD ["/bin/httpd","-f","-p","80","-h","/www"]"#,
                &tar,
                &image,
            ])?;
        }
        let partial = work.path().join("images.tar");
        let partial_s = partial.display().to_string();
        podman(&[
            "save",
            "--quiet",
            "--multi-image-archive",
            "-o",
            &partial_s,
            "localhost/iot-web:v1",
            "localhost/iot-web:v2",
        ])?;
        // Copied next to the image, then renamed: a reader never sees half a file.
        let staged = self.dir.join(format!(".iot-web-images.{}", std::process::id()));
        std::fs::copy(&partial, &staged)?;
        std::fs::rename(&staged, &archive)?;
        Ok(archive)
    }
}

/// How the VM is networked.
#[derive(Debug, Clone)]
pub enum VmNet {
    /// qemu's user-mode network: the guest reaches the host's loopback as
    /// 10.0.2.2, and these (host 127.0.0.1 port, guest port) pairs are forwarded in.
    /// Nothing outside loopback is touched: what tests use.
    User { forwards: Vec<(u16, u16)> },
    /// A tap device the caller made (and attached to a bridge): the guest is a
    /// machine on that LAN, as a device would be. What `iot-up --vm` uses.
    Tap { ifname: String },
}

/// The guest's address for the host's loopback under [`VmNet::User`].
pub const USER_NET_HOST: &str = "10.0.2.2";

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub image: GuestImage,
    /// The VM's own directory: disk overlay, sockets, console log.
    pub dir: PathBuf,
    /// The NoCloud seed: an ISO (read-only), or a FAT image (writable, as a USB
    /// stick or a Pi's boot partition is).
    pub seed: PathBuf,
    pub seed_writable: bool,
    pub net: VmNet,
    pub mac: String,
    pub memory_mb: u32,
    pub cpus: u32,
}

/// A running (or powered-off) VM. Dropping it pulls the plug.
pub struct Vm {
    pub spec: VmSpec,
    child: Option<Child>,
    /// How many times qemu was started for this disk.
    pub boots: u32,
}

impl Vm {
    /// Creates the VM's disk (an overlay on the image) if it has none, and powers
    /// it on.
    pub fn start(spec: VmSpec) -> anyhow::Result<Self> {
        // The disk will hold the device's enrollment.
        private_dir(&spec.dir)?;
        let disk = spec.dir.join("disk.qcow2");
        if !disk.exists() {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(spec.image.dir.join("rootfs.img"))
                .arg(&disk)
                .output()
                .map_err(|e| anyhow::anyhow!("qemu-img: {e} (run scripts/setup-host.sh --vm)"))?;
            anyhow::ensure!(
                out.status.success(),
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut vm = Vm {
            spec,
            child: None,
            boots: 0,
        };
        vm.power_on()?;
        Ok(vm)
    }

    pub fn console_log(&self) -> PathBuf {
        self.spec.dir.join("console.log")
    }

    /// The serial console, for a person: `socat -,raw,echo=0 UNIX-CONNECT:<this>`.
    pub fn console_socket(&self) -> PathBuf {
        self.spec.dir.join("console.sock")
    }

    pub fn monitor_socket(&self) -> PathBuf {
        self.spec.dir.join("monitor.sock")
    }

    pub fn guest_agent_socket(&self) -> PathBuf {
        self.spec.dir.join("qga.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Everything the console printed, across boots.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.console_log()).unwrap_or_default()).into_owned()
    }

    /// Starts qemu on the VM's disk (first boot, or after a power-off).
    pub fn power_on(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.is_running(), "{} is already on", self.spec.name);
        let s = &self.spec;
        let (qemu, machine, console) = s.image.arch.qemu();
        for sock in [self.console_socket(), self.monitor_socket(), self.guest_agent_socket()] {
            let _ = std::fs::remove_file(sock);
        }
        let mut cmd = Command::new(qemu);
        cmd.args(["-name", &s.name, "-nodefaults", "-display", "none"])
            .args(machine)
            .args(["-accel", "tcg,thread=multi"])
            .args(["-smp", &s.cpus.to_string(), "-m", &s.memory_mb.to_string()])
            .arg("-kernel")
            .arg(s.image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(s.image.dir.join("initrd.img"))
            .args([
                "-append",
                &format!("root=LABEL=iotroot rw console={console} net.ifnames=0 panic=10"),
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                s.dir.join("disk.qcow2").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw{}",
                s.seed.display(),
                if s.seed_writable { "" } else { ",readonly=on" }
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                self.console_socket().display(),
                self.console_log().display()
            ))
            .args(["-serial", "chardev:console"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", self.monitor_socket().display()))
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga,path={},server=on,wait=off",
                self.guest_agent_socket().display()
            ))
            .args(["-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0"])
            .args(["-device", "virtio-rng-pci"]);
        let netdev = match &s.net {
            VmNet::User { forwards } => {
                let mut n = String::from("user,id=net0");
                for (host, guest) in forwards {
                    n.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
                }
                n
            }
            VmNet::Tap { ifname } => format!("tap,id=net0,ifname={ifname},script=no,downscript=no"),
        };
        cmd.args(["-netdev", &netdev])
            .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={}", s.mac)]);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("qemu.log"))?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {qemu}: {e} (run scripts/setup-host.sh --vm)"))?;
        self.child = Some(child);
        self.boots += 1;
        Ok(())
    }

    /// Waits until the console has printed `needle` `count` times in total (across
    /// boots), failing early if qemu exits.
    pub async fn wait_console(&mut self, needle: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.console_text().matches(needle).count() >= count {
                return Ok(());
            }
            anyhow::ensure!(
                self.is_running(),
                "{} powered off; see {}",
                self.spec.name,
                self.console_log().display()
            );
            anyhow::ensure!(
                start.elapsed() < timeout,
                "{} did not print {needle:?} within {timeout:?}; see {}",
                self.spec.name,
                self.console_log().display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The reset button: the guest gets no warning, as in a power cut.
    pub async fn hard_reset(&self) -> anyhow::Result<()> {
        crate::guest::monitor(&self.monitor_socket(), "system_reset")
            .await
            .map(drop)
    }

    /// The power button (ACPI): the guest shuts down cleanly and qemu exits.
    /// Pulls the plug if that takes longer than `timeout`.
    pub async fn shut_down(&mut self, timeout: Duration) -> anyhow::Result<()> {
        crate::guest::monitor(&self.monitor_socket(), "system_powerdown").await?;
        let start = Instant::now();
        while self.is_running() {
            if start.elapsed() > timeout {
                self.pull_plug();
                anyhow::bail!("{} did not power off within {timeout:?}; plug pulled", self.spec.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.child = None;
        Ok(())
    }

    /// Kills qemu: power off without a shutdown.
    pub fn pull_plug(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::process::kill_child(&mut c);
        }
    }

    /// Runs a command in the guest (through the qemu guest agent).
    pub async fn exec(&self, argv: &[&str], timeout: Duration) -> anyhow::Result<GuestOutput> {
        crate::guest::exec(&self.guest_agent_socket(), argv, timeout).await
    }

    /// Like [`Vm::exec`], but a non-zero exit is an error.
    pub async fn run(&self, argv: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let out = self.exec(argv, timeout).await?;
        anyhow::ensure!(
            out.exit_code == 0,
            "`{}` in {} exited {}: {}",
            argv.join(" "),
            self.spec.name,
            out.exit_code,
            out.stderr.trim()
        );
        Ok(out.stdout)
    }
}

/// One container in a VM, as its own podman lists it.
#[derive(Debug, Clone)]
pub struct GuestContainer {
    /// Short (12 hex digit) id.
    pub id: String,
    pub name: String,
    /// podman's state word: running, exited, created...
    pub state: String,
}

impl GuestContainer {
    /// The agent names containers `<device>.<namespace>.<name>.<service>.<hash>`.
    pub fn is_of(&self, deployment: &str) -> bool {
        self.name.split('.').nth(2) == Some(deployment)
    }
}

impl Vm {
    /// The guest's containers (any state), from its podman through the guest agent.
    pub async fn containers(&self) -> anyhow::Result<Vec<GuestContainer>> {
        let out = self
            .run(&["podman", "ps", "-a", "--format", "json"], Duration::from_secs(60))
            .await?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        Ok(list
            .iter()
            .map(|c| GuestContainer {
                id: c["Id"].as_str().unwrap_or_default().chars().take(12).collect(),
                name: c["Names"][0].as_str().unwrap_or_default().to_owned(),
                state: c["State"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.pull_plug();
    }
}

/// A locally administered MAC address derived from a small index.
pub fn mac_for(index: u8) -> String {
    format!("52:54:00:10:77:{index:02x}")
}
