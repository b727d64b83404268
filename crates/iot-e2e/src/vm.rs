//! A VM device for a secured [`Stack`]: enrolled in the stack's OpenBao, provisioned
//! by cloud-init from a seed (`iot-provision`), on qemu's user-mode network so every
//! connection stays on the host's loopback (the guest reaches it as 10.0.2.2).

use iot_launch::vm::{Arch, USER_NET_HOST, Vm, VmNet};
use iot_launch::vm_seed::{SeededVm, prepare_seeded_vm};
use iot_provision::{DeviceProvision, StaticNetwork};
use std::path::Path;

use crate::stack::Stack;

/// Ports deployments publish in the guest, each forwarded from a host loopback port.
pub const GUEST_HTTP_PORTS: [u16; 2] = [8080, 8081];
pub const GUEST_METRICS_PORT: u16 = 9464;

pub struct VmDevice {
    pub id: String,
    pub vm: Vm,
    /// Host loopback ports forwarded to the guest's [`GUEST_HTTP_PORTS`].
    pub http_ports: [u16; 2],
    /// Host loopback port forwarded to the agent's metrics in the guest.
    pub metrics_port: u16,
    /// The secret id of the enrollment its seed carried (tests check where it ends up).
    pub enrollment_secret: String,
}

/// Rewrites a host-loopback URL into the address the guest reaches it on.
pub fn from_guest(url: &str) -> String {
    url.replace("127.0.0.1", USER_NET_HOST)
        .replace("localhost", USER_NET_HOST)
}

/// Enrolls a device, writes its seed (agent binary, test images for the guest's
/// arch, cloud-init user-data) and powers the VM on. It joins the fleet once
/// cloud-init has run: wait for its status with [`Stack::agent_status`].
pub async fn start_vm_device(stack: &Stack, arch: Arch, agent: &Path, id: &str) -> anyhow::Result<VmDevice> {
    start_vm_device_with(stack, arch, agent, id, false).await
}

/// [`start_vm_device`] with a writable FAT seed (a USB stick, a Pi's boot
/// partition) instead of an ISO.
pub async fn start_vm_device_with(
    stack: &Stack,
    arch: Arch,
    agent: &Path,
    id: &str,
    writable_seed: bool,
) -> anyhow::Result<VmDevice> {
    let sec = stack
        .security
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("a VM device needs a secured stack"))?;
    let mut enrollment = iot_bao::enroll::enroll_device_identity(&sec.bao.root()?, id).await?;
    enrollment.bao_addr = from_guest(&enrollment.bao_addr);
    let provision = DeviceProvision {
        device_id: id.to_owned(),
        nats_urls: vec![from_guest(&stack.nats.url())],
        enrollment: Some(serde_json::to_string(&enrollment)?),
        ca_pem: match stack.nats.ca_file() {
            Some(ca) => Some(std::fs::read_to_string(ca)?),
            None => None,
        },
        insecure: stack.nats.ca_file().is_none(),
        metrics_addr: Some(format!("0.0.0.0:{GUEST_METRICS_PORT}").parse()?),
        // qemu's user network: the guest is 10.0.2.15 behind the host at 10.0.2.2.
        network: Some(StaticNetwork {
            mac: iot_launch::vm::mac_for(1),
            address: "10.0.2.15/24".into(),
            gateway: USER_NET_HOST.parse()?,
            nameservers: vec![],
        }),
        agent_env: vec![
            ("IOT_STOP_TIMEOUT".into(), "5s".into()),
            ("IOT_HEARTBEAT_INTERVAL".into(), "5s".into()),
        ],
        ..Default::default()
    };
    let http_ports = [iot_testkit::free_port()?, iot_testkit::free_port()?];
    let metrics_port = iot_testkit::free_port()?;
    let vm = Vm::start(prepare_seeded_vm(SeededVm {
        provision: &provision,
        agent,
        arch,
        dir: stack.dir.path().join(format!("vm-{id}")),
        net: VmNet::User {
            forwards: vec![
                (http_ports[0], GUEST_HTTP_PORTS[0]),
                (http_ports[1], GUEST_HTTP_PORTS[1]),
                (metrics_port, GUEST_METRICS_PORT),
            ],
        },
        writable_seed,
    })?)?;
    Ok(VmDevice {
        id: id.to_owned(),
        vm,
        http_ports,
        metrics_port,
        enrollment_secret: enrollment.secret_id.clone(),
    })
}
