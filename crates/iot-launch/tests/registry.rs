//! The private registry as devices will meet it: `docker-registry` over TLS from the
//! stack's CA with token auth, asking for a token at its realm and logging every
//! request; a publisher pushes through the real realm (`iot-registry-token`), and
//! an isolated podman (a device's empty store, in a network namespace of its own)
//! pulls through its REST API, leaving through its link; a wrong password is
//! refused with an error that names the registry; nothing of that podman outlives it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::Context;
use base64::Engine;
use iot_launch::podman::IsolatedPodman;
use iot_launch::registry::{Publisher, write_ca_bundle};
use iot_launch::{
    Ca, PodmanService, Registry, RegistryKeys, RegistryOptions, RegistryToken, RegistryTokenOptions, run_captured,
};

/// `curl -si` over TLS verified with `ca`: (status, headers and body).
fn curl(url: &str, ca: &Path) -> anyhow::Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "curl {url} failed ({}): {text}", out.status);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    Ok((code, text))
}

#[tokio::test]
async fn registry_serves_tls_asks_for_a_token_and_logs_each_request() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let ca = Ca::create(&dir.path().join("ca"))?;
    let keys = RegistryKeys::generate(&dir.path().join("keys"))?;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&keys.key_pem)?.permissions().mode() & 0o777, 0o600);
    let key_text = std::fs::read_to_string(&keys.key_pem)?;
    assert!(
        key_text.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 PEM: {key_text}"
    );
    let cert_text = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-text", "-in"])
        .arg(&keys.cert_pem)
        .output()?;
    let cert_text = String::from_utf8_lossy(&cert_text.stdout);
    assert!(cert_text.contains("CN = iot-registry-token"), "{cert_text}");
    assert!(cert_text.contains("prime256v1"), "{cert_text}");

    // Nothing answers at this realm: the registry only names it.
    let realm = "https://127.0.0.1:9/token";
    let mut registry = Registry::start(&RegistryOptions::new(&ca, realm, &keys.cert_pem)).await?;
    let started = t0.elapsed();
    let url = format!("https://{}/v2/", registry.url());
    let (code, text) = curl(&url, &ca.cert_file())?;
    assert_eq!(code, 401, "{text}");
    let challenge = text
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
        })
        .map(|(_, v)| v.trim().to_owned());
    assert_eq!(
        challenge.as_deref(),
        Some(format!("Bearer realm=\"{realm}\",service=\"iot-registry\"").as_str()),
        "{text}"
    );
    // Another CA's clients refuse it.
    let other = Ca::create(&dir.path().join("other-ca"))?;
    assert!(curl(&url, &other.cert_file()).is_err());
    // The access log has the request (a refused one has only the Apache-style line).
    let log = registry.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"GET /v2/ HTTP/") && l.contains("\" 401 ")),
        "no access line for GET /v2/ in:\n{log}"
    );

    // Down, then back on the same port and storage.
    let (port, pid, storage) = (registry.port(), registry.pid(), registry.storage_dir().to_owned());
    registry.stop();
    assert!(curl(&url, &ca.cert_file()).is_err(), "still answering after stop");
    registry.restart().await?;
    assert_eq!((registry.port(), registry.storage_dir()), (port, storage.as_path()));
    assert_ne!(registry.pid(), pid);
    assert_eq!(curl(&url, &ca.cert_file())?.0, 401);
    eprintln!("registry up in {started:?}; whole test {:?}", t0.elapsed());
    Ok(())
}

/// A network namespace with a veth pair (a device's link), deleted on drop.
struct TestNs {
    name: String,
    host_ip: String,
    ns_ip: String,
}

