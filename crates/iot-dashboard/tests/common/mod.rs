//! Shared by the browser tests: headless Chromium through chromedriver, page text
//! readers, screenshots, and the dashboard process.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use fantoccini::{Client, ClientBuilder};
use iot_e2e::stack::*;
use iot_testkit::{LoggedProcess, cargo_bin, free_port, wait_until};
use serde_json::json;

pub struct Browser {
    pub client: Client,
    _driver: LoggedProcess,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// chromedriver's Chromium outlives a killed chromedriver; its profile
    /// directory, unique to this browser, names exactly its processes.
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(self.profile.path())
            .status();
    }
}

pub async fn browser(log_dir: &std::path::Path) -> anyhow::Result<Browser> {
    browser_with(log_dir, &[]).await
}

/// [`browser`] with extra Chromium flags.
pub async fn browser_with(log_dir: &std::path::Path, extra_args: &[String]) -> anyhow::Result<Browser> {
    let port = free_port()?;
    let mut cmd = Command::new("/usr/bin/chromedriver");
    cmd.arg(format!("--port={port}"));
    let driver = LoggedProcess::spawn("chromedriver", cmd, log_dir.join("chromedriver.log"))?;
    // chromedriver keeps connections alive, so wait for its port, not an HTTP/1.0 reply.
    wait_until(WAIT, "chromedriver", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
    })
    .await?;
    let profile = tempfile::tempdir()?;
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.path().display()));
    args.extend(extra_args.iter().cloned());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": "/usr/bin/chromium", "args": args }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await?;
    Ok(Browser {
        client,
        _driver: driver,
        profile,
    })
}

/// Text of the first element matching `selector`, read in the page (no stale
/// element handles across live updates).
pub async fn text(c: &Client, selector: &str) -> Option<String> {
    let v = c
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
            vec![json!(selector)],
        )
        .await
        .ok()?;
    v.as_str().map(str::to_owned)
}

pub async fn wait_text(c: &Client, selector: &str, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let r = wait_until(WAIT, what, || async { text(c, selector).await.filter(|t| pred(t)) }).await;
    if r.is_err() {
        eprintln!("last text of {selector}: {:?}", text(c, selector).await);
    }
    r
}

pub fn screenshots_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub async fn screenshot(c: &Client, name: &str) -> anyhow::Result<()> {
    let png = c.screenshot().await?;
    anyhow::ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(screenshots_dir()?.join(format!("{name}.png")), png)?;
    Ok(())
}

pub fn spawn_dashboard(stack: &Stack, stale_after: &str) -> anyhow::Result<(LoggedProcess, u16)> {
    spawn_dashboard_with(stack, stale_after, &[])
}

/// [`spawn_dashboard`] with extra environment (e.g. the OIDC settings).
pub fn spawn_dashboard_with(
    stack: &Stack,
    stale_after: &str,
    env: &[(&str, String)],
) -> anyhow::Result<(LoggedProcess, u16)> {
    let port = free_port()?;
    let mut cmd = Command::new(cargo_bin("iot-dashboard")?);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    cmd.env("KUBECONFIG", stack.kubeconfig())
        .env("NATS_URL", stack.nats.url())
        .env("IOT_DASHBOARD_ADDR", format!("127.0.0.1:{port}"))
        .env("IOT_STALE_AFTER", stale_after)
        .env("RUST_LOG", "info");
    let p = LoggedProcess::spawn("iot-dashboard", cmd, stack.dir.path().join("dashboard.log"))?;
    Ok((p, port))
}

/// Waits until the dashboard on `port` reports ready.
pub async fn wait_dashboard(port: u16) -> anyhow::Result<()> {
    wait_until(WAIT, "dashboard /readyz", || async {
        (iot_testkit::http::get_status("127.0.0.1", port, "/readyz").await.ok()? == 200).then_some(())
    })
    .await
}
