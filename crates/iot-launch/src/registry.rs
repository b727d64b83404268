//! The private image registry devices pull from: Debian's `docker-registry` (CNCF
//! distribution 2.8) over TLS with token authentication, and its realm, our
//! `iot-registry-token`.
//!
//! The registry trusts tokens signed by the P-256 key of [`RegistryKeys`]: its
//! certificate is the registry's `rootcertbundle`, and the tokens name the key by a
//! libtrust `kid`. The registry's server certificate comes from the stack's [`Ca`].
//!
//! How podman trusts that CA without touching `/etc` (both checked against this
//! registry): the podman CLI takes `--cert-dir <dir with ca.crt>` ([`Registry::cert_dir`]);
//! a podman service (and the CLI too) takes `SSL_CERT_FILE=<bundle>` in its
//! environment (Go's system pool reads it, and containers/image starts from the
//! system pool). `SSL_CERT_FILE` replaces the system roots, so a bundle for a device
//! that also pulls from public registries must contain those roots as well.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

use crate::auth::{random_secret, write_private};
use crate::paths::find_binary;
use crate::process::{LoggedProcess, free_port, listens_on, run_captured};
use crate::tls::Ca;

/// The registry's default `auth.token.service` (the token's audience).
pub const DEFAULT_SERVICE: &str = "iot-registry";
/// The registry's default `auth.token.issuer`, and the signing certificate's CN.
pub const DEFAULT_ISSUER: &str = "iot-registry-token";

/// The token-signing key pair: the realm signs with `key_pem`, the registry verifies
/// with the certificate in `cert_pem` (its `rootcertbundle`).
#[derive(Debug, Clone)]
pub struct RegistryKeys {
    /// P-256 private key, PKCS#8 PEM, mode 0600.
    pub key_pem: PathBuf,
    /// Self-signed certificate of that key, CN `iot-registry-token`.
    pub cert_pem: PathBuf,
}

impl RegistryKeys {
    /// A new key and certificate in `dir` (created 0700 if missing):
    /// `token-signing.key` and `token-signing.crt`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        crate::vm::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a P-256 key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, DEFAULT_ISSUER);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Started a week back, like the stack's other certificates (clocks behind).
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(7);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).context("self-signing the token certificate")?;
        let me = Self {
            key_pem: dir.join("token-signing.key"),
            cert_pem: dir.join("token-signing.crt"),
        };
        write_private(&me.key_pem, &key.serialize_pem())
            .with_context(|| format!("writing {}", me.key_pem.display()))?;
        std::fs::write(&me.cert_pem, cert.pem()).with_context(|| format!("writing {}", me.cert_pem.display()))?;
        Ok(me)
    }
}

/// How to run a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Address to listen on (an IP); default 127.0.0.1.
    pub ip: String,
    /// Port; a free one when `None`.
    pub port: Option<u16>,
    /// Issues the server certificate (naming `ip` and 127.0.0.1).
    pub ca: Ca,
    /// Where blobs and manifests live; default a directory the registry owns.
    pub storage_dir: Option<PathBuf>,
    /// The token service's URL (`auth.token.realm`), e.g. `https://10.0.0.1:5001/token`.
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// Certificates of the keys that sign tokens ([`RegistryKeys::cert_pem`]).
    pub rootcertbundle: PathBuf,
}

impl RegistryOptions {
    /// Defaults: 127.0.0.1 on a free port, storage of its own, service
    /// `iot-registry`, issuer `iot-registry-token`.
    pub fn new(ca: &Ca, realm: impl Into<String>, rootcertbundle: impl Into<PathBuf>) -> Self {
        Self {
            ip: "127.0.0.1".to_owned(),
            port: None,
            ca: ca.clone(),
            storage_dir: None,
            realm: realm.into(),
            service: DEFAULT_SERVICE.to_owned(),
            issuer: DEFAULT_ISSUER.to_owned(),
            rootcertbundle: rootcertbundle.into(),
        }
    }
}

/// One request the registry finished, from its `response completed` log line.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedRequest {
    pub method: String,
    pub uri: String,
    pub status: u16,
    /// Body bytes sent (`http.response.written`).
    pub written: u64,
    pub duration: Duration,
    /// When the response completed (the line's `time`).
    pub finished: SystemTime,
    pub remote: String,
}

impl CompletedRequest {
    /// When the request started: `finished - duration`.
    pub fn started(&self) -> SystemTime {
        self.finished.checked_sub(self.duration).unwrap_or(self.finished)
    }

    /// A blob download (`GET /v2/<name>/blobs/<digest>`), the bulk of a pull.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.uri.contains("/blobs/sha256:")
    }
}

