//! The operator as `iot-up` and the tests start it: one way to install the CRD and
//! one way to build the `iot-operator run` command, so the bring-up and the tests
//! cannot drift apart. Callers add what is theirs (TLS trust, timings, extra
//! environment) to the command.

use std::path::Path;
use std::process::Command;

/// `iot-operator install`: applies the CRD and waits until it is Established.
pub fn install_crd(operator_bin: &Path, kubeconfig: &Path) -> anyhow::Result<()> {
    let out = Command::new(operator_bin)
        .env("KUBECONFIG", kubeconfig)
        .args(["install", "--timeout", "60s"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "iot-operator install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `iot-operator run` against `kubeconfig` and `nats_url`, serving its probes on
/// 127.0.0.1:`http_port`, as the NATS identity in `enrollment` when given.
pub fn run_command(
    operator_bin: &Path,
    kubeconfig: &Path,
    nats_url: &str,
    http_port: u16,
    enrollment: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(operator_bin);
    cmd.env("KUBECONFIG", kubeconfig)
        .env("NATS_URL", nats_url)
        .env("IOT_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("RUST_LOG", "info")
        .arg("run");
    if let Some(enrollment) = enrollment {
        cmd.env("NATS_IDENTITY", enrollment);
    }
    cmd
}
