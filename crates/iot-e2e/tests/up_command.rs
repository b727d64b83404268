//! The main command (`iot-up`, what `scripts/up.sh` execs): `--auto` regression,
//! clean teardown on SIGTERM, and recovery from a run that was killed.
//! Each test uses its own instance name and subnet, so it never touches a user's
//! `up` running on the same machine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iot_testkit::{cargo_bin, paths::containers_conf};

struct Instance {
    name: String,
    subnet: String,
    state: tempfile::TempDir,
}

impl Instance {
    fn new(name: &str, third_octet: u8) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.into(),
            subnet: format!("10.{third_octet}.99"),
            state: tempfile::tempdir()?,
        })
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.state.path().join("up")
    }

    fn command(&self, extra: &[&str]) -> anyhow::Result<Command> {
        let bin = cargo_bin("iot-up")?;
        let bin_dir = bin.parent().ok_or_else(|| anyhow::anyhow!("no bin dir"))?.to_owned();
        let mut cmd = Command::new(bin);
        cmd.env("IOT_UP_STATE_DIR", self.state_dir())
            .env("CONTAINERS_CONF", containers_conf())
            .args(["--name", &self.name, "--subnet", &self.subnet, "--bin-dir"])
            .arg(bin_dir)
            .args(extra);
        Ok(cmd)
    }

    /// Nothing of this instance is left: namespaces, bridge, containers, processes, state.
    fn assert_clean(&self) {
        let ns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
        let ns = String::from_utf8_lossy(&ns.stdout);
        assert!(
            !ns.lines().any(|l| l.starts_with(&format!("{}-", self.name))),
            "namespaces left: {ns}"
        );
        let br = Command::new("ip")
            .args(["link", "show", &format!("{}0", self.name)])
            .output()
            .expect("ip link");
        assert!(!br.status.success(), "bridge left behind");
        let ps = iot_testkit::podman::podman_cli(&["ps", "-a", "--format", "{{.Names}}"]).unwrap_or_default();
        assert!(
            !ps.lines().any(|n| n.starts_with(&format!("{}-device-", self.name))),
            "containers left: {ps}"
        );
        assert!(!self.state_dir().exists(), "state directory left behind");
        assert!(our_pids(&self.state_dir()).is_empty(), "processes left behind");
    }
}

/// Processes whose environment carries this instance's state dir marker.
fn our_pids(state_dir: &Path) -> Vec<u32> {
    let marker = format!("IOT_UP_STATE_DIR={}", state_dir.display());
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/environ"))
                        .map(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for_output(log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!(
        "{needle:?} not printed within {timeout:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

#[test]
fn auto_regression_passes_and_leaves_nothing_behind() -> anyhow::Result<()> {
    let inst = Instance::new("iott1", 78)?;
    let out = inst.command(&["--auto"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iot-up --auto failed:\n{stderr}");
    assert!(stderr.contains("ALL PASSED"), "{stderr}");
    for via in ["TypedApplier", "PrintedJson", "YamlManifest"] {
        assert!(
            stderr.contains(&format!("PASS\u{1b}[0m {via}")),
            "{via} did not pass:\n{stderr}"
        );
    }
    inst.assert_clean();
    Ok(())
}

#[test]
fn hand_off_stops_cleanly_and_a_killed_run_is_cleaned_up_by_the_next() -> anyhow::Result<()> {
    let inst = Instance::new("iott2", 79)?;
    let log = inst.state.path().join("up.log");

    // Hand-off mode, two devices; SIGTERM tears everything down.
    let mut child = inst
        .command(&["--devices", "2"])?
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    wait_for_output(&log, "Press Ctrl-C here to stop", Duration::from_secs(120))?;
    let text = std::fs::read_to_string(&log)?;
    for needle in [
        "KV bucket ready",
        "iott2-device-1@10.79.99.11",
        "iott2-device-2@10.79.99.12",
        "kubectl get deployments.iot.nationtech.io -A -w",
        "iotctl kv ls desired",
        "curl http://10.79.99.11:8080/",
    ] {
        assert!(text.contains(needle), "menu lacks {needle:?}:\n{text}");
    }
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(term.success());
    let status = child.wait()?;
    assert!(status.success(), "exit after SIGTERM: {status}");
    wait_for_output(&log, "stopped cleanly", Duration::from_secs(5))?;
    inst.assert_clean();

    // Killed hard: it leaves processes, namespaces and state behind...
    let log2 = inst.state.path().join("up2.log");
    let mut child = inst
        .command(&[])?
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log2)?)
        .spawn()?;
    wait_for_output(&log2, "Press Ctrl-C here to stop", Duration::from_secs(120))?;
    child.kill()?;
    child.wait()?;
    assert!(
        !our_pids(&inst.state_dir()).is_empty(),
        "a SIGKILLed run should leave processes for this test to be meaningful"
    );

    // ...which the next run removes before it starts.
    let out = inst.command(&["--auto"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run after a killed run failed:\n{stderr}");
    assert!(
        stderr.contains("cleaning up what a previous run left behind"),
        "{stderr}"
    );
    inst.assert_clean();
    Ok(())
}