impl TestNs {
    fn create() -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xffff);
        // A /30 out of 10.214.0.0/16 (iot-testkit's namespaces use 10.213/16).
        let base = 4 * ((pid.wrapping_mul(31).wrapping_add(n * 4)) % 16_000);
        let (a, b) = (base / 256, base % 256);
        let me = Self {
            name: format!("iotreg-{tag}"),
            host_ip: format!("10.214.{a}.{}", b + 1),
            ns_ip: format!("10.214.{a}.{}", b + 2),
        };
        let (host_if, peer) = (format!("irh{tag}"), format!("irn{tag}"));
        ip(&["netns", "add", &me.name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer, "netns", &me.name,
        ])?;
        ip(&["addr", "add", &format!("{}/30", me.host_ip), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let ns_addr = format!("{}/30", me.ns_ip);
        for args in [
            ["addr", "add", ns_addr.as_str(), "dev", peer.as_str()].as_slice(),
            &["link", "set", &peer, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", me.name.as_str(), "ip"];
            full.extend_from_slice(args);
            ip(&full)?;
        }
        Ok(me)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The token service binary, built here if need be (`IOT_REGISTRY_TOKEN_BIN`
/// overrides): a test that skipped itself would pass without testing anything.
fn token_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("IOT_REGISTRY_TOKEN_BIN") {
        return Ok(p.into());
    }
    let root = iot_launch::paths::repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "-q", "-p", "iot-registry", "--bin", "iot-registry-token"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cargo build of iot-registry-token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/iot-registry-token"))
}

/// A small local image: localhost/iot-web:v1 (scripts/setup-host.sh builds it),
/// else one built here FROM scratch with busybox.
fn local_image(dir: &Path) -> anyhow::Result<String> {
    let image = "localhost/iot-web:v1";
    let mut exists = Command::new("podman");
    exists.env("CONTAINERS_CONF", iot_launch::paths::containers_conf());
    if exists.args(["image", "exists", image]).status()?.success() {
        return Ok(image.to_owned());
    }
    let ctx = dir.join("image");
    std::fs::create_dir_all(ctx.join("rootfs/bin"))?;
    std::fs::copy("/bin/busybox", ctx.join("rootfs/bin/busybox")).context("busybox-static")?;
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/busybox\", \"sleep\", \"3600\"]\n",
    )?;
    let image = "localhost/iot-registry-test:v1";
    let mut build = Command::new("podman");
    build
        .env("CONTAINERS_CONF", iot_launch::paths::containers_conf())
        .args(["build", "-q", "-t", image])
        .arg(&ctx);
    let (ok, _, err) = run_captured(build, None)?;
    anyhow::ensure!(ok, "podman build: {err}");
    Ok(image.to_owned())
}

/// `POST /libpod/images/pull` on the service's socket with these credentials: the
/// streamed JSON lines.
fn rest_pull(podman: &PodmanService, reference: &str, user: &str, password: &str) -> anyhow::Result<String> {
    let auth = serde_json::json!({ "username": user, "password": password }).to_string();
    let auth = base64::engine::general_purpose::URL_SAFE.encode(auth);
    let out = Command::new("curl")
        .args(["-s", "--max-time", "120", "-X", "POST", "--unix-socket"])
        .arg(podman.socket())
        .arg("-H")
        .arg(format!("X-Registry-Auth: {auth}"))
        .arg(format!(
            "http://d/v4.0.0/libpod/images/pull?reference={reference}&policy=always"
        ))
        .output()?;
    anyhow::ensure!(out.status.success(), "curl to the podman socket failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_publisher_pushes_and_an_isolated_device_pulls_through_its_link() -> anyhow::Result<()> {
    let token_bin = token_binary()?;
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let ca = Ca::create(&dir.path().join("ca"))?;
    let keys = RegistryKeys::generate(&dir.path().join("keys"))?;
    let ns = TestNs::create()?;
    let password = iot_launch::auth::random_secret()?;
    let publisher = Publisher {
        name: "ci".to_owned(),
        password: password.clone(),
        patterns: vec!["iot/*".to_owned()],
    };
    // Both listen on the host end of the device's link, where the device reaches them.
    let mut token_opts = RegistryTokenOptions::new(&ca, &keys, vec![publisher]);
    token_opts.ip = ns.host_ip.clone();
    let token = RegistryToken::start(&token_bin, &token_opts).await?;
    let mut reg_opts = RegistryOptions::new(&ca, token.realm(), &keys.cert_pem);
    reg_opts.ip = ns.host_ip.clone();
    let mut registry = Registry::start(&reg_opts).await?;
    let up = t0.elapsed();

    let image = local_image(dir.path())?;
    let t = Instant::now();
    registry.push(&image, "iot/web:v1", "ci", &password)?;
    let pushed = t.elapsed();
    let refused = registry
        .push(&image, "iot/web:v1", "ci", "wrong")
        .expect_err("a wrong password pushed");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("unauthorized") || refused.contains("invalid username/password"),
        "{refused}"
    );
    match registry.push(&image, "other/web:v1", "ci", &password) {
        Ok(()) => eprintln!("NOTE: a push outside the publisher's patterns (iot/*) was accepted"),
        Err(e) => eprintln!("a push outside the publisher's patterns is refused: {e:#}"),
    }

    // A device: an empty store, in the namespace, trusting the stack's CA only.
    let bundle = dir.path().join("ca-bundle.pem");
    write_ca_bundle(&bundle, &[&ca.cert_file()])?;
    let store = dir.path().join("device-store");
    let device = PodmanService::start_isolated(IsolatedPodman {
        store_dir: Some(store.clone()),
        tmp_dir: None,
        netns: Some(ns.path()),
        ca_bundle: Some(bundle),
    })
    .await?;
    let (ok, listed, err) = run_captured(
        {
            let mut c = device.command();
            c.args(["images", "-q"]);
            c
        },
        None,
    )?;
    assert!(
        ok && listed.trim().is_empty(),
        "a new device's store is empty: {listed} {err}"
    );

    let reference = format!("{}/iot/web:v1", registry.url());
    // Pulls stage in the configured directory: without it, the pull fails naming it.
    let copy_tmp = device.copy_tmp_dir().context("isolated")?.to_owned();
    std::fs::remove_dir(&copy_tmp)?;
    let staged = rest_pull(&device, &reference, "ci", &password)?;
    assert!(staged.contains(&copy_tmp.display().to_string()), "{staged}");
    std::fs::create_dir(&copy_tmp)?;

    let t = Instant::now();
    let pulled = rest_pull(&device, &reference, "ci", &password)?;
    let pull_time = t.elapsed();
    assert!(
        pulled.contains("\"images\":[") && !pulled.contains("\"error\""),
        "{pulled}"
    );
    // The blobs left through the device's link: the registry saw its address.
    let from_device: Vec<_> = registry
        .completed_requests()
        .into_iter()
        .filter(|r| r.is_blob_get() && r.remote.starts_with(&format!("{}:", ns.ns_ip)))
        .collect();
    assert!(
        !from_device.is_empty(),
        "no blob GET from {} in:\n{}",
        ns.ns_ip,
        registry.log()
    );
    assert!(from_device.iter().all(|r| r.status == 200));

    let wrong = rest_pull(&device, &reference, "ci", "wrong")?;
    assert!(
        wrong.contains("\"error\"") && wrong.contains(&registry.url()),
        "{wrong}"
    );
    assert!(
        wrong.contains("unauthorized") || wrong.contains("invalid username/password"),
        "{wrong}"
    );

    // Registry down: the pull fails; back up (same port and storage): it works.
    registry.stop();
    let down = rest_pull(&device, &reference, "ci", &password)?;
    assert!(down.contains("\"error\""), "{down}");
    registry.restart().await?;
    let back = rest_pull(&device, &reference, "ci", &password)?;
    assert!(back.contains("\"images\":[") && !back.contains("\"error\""), "{back}");

    // A container on the device; the teardown removes it and unmounts the store.
    let (ok, id, err) = run_captured(
        {
            let mut c = device.command();
            c.args([
                "create",
                "--name",
                "registry-test",
                &reference,
                "/bin/busybox",
                "sleep",
                "60",
            ]);
            c
        },
        None,
    )?;
    assert!(ok, "podman create: {err}");
    let (ok, _, err) = run_captured(
        {
            let mut c = device.command();
            c.args(["start", id.trim()]);
            c
        },
        None,
    )?;
    assert!(ok, "podman start: {err}");
    assert!(!mounts_under(&store).is_empty());
    let mut ps = Command::new("podman");
    ps.env("CONTAINERS_CONF", iot_launch::paths::containers_conf())
        .arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .arg("--tmpdir")
        .arg(store.join("tmp"))
        .args(["ps", "-aq"]);
    drop(device);
    assert_eq!(mounts_under(&store), Vec::<String>::new());
    let (ok, left, err) = run_captured(ps, None)?;
    assert!(ok && left.trim().is_empty(), "containers left: {left} {err}");
    // That listing mounted the store's overlay again; undo it.
    for m in mounts_under(&store).iter().rev() {
        let _ = Command::new("umount").args(["-l", m]).status();
    }

    eprintln!(
        "up {up:?}, push {pushed:?}, pull {pull_time:?}, whole test {:?}; {} blob GETs from the device",
        t0.elapsed(),
        from_device.len()
    );
    drop(token);
    Ok(())
}
