//! The token cache: one file per (issuer, client id) under the user's config dir,
//! written 0600 in a 0700 directory, replaced atomically. Refreshes happen under an
//! exclusive lock on a sibling file, because kubectl runs the credential plugin
//! concurrently and providers that rotate refresh tokens (oidc-provider, Zitadel)
//! end the whole session when a used refresh token is presented twice.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::SsoError;
use crate::provider::{Identity, IssuerConfig};

/// A login: the current ID token and what renews it. Holds secrets: never log it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub issuer_url: String,
    pub client_id: String,
    pub id_token: String,
    pub id_token_expiry: DateTime<Utc>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    pub identity: Identity,
    pub saved_at: DateTime<Utc>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("issuer_url", &self.issuer_url)
            .field("client_id", &self.client_id)
            .field("id_token_expiry", &self.id_token_expiry)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// How long before expiry the token counts as spent: 30 s, or a quarter of its
    /// lifetime for short-lived tokens, so a request started with it still lands
    /// in time and a 20 s token is not refreshed on every use.
    pub fn renew_margin(&self) -> chrono::Duration {
        let life = self.id_token_expiry - self.saved_at;
        (life / 4).clamp(chrono::Duration::zero(), chrono::Duration::seconds(30))
    }

    /// True while the ID token has more than [`Session::renew_margin`] left.
    pub fn is_fresh(&self) -> bool {
        self.id_token_expiry - self.renew_margin() > Utc::now()
    }
}

/// The directory holding the cache: `$IOTCTL_CONFIG_DIR`, else
/// `$XDG_CONFIG_HOME/iotctl`, else `~/.config/iotctl`; tokens live in `sso/` below.
pub fn default_dir() -> Result<PathBuf, SsoError> {
    let base = if let Some(d) = std::env::var_os("IOTCTL_CONFIG_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(d).join("iotctl")
    } else if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(home).join(".config").join("iotctl")
    } else {
        return Err(SsoError::Config(
            "no config directory: set HOME, XDG_CONFIG_HOME or IOTCTL_CONFIG_DIR".into(),
        ));
    };
    Ok(base.join("sso"))
}

/// The cache for one (issuer, client id).
#[derive(Debug, Clone)]
pub struct TokenCache {
    path: PathBuf,
}

impl TokenCache {
    pub fn new(dir: &Path, issuer: &IssuerConfig) -> Self {
        let digest = Sha256::digest(format!("{}\n{}", issuer.issuer_url, issuer.client_id));
        let name: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        Self {
            path: dir.join(format!("{name}.json")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ensure_dir(&self) -> Result<(), SsoError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SsoError::io(dir, e))?;
        // An existing directory may have been made by something else: tighten it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| SsoError::io(dir, e))
    }

    /// The cached session, if any. A corrupt file counts as none, so a new login
    /// repairs it.
    pub fn load(&self) -> Result<Option<Session>, SsoError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "ignoring an unreadable token cache");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SsoError::io(&self.path, e)),
        }
    }

    /// Writes the session to a 0600 temporary file, then renames it into place.
    pub fn save(&self, session: &Session) -> Result<(), SsoError> {
        self.ensure_dir()?;
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        let json = serde_json::to_vec_pretty(session).map_err(|e| SsoError::Config(e.to_string()))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| SsoError::io(&tmp, e))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(|e| SsoError::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| SsoError::io(&self.path, e))
    }

    /// Removes the session. Returns whether there was one.
    pub fn remove(&self) -> Result<bool, SsoError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SsoError::io(&self.path, e)),
        }
    }

    /// Takes the exclusive refresh lock; released when the guard drops.
    pub async fn lock(&self) -> Result<Flock<File>, SsoError> {
        self.ensure_dir()?;
        let path = self.path.with_extension("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SsoError::io(&path, e))?;
        tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
            .await
            .map_err(|e| SsoError::Config(format!("lock task: {e}")))?
            .map_err(|(_, errno)| SsoError::io(&path, std::io::Error::from(errno)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            issuer_url: "https://issuer.example".into(),
            client_id: "iot-fleet".into(),
            id_token: "header.payload.sig".into(),
            id_token_expiry: Utc::now() + chrono::Duration::seconds(60),
            refresh_token: Some("rt".into()),
            identity: Identity {
                subject: "dave".into(),
                email: Some("dave@fleet.example".into()),
                groups: vec!["fleet-deployers".into()],
                zitadel_roles: vec![],
            },
            saved_at: Utc::now(),
        }
    }

    fn issuer() -> IssuerConfig {
        IssuerConfig {
            issuer_url: "https://issuer.example".into(),
            client_id: "iot-fleet".into(),
            ca_file: None,
        }
    }

    #[test]
    fn saved_sessions_are_private_and_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cache = TokenCache::new(&dir.path().join("sso"), &issuer());
        assert_eq!(cache.load()?, None);
        let saved = session();
        cache.save(&saved)?;
        let mode = std::fs::metadata(cache.path())?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "token file mode");
        let dir_mode = std::fs::metadata(dir.path().join("sso"))?.permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "token dir mode");
        assert_eq!(cache.load()?, Some(saved));
        assert!(cache.remove()?);
        assert!(!cache.remove()?);
        Ok(())
    }

    #[test]
    fn a_corrupt_cache_reads_as_logged_out() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cache = TokenCache::new(dir.path(), &issuer());
        std::fs::write(cache.path(), b"{not json")?;
        assert_eq!(cache.load()?, None);
        Ok(())
    }

    #[test]
    fn each_issuer_and_client_gets_its_own_file() {
        let dir = Path::new("/x");
        let a = TokenCache::new(dir, &issuer());
        let b = TokenCache::new(
            dir,
            &IssuerConfig {
                client_id: "other".into(),
                ..issuer()
            },
        );
        assert_ne!(a.path(), b.path());
    }

    #[test]
    fn short_tokens_renew_a_quarter_before_expiry_long_ones_30s_before() {
        let mut s = session();
        s.id_token_expiry = s.saved_at + chrono::Duration::seconds(20);
        assert_eq!(s.renew_margin(), chrono::Duration::seconds(5));
        s.id_token_expiry = s.saved_at + chrono::Duration::seconds(3600);
        assert_eq!(s.renew_margin(), chrono::Duration::seconds(30));
        s.id_token_expiry = Utc::now() + chrono::Duration::seconds(20);
        s.saved_at = Utc::now() - chrono::Duration::seconds(3600);
        assert!(!s.is_fresh(), "20 s left of an hour-long token is inside the margin");
    }

    #[test]
    fn debug_output_hides_the_tokens() {
        let text = format!("{:?}", session());
        assert!(
            !text.contains("header.payload.sig") && !text.contains("\"rt\""),
            "{text}"
        );
    }
}
