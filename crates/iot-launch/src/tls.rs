//! A private CA for one stack: NATS and OpenBao serve certificates it signed, and
//! every client trusts exactly it. This is what `scripts/up.sh` and the tests run
//! by default, so every test exercises the production path (TLS, verified).
//!
//! Keys are ECDSA P-256 (rcgen on ring). Certificates start a week in the past: a
//! device whose clock is off by hours (a board without a real-time clock, before
//! NTP has run) must still accept them. A clock that is off by more than that
//! cannot verify any certificate until NTP sets it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Where a guest on qemu's user network reaches the host: server certificates of
/// stacks that may host VM devices name it, so the guest verifies them too.
pub const GUEST_HOST_ALIAS: &str = "10.0.2.2";

/// How far back certificates start (device clocks that run behind).
const BACKDATE_DAYS: i64 = 7;
/// How long a local stack's certificates last.
const VALID_DAYS: i64 = 365;

/// How a server gets its certificate.
#[derive(Debug, Clone, Copy)]
pub enum TlsMode<'a> {
    /// A CA of its own, in its directory (tests that run the server alone).
    OwnCa,
    /// A certificate from this CA (a stack whose servers share it).
    Ca(&'a Ca),
    /// No TLS: for `--insecure` runs and the tests of what clients do then.
    Plain,
}

/// A server's certificate, and the CA certificate its clients verify it with.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsMode<'_> {
    /// The certificate for server `name` (unique per server: it names the files)
    /// answering on `host` and the loopback and guest names; a CA of its own is made
    /// in `own_ca_dir`. `None` for [`TlsMode::Plain`].
    pub fn server_cert(&self, own_ca_dir: &Path, name: &str, host: &str) -> anyhow::Result<Option<ServerCert>> {
        let own;
        let ca = match self {
            TlsMode::Plain => return Ok(None),
            TlsMode::Ca(ca) => *ca,
            TlsMode::OwnCa => {
                own = Ca::create(own_ca_dir)?;
                &own
            }
        };
        let (cert, key) = ca.issue(name, &[host, "127.0.0.1", "localhost", GUEST_HOST_ALIAS])?;
        Ok(Some(ServerCert {
            ca_file: ca.cert_file(),
            cert,
            key,
        }))
    }
}

/// Tells a platform binary which CA verifies NATS (`NATS_CA_FILE`) and OpenBao
/// (`BAO_CACERT`). Without a NATS CA the stack is plain TCP, and the binary is
/// told so (`NATS_INSECURE`), since every client refuses plain servers otherwise.
pub fn trust_env(cmd: &mut std::process::Command, nats_ca: Option<&Path>, bao_ca: Option<&Path>) {
    match nats_ca {
        Some(ca) => {
            cmd.env("NATS_CA_FILE", ca);
        }
        None => {
            cmd.env("NATS_INSECURE", "true");
        }
    }
    if let Some(ca) = bao_ca {
        cmd.env("BAO_CACERT", ca);
    }
}

/// The CA's certificate and key, kept in memory to sign server certificates.
#[derive(Clone)]
pub struct Ca {
    dir: PathBuf,
    cert: Arc<Certificate>,
    key: Arc<KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(BACKDATE_DAYS);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

impl Ca {
    /// A new CA in `dir` (created 0700 if missing): `ca.crt`, and `ca.key` (0600).
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        crate::vm::private_dir(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        // A name of its own: a client given another stack's CA then reads "unknown
        // issuer", not a bad signature from a CA of the same name.
        name.push(
            DnType::CommonName,
            format!("iot-platform-local-ca-{}", &crate::auth::random_secret()?[..12]),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params);
        let cert = params.self_signed(&key)?;
        std::fs::write(dir.join("ca.crt"), cert.pem())?;
        crate::auth::write_private(&dir.join("ca.key"), &key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            cert: Arc::new(cert),
            key: Arc::new(key),
        })
    }

    /// The CA certificate (PEM): what clients are given.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A server certificate for `hosts` (IP addresses or DNS names), signed by this
    /// CA: returns (certificate, key), both in the CA's directory, the key 0600.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> anyhow::Result<(PathBuf, PathBuf)> {
        anyhow::ensure!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "certificate name {name:?}: letters, digits and - only"
        );
        let mut sans: Vec<String> = Vec::new();
        for h in hosts {
            if !sans.iter().any(|s| s == h) {
                sans.push((*h).to_owned());
            }
        }
        anyhow::ensure!(!sans.is_empty(), "a server certificate needs at least one host");
        // IP addresses become IP SANs, the rest DNS names.
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Client auth too: the members of a NATS cluster present the same certificate
        // when they dial each other's route port, and each verifies the other.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let (crt, key_file) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem())?;
        crate::auth::write_private(&key_file, &key.serialize_pem())?;
        Ok((crt, key_file))
    }

    /// A client certificate (TLS client auth only) for `common_name` in
    /// `organization`: what Kubernetes reads as a user and its group (one: rcgen
    /// keeps one value per attribute). Written as `<file_name>.crt` and `.key`
    /// (0600) in the CA's directory.
    pub fn issue_client(
        &self,
        file_name: &str,
        common_name: &str,
        organization: Option<&str>,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        anyhow::ensure!(
            !file_name.is_empty() && file_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "certificate file name {file_name:?}: letters, digits and - only"
        );
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            dn.push(DnType::OrganizationName, o);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let (crt, key_file) = (
            self.dir.join(format!("{file_name}.crt")),
            self.dir.join(format!("{file_name}.key")),
        );
        std::fs::write(&crt, cert.pem())?;
        crate::auth::write_private(&key_file, &key.serialize_pem())?;
        Ok((crt, key_file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_name_their_hosts_and_start_in_the_past() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::create(&dir.path().join("ca"))?;
        let (crt, key) = ca.issue("nats", &["127.0.0.1", "localhost", "10.0.2.2"])?;
        let text = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&crt)
            .output()?;
        let text = String::from_utf8_lossy(&text.stdout);
        for want in [
            "IP Address:127.0.0.1",
            "DNS:localhost",
            "IP Address:10.0.2.2",
            "TLS Web Server Authentication",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        let verify = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(ca.cert_file())
            .arg(&crt)
            .output()?;
        assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
        // A device an hour (or a day) behind still sees a valid certificate.
        let behind = std::process::Command::new("openssl")
            .args(["verify", "-attime"])
            .arg(
                (time::OffsetDateTime::now_utc() - time::Duration::days(1))
                    .unix_timestamp()
                    .to_string(),
            )
            .arg("-CAfile")
            .arg(ca.cert_file())
            .arg(&crt)
            .output()?;
        assert!(behind.status.success(), "{}", String::from_utf8_lossy(&behind.stderr));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("ca/ca.key"))?.permissions().mode() & 0o777,
            0o600
        );
        Ok(())
    }
}
