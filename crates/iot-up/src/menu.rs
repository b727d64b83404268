//! The hand-off: an env file and a menu of exact commands with real values.

use crate::out;
use crate::up::Up;

pub fn env_file(up: &Up) -> std::path::PathBuf {
    up.state_dir.join("env")
}

/// `source`-able settings, so the menu's commands stay short.
pub fn write_env_file(up: &Up) -> anyhow::Result<()> {
    let mut text = format!(
        "export KUBECONFIG={}\nexport NATS_URL={}\nexport CONTAINERS_CONF={}\nexport PATH={}:$PATH\n",
        up.kubeconfig().display(),
        up.nats_url(),
        up.containers_conf.display(),
        up.bin_dir.display()
    );
    match up.ca_file() {
        // Every client verifies NATS and OpenBao against the stack's own CA.
        Some(ca) => text.push_str(&format!(
            "export NATS_CA_FILE={}\nexport BAO_CACERT={}\n",
            ca.display(),
            ca.display()
        )),
        None => text.push_str("export NATS_INSECURE=true\n"),
    }
    if let Some(sec) = &up.security {
        // The development admin (bypasses the callout) for iotctl, and OpenBao's
        // root token for enrolling: a local stack's conveniences, nothing a device
        // ever gets.
        text.push_str(&format!(
            "export NATS_USER=admin\nexport NATS_PASSWORD={}\nexport NATS_DEV_SHARED_CREDENTIALS=true\nexport NATS_SYSTEM_PASSWORD={}\nexport BAO_ADDR={}\nexport BAO_TOKEN={}\n",
            sec.keys.admin_password,
            sec.keys.system_password,
            sec.bao.addr(),
            sec.bao.root_token()
        ));
    }
    if let Some(sso) = &up.sso {
        // So `iotctl login` and `iotctl credential` need no flags.
        text.push_str(&format!(
            "export IOT_OIDC_ISSUER={}\nexport IOT_OIDC_CA_FILE={}\nexport IOT_OIDC_CLIENT_ID={}\n",
            sso.oidc.issuer(),
            sso.oidc.ca_file().display(),
            iot_launch::oidc::FLEET_CLIENT_ID
        ));
    }
    iot_launch::auth::write_private(&env_file(up), &text)
}

/// Where the menu suggests people keep their SSO kubeconfig.
pub fn sso_kubeconfig(up: &Up) -> std::path::PathBuf {
    up.state_dir.join("kubeconfig-sso")
}

fn sso_section(m: &mut String, up: &Up) {
    let Some(sso) = &up.sso else {
        return;
    };
    let kubeconfig = sso_kubeconfig(up);
    line(
        m,
        format!(
            "{} (OIDC stand-in for Zitadel at {}; the API server turns groups into RBAC)",
            out::bold("Single sign-on"),
            sso.oidc.issuer()
        ),
    );
    line(m, format!("  {}", crate::sso::login_command(sso, &kubeconfig)));
    line(
        m,
        "  # prints a URL to open (a browser opens if there is one); add --device-code on a shell without one",
    );
    line(
        m,
        format!(
            "  KUBECONFIG={} kubectl get deployments.iot.nationtech.io -A",
            kubeconfig.display()
        ),
    );
    line(
        m,
        format!(
            "  KUBECONFIG={} example_iot_apply_deployment --name mine --target-device {} --image localhost/iot-web:v1",
            kubeconfig.display(),
            up.devices.first().map(|d| d.id.as_str()).unwrap_or("DEVICE")
        ),
    );
    line(
        m,
        "  iotctl logout    # forget the session and revoke its refresh token",
    );
    line(m, "  Demo users (password: <user>-dev), what they may do:");
    for (user, groups, may) in crate::sso::DEMO_USERS {
        line(m, format!("    {user:<6} {groups:<52} {may}"));
    }
}

pub(crate) fn line(m: &mut String, text: impl AsRef<str>) {
    m.push_str(text.as_ref());
    m.push('\n');
}