/// The requests in a registry log: every `response completed` line, other lines
/// (startup, warnings, the Apache-style access lines) skipped. See [`Registry`].
pub fn completed_requests(log: &str) -> Vec<CompletedRequest> {
    log.lines().filter_map(parse_completed).collect()
}

fn parse_completed(line: &str) -> Option<CompletedRequest> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if v.get("msg")?.as_str()? != "response completed" {
        return None;
    }
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let finished =
        time::OffsetDateTime::parse(v.get("time")?.as_str()?, &time::format_description::well_known::Rfc3339).ok()?;
    Some(CompletedRequest {
        method: text("http.request.method")?,
        uri: text("http.request.uri")?,
        status: u16::try_from(v.get("http.response.status")?.as_u64()?).ok()?,
        written: v.get("http.response.written").and_then(|x| x.as_u64()).unwrap_or(0),
        duration: parse_go_duration(v.get("http.response.duration")?.as_str()?)?,
        finished: SystemTime::from(finished),
        remote: text("http.request.remoteaddr").unwrap_or_default(),
    })
}

/// The most requests in `requests` that were in flight at the same instant.
pub fn max_concurrent<'a>(requests: impl IntoIterator<Item = &'a CompletedRequest>) -> usize {
    // Ends sort before starts at the same instant: back-to-back is not overlap.
    let mut events: Vec<(SystemTime, i32)> = Vec::new();
    for r in requests {
        events.push((r.started(), 1));
        events.push((r.finished, -1));
    }
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

/// A Go `time.Duration` string: `9.975179ms`, `1.5s`, `350µs`, `1m2.5s`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    Some(Duration::from_secs_f64(total))
}

/// `docker-registry serve` with TLS and token auth, in a directory of its own,
/// stopped on drop.
///
/// Its log ([`Self::log_path`]) is logrus JSON, one line per event. Every request
/// the registry serves past authentication ends in a `response completed` line;
/// `time` is when it completed and `http.response.duration` how long it took, so
/// it started at `time - duration` (see [`completed_requests`] and
/// [`max_concurrent`]). From a real run (a blob of a pull):
///
/// ```text
/// {"go.version":"go1.19.8","http.request.host":"127.0.0.1:15555","http.request.id":"c25662e0-d09c-4ceb-8191-b5877e898487","http.request.method":"GET","http.request.remoteaddr":"127.0.0.1:42782","http.request.uri":"/v2/iot/web/blobs/sha256:596daef53546d4b63789027416aa6df529f1abbb6b20074e74f636b817e03da4","http.request.useragent":"containers/5.23.1 (github.com/containers/image)","http.response.contenttype":"application/octet-stream","http.response.duration":"5.539618ms","http.response.status":200,"http.response.written":1083776,"level":"info","msg":"response completed","time":"2026-12-07T18:39:33.075408701Z"}
/// ```
///
/// Requests refused before a handler runs (no or a bad token: 401) get no such
/// line, only a `warning` line `error authorizing context: ...` and the access
/// log's Apache-style line, which has no duration:
///
/// ```text
/// 127.0.0.1 - - [07/Dec/2026:18:37:59 +0000] "GET /v2/ HTTP/2.0" 401 87 "" "curl/7.88.1"
/// ```
pub struct Registry {
    process: Option<LoggedProcess>,
    dir: TempDir,
    ip: String,
    port: u16,
    storage: PathBuf,
    ca_file: PathBuf,
}

