//! `--vm`: a VM device on the bridge, booted from the Debian guest image and
//! provisioned by cloud-init exactly as a real device would be (agent binary from
//! the seed, settings, enrollment, hardened systemd unit). TCG is slow, so boot
//! progress is printed from the serial console as it happens.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iot_launch::vm::{Arch, Vm, VmNet};
use iot_launch::vm_seed::{SeededVm, prepare_seeded_vm};
use iot_provision::{AdminUser, DeviceProvision, StaticNetwork};

use crate::net::{Net, run};
use crate::print_line;

/// A VM device while up.
pub struct VmDevice {
    pub id: String,
    pub ip: String,
    pub arch: Arch,
    pub tap: String,
    pub vm: Vm,
    /// The console password of the `fleet` account (random per bring-up).
    pub console_password: String,
    /// Power-on to the agent's first `/readyz` 200.
    pub boot_to_ready: Option<Duration>,
}

/// Console milestones worth telling a person about, in boot order.
const MILESTONES: [(&str, &str); 5] = [
    ("Linux version", "kernel started"),
    ("systemd[1]: ", "systemd running"),
    ("running 'init-local'", "cloud-init: reading the seed"),
    ("running 'modules:final'", "cloud-init: installing the agent"),
    ("iot-agent: installed", "agent installed, starting under systemd"),
];

impl Net {
    pub fn vm_id(&self, index: usize) -> String {
        if self.name == crate::net::DEFAULT_NAME {
            format!("vm-{index}")
        } else {
            format!("{}-vm-{index}", self.name)
        }
    }

    pub fn vm_ip(&self, index: usize) -> String {
        format!("{}.{}", self.prefix, 100 + index)
    }

    /// `<name>-t<N>`: the dash cannot appear in an instance name, so another
    /// instance's interfaces never match.
    pub fn tap(&self, index: usize) -> String {
        format!("{}-t{index}", self.name)
    }

    pub fn create_tap(&self, index: usize) -> anyhow::Result<String> {
        let tap = self.tap(index);
        run(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"])?;
        run(&["ip", "link", "set", &tap, "master", &self.bridge(), "up"])?;
        Ok(tap)
    }
}

/// What provisioning needs from the bring-up.
pub struct VmLaunch<'a> {
    pub net: &'a Net,
    pub index: usize,
    pub arch: Arch,
    pub agent: &'a Path,
    /// Every NATS server's URL (a cluster's members; the seed lists them all).
    pub nats_urls: Vec<String>,
    pub enrollment: Option<String>,
    /// The stack's CA (PEM); `None` on an --insecure stack.
    pub ca_pem: Option<String>,
    pub state_dir: &'a Path,
}

/// Writes the seed, makes the tap and powers the VM on. Returns at once: the VM
/// boots while [`watch_boot`] reports its progress.
pub fn start(l: &VmLaunch<'_>) -> anyhow::Result<VmDevice> {
    let id = l.net.vm_id(l.index);
    let ip = l.net.vm_ip(l.index);
    let mac = iot_launch::vm::mac_for(u8::try_from(l.index)?);
    let console_password = random_password()?;
    let provision = DeviceProvision {
        device_id: id.clone(),
        nats_urls: l.nats_urls.clone(),
        enrollment: l.enrollment.clone(),
        insecure: l.ca_pem.is_none(),
        ca_pem: l.ca_pem.clone(),
        metrics_addr: Some(format!("{ip}:{}", crate::up::AGENT_METRICS_PORT).parse()?),
        network: Some(StaticNetwork {
            mac,
            address: format!("{ip}/24"),
            gateway: l.net.gateway().parse()?,
            nameservers: vec![],
        }),
        admin: Some(AdminUser {
            name: "fleet".into(),
            password_hash: Some(crypt_sha512(&console_password)?),
            ssh_authorized_keys: vec![],
        }),
        agent_env: vec![("IOT_STOP_TIMEOUT".into(), "5s".into())],
        ..Default::default()
    };
    let spec = prepare_seeded_vm(SeededVm {
        provision: &provision,
        agent: l.agent,
        arch: l.arch,
        dir: l.state_dir.join(&id),
        net: VmNet::Tap {
            ifname: l.net.tap(l.index),
        },
        // As a Pi's boot partition is: the enrollment leaves it at first boot.
        writable_seed: true,
    })?;
    let tap = l.net.create_tap(l.index)?;
    let vm = Vm::start(spec)?;
    Ok(VmDevice {
        id,
        ip,
        arch: l.arch,
        tap,
        vm,
        console_password,
        boot_to_ready: None,
    })
}

