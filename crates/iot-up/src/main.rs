//! `iot-up`: the whole platform on this machine, then a command menu (or, with
//! `--auto`, the end-to-end regression). Run through `scripts/up.sh`, which installs
//! and builds what is missing first.

mod menu;
mod net;
mod node_menu;
mod out;
mod registry;
mod regression;
mod sso;
mod up;
mod vm;

pub use out::print_line;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "iot-up", about = "Bring up API server, NATS, operator and devices locally")]
struct Args {
    /// Number of devices (each an agent in its own network namespace); 0 with --vm
    /// for the VM alone.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Also bring up a VM device: the Debian guest image under qemu, provisioned
    /// by cloud-init, on the same bridge. `--auto` then runs against the VM.
    #[arg(long)]
    vm: bool,
    /// The VM's architecture (aarch64 is emulated, so it boots several times slower).
    #[arg(long, default_value = "x86_64", requires = "vm")]
    arch: String,
    /// Run the regression (apply -> HTTP 200 -> upgrade -> delete) and exit 0/1.
    #[arg(long)]
    auto: bool,
    /// Where logs, kubeconfig and device sockets live while up.
    #[arg(long, env = "IOT_UP_STATE_DIR", default_value = "/run/iot-up")]
    state_dir: PathBuf,
    /// Instance name (1-8 lowercase letters/digits): names the bridge, namespaces and
    /// veths, so separate instances never collide.
    #[arg(long, default_value = net::DEFAULT_NAME)]
    name: String,
    /// First three octets of the device subnet (the gateway is .1, devices .11 and up).
    #[arg(long, default_value = "10.77.0")]
    subnet: String,
    /// Keep the logs in the state directory after teardown (everything else goes).
    #[arg(long)]
    keep_logs: bool,
    /// Run NATS without authentication (today's open mode, for debugging). By
    /// default every client goes through the auth callout with its own identity.
    #[arg(long)]
    insecure: bool,
    /// Single sign-on: an OIDC provider standing in for Zitadel, and the full
    /// kube-apiserver with --oidc-* flags and RBAC instead of the CRD-only server.
    /// People log in with `iotctl login`; their groups decide what they may do.
    #[arg(long)]
    sso: bool,
    /// Run NATS as a JetStream cluster of this many servers (3 or 5) on the gateway
    /// address, routes in mutual TLS, both buckets with 3 replicas, every client
    /// given every URL. 1 (the default) is a single server. Needs the secured
    /// stack (the cluster's routes use its CA).
    #[arg(long, default_value_t = 1, conflicts_with = "insecure")]
    nats_cluster: usize,
    /// The plan's in-cluster shape: a real single-node Kubernetes 1.20 (kubelet,
    /// containerd, kube-proxy) joins the device bridge, and the charts run NATS with
    /// the auth callout (iot-nats) and two operator replicas (iot-operator) as pods.
    /// OpenBao and the devices stay outside, as on a real site. Slower to start than
    /// the default (processes on the host); use it to try the charts, `helm upgrade`
    /// and what pods do.
    #[arg(long, conflicts_with_all = ["insecure", "sso"])]
    cluster: bool,
    /// Directory with the release binaries (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let code = match run(args).await {
        Ok(code) => code,
        Err(e) => {
            print_line(&format!("{} {e:#}", out::bad("ERROR:")));
            1
        }
    };
    std::process::exit(code);
}