/// Everything the main command prints once the platform is up: how to reach,
/// drive and watch each part.
pub fn print(up: &Up) {
    let mut m = String::new();
    // The suggested deployment targets every device, so every curl below answers.
    let all: Vec<(String, String)> = up
        .devices
        .iter()
        .map(|d| (d.id.clone(), d.ip.clone()))
        .chain(up.vms.iter().map(|v| (v.id.clone(), v.ip.clone())))
        .collect();
    let first = up.target().map(|(id, _)| id).unwrap_or_default();
    line(
        &mut m,
        format!(
            "\n{} Open another terminal and load its settings:\n",
            out::good("The platform is up.")
        ),
    );
    line(&mut m, format!("  source {}\n", env_file(up).display()));
    dashboard_section(&mut m, up);
    sso_section(&mut m, up);
    if up.sso.is_some() {
        line(&mut m, "");
    }
    deploy_section(&mut m, &all);
    crate::registry::section(&mut m, up);
    fleet_section(&mut m, &first);
    kv_section(&mut m, &first);
    cluster_section(&mut m, up);
    crate::node_menu::section(&mut m, up);
    netns_section(&mut m, up);
    vm_section(&mut m, up);
    identity_section(&mut m, up, &first);
    metrics_section(&mut m, up, &all);
    logs_section(&mut m, up);
    line(&mut m, "\nPress Ctrl-C here to stop everything and clean up.");
    crate::print_line(&m);
}

/// The dashboard's address, and whether people can change things there.
fn dashboard_section(m: &mut String, up: &Up) {
    if let Some(addr) = &up.dashboard_addr {
        if up.sso.is_some() {
            line(
                m,
                out::bold("Fleet dashboard (live; sign in as a demo user below to change deployments as them)"),
            );
        } else {
            line(m, out::bold("Fleet dashboard (live, read-only)"));
        }
        line(m, format!("  http://{addr}\n"));
    }
}

/// Watching, deploying to every device, and curling what runs.
fn deploy_section(m: &mut String, all: &[(String, String)]) {
    let targets: String = all.iter().map(|(id, _)| format!(" --target-device {id}")).collect();
    let apply = |image: &str| format!("example_iot_apply_deployment --name web{targets} --image {image} --port 8080");
    line(m, out::bold("Watch resources (as the cluster admin)"));
    line(m, "  kubectl get deployments.iot.nationtech.io -A -w");
    line(m, "  iotctl deployments");
    line(
        m,
        format!(
            "\n{} (v1 and v2 images are in every device's store)",
            out::bold("Deploy a web server to every device with the typed applier")
        ),
    );
    line(m, format!("  {}", apply("localhost/iot-web:v1")));
    line(m, "  # the same resource through kubectl:");
    line(
        m,
        format!("  {} --print | kubectl apply -f -", apply("localhost/iot-web:v1")),
    );
    line(m, "  # upgrade, wait until every device runs it, then delete:");
    line(m, format!("  {} --wait 60s", apply("localhost/iot-web:v2")));
    line(m, "  example_iot_apply_deployment --name web --delete");
    line(m, format!("\n{}", out::bold("Curl the service on each device")));
    for (id, ip) in all {
        line(m, format!("  curl http://{ip}:8080/        # {id}"));
    }
}

/// The inventory, and deploying by labels instead of ids.
fn fleet_section(m: &mut String, first: &str) {
    line(
        m,
        format!(
            "\n{} (Devices are labelled site=lab; {first} is ring=canary, the rest ring=main)",
            out::bold("The fleet: Devices and label selectors")
        ),
    );
    line(m, "  kubectl get devices -L site,ring");
    line(m, "  kubectl get devices -l ring=canary -o wide");
    line(
        m,
        "  # deploy to every device labelled ring=canary, and to any device labelled so later:",
    );
    line(
        m,
        "  example_iot_apply_deployment --name canary-web --selector ring=canary --image localhost/iot-web:v1 --port 8081",
    );
    line(
        m,
        "  kubectl get deployments.iot.nationtech.io canary-web -o jsonpath='{.status.matchedDevices}'",
    );
    line(
        m,
        format!("  kubectl label device {first} ring=main --overwrite   # labelled out: its container goes"),
    );
    line(
        m,
        "  iotctl rollout history default/web        # revisions; iotctl rollout undo default/web",
    );
    line(
        m,
        "  # a progressive rollout: the canary, then 50 %, then the rest, rolled back on failure (README: Rolling out safely)",
    );
    let example = iot_launch::paths::repo_root().join("deploy/examples/rollout.yaml");
    let example = std::fs::canonicalize(&example).unwrap_or(example);
    line(m, format!("  kubectl apply -f {}", example.display()));
    line(
        m,
        "  iotctl rollout status default/shop-web          # the canary ran it; its batch waits for a person",
    );
    line(m, "  iotctl rollout promote default/shop-web");
    line(
        m,
        "  iotctl rollout status default/shop-web --watch  # bars per batch; exits 0 when complete",
    );
}

