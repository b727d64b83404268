//! The hand-off: an env file and a menu of exact commands with real values.

use std::fmt::Write as _;

use crate::up::Up;

pub fn env_file(up: &Up) -> std::path::PathBuf {
    up.state_dir.join("env")
}

/// `source`-able settings, so the menu's commands stay short.
pub fn write_env_file(up: &Up) -> anyhow::Result<()> {
    let text = format!(
        "export KUBECONFIG={}\nexport NATS_URL={}\nexport CONTAINERS_CONF={}\nexport PATH={}:$PATH\n",
        up.kubeconfig().display(),
        up.nats_url(),
        up.containers_conf.display(),
        up.bin_dir.display()
    );
    std::fs::write(env_file(up), text)?;
    Ok(())
}

pub fn print(up: &Up) {
    let d = &up.devices[0];
    let mut m = String::new();
    let env = env_file(up);
    let _ = writeln!(
        m,
        "\n\x1b[1;32mThe platform is up.\x1b[0m Open another terminal and load its settings:\n"
    );
    let _ = writeln!(m, "  source {}\n", env.display());
    let _ = writeln!(m, "\x1b[1mWatch resources\x1b[0m");
    let _ = writeln!(m, "  kubectl get deployments.iot.nationtech.io -A -w");
    let _ = writeln!(m, "  iotctl deployments");
    let _ = writeln!(
        m,
        "\n\x1b[1mDeploy a web server to {} with the typed applier\x1b[0m (v1 and v2 images are built locally)",
        d.id
    );
    let _ = writeln!(
        m,
        "  example_iot_apply_deployment --name web --target-device {} --image localhost/iot-web:v1 --port 8080",
        d.id
    );
    let _ = writeln!(m, "  # the same resource through kubectl:");
    let _ = writeln!(
        m,
        "  example_iot_apply_deployment --name web --target-device {} --image localhost/iot-web:v1 --port 8080 --print | kubectl apply -f -",
        d.id
    );
    let _ = writeln!(m, "  # upgrade, wait until every device runs it, then delete:");
    let _ = writeln!(
        m,
        "  example_iot_apply_deployment --name web --target-device {} --image localhost/iot-web:v2 --port 8080 --wait 60s",
        d.id
    );
    let _ = writeln!(m, "  example_iot_apply_deployment --name web --delete");
    let _ = writeln!(m, "\n\x1b[1mCurl the service on the device\x1b[0m");
    for dev in &up.devices {
        let _ = writeln!(m, "  curl http://{}:8080/        # {}", dev.ip, dev.id);
    }
    let _ = writeln!(
        m,
        "\n\x1b[1mInspect NATS KV\x1b[0m (instead of nats-box: no image can be pulled here)"
    );
    let _ = writeln!(m, "  iotctl kv ls desired");
    let _ = writeln!(m, "  iotctl kv get desired {} default/web", d.id);
    let _ = writeln!(m, "  iotctl kv get status {}", d.id);
    let _ = writeln!(m, "  iotctl devices");
    let _ = writeln!(m, "\n\x1b[1mContainers on a device\x1b[0m");
    for dev in &up.devices {
        let _ = writeln!(
            m,
            "  podman --url unix://{} ps -a       # {}",
            dev.podman_socket.display(),
            dev.id
        );
    }
    let _ = writeln!(
        m,
        "  nsenter --net=/var/run/netns/iotup-{} ip addr   # a shell-level look inside the device",
        d.index
    );
    let _ = writeln!(m, "\n\x1b[1mLogs\x1b[0m");
    let _ = writeln!(m, "  tail -f {}/operator.log", up.logs_dir().display());
    for dev in &up.devices {
        let _ = writeln!(m, "  tail -f {}/agent-{}.log", up.logs_dir().display(), dev.id);
    }
    if let Some(api) = &up.api {
        let _ = writeln!(m, "  tail -f {}/apiserver.log", api.dir().display());
    }
    if let Some(nats) = &up.nats {
        let _ = writeln!(m, "  tail -f {}", nats.log_path().display());
    }
    let _ = writeln!(m, "\nPress Ctrl-C here to stop everything and clean up.");
    eprintln!("{m}");
}
