//! Talking to a running VM from the host: qemu's human monitor (power buttons) and
//! the qemu guest agent inside it (run a command, read its output), both over unix
//! sockets the VM's qemu serves.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// One command on qemu's human monitor; returns what it printed.
pub async fn monitor(socket: &Path, command: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow::anyhow!("monitor {} did not accept", socket.display()))??;
    read_until_prompt(&mut s).await?;
    s.write_all(format!("{command}\n").as_bytes()).await?;
    let out = read_until_prompt(&mut s).await?;
    Ok(out.lines().skip(1).collect::<Vec<_>>().join("\n"))
}

async fn read_until_prompt(s: &mut UnixStream) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.ends_with(b"(qemu) ") {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .map_err(|_| anyhow::anyhow!("qemu monitor did not answer"))??;
        anyhow::ensure!(n > 0, "qemu monitor closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    // The monitor echoes with terminal escapes; keep the printable text.
    let text = String::from_utf8_lossy(&buf).replace("\r", "");
    Ok(text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control() || *c == '\t').collect::<String>())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// What a command run in the guest printed.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` in the guest through the qemu guest agent and waits for it.
/// Fails if the agent does not answer within `timeout` (not booted yet, say).
pub async fn exec(socket: &Path, argv: &[&str], timeout: Duration) -> anyhow::Result<GuestOutput> {
    let (path, args) = argv.split_first().ok_or_else(|| anyhow::anyhow!("empty command"))?;
    let deadline = Instant::now() + timeout;
    let mut qga = Qga::connect(socket, deadline).await?;
    let started = qga
        .call(
            &json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args, "capture-output": true}}),
            deadline,
        )
        .await?;
    let pid = started["pid"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("guest-exec gave no pid: {started}"))?;
    loop {
        let status = qga
            .call(
                &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
                deadline,
            )
            .await?;
        if status["exited"].as_bool() == Some(true) {
            let text = |key: &str| -> String {
                status[key]
                    .as_str()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            return Ok(GuestOutput {
                exit_code: status["exitcode"].as_i64().unwrap_or(-1),
                stdout: text("out-data"),
                stderr: text("err-data"),
            });
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} still running in the guest after {timeout:?}",
            argv.join(" ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Qga {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qga {
    /// Connects and synchronises: the socket may hold a previous client's answers,
    /// so send a random sync id and skip everything up to its echo.
    async fn connect(socket: &Path, deadline: Instant) -> anyhow::Result<Self> {
        let s = UnixStream::connect(socket)
            .await
            .map_err(|e| anyhow::anyhow!("guest agent socket {}: {e}", socket.display()))?;
        let (r, w) = s.into_split();
        let mut qga = Qga {
            reader: BufReader::new(r),
            writer: w,
        };
        // Until qemu-ga runs, qemu queues what is sent and qemu-ga later answers all
        // of it: each attempt gets a fresh id, and answers to older ones are read
        // past, so nothing stale is left for the next call.
        static SYNCS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        loop {
            let id =
                i64::from(std::process::id()) * 1_000_000 + SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sync = json!({"execute": "guest-sync", "arguments": {"id": id}});
            qga.writer.write_all(format!("{sync}\n").as_bytes()).await?;
            let try_until =
                Instant::now() + Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now()));
            loop {
                match qga.read_answer(try_until).await {
                    Ok(v) if v.as_i64() == Some(id) => return Ok(qga),
                    Ok(_) => continue,
                    Err(_) if Instant::now() < deadline => break,
                    Err(e) => return Err(e.context("the guest agent did not answer (has the VM booted?)")),
                }
            }
        }
    }

    async fn call(&mut self, request: &Value, deadline: Instant) -> anyhow::Result<Value> {
        self.writer.write_all(format!("{request}\n").as_bytes()).await?;
        self.read_answer(deadline).await
    }

    /// The next answer (`return` value) on the socket; an `error` fails.
    async fn read_answer(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.reader.read_line(&mut line))
                .await
                .map_err(|_| anyhow::anyhow!("no answer from the guest agent"))??;
            anyhow::ensure!(n > 0, "guest agent socket closed");
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            if let Some(e) = v.get("error") {
                anyhow::bail!("guest agent: {e}");
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }
}