/// Reading what NATS holds.
fn kv_section(m: &mut String, first: &str) {
    line(
        m,
        format!(
            "\n{} (instead of nats-box: no image can be pulled here)",
            out::bold("Inspect NATS KV")
        ),
    );
    line(m, "  iotctl kv ls desired");
    line(m, format!("  iotctl kv get desired {first} default/web"));
    line(m, format!("  iotctl kv get status {first}"));
    line(m, "  iotctl devices");
}

/// The NATS cluster's members, which devices are on each, and how to lose one.
fn cluster_section(m: &mut String, up: &Up) {
    let Some(cluster) = &up.nats_cluster else { return };
    line(
        m,
        format!(
            "\n{} ({} servers; each bucket is kept on {} of them, so one may be lost)",
            out::bold("NATS cluster"),
            cluster.len(),
            up.kv_replicas()
        ),
    );
    for i in 0..cluster.len() {
        let member = cluster.member(i);
        let devices = up.nats_placement.get(i).map(|d| d.join(", ")).unwrap_or_default();
        line(
            m,
            format!(
                "  nats-{i}  {}  pid {}  http://{}:{}/varz  devices: {}",
                member.url(),
                member.pid().map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                iot_launch::nats_cluster::MONITOR_HOST,
                cluster.monitor_port(i),
                if devices.is_empty() { "none".to_owned() } else { devices }
            ),
        );
    }
    let first = cluster.member(0);
    let pid = first.pid().map(|p| p.to_string()).unwrap_or_else(|| "PID".into());
    line(
        m,
        format!(
            "  curl -s 'http://{}:{}/jsz?streams=true'   # which server leads each bucket's stream",
            iot_launch::nats_cluster::MONITOR_HOST,
            cluster.monitor_port(0)
        ),
    );
    line(
        m,
        format!("  kill -STOP {pid}; sleep 20; kill -CONT {pid}   # nats-0 unreachable for 20 s, then back"),
    );
    line(
        m,
        format!(
            "  kill -9 {pid}   # lose nats-0 for good: its devices move to the others (iot-up does not restart it)"
        ),
    );
}

/// Device identities, or a warning that NATS is open.
fn identity_section(m: &mut String, up: &Up, first: &str) {
    match &up.security {
        Some(sec) => {
            line(
                m,
                format!(
                    "\n{} (NATS admits every client through the auth callout; each device sees only its own keys)",
                    out::bold("Device identities")
                ),
            );
            line(m, "  iotctl device list");
            line(
                m,
                format!(
                    "  iotctl device revoke {first}     # its live session ends now; every connect after is refused"
                ),
            );
            if let Some(d) = up.devices.first() {
                line(
                    m,
                    format!(
                        "  iotctl device enroll {0} --out {1}/{0}.json   # and restart its agent",
                        d.id,
                        up.identities_dir().display(),
                    ),
                );
            }
            if let Some(v) = up.vms.first() {
                line(
                    m,
                    format!(
                        "  iotctl device enroll {0} --out {0}.json   # a VM gets it in a new seed: iotctl device provision {0} --enrollment {0}.json ...",
                        v.id
                    ),
                );
            }
            for c in &sec.callouts {
                line(
                    m,
                    format!("  curl -s {} | grep ^iot_auth    # a callout replica", c.metrics_url()),
                );
            }
        }
        None => line(
            m,
            format!(
                "\n{}",
                out::bad("NATS is open (--insecure): any client can read and write everything")
            ),
        ),
    }
}

