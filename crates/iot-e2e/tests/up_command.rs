//! The main command (`iot-up`, what `scripts/up.sh` execs): `--auto` regression,
//! clean teardown on SIGTERM, and recovery from a run that was killed.
//! Each test uses its own instance name and subnet, so it never touches a user's
//! `up` running on the same machine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iot_testkit::{cargo_bin, paths::containers_conf};

/// A running iot-up that gets SIGTERM (then SIGKILL) if the test fails before it
/// stops it, so a failing test does not leave a platform running.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        iot_testkit::process_stop(&mut self.0);
    }
}

/// The same for a shell pipeline in a process group of its own: the whole group.
struct RunningGroup(std::process::Child);

impl Drop for RunningGroup {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None))
            && let Ok(pid) = i32::try_from(self.0.id())
        {
            let group = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM).is_ok() {
                std::thread::sleep(Duration::from_secs(20));
            }
        }
        iot_testkit::process_stop(&mut self.0);
    }
}

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

    /// iot-up with `extra` in the background, its output in `log`.
    fn spawn(&self, extra: &[&str], log: &Path) -> anyhow::Result<Running> {
        Ok(Running(
            self.command(extra)?
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log)?)
                .spawn()?,
        ))
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
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link");
        let tap = format!("{}-t", self.name);
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains(&tap),
            "VM tap left behind"
        );
        let ps = iot_testkit::podman::podman_cli(&["ps", "-a", "--format", "{{.Names}}"]).unwrap_or_default();
        assert!(
            !ps.lines().any(|n| n.starts_with(&format!("{}-device-", self.name))),
            "containers left: {ps}"
        );
        assert!(!self.state_dir().exists(), "state directory left behind");
        assert!(our_pids(&self.state_dir()).is_empty(), "processes left behind");
        // Containers live in each device's own store under the state directory; their
        // conmon processes name it on their command line.
        let state = self.state_dir().display().to_string();
        let conmons: Vec<String> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .filter(|c| c.contains(&state))
                    .collect()
            })
            .unwrap_or_default();
        assert!(conmons.is_empty(), "container processes left behind: {conmons:?}");
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
    wait_for(None, log, needle, timeout)
}

/// [`wait_for_output`] from a running iot-up: fails as soon as it has exited
/// (a failed start tears down and exits; no need to wait out the timeout).
fn wait_for_output_while_running(
    child: &mut std::process::Child,
    log: &Path,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(Some(child), log, needle, timeout)
}