impl Registry {
    /// Writes the configuration, starts the registry and waits until `GET /v2/`
    /// answers over TLS (401 counts: it is up and asks for a token).
    pub async fn start(opts: &RegistryOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("iot-registry-")
            .tempdir()
            .context("creating the registry's directory")?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let storage = match &opts.storage_dir {
            Some(s) => s.clone(),
            None => dir.path().join("storage"),
        };
        std::fs::create_dir_all(&storage).with_context(|| format!("creating {}", storage.display()))?;
        let (cert, key) = opts
            .ca
            .issue(&format!("registry-{port}"), &[&opts.ip, "127.0.0.1"])
            .context("issuing the registry's server certificate")?;
        let ca_file = opts.ca.cert_file();
        // podman --cert-dir reads *.crt there as CAs (and *.cert/*.key as client certs).
        let cert_dir = dir.path().join("certs.d");
        std::fs::create_dir_all(&cert_dir)?;
        std::fs::copy(&ca_file, cert_dir.join("ca.crt")).context("copying the CA for --cert-dir")?;
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: {ip}:{port}\n  secret: {secret}\n  headers:\n    X-Content-Type-Options: [nosniff]\n  \
             tls:\n    certificate: {cert}\n    key: {key}\n\
             auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {bundle}\n\
             health:\n  storagedriver:\n    enabled: false\n",
            storage = yaml_str(&storage.display().to_string()),
            ip = opts.ip,
            secret = random_secret()?,
            cert = yaml_str(&cert.display().to_string()),
            key = yaml_str(&key.display().to_string()),
            realm = yaml_str(&opts.realm),
            service = yaml_str(&opts.service),
            issuer = yaml_str(&opts.issuer),
            bundle = yaml_str(&opts.rootcertbundle.display().to_string()),
        );
        write_private(&dir.path().join("config.yml"), &config).context("writing the registry's config.yml")?;
        let mut me = Self {
            process: None,
            dir,
            ip: opts.ip.clone(),
            port,
            storage,
            ca_file,
        };
        me.spawn().await?;
        Ok(me)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = find_binary("docker-registry", "IOT_DOCKER_REGISTRY")?;
        let mut cmd = Command::new(binary);
        cmd.arg("serve").arg(self.dir.path().join("config.yml"));
        let mut process = LoggedProcess::spawn("docker-registry", cmd, self.log_path())?;
        let start = Instant::now();
        let url = format!("https://{}:{}/v2/", self.ip, self.port);
        loop {
            if !process.is_running() {
                let log = process.log_text();
                anyhow::bail!("docker-registry exited while starting; its log:\n{log}");
            }
            let pid = process.pid().unwrap_or(0);
            if listens_on(pid, self.port)
                && let Ok(code) = curl_status(&url, &self.ca_file)
                && (code == 401 || code == 200)
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let log = process.log_text();
                process.kill();
                anyhow::bail!("docker-registry did not answer {url} within 30 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
        Ok(())
    }

    /// `host:port`, as it appears in image names (`<url>/iot/web:v1`).
    pub fn url(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn ip(&self) -> &str {
        &self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that verifies the registry's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A directory with the CA as `ca.crt`, for `podman --cert-dir`.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The whole log, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Every request completed so far (see the type's documentation).
    pub fn completed_requests(&self) -> Vec<CompletedRequest> {
        completed_requests(&self.log())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(LoggedProcess::pid)
    }

    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 5 s), keeping its storage.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Stops it, then starts it again on the same port and storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    /// `podman push local_image <url>/repo_tag` as `user`, trusting the registry's
    /// CA through `--cert-dir`. Blocks until podman is done.
    pub fn push(&self, local_image: &str, repo_tag: &str, user: &str, password: &str) -> anyhow::Result<()> {
        let target = format!("{}/{repo_tag}", self.url());
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", crate::paths::containers_conf())
            .arg("push")
            .arg("--cert-dir")
            .arg(self.cert_dir())
            .arg("--creds")
            .arg(format!("{user}:{password}"))
            .arg(local_image)
            .arg(format!("docker://{target}"));
        let (ok, _, stderr) = run_captured(cmd, None).context("running podman push")?;
        anyhow::ensure!(ok, "podman push {local_image} to {target} as {user}: {}", stderr.trim());
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A YAML double-quoted string.
fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The HTTP status `url` answers, verified against `ca` (0 when nothing answered).
fn curl_status(url: &str, ca: &Path) -> anyhow::Result<u16> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            "--cacert",
        ])
        .arg(ca)
        .arg(url)
        .output()
        .context("running curl")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0))
}

/// One publisher the token service accepts: HTTP Basic `name:password`, allowed
/// to push and pull the repositories matching `patterns` (`iot/*`, `*`).
#[derive(Debug, Clone)]
pub struct Publisher {
    pub name: String,
    pub password: String,
    pub patterns: Vec<String>,
}

/// How to run a [`RegistryToken`].
#[derive(Debug, Clone)]
pub struct RegistryTokenOptions {
    /// Address to listen on (an IP); default 127.0.0.1.
    pub ip: String,
    /// Port; a free one when `None`.
    pub port: Option<u16>,
    /// Issues the server certificate (naming `ip` and 127.0.0.1).
    pub ca: Ca,
    /// The token-signing key ([`RegistryKeys::key_pem`]).
    pub signing_key: PathBuf,
    pub service: String,
    pub issuer: String,
    pub publishers: Vec<Publisher>,
}

impl RegistryTokenOptions {
    pub fn new(ca: &Ca, keys: &RegistryKeys, publishers: Vec<Publisher>) -> Self {
        Self {
            ip: "127.0.0.1".to_owned(),
            port: None,
            ca: ca.clone(),
            signing_key: keys.key_pem.clone(),
            service: DEFAULT_SERVICE.to_owned(),
            issuer: DEFAULT_ISSUER.to_owned(),
            publishers,
        }
    }
}