/// Every daemon's metrics endpoint.
fn metrics_section(m: &mut String, up: &Up, all: &[(String, String)]) {
    line(m, format!("\n{}", out::bold("Metrics and readiness")));
    if let Some(http) = &up.operator_http {
        line(
            m,
            format!("  curl -s http://{http}/metrics | grep ^iot_operator     # operator"),
        );
    }
    for (id, ip) in all {
        line(
            m,
            format!(
                "  curl -s http://{ip}:{}/metrics | grep ^iot_agent   # {id}",
                crate::up::AGENT_METRICS_PORT,
            ),
        );
    }
}

/// Every log file.
fn logs_section(m: &mut String, up: &Up) {
    line(m, format!("\n{}", out::bold("Logs")));
    if up.node.is_none() {
        line(m, format!("  tail -f {}/operator.log", up.logs_dir().display()));
    }
    for dev in &up.devices {
        line(m, format!("  tail -f {}/agent-{}.log", up.logs_dir().display(), dev.id));
    }
    for v in &up.vms {
        line(
            m,
            format!(
                "  tail -f {}     # {}'s serial console",
                v.vm.console_log().display(),
                v.id
            ),
        );
    }
    if let Some(api) = &up.api {
        line(m, format!("  tail -f {}/apiserver.log", api.dir().display()));
    }
    if let Some(sso) = &up.sso {
        line(m, format!("  tail -f {}/apiserver.log", sso.api.dir().display()));
        line(
            m,
            format!(
                "  tail -f {}/audit.log     # who did what, allowed or forbidden",
                sso.api.dir().display()
            ),
        );
    }
    if let Some(nats) = &up.nats {
        line(m, format!("  tail -f {}", nats.log_path().display()));
    }
    if let Some(cluster) = &up.nats_cluster {
        for i in 0..cluster.len() {
            line(m, format!("  tail -f {}", cluster.member(i).log_path().display()));
        }
    }
    if up.security.is_some() && up.node.is_none() {
        line(m, format!("  tail -f {}/callout-0.log", up.logs_dir().display()));
    }
}

/// Netns devices: each has its own podman store, reachable on its socket.
fn netns_section(m: &mut String, up: &Up) {
    let Some(d) = up.devices.first() else { return };
    line(
        m,
        format!(
            "\n{} (each device has its own store)",
            out::bold("Containers on a device")
        ),
    );
    for dev in &up.devices {
        line(
            m,
            format!(
                "  podman --url unix://{} ps -a       # {}",
                dev.podman_socket.display(),
                dev.id
            ),
        );
    }
    line(
        m,
        format!(
            "  nsenter --net={} ip addr   # a shell-level look inside the device",
            up.net.netns_path(d.index)
        ),
    );
}

/// VM devices: a machine of their own, reached on the console.
fn vm_section(m: &mut String, up: &Up) {
    for v in &up.vms {
        line(
            m,
            format!(
                "\n{} ({} on tap {}, {}; the agent runs under systemd, installed by cloud-init)",
                out::bold(&format!("VM device {}", v.id)),
                v.ip,
                v.tap,
                v.arch.name()
            ),
        );
        line(
            m,
            format!(
                "  socat -,raw,echo=0,escape=0x0f UNIX-CONNECT:{}   # console (Ctrl-O leaves); log in as fleet / {}",
                v.vm.console_socket().display(),
                v.console_password
            ),
        );
        line(
            m,
            "  # then: sudo podman ps -a; journalctl -u iot-agent -f; systemctl status iot-agent",
        );
        line(
            m,
            format!(
                "  echo system_reset | socat - UNIX-CONNECT:{} >/dev/null   # pull the power: it reboots, the agent comes back",
                v.vm.monitor_socket().display()
            ),
        );
        line(
            m,
            "  # ssh: the guest image has no ssh server; the console is the way in",
        );
    }
}