async fn run(args: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(args.devices <= 200, "--devices must be 0-200");
    anyhow::ensure!(
        matches!(args.nats_cluster, 1 | 3 | 5),
        "--nats-cluster must be 1 (a single server), 3 or 5: a cluster of two loses its quorum with either server"
    );
    anyhow::ensure!(
        !(args.cluster && args.nats_cluster > 1),
        "--cluster runs NATS as one pod on a single node; --nats-cluster runs a NATS cluster of processes on the host: choose one"
    );
    anyhow::ensure!(
        args.devices >= 1 || args.vm,
        "--devices 0 needs --vm (something must be a device)"
    );
    // Netns devices take .11 and up, VMs .101 and up.
    anyhow::ensure!(!args.vm || args.devices <= 90, "with --vm, --devices must be 0-90");
    let vm_arch = if args.vm {
        Some(iot_launch::vm::Arch::parse(&args.arch)?)
    } else {
        None
    };
    anyhow::ensure!(
        args.subnet.split('.').count() == 3 && args.subnet.split('.').all(|o| o.parse::<u8>().is_ok()),
        "--subnet must be three octets like 10.77.0"
    );
    anyhow::ensure!(
        (1..=8).contains(&args.name.len()) && args.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "--name must be 1-8 lowercase letters or digits"
    );
    let net = net::Net {
        name: args.name.clone(),
        prefix: args.subnet.clone(),
    };
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("no binary dir"))?,
    };
    for b in [
        "iot-operator",
        "iot-agent",
        "example_iot_apply_deployment",
        "iotctl",
        "iot-auth-callout",
        "iot-dashboard",
    ] {
        anyhow::ensure!(
            bin_dir.join(b).exists(),
            "{} missing in {}; run scripts/up.sh (it builds them)",
            b,
            bin_dir.display()
        );
    }
    // Whatever a previous run left behind (if it was killed) goes first.
    if std::env::var_os("IOT_UP_STATE_DIR").is_none() {
        print_line(
            "note: IOT_UP_STATE_DIR is not exported (scripts/up.sh does it); processes of a crashed run cannot be found later",
        );
    }
    cleanup_leftovers(&net, &args.state_dir);
    std::fs::create_dir_all(args.state_dir.join("logs"))?;

    let mut up = up::Up {
        bin_dir,
        state_dir: args.state_dir.clone(),
        net: net.clone(),
        devices: Vec::new(),
        vms: Vec::new(),
        vm_arch,
        api: None,
        sso: None,
        want_sso: args.sso,
        nats: None,
        nats_cluster: None,
        nats_members: args.nats_cluster,
        nats_placement: Vec::new(),
        operator: None,
        operator_http: None,
        dashboard: None,
        dashboard_addr: None,
        containers_conf: iot_launch::paths::containers_conf(),
        keep_logs: args.keep_logs,
        security: None,
        secure: !args.insecure,
        ca: None,
        want_cluster: args.cluster,
        node: None,
        operator_sets: Vec::new(),
        registry: None,
    };
    let started = tokio::select! {
        r = up.start(args.devices) => r,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted during bring-up")),
    };
    if let Err(e) = started {
        drop(up);
        return Err(e);
    }
    menu::write_env_file(&up)?;
    if args.auto {
        let ok = regression::run(&up).await;
        // A failed regression keeps its logs for whoever investigates.
        up.keep_logs |= !ok;
        drop(up);
        return Ok(if ok { 0 } else { 1 });
    }
    menu::print(&up);
    shutdown_signal().await;
    drop(up);
    print_line(&out::good("stopped cleanly"));
    Ok(0)
}

fn cleanup_leftovers(net: &net::Net, state_dir: &std::path::Path) {
    let leftover_devices = net.existing_devices();
    if leftover_devices.is_empty() && !state_dir.exists() {
        return;
    }
    print_line(&format!(
        "{} cleaning up what a previous run left behind",
        out::step("==>")
    ));
    // Processes of a previous run: scripts/up.sh exports IOT_UP_STATE_DIR, so every
    // process it started (and their children) carries it in its environment.
    if let Ok(entries) = std::fs::read_dir("/proc") {
        let me = std::process::id();
        let state = state_dir.display().to_string();
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let marker = format!("IOT_UP_STATE_DIR={state}");
            let ours = environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes());
            if ours && let Err(e) = iot_launch::process::kill_pid(pid) {
                print_line(&format!("  warning: could not stop leftover process {pid}: {e}"));
            }
        }
    }
    // A node's mounts, cgroups, kernel settings and namespace (its processes were
    // killed above): undone before its directory goes.
    for name in iot_launch::kube_node::ledger::reap_dead("") {
        print_line(&format!("  removed the single-node Kubernetes {name}"));
    }
    for index in leftover_devices {
        up::remove_device_containers(
            net,
            index,
            &state_dir.join(net.device_id(index)),
            &iot_launch::paths::containers_conf(),
        );
    }
    net.remove_all();
    if let Err(e) = std::fs::remove_dir_all(state_dir) {
        print_line(&format!("  warning: could not remove {}: {e}", state_dir.display()));
    }
}

async fn shutdown_signal() {
    iot_observe::process::shutdown_signal_with(print_line).await;
}