fn wait_for(
    mut child: Option<&mut std::process::Child>,
    log: &Path,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = child.as_mut().map(|c| c.try_wait()).transpose()?.flatten() {
            anyhow::bail!("iot-up exited ({status}) before printing {needle:?}:\n{text}");
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("{needle:?} not printed within {timeout:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one menu line as printed, in a shell that sources the printed env file.
fn menu_shell(inst: &Instance, line: &str) -> anyhow::Result<String> {
    let env_file = inst.state_dir().join("env");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && {line}", env_file.display()))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "menu command failed: {line}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the menu's first apply command and every curl line exactly as printed,
/// through a shell that sources the printed env file; then checks that each device
/// sees only its own containers.
fn menu_commands_work_verbatim(inst: &Instance, menu: &str) -> anyhow::Result<()> {
    let env_file = inst.state_dir().join("env");
    let shell = |line: &str| menu_shell(inst, line);
    let commands: Vec<&str> = menu.lines().map(str::trim).collect();
    let apply = commands
        .iter()
        .find(|l| l.starts_with("example_iot_apply_deployment") && !l.contains("--print"))
        .ok_or_else(|| anyhow::anyhow!("no apply command in the menu"))?;
    shell(&format!("{apply} --wait 90s"))?;
    let curls: Vec<&str> = commands
        .iter()
        .filter(|l| l.starts_with("curl http://"))
        .map(|l| l.split('#').next().unwrap_or(l).trim())
        .collect();
    assert_eq!(curls.len(), 2, "{menu}");
    for curl in curls {
        let body = shell(&format!("curl -sf --max-time 5 {}", curl.trim_start_matches("curl ")))?;
        assert_eq!(body.trim(), "v1", "{curl}");
    }
    // Each device's podman lists its own container only.
    let listings: Vec<String> = commands
        .iter()
        .filter(|l| l.starts_with("podman --url"))
        .map(|l| {
            shell(&format!(
                "{} --format '{{{{.Names}}}}'",
                l.split('#').next().unwrap_or(l).trim()
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(listings.len(), 2, "{menu}");
    // Secure by default: every device is enrolled in OpenBao, the env file (which
    // holds the development secrets) is private, and NATS admits no anonymous client.
    let enrolled = shell("iotctl device list")?;
    // A header, then one row per device.
    assert_eq!(enrolled.lines().skip(1).count(), 2, "{enrolled}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&env_file)?.permissions().mode() & 0o777, 0o600);
    shell("iotctl devices")?;
    let anonymous = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && env -u NATS_USER -u NATS_PASSWORD iotctl devices",
            env_file.display()
        ))
        .output()?;
    assert!(!anonymous.status.success(), "an anonymous client read the fleet");
    for (i, list) in listings.iter().enumerate() {
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(names.len(), 1, "device {} lists {names:?}", i + 1);
        assert!(names[0].starts_with(&format!("iott2-device-{}.", i + 1)), "{names:?}");
    }
    // The dashboard the menu names shows both devices online, through its own
    // read-only identity.
    let dashboard = commands
        .iter()
        .find(|l| l.starts_with("http://127.0.0.1:"))
        .ok_or_else(|| anyhow::anyhow!("no dashboard URL in the menu:\n{menu}"))?;
    let page = shell(&format!("curl -sf --max-time 5 {dashboard}/devices"))?;
    for i in 1..=2 {
        assert!(page.contains(&format!(r#"data-device="iott2-device-{i}""#)), "{page}");
    }
    assert!(!page.contains("never seen</span></td>"), "{page}");
    // The fleet: both devices are labelled Devices, online; the selector example
    // reaches the canary (device 1) and only it.
    let inventory = commands
        .iter()
        .find(|l| l.starts_with("kubectl get devices -L"))
        .ok_or_else(|| anyhow::anyhow!("no kubectl get devices line in the menu:\n{menu}"))?;
    let listed = wait_until_shell(&shell, inventory, |out| {
        (1..=2).all(|i| {
            out.lines()
                .any(|l| l.starts_with(&format!("iott2-device-{i} ")) && l.contains("True"))
        })
    })?;
    assert!(listed.contains("canary") && listed.contains("lab"), "{listed}");
    let canary = commands
        .iter()
        .find(|l| l.starts_with("example_iot_apply_deployment") && l.contains("--selector"))
        .ok_or_else(|| anyhow::anyhow!("no selector example in the menu:\n{menu}"))?;
    shell(&format!("{canary} --wait 90s"))?;
    let first_ip = commands
        .iter()
        .find_map(|l| l.strip_prefix("curl http://"))
        .and_then(|rest| rest.split(':').next())
        .ok_or_else(|| anyhow::anyhow!("no device address in the menu"))?;
    let body = shell(&format!("curl -sf --max-time 5 http://{first_ip}:8081/"))?;
    assert_eq!(body.trim(), "v1");

    // The progressive rollout example, verbatim: the canary first, then it waits
    // for a person; promoted, the other device follows after its bake time.
    let find = |pred: &dyn Fn(&str) -> bool, what: &str| {
        commands
            .iter()
            .find(|l| pred(l))
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no {what} line in the menu:\n{menu}"))
    };
    let apply_rollout = find(
        &|l| l.starts_with("kubectl apply -f") && l.ends_with("rollout.yaml"),
        "rollout example",
    )?;
    shell(apply_rollout)?;
    let status = find(
        &|l| l.starts_with("iotctl rollout status default/shop-web") && !l.contains("--watch"),
        "rollout status",
    )?;
    let promote = find(
        &|l| l.starts_with("iotctl rollout promote default/shop-web"),
        "rollout promote",
    )?;
    let watch = find(
        &|l| l.starts_with("iotctl rollout status default/shop-web --watch"),
        "rollout watch",
    )?;
    // `status` exits 1 until the rollout is complete: read its output either way.
    let status_now = || -> anyhow::Result<(bool, String)> {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && {status}", env_file.display()))
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let start = Instant::now();
    let waiting = loop {
        let (done, out) = status_now()?;
        anyhow::ensure!(!done, "complete before anyone promoted it:\n{out}");
        if out.contains("Paused") && out.contains("promote") {
            break out;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(90),
            "the canary never passed:\n{out}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("{waiting}");
    let body = shell(&format!("curl -sf --max-time 5 http://{first_ip}:8082/"))?;
    assert_eq!(body.trim(), "v1", "the canary runs it");
    shell(promote)?;
    shell(&format!("timeout 120 {watch}"))?;
    let (done, out) = status_now()?;
    assert!(done && out.contains("Complete"), "{out}");
    Ok(())
}

/// Runs `line` until `ok` accepts its output (Device status follows the first
/// reports by a second or two).
fn wait_until_shell(
    shell: &dyn Fn(&str) -> anyhow::Result<String>,
    line: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let out = shell(line)?;
        if ok(&out) {
            return Ok(out);
        }
        if start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("{line} never showed what was expected:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The tail of every log a failed run kept, for the failure message.
fn kept_logs(inst: &Instance) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(inst.state_dir().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        out.push_str(&format!("---- {} ----\n", entry.path().display()));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// With `--vm` the regression runs against a VM device booted by cloud-init on the
/// bridge (the netns device runs alongside); the other tests cover netns devices.
/// First a run is killed hard while its VM boots: the next run clears its qemu and
/// tap before it starts.
#[test]
fn auto_regression_on_a_vm_passes_after_a_killed_boot_and_leaves_nothing_behind() -> anyhow::Result<()> {
    let inst = Instance::new("iott1", 78)?;
    let log = inst.state.path().join("killed.log");
    let mut killed = inst.spawn(&["--vm", "--devices", "0"], &log)?;
    wait_for_output_while_running(&mut killed.0, &log, "kernel started", Duration::from_secs(600))?;
    killed.0.kill()?;
    killed.0.wait()?;
    // What it left, recorded now and asserted after the next run, which is what
    // removes it even when an assertion here would fail.
    let qemus: Vec<u32> = our_pids(&inst.state_dir())
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu-system")))
        .collect();
    let tap_left = Command::new("ip")
        .args(["link", "show", "iott1-t1"])
        .output()?
        .status
        .success();

    let out = inst.command(&["--auto", "--vm"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !qemus.is_empty() && tap_left,
        "a SIGKILLed run should leave its booting VM and tap for this test to be meaningful"
    );
    assert!(
        out.status.success(),
        "iot-up --auto failed:\n{stderr}\n{}",
        kept_logs(&inst)
    );
    assert!(
        stderr.contains("cleaning up what a previous run left behind"),
        "{stderr}"
    );
    // Gone, or a zombie nobody has reaped yet (its environment is empty then).
    let still = our_pids(&inst.state_dir());
    assert!(
        qemus.iter().all(|pid| !still.contains(pid)),
        "the killed run's qemu {qemus:?} is still running"
    );
    assert!(stderr.contains("ALL PASSED"), "{stderr}");
    for via in ["TypedApplier", "PrintedJson", "YamlManifest"] {
        assert!(stderr.contains(&format!("PASS {via}")), "{via} did not pass:\n{stderr}");
    }
    assert!(
        stderr.contains("regression via TypedApplier on iott1-vm-1 (10.78.99.101)"),
        "the regression ran against the VM:\n{stderr}"
    );
    assert!(
        stderr.contains("agent installed, starting under systemd") && stderr.contains("iott1-vm-1: guest x86_64"),
        "boot progress and the guest's own report:\n{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in output that is not a terminal"
    );
    inst.assert_clean();
    Ok(())
}

#[test]
fn hand_off_stops_cleanly_and_a_killed_run_is_cleaned_up_by_the_next() -> anyhow::Result<()> {
    let inst = Instance::new("iott2", 79)?;
    let log = inst.state.path().join("up.log");

    // Hand-off mode, two devices; SIGTERM tears everything down.
    let mut running = inst.spawn(&["--devices", "2"], &log)?;
    let child = &mut running.0;
    wait_for_output_while_running(child, &log, "Press Ctrl-C here to stop", Duration::from_secs(120))?;
    let text = std::fs::read_to_string(&log)?;
    for needle in [
        "Fleet dashboard (live, read-only)",
        "iott2-device-1@10.79.99.11",
        "iott2-device-2@10.79.99.12",
        "kubectl get deployments.iot.nationtech.io -A -w",
        "iotctl kv ls desired",
        "curl http://10.79.99.11:8080/",
        "curl http://10.79.99.12:8080/",
    ] {
        assert!(text.contains(needle), "menu lacks {needle:?}:\n{text}");
    }
    menu_commands_work_verbatim(&inst, &text)?;
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(term.success());
    let status = child.wait()?;
    assert!(status.success(), "exit after SIGTERM: {status}");
    wait_for_output(&log, "stopped cleanly", Duration::from_secs(5))?;
    inst.assert_clean();

    // Killed hard: it leaves processes, namespaces and state behind...
    let log2 = inst.state.path().join("up2.log");
    let mut killed = inst.spawn(&[], &log2)?;
    let child = &mut killed.0;
    wait_for_output_while_running(child, &log2, "Press Ctrl-C here to stop", Duration::from_secs(120))?;
    child.kill()?;
    child.wait()?;
    let left = our_pids(&inst.state_dir());

    // ...which the next run removes before it starts (asserted after it, so a
    // failure here still leaves nothing running).
    let out = inst.command(&["--auto"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !left.is_empty(),
        "a SIGKILLed run should leave processes for this test to be meaningful"
    );
    assert!(out.status.success(), "run after a killed run failed:\n{stderr}");
    assert!(
        stderr.contains("cleaning up what a previous run left behind"),
        "{stderr}"
    );
    inst.assert_clean();
    Ok(())
}

#[test]
fn ctrl_c_with_output_piped_through_tee_still_tears_down() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let inst = Instance::new("iott3", 80)?;
    let log = inst.state.path().join("tee.log");
    let cmd = inst.command(&[])?;
    // `iot-up ... 2>&1 | tee log`, in a process group of its own like a terminal job.
    let line = format!(
        "{} 2>&1 | tee {}",
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" "),
        log.display()
    );
    let mut shell = Command::new("bash");
    shell.arg("-c").arg(line).stdout(Stdio::null()).process_group(0);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            shell.env(k, v);
        }
    }
    let mut group = RunningGroup(shell.spawn()?);
    let child = &mut group.0;
    wait_for_output(&log, "Press Ctrl-C here to stop", Duration::from_secs(120))?;
    // Ctrl-C: SIGINT to the whole job, so tee dies too and stderr becomes a dead pipe.
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT)?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "not stopped after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Wait for iot-up itself (the pipeline's exit is tee's).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !our_pids(&inst.state_dir()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("pipeline exited with {status}");
    inst.assert_clean();
    Ok(())
}

/// `--sso`: people follow the menu. Each runs its `iotctl login` line verbatim
/// (the browser part done on the stand-in's own sign-in page), then its apply line
/// as themselves: dave's deployment runs on the device, vera's is refused by the
/// chart's RBAC under her own name. `iotctl logout` ends dave's session.
/// SIGTERM leaves nothing.
#[tokio::test]
async fn sso_menu_lines_work_verbatim_and_rbac_decides() -> anyhow::Result<()> {
    let inst = Instance::new("iott4", 81)?;
    let log = inst.state.path().join("up.log");
    let mut running = inst.spawn(&["--sso", "--devices", "1"], &log)?;
    wait_for_output_while_running(
        &mut running.0,
        &log,
        "Press Ctrl-C here to stop",
        Duration::from_secs(240),
    )?;
    let menu = std::fs::read_to_string(&log)?;
    let lines: Vec<&str> = menu.lines().map(str::trim).collect();
    let find = |prefix: &str, contains: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(prefix) && l.contains(contains))
            .map(|l| l.split("    #").next().unwrap_or(l).trim().to_owned())
            .ok_or_else(|| anyhow::anyhow!("no {prefix:?} line in the menu:\n{menu}"))
    };
    let login = find("iotctl login ", "--print-kubeconfig")?;
    let apply = find("KUBECONFIG=", "example_iot_apply_deployment --name mine")?;
    let logout = find("iotctl logout", "")?;
    for user in ["alice", "dave", "vera", "nora", "olga", "sam"] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{user} "))),
            "demo user {user} missing:\n{menu}"
        );
    }
    let env_file = inst.state_dir().join("env");
    let env = std::fs::read_to_string(&env_file)?;
    let ca_file = env
        .lines()
        .find_map(|l| l.strip_prefix("export IOT_OIDC_CA_FILE="))
        .ok_or_else(|| anyhow::anyhow!("no IOT_OIDC_CA_FILE in {}", env_file.display()))?
        .to_owned();
    // One shell per person: the menu's settings, and a config dir of their own
    // for the token cache (the kubeconfig path is the menu's, shared).
    let shell = |home: &Path, line: &str| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg("-c")
            .arg(format!("source {} && {line}", env_file.display()))
            .env("XDG_CONFIG_HOME", home)
            .env_remove("IOTCTL_CONFIG_DIR")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .kill_on_drop(true);
        cmd
    };
    let log_in = |user: &'static str| {
        let home = inst.state.path().join(format!("home-{user}"));
        let mut cmd = shell(&home, &login);
        let ca_file = ca_file.clone();
        async move {
            std::fs::create_dir_all(&home)?;
            let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
            let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
            let mut said = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
            let url = tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(line) = said.next_line().await? {
                    if line.trim().starts_with("https://") {
                        return Ok(line.trim().to_owned());
                    }
                }
                anyhow::bail!("the menu's login printed no URL")
            })
            .await??;
            let outcome = iot_testkit::SignIn::new(Path::new(&ca_file))?
                .complete(&url, user, &format!("{user}-dev"))
                .await?;
            anyhow::ensure!(outcome.status == 200, "sign-in as {user}: {outcome:?}");
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
            anyhow::ensure!(status.success(), "the menu's login as {user} failed");
            anyhow::Ok(home)
        }
    };
    // Run as a person would: wait for the apply's outcome; kube-apiserver 1.20
    // may still be fetching the issuer's keys (401) right after start.
    let run_apply = |home: &Path| {
        let mut cmd = shell(home, &format!("{apply} --wait 90s"));
        async move {
            let out = tokio::time::timeout(Duration::from_secs(150), cmd.output()).await??;
            anyhow::Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
        }
    };

    let dave = log_in("dave").await?;
    let (ok, err) = iot_testkit::wait_until(
        Duration::from_secs(60),
        "dave's apply past the API server's start",
        || async {
            let r = run_apply(&dave).await.ok()?;
            if r.1.contains("Unauthorized") {
                tokio::time::sleep(Duration::from_secs(2)).await;
                return None;
            }
            Some(r)
        },
    )
    .await?;
    // --wait returns once the device runs it.
    assert!(ok, "dave's apply from the menu failed: {err}");

    let vera = log_in("vera").await?;
    let (ok, err) = run_apply(&vera).await?;
    assert!(!ok, "vera (a viewer) changed a deployment");
    assert!(
        err.contains("not allowed by the cluster's RBAC") && err.contains("vera@fleet.example"),
        "vera's refusal should say why and name her: {err}"
    );

    let out = shell(&dave, &logout).output().await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, err) = run_apply(&dave).await?;
    assert!(
        !ok && err.contains("not logged in") && err.contains("Log in again with: iotctl login"),
        "after logout dave is asked to log in: {err}"
    );

    let child = &mut running.0;
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(term.success());
    let stop_by = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        anyhow::ensure!(Instant::now() < stop_by, "iot-up did not stop within 60 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    inst.assert_clean();
    Ok(())
}

#[test]
fn cluster_mode_runs_the_platform_as_pods_and_a_killed_run_is_reaped() -> anyhow::Result<()> {
    let inst = Instance::new("iott5", 82)?;
    // Two NATS shapes at once cannot be: refused before anything starts.
    let out = inst.command(&["--cluster", "--nats-cluster", "3"])?.output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("choose one"), "{stderr}");
    for other in ["--insecure", "--sso"] {
        let out = inst.command(&["--cluster", other])?.output()?;
        assert!(!out.status.success(), "--cluster {other} was accepted");
    }
    assert!(!inst.state_dir().exists(), "a refused run started something");

    // Hand-off: the menu's cluster lines work as printed.
    let log = inst.state.path().join("up.log");
    let mut killed = inst.spawn(&["--cluster", "--devices", "1"], &log)?;
    let child = &mut killed.0;
    wait_for_output_while_running(child, &log, "Press Ctrl-C here to stop", Duration::from_secs(240))?;
    let text = std::fs::read_to_string(&log)?;
    let shell = |line: &str| menu_shell(&inst, line);
    let menu_line = |start: &str| -> anyhow::Result<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(start))
            .map(|l| l.split("   #").next().unwrap_or(l).to_owned())
            .ok_or_else(|| anyhow::anyhow!("menu lacks {start:?}:\n{text}"))
    };
    let pods = shell(&menu_line("kubectl get pods -A")?)?;
    for pod in ["nats-iot-nats-", "iot-iot-operator-"] {
        assert!(
            pods.lines().any(|l| l.contains(pod) && l.contains("Running")),
            "{pod} not Running:\n{pods}"
        );
    }
    let lease = shell(&menu_line("kubectl -n iot-system get lease")?)?;
    assert!(lease.trim().starts_with("iot-iot-operator-"), "{lease}");
    let history_line = text
        .lines()
        .map(str::trim)
        .find(|l| l.contains("helm.py history "))
        .ok_or_else(|| anyhow::anyhow!("no helm history line:\n{text}"))?;
    let history = shell(history_line)?;
    assert!(history.contains("deployed"), "{history}");

    // Killed hard: its node (pods, mounts, cgroups, namespace) is left behind...
    child.kill()?;
    child.wait()?;
    assert!(
        !our_pids(&inst.state_dir()).is_empty(),
        "a SIGKILLed run should leave processes for this test to be meaningful"
    );
    // ...and the next run removes it before it starts, then passes the regression.
    let out = inst.command(&["--cluster", "--auto"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run after a killed run failed:\n{stderr}");
    assert!(
        stderr.contains("removed the single-node Kubernetes upiott5"),
        "{stderr}"
    );
    assert!(stderr.contains("ALL PASSED"), "{stderr}");
    inst.assert_clean();
    let netns = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout).into_owned();
    assert!(!netns.contains("iotk-upiott5"), "{netns}");
    assert!(!Path::new("/run/iot-kube-node/upiott5.json").exists());
    Ok(())
}