/// The registry's realm, `iot-registry-token`, over HTTPS; stopped on drop.
pub struct RegistryToken {
    process: LoggedProcess,
    _dir: TempDir,
    ip: String,
    port: u16,
}

impl RegistryToken {
    /// Starts `binary` (the caller finds it: a workspace binary) and waits until
    /// `GET /token` answers over TLS.
    pub async fn start(binary: &Path, opts: &RegistryTokenOptions) -> anyhow::Result<Self> {
        use sha2::Digest;
        let dir = tempfile::Builder::new()
            .prefix("iot-registry-token-")
            .tempdir()
            .context("creating the token service's directory")?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let (cert, key) = opts
            .ca
            .issue(&format!("registry-token-{port}"), &[&opts.ip, "127.0.0.1"])
            .context("issuing the token service's server certificate")?;
        let mut publishers = String::new();
        for p in &opts.publishers {
            anyhow::ensure!(
                !p.name.is_empty() && !p.name.contains(char::is_whitespace) && !p.patterns.is_empty(),
                "publisher {:?}: a name without spaces and at least one pattern",
                p.name
            );
            let hash: String = sha2::Sha256::digest(p.password.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            publishers.push_str(&format!("{} {hash} {}\n", p.name, p.patterns.join(",")));
        }
        let publishers_file = dir.path().join("publishers");
        write_private(&publishers_file, &publishers).context("writing the publishers file")?;
        let mut cmd = Command::new(binary);
        cmd.arg("--listen")
            .arg(format!("{}:{port}", opts.ip))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--signing-key")
            .arg(&opts.signing_key)
            .arg("--service")
            .arg(&opts.service)
            .arg("--issuer")
            .arg(&opts.issuer)
            .arg("--publishers")
            .arg(&publishers_file)
            .env("RUST_LOG", "info");
        let mut process = LoggedProcess::spawn("iot-registry-token", cmd, dir.path().join("token.log"))?;
        let url = format!("https://{}:{port}/token?service={}", opts.ip, opts.service);
        let start = Instant::now();
        loop {
            if !process.is_running() {
                let log = process.log_text();
                anyhow::bail!("iot-registry-token exited while starting; its log:\n{log}");
            }
            if listens_on(process.pid().unwrap_or(0), port) && curl_status(&url, &opts.ca.cert_file())? != 0 {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let log = process.log_text();
                process.kill();
                anyhow::bail!("iot-registry-token did not answer {url} within 30 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            process,
            _dir: dir,
            ip: opts.ip.clone(),
            port,
        })
    }

    /// The registry's `auth.token.realm`: `https://ip:port/token`.
    pub fn realm(&self) -> String {
        format!("https://{}:{}/token", self.ip, self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

/// A CA bundle for `SSL_CERT_FILE` at `path`: the given PEM files, concatenated
/// (add `/etc/ssl/certs/ca-certificates.crt` to keep the public roots).
pub fn write_ca_bundle(path: &Path, cas: &[&Path]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for ca in cas {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        f.write_all(&pem)?;
        if !pem.ends_with(b"\n") {
            f.write_all(b"\n")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("5.539618ms"), Some(Duration::from_nanos(5_539_618)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("350µs"), Some(Duration::from_micros(350)));
        assert_eq!(parse_go_duration("1m2.5s"), Some(Duration::from_millis(62_500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("12parsecs"), None);
    }

    #[test]
    fn completed_lines_are_read_and_overlaps_counted() {
        let line = |t: &str, d: &str| {
            format!(
                r#"{{"http.request.method":"GET","http.request.uri":"/v2/iot/web/blobs/sha256:ab","http.response.duration":"{d}","http.response.status":200,"http.response.written":10,"level":"info","msg":"response completed","time":"{t}"}}"#
            )
        };
        let log = [
            line("2026-12-07T18:39:33.100Z", "100ms"),
            "127.0.0.1 - - [07/Dec/2026:18:37:59 +0000] \"GET /v2/ HTTP/2.0\" 401 87 \"\" \"curl\"".to_owned(),
            line("2026-12-07T18:39:33.150Z", "100ms"),
            line("2026-12-07T18:39:33.300Z", "100ms"),
        ]
        .join("\n");
        let reqs = completed_requests(&log);
        assert_eq!(reqs.len(), 3);
        assert!(reqs.iter().all(CompletedRequest::is_blob_get));
        assert_eq!(max_concurrent(&reqs), 2);
    }
}