/// Prints each boot milestone as the console shows it, until the agent is
/// installed (or `timeout`).
pub async fn watch_boot(d: &mut VmDevice, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut next = 0;
    while next < MILESTONES.len() {
        let text = d.vm.console_text();
        while next < MILESTONES.len() && text.contains(MILESTONES[next].0) {
            print_line(&format!(
                "      {} {} ({:.0} s)",
                d.id,
                MILESTONES[next].1,
                start.elapsed().as_secs_f64()
            ));
            next += 1;
        }
        if text.contains("iot-agent: install failed") {
            anyhow::bail!(
                "{}: the agent could not be installed; see {}",
                d.id,
                d.vm.console_log().display()
            );
        }
        anyhow::ensure!(
            d.vm.is_running(),
            "{} powered off during boot; see {}",
            d.id,
            d.vm.console_log().display()
        );
        anyhow::ensure!(
            start.elapsed() < timeout,
            "{} did not finish booting within {timeout:?}; see {}",
            d.id,
            d.vm.console_log().display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Where up.sh puts the agent built for `arch`.
pub fn agent_for(bin_dir: &Path, arch: Arch) -> PathBuf {
    if arch.name() == std::env::consts::ARCH {
        return bin_dir.join("iot-agent");
    }
    // bin_dir is target/release; the cross build (device profile) lands in
    // target/<triple>/device.
    bin_dir
        .parent()
        .map(|target| target.join(arch.rust_target()).join("device/iot-agent"))
        .unwrap_or_else(|| bin_dir.join("iot-agent"))
}

/// A random password for the VM's console account.
fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 12];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// crypt(3) SHA-512 hash of a password, as cloud-init's `hashed_passwd` wants.
fn crypt_sha512(password: &str) -> anyhow::Result<String> {
    let cmd = {
        let mut c = std::process::Command::new("openssl");
        c.args(["passwd", "-6", "-stdin"]);
        c
    };
    let (ok, out, err) = iot_launch::process::run_captured(cmd, Some(password))?;
    anyhow::ensure!(ok, "openssl passwd: {}", err.trim());
    Ok(out.trim().to_owned())
}

/// What the device itself says, for BENCHMARKS.md: its architecture, the agent's
/// resident memory and binary size, and how long the boot took.
pub async fn report_facts(d: &VmDevice) -> anyhow::Result<String> {
    let t = Duration::from_secs(60);
    let machine = d.vm.run(&["uname", "-m"], t).await?;
    let pid =
        d.vm.run(
            &["systemctl", "show", "-p", "MainPID", "--value", "iot-agent.service"],
            t,
        )
        .await?;
    let status = d.vm.run(&["cat", &format!("/proc/{}/status", pid.trim())], t).await?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".into());
    let size = d.vm.run(&["stat", "-c", "%s", iot_provision::AGENT_BINARY], t).await?;
    Ok(format!(
        "{}: guest {}, agent VmRSS {rss} after the regression, binary {} bytes, power-on to agent ready {}",
        d.id,
        machine.trim(),
        size.trim(),
        d.boot_to_ready
            .map(|b| format!("{:.0} s", b.as_secs_f64()))
            .unwrap_or_else(|| "?".into())
    ))
}
