use std::net::TcpListener;
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An id unique across parallel tests and test binaries: prefix, pid, counter.
pub fn unique_id(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills and reaps a child process, ignoring "already exited".
pub fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait()
        && let Err(e) = child.kill()
    {
        tracing::warn!(pid = child.id(), error = %e, "failed to kill child process");
    }
    if let Err(e) = child.wait() {
        tracing::warn!(pid = child.id(), error = %e, "failed to reap child process");
    }
}

/// A child process with its output in a log file; killed on drop, and its log
/// printed if the test is failing.
pub struct LoggedProcess {
    pub name: String,
    child: Option<Child>,
    pub log: std::path::PathBuf,
}

impl LoggedProcess {
    pub fn spawn(name: &str, mut cmd: std::process::Command, log: std::path::PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = cmd
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }
}

impl Drop for LoggedProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("---- last lines of {} log ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Path of a workspace binary, built (once per test process) with `cargo build`, so
/// end-to-end tests never run a stale binary.
pub fn cargo_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::sync::OnceLock;
    static BUILD: OnceLock<Result<(), String>> = OnceLock::new();
    let root = crate::paths::repo_root();
    let built = BUILD.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .current_dir(&root)
            .args(["build", "-q", "--workspace", "--bins"])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = built {
        anyhow::bail!("cargo build of the workspace binaries failed: {e}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join(name);
    anyhow::ensure!(path.exists(), "{} does not exist after building", path.display());
    Ok(path)
}

/// Runs a command to completion with `stdin` fed in; returns (success, stdout, stderr).
pub fn run_captured(mut cmd: std::process::Command, stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut sin) = child.stdin.take() {
        sin.write_all(stdin.unwrap_or("").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
