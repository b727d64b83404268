//! Helm, through the project's own wrapper around Helm's Go SDK (`hack/helm.py`, on
//! helm-python-sdk: no `helm` binary can be fetched on these machines). Every result
//! and error text is Helm's.

use std::path::PathBuf;
use std::process::Command;

/// `deploy/chart/<name>` in this repository.
pub fn chart_dir(name: &str) -> PathBuf {
    crate::paths::repo_root().join("deploy/chart").join(name)
}

/// The wrapper script, for commands shown to people.
pub fn wrapper() -> PathBuf {
    crate::paths::repo_root().join("hack/helm.py")
}

/// Runs `hack/helm.py ARGS`; returns (success, stdout, stderr).
pub fn helm(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new("python3");
    cmd.arg(wrapper()).args(args);
    crate::process::run_captured(cmd, None)
}

/// [`helm`], failing with Helm's error text.
pub fn helm_ok(args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = helm(args)?;
    anyhow::ensure!(ok, "helm {}: {err}", args.join(" "));
    Ok(out)
}
