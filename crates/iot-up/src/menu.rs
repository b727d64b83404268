//! The hand-off: an env file and a menu of exact commands with real values.

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

fn say(m: &mut String, line: impl AsRef<str>) {
    m.push_str(line.as_ref());
    m.push('\n');
}

pub fn print(up: &Up) {
    let d = &up.devices[0];
    let mut m = String::new();
    let env = env_file(up);
    say(
        &mut m,
        "\n\x1b[1;32mThe platform is up.\x1b[0m Open another terminal and load its settings:\n",
    );
    say(&mut m, format!("  source {}\n", env.display()));
    say(&mut m, "\x1b[1mWatch resources\x1b[0m");
    say(&mut m, "  kubectl get deployments.iot.nationtech.io -A -w");
    say(&mut m, "  iotctl deployments");
    say(
        &mut m,
        format!(
            "\n\x1b[1mDeploy a web server to {} with the typed applier\x1b[0m (v1 and v2 images are built locally)",
            d.id
        ),
    );
    say(
        &mut m,
        format!(
            "  example_iot_apply_deployment --name web --target-device {} --image localhost/iot-web:v1 --port 8080",
            d.id
        ),
    );
    say(&mut m, "  # the same resource through kubectl:");
    say(
        &mut m,
        format!(
            "  example_iot_apply_deployment --name web --target-device {} --image localhost/iot-web:v1 --port 8080 --print | kubectl apply -f -",
            d.id
        ),
    );
    say(&mut m, "  # upgrade, wait until every device runs it, then delete:");
    say(
        &mut m,
        format!(
            "  example_iot_apply_deployment --name web --target-device {} --image localhost/iot-web:v2 --port 8080 --wait 60s",
            d.id
        ),
    );
    say(&mut m, "  example_iot_apply_deployment --name web --delete");
    say(&mut m, "\n\x1b[1mCurl the service on the device\x1b[0m");
    for dev in &up.devices {
        say(&mut m, format!("  curl http://{}:8080/        # {}", dev.ip, dev.id));
    }
    say(
        &mut m,
        "\n\x1b[1mInspect NATS KV\x1b[0m (instead of nats-box: no image can be pulled here)",
    );
    say(&mut m, "  iotctl kv ls desired");
    say(&mut m, format!("  iotctl kv get desired {} default/web", d.id));
    say(&mut m, format!("  iotctl kv get status {}", d.id));
    say(&mut m, "  iotctl devices");
    say(&mut m, "\n\x1b[1mContainers on a device\x1b[0m");
    for dev in &up.devices {
        say(
            &mut m,
            format!(
                "  podman --url unix://{} ps -a       # {}",
                dev.podman_socket.display(),
                dev.id
            ),
        );
    }
    say(
        &mut m,
        format!(
            "  nsenter --net=/var/run/netns/iotup-{} ip addr   # a shell-level look inside the device",
            d.index
        ),
    );
    say(&mut m, "\n\x1b[1mLogs\x1b[0m");
    say(&mut m, format!("  tail -f {}/operator.log", up.logs_dir().display()));
    for dev in &up.devices {
        say(
            &mut m,
            format!("  tail -f {}/agent-{}.log", up.logs_dir().display(), dev.id),
        );
    }
    if let Some(api) = &up.api {
        say(&mut m, format!("  tail -f {}/apiserver.log", api.dir().display()));
    }
    if let Some(nats) = &up.nats {
        say(&mut m, format!("  tail -f {}", nats.log_path().display()));
    }
    say(&mut m, "\nPress Ctrl-C here to stop everything and clean up.");
    eprintln!("{m}");
}
