//! Hardware and OS facts reported with the status.

use harmony_reconciler_contracts::InventorySnapshot;

use crate::decode::AGENT_VERSION;

/// Reads the snapshot from /proc, /etc/os-release and statvfs("/"). Missing facts
/// are left empty rather than failing: inventory is informative.
pub fn collect() -> InventorySnapshot {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let memory_bytes = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let (disk_total_bytes, disk_free_bytes) = match nix::sys::statvfs::statvfs("/") {
        Ok(s) => {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        }
        Err(e) => {
            tracing::debug!(error = %e, "statvfs(/) failed");
            (0, 0)
        }
    };
    InventorySnapshot {
        hostname: read("/proc/sys/kernel/hostname"),
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(0),
        memory_bytes,
        disk_total_bytes,
        disk_free_bytes,
        kernel: read("/proc/sys/kernel/osrelease"),
        arch: std::env::consts::ARCH.to_owned(),
        os,
        agent_version: AGENT_VERSION.to_owned(),
    }
}

/// True if the change is worth a log line (free disk space moves all the time).
pub fn materially_changed(a: &InventorySnapshot, b: &InventorySnapshot) -> bool {
    let strip = |s: &InventorySnapshot| InventorySnapshot {
        disk_free_bytes: 0,
        ..s.clone()
    };
    strip(a) != strip(b)
}
