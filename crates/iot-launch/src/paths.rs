//! Where binaries built or installed by `scripts/setup-host.sh` live.

use std::path::PathBuf;

/// `$IOT_CACHE`, else `$XDG_CACHE_HOME/harmony-iot`, else `~/.cache/harmony-iot`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IOT_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("harmony-iot")
}

/// Finds a tool: `$<env_var>`, then the project cache, then `PATH`.
pub fn find_binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(p.into());
    }
    let cached = cache_dir().join("bin").join(name);
    if cached.exists() {
        return Ok(cached);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    anyhow::bail!(
        "{name} not found (looked at ${env_var}, {}, PATH); run scripts/setup-host.sh",
        cached.display()
    )
}

/// The repository root (for dev/containers.conf and the like).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The podman settings this dev/test machine needs (see dev/containers.conf).
pub fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("dev/containers.conf"))
}
