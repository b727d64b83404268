use std::net::TcpListener;
use std::process::Child;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1, bound then released, and never handed out twice by
/// this process. A test asks for a port long before anything listens on it (an agent
/// publishes a container there only once the operator dispatched), so without the
/// ledger a parallel test could be given the same port meanwhile and be answered by
/// the other test's container.
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 that this process has not handed out already")
}

/// Whether process `pid` itself holds a listening TCP socket on `port` (read from
/// `/proc`, in the process's own network namespace). Two bring-ups that both found
/// a port free may both start a server on it: the loser exits, and its health check
/// would be answered by the winner, so a readiness check must also ask who listens.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9)) else {
                continue;
            };
            let local_port = local.rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
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

/// Asks a child to stop (SIGTERM), waits up to `grace`, then kills it; reaps it.
/// Daemons get the chance to finish cleanly, as under systemd.
pub fn terminate_child(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait()
        && let Ok(pid) = i32::try_from(child.id())
    {
        let pid = nix::unistd::Pid::from_raw(pid);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            tracing::debug!(pid = child.id(), error = %e, "SIGTERM failed");
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    kill_child(child);
}

/// Sends SIGKILL to a process that is not our child (one a killed run left behind).
pub fn kill_pid(pid: u32) -> anyhow::Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
    Ok(())
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

    /// SIGKILL, like a crash or a power cut.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`: a clean stop.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            terminate_child(&mut c, grace);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_counts_as_ours_only_while_we_hold_it() -> anyhow::Result<()> {
        let me = std::process::id();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        assert!(listens_on(me, port));
        drop(listener);
        assert!(!listens_on(me, port));
        // Another process's listener answers on the port, but is not ours: what a
        // health check alone cannot tell apart.
        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\nprint(s.getsockname()[1],flush=True)\ntime.sleep(30)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = other.stdout.take() {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
        }
        let theirs: u16 = line.trim().parse()?;
        assert!(listens_on(other.id(), theirs));
        assert!(!listens_on(me, theirs));
        other.kill()?;
        other.wait()?;
        Ok(())
    }
}
