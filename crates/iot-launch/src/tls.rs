//! A private CA for one stack: NATS and OpenBao serve certificates it signed, and
//! every client trusts exactly it. This is what `scripts/up.sh` and the tests run
//! by default, so every test exercises the production path (TLS, verified).
//!
//! Keys are P-256, made by the `openssl` command line (as the API servers' are).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a guest on qemu's user network reaches the host: server certificates of
/// stacks that may host VM devices name it, so the guest verifies them too.
pub const GUEST_HOST_ALIAS: &str = "10.0.2.2";

/// Days a certificate of a local stack is valid.
const DAYS: &str = "365";

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

#[derive(Debug, Clone)]
pub struct Ca {
    dir: PathBuf,
}

impl Ca {
    /// A new CA in `dir` (created 0700 if missing): `ca.crt`, and `ca.key` (0600).
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        crate::vm::private_dir(dir)?;
        // A name of its own: a client given another stack's CA then reads "unknown
        // issuer", not a bad signature from a CA of the same name.
        let subject = format!("/CN=iot-platform-local-ca-{}", &crate::auth::random_secret()?[..12]);
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                DAYS,
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        set_private(&dir.join("ca.key"))?;
        Ok(Self { dir: dir.to_owned() })
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
            let san = if h.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{h}")
            } else {
                format!("DNS:{h}")
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        anyhow::ensure!(!sans.is_empty(), "a server certificate needs at least one host");
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )?;
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        )?;
        set_private(&self.dir.join(&key))?;
        let ext_file = ext.display().to_string();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                DAYS,
                "-extfile",
                &ext_file,
            ],
        )?;
        std::fs::remove_file(self.dir.join(&csr))?;
        std::fs::remove_file(&ext)?;
        Ok((self.dir.join(crt), self.dir.join(key)))
    }
}

fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").current_dir(dir).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
