//! A machine of its own as a device: a Debian VM (qemu, TCG) boots the guest image,
//! cloud-init installs the agent from the seed with its enrollment and a hardened
//! systemd unit, and the device joins a secured fleet. Then it is power-cycled:
//! a hard reset (the guest gets no warning), and a clean shutdown during which one
//! deployment is deleted and another created. After each boot the agent is back
//! under systemd, what should run runs exactly once, and what was deleted while the
//! device was off stays gone. `.status` counts the device unreported while it is
//! down and converges after. A pending upgrade (an image the device cannot get)
//! does not keep the previous version down after the reset.
//!
//! Everything runs on the production path: NATS and OpenBao over TLS verified
//! against the stack's CA, which the seed carries; the seed is a writable FAT disk
//! (as a USB stick or a Pi's boot partition), which holds no secret after the
//! first boot.

use std::time::{Duration, Instant};

use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DeploymentRef, Id, agent_status_key};
use iot_e2e::stack::*;
use iot_e2e::vm::{VmDevice, start_vm_device_with};
use iot_launch::vm::Arch;
use iot_testkit::{cargo_bin, unique_id, wait_until};
use kube::api::DeleteParams;

/// TCG is slow, and a cold first boot also loads the images: generous, as a real
/// device's first boot would be.
const BOOT: Duration = Duration::from_secs(600);

