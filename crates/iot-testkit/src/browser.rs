//! Headless Chromium (Debian's) driven through the local chromedriver by
//! fantoccini: for the dashboard's browser tests and its render benchmark. No
//! browser or driver is downloaded.

use std::process::Command;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::json;

use crate::{LoggedProcess, free_port, wait_until};

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

/// Starts chromedriver and a headless Chromium with its own profile (and
/// `extra_args`); both go when the [`Browser`] drops.
pub async fn browser_with(log_dir: &std::path::Path, extra_args: &[String]) -> anyhow::Result<Browser> {
    let port = free_port()?;
    let mut cmd = Command::new("/usr/bin/chromedriver");
    cmd.arg(format!("--port={port}"));
    let driver = LoggedProcess::spawn("chromedriver", cmd, log_dir.join("chromedriver.log"))?;
    // chromedriver keeps connections alive, so wait for its port, not an HTTP/1.0 reply.
    wait_until(Duration::from_secs(60), "chromedriver", || async {
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
