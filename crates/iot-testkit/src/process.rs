//! Test-only process helpers.

use std::sync::atomic::{AtomicU32, Ordering};

/// An id unique across parallel tests and test binaries: prefix, pid, counter.
pub fn unique_id(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// Path of a workspace binary, built (once per test process) with `cargo build`, so
/// end-to-end tests never run a stale binary.
pub fn cargo_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::sync::OnceLock;
    static BUILD: OnceLock<Result<(), String>> = OnceLock::new();
    let root = iot_launch::paths::repo_root();
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
