//! Shared by the browser tests: headless Chromium through chromedriver, page text
//! readers, screenshots, and the dashboard process.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use fantoccini::Client;
use iot_e2e::stack::*;
use iot_testkit::{LoggedProcess, cargo_bin, free_port, wait_until};
use serde_json::json;

pub use iot_testkit::browser::{Browser, browser_with};

pub async fn browser(log_dir: &std::path::Path) -> anyhow::Result<Browser> {
    browser_with(log_dir, &[]).await
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

/// A string the script returns, read in the page (`None` for null or an error).
pub async fn eval_string(c: &Client, script: &str) -> Option<String> {
    c.execute(script, vec![]).await.ok()?.as_str().map(str::to_owned)
}

/// Runs `act` (find elements, then type or click) again when the live script
/// replaced `<main>` between finding an element and using it, as a person whose
/// page changed under the pointer would simply do it again. Any other error ends it.
pub async fn on_live_page<F, Fut>(what: &str, mut act: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), fantoccini::error::CmdError>>,
{
    let mut replaced = 0;
    loop {
        match act().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_stale_element_reference() && replaced < 5 => {
                replaced += 1;
                eprintln!("{what}: the page was updated under the test ({replaced}), again");
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{what} (after {replaced} live updates)"))),
        }
    }
}

pub async fn wait_text(c: &Client, selector: &str, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let r = wait_until(WAIT, what, || async { text(c, selector).await.filter(|t| pred(t)) }).await;
    if r.is_err() {
        eprintln!("last text of {selector}: {:?}", text(c, selector).await);
    }
    r
}

/// Loads `url` and waits until `selector`'s text satisfies `pred`, loading it again
/// while it does not: Chromium aborts a load when the host's network interfaces
/// change (a device's new container adds a veth), and a person would reload.
pub async fn goto_until(
    c: &Client,
    url: &str,
    selector: &str,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let r = wait_until(WAIT, what, || async {
        if let Some(t) = text(c, selector).await.filter(|t| pred(t)) {
            return Some(t);
        }
        let aborted = text(c, "body")
            .await
            .is_none_or(|t| t.contains("network change was detected"));
        let elsewhere = c.current_url().await.map(|u| u.as_str() != url).unwrap_or(true);
        if aborted || elsewhere {
            let _ = c.goto(url).await;
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        None
    })
    .await;
    if r.is_err() {
        eprintln!("last text of {selector} at {url}: {:?}", text(c, selector).await);
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
    stack.trust(&mut cmd);
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