#[tokio::test]
async fn a_vm_joins_by_cloud_init_serves_and_survives_power_cycles() -> anyhow::Result<()> {
    let mut stack = Stack::start_secured().await?;
    // The agent beats every 5 s (set in its provisioning), so 15 s of silence is an
    // outage, not noise.
    stack.operator_env.push(("IOT_STALE_AFTER".into(), "15s".into()));
    stack.start_operator()?;
    stack.wait_operator_ready().await?;

    // scripts/test-arm64-vm.sh runs this same test against an emulated arm64 guest
    // with the cross-built agent.
    let arch = Arch::parse(&std::env::var("IOT_VM_TEST_ARCH").unwrap_or_else(|_| "x86_64".into()))?;
    let agent = match arch {
        Arch::X86_64 => cargo_bin("iot-agent")?,
        Arch::Aarch64 => iot_launch::paths::repo_root().join("target/aarch64-unknown-linux-gnu/device/iot-agent"),
    };
    anyhow::ensure!(
        agent.exists(),
        "{} missing (scripts/test-arm64-vm.sh builds it)",
        agent.display()
    );
    let id = unique_id("vm");
    let started = Instant::now();
    let mut dev = start_vm_device_with(&stack, arch, &agent, &id, true).await?;
    wait_for_report(&stack, &mut dev, 0).await?;
    eprintln!(
        "first boot to the agent's first report: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let machine = run(&dev.vm, &["uname", "-m"]).await?;
    assert_eq!(machine, arch.name(), "the guest is the architecture asked for");
    let console = dev.vm.console_text();
    assert!(
        console.contains("iot-agent: installed iot-agent"),
        "cloud-init ran the install script"
    );
    // Attack: the seed (a USB stick, an SD card's boot partition) read on another
    // machine after the device booted. The install script overwrote and removed
    // the enrollment; not a byte of the secret is left on the disk image.
    assert!(
        console.contains("iot-agent: removed the enrollment secret from the seed"),
        "{console}"
    );
    let secret = dev.enrollment_secret.clone();
    let image = std::fs::read(&dev.vm.spec.seed)?;
    assert!(
        !image.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the writable seed still holds the enrollment secret"
    );
    let listing = std::process::Command::new("mdir")
        .args(["-b", "-i"])
        .arg(&dev.vm.spec.seed)
        .arg("::")
        .output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("IOT-AGENT") || listing.to_lowercase().contains("iot-agent"),
        "the seed is readable and keeps the rest: {listing}"
    );
    assert!(!listing.to_lowercase().contains("enrollment"), "{listing}");

    // What cloud-init installed, checked inside the guest.
    assert_eq!(
        run(&dev.vm, &["systemctl", "is-enabled", "iot-agent.service"]).await?,
        "enabled"
    );
    assert_eq!(
        run(
            &dev.vm,
            &["systemctl", "show", "-p", "Restart", "--value", "iot-agent.service"]
        )
        .await?,
        "on-failure"
    );
    assert_eq!(
        run(&dev.vm, &["stat", "-c", "%a %U", "/etc/iot-agent/identity.json"]).await?,
        "600 root"
    );
    assert_eq!(
        run(&dev.vm, &["stat", "-c", "%a %U", "/etc/iot-agent/agent.env"]).await?,
        "600 root"
    );
    let caps = run(
        &dev.vm,
        &[
            "systemctl",
            "show",
            "-p",
            "CapabilityBoundingSet",
            "--value",
            "iot-agent.service",
        ],
    )
    .await?;
    assert!(caps.is_empty(), "the agent runs with no capabilities, has: {caps}");

    let web = DeploymentRef::new("default", "web")?;
    apply(&stack, "web", &id, "localhost/iot-web:v1", 8080)?;
    iot_testkit::http::wait_http("127.0.0.1", dev.http_ports[0], "v1", BOOT).await?;
    wait_counts(&stack, "web", "web running on the VM", 1, 0).await?;
    let before = running_once(&dev, "web").await?;

    // A crashed agent comes back: systemd's Restart=on-failure.
    let restarts = |vm| {
        run(
            vm,
            &["systemctl", "show", "-p", "NRestarts", "--value", "iot-agent.service"],
        )
    };
    let n0: u32 = restarts(&dev.vm).await?.parse()?;
    run(&dev.vm, &["systemctl", "kill", "--signal=KILL", "iot-agent.service"]).await?;
    // Read after the kill (systemd waits 5 s before the restart): the next report
    // can only come from the restarted agent.
    let rev = latest_report(&stack, &dev.id).await?;
    wait_until(
        Duration::from_secs(60),
        "systemd to restart the killed agent",
        || async {
            let n: u32 = restarts(&dev.vm).await.ok()?.parse().ok()?;
            (n > n0).then_some(())
        },
    )
    .await?;
    wait_for_report(&stack, &mut dev, rev).await?;

    // An upgrade that cannot happen: the new image is on no registry the device
    // reaches. v1 keeps serving, and the deployment says why it is Failed.
    apply(&stack, "web", &id, "localhost/iot-web:not-on-any-registry", 8080)?;
    stack
        .wait_resource_status("default", "web", "the pending upgrade failing", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.failed == 1)
        })
        .await?;
    iot_testkit::http::wait_http("127.0.0.1", dev.http_ports[0], "v1", BOOT).await?;

    // 1. The reset button, with that upgrade pending. The device falls silent, is
    //    counted unreported, then comes back: v1's container is started again
    //    (the agent does not wait for the upgrade), and it is the same one.
    dev.vm.hard_reset().await?;
    let reset_at = Instant::now();
    stack
        .wait_resource_status("default", "web", "the silent device counted unreported", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.unreported == 1)
        })
        .await?;
    // Silent for 15 s by now: the next report is the rebooted device's.
    let rev = latest_report(&stack, &dev.id).await?;
    wait_for_report(&stack, &mut dev, rev).await?;
    iot_testkit::http::wait_http("127.0.0.1", dev.http_ports[0], "v1", BOOT).await?;
    stack
        .wait_resource_status("default", "web", "back, with the upgrade still failing", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.failed == 1 && a.unreported == 0)
        })
        .await?;
    eprintln!("hard reset to serving again: {:.1} s", reset_at.elapsed().as_secs_f64());
    let after = running_once(&dev, "web").await?;
    eprintln!("web's container across the reset: {before} -> {after}");
    assert_eq!(after, before, "the previous version's own container serves again");
    let uptime: f64 = run(&dev.vm, &["cut", "-d", " ", "-f1", "/proc/uptime"])
        .await?
        .parse()?;
    assert!(
        uptime < reset_at.elapsed().as_secs_f64() + 5.0,
        "the guest really rebooted (uptime {uptime} s)"
    );
    assert_eq!(
        run(&dev.vm, &["systemctl", "is-active", "iot-agent.service"]).await?,
        "active"
    );

    // 2. A clean shutdown. While the device is off, web is deleted and web2 created.
    dev.vm.shut_down(Duration::from_secs(180)).await?;
    let rev = latest_report(&stack, &dev.id).await?;
    stack
        .deployments("default")
        .delete("web", &DeleteParams::default())
        .await?;
    apply(&stack, "web2", &id, "localhost/iot-web:v2", 8081)?;
    wait_until(Duration::from_secs(60), "web's desired state removed", || async {
        stack.keys_of(&web).await.ok()?.is_empty().then_some(())
    })
    .await?;
    wait_counts(&stack, "web2", "web2 waiting for the device that is off", 0, 1).await?;
    let off_at = Instant::now();
    dev.vm.power_on()?;
    wait_for_report(&stack, &mut dev, rev).await?;
    iot_testkit::http::wait_http("127.0.0.1", dev.http_ports[1], "v2", BOOT).await?;
    wait_counts(&stack, "web2", "web2 running after the boot", 1, 0).await?;
    eprintln!("power on to web2 serving: {:.1} s", off_at.elapsed().as_secs_f64());
    running_once(&dev, "web2").await?;
    // What was deleted while the device was off does not come back: eventually no
    // container of it, and for a while after, still none.
    wait_until(
        Duration::from_secs(120),
        "web's container removed after boot",
        || async {
            let all = dev.vm.containers().await.ok()?;
            (!all.iter().any(|c| c.is_of("web"))).then_some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let all = dev.vm.containers().await?;
    assert_eq!(all.len(), 1, "only web2 is on the device: {all:?}");
    assert!(
        iot_testkit::http::get_status("127.0.0.1", dev.http_ports[0], "/")
            .await
            .is_err(),
        "nothing answers on web's port any more"
    );
    Ok(())
}

fn apply(stack: &Stack, name: &str, device: &str, image: &str, guest_port: u16) -> anyhow::Result<()> {
    let mut cmd = stack.applier()?;
    cmd.args([
        "--name",
        name,
        "--namespace",
        "default",
        "--target-device",
        device,
        "--image",
        image,
    ])
    .args(["--port", &format!("{guest_port}:80")]);
    run_ok(cmd).map(drop)
}

/// Exactly one container of the deployment, and it is running; returns its id.
async fn running_once(dev: &VmDevice, deployment: &str) -> anyhow::Result<String> {
    let all = dev.vm.containers().await?;
    let mine: Vec<_> = all.iter().filter(|c| c.is_of(deployment)).collect();
    anyhow::ensure!(mine.len() == 1, "expected one container of {deployment}, found {all:?}");
    anyhow::ensure!(
        mine[0].state == "running",
        "{deployment}'s container is not running: {all:?}"
    );
    Ok(mine[0].id.clone())
}

/// The revision of the device's latest status report.
async fn latest_report(stack: &Stack, device: &str) -> anyhow::Result<u64> {
    let key = agent_status_key(&Id::new(device)?);
    Ok(stack.status.entry(&key).await?.map(|e| e.revision).unwrap_or(0))
}

/// Waits for a status report newer than revision `after` (a new boot's or a
/// restarted agent's), printing the console's tail if it never comes.
async fn wait_for_report(stack: &Stack, dev: &mut VmDevice, after: u64) -> anyhow::Result<u64> {
    let key = agent_status_key(&Id::new(dev.id.as_str())?);
    let start = Instant::now();
    loop {
        if let Ok(Some(e)) = stack.status.entry(&key).await
            && e.revision > after
        {
            return Ok(e.revision);
        }
        let running = dev.vm.is_running();
        if !running || start.elapsed() > BOOT {
            let console = dev.vm.console_text();
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            anyhow::bail!(
                "no report from {} in {AGENT_STATUS_BUCKET} after {:?} (VM running: {running}); console:\n{}",
                dev.id,
                start.elapsed(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_counts(stack: &Stack, name: &str, what: &str, succeeded: u32, unreported: u32) -> anyhow::Result<()> {
    stack
        .wait_resource_status("default", name, what, |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.succeeded == succeeded && a.unreported == unreported)
        })
        .await
        .map(drop)
}

/// A command in the guest (through the qemu guest agent); its trimmed stdout.
async fn run(vm: &iot_launch::vm::Vm, argv: &[&str]) -> anyhow::Result<String> {
    vm.run(argv, Duration::from_secs(60)).await.map(|s| s.trim().to_owned())
}
