//! The private registry on the device bridge (secured mode): docker-registry 2.8
//! with TLS from the stack's CA and token authentication by `iot-registry-token`.
//! The test images are pushed into it, the operator pins its tags and grants
//! devices their pulls, and every device's podman trusts the CA.

use std::path::PathBuf;

use iot_launch::registry::Publisher;
use iot_launch::{Registry, RegistryKeys, RegistryOptions, RegistryToken, RegistryTokenOptions};

use crate::menu::line;
use crate::out;
use crate::up::{TEST_IMAGES, Up};

/// The registry's port on the gateway address.
pub const REGISTRY_PORT: u16 = 5000;
/// The token service's port on the gateway address.
pub const TOKEN_PORT: u16 = 5001;
/// The publisher the menu pushes as.
pub const PUBLISHER: &str = "ci";

pub struct UpRegistry {
    pub registry: Registry,
    pub token: RegistryToken,
    pub keys: RegistryKeys,
    /// The publisher's password, mode 0600.
    pub password_file: PathBuf,
}

impl UpRegistry {
    /// `host:port`, as image names spell it.
    pub fn url(&self) -> String {
        self.registry.url()
    }

    /// Starts both, pushes the test images as `iot/web:v1` and `:v2`.
    pub async fn start(up: &Up, ca: &iot_launch::Ca) -> anyhow::Result<Self> {
        let dir = up.state_dir.join("registry");
        let keys = RegistryKeys::generate(&dir.join("keys"))?;
        let password = random_password()?;
        let password_file = dir.join("publisher-password");
        iot_launch::auth::write_private(&password_file, &password)?;
        let mut token_opts = RegistryTokenOptions::new(
            ca,
            &keys,
            vec![Publisher {
                name: PUBLISHER.into(),
                password: password.clone(),
                patterns: vec!["iot/*".into()],
            }],
        );
        token_opts.ip = up.net.gateway();
        token_opts.port = Some(TOKEN_PORT);
        let token = RegistryToken::start(&up.bin("iot-registry-token"), &token_opts).await?;
        let mut opts = RegistryOptions::new(ca, token.realm(), &keys.cert_pem);
        opts.ip = up.net.gateway();
        opts.port = Some(REGISTRY_PORT);
        opts.storage_dir = Some(dir.join("storage"));
        let registry = Registry::start(&opts).await?;
        for image in TEST_IMAGES {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
            registry.push(image, &format!("iot/web:{tag}"), PUBLISHER, &password)?;
        }
        Ok(Self {
            registry,
            token,
            keys,
            password_file,
        })
    }

    /// The operator's settings for it.
    pub fn operator_env(&self, ca_file: &std::path::Path) -> Vec<(&'static str, String)> {
        vec![
            ("IOT_REGISTRIES", self.url()),
            ("IOT_REGISTRY_SIGNING_KEY", self.keys.key_pem.display().to_string()),
            ("IOT_REGISTRY_CA_FILE", ca_file.display().to_string()),
        ]
    }
}

fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The menu: push a new version, roll it out paced, re-resolve a moved tag.
pub fn section(m: &mut String, up: &Up) {
    let Some(r) = &up.registry else { return };
    let url = r.url();
    let creds = format!("--creds {PUBLISHER}:$(cat {})", r.password_file.display());
    let cert_dir = r.registry.cert_dir();
    line(
        m,
        format!(
            "\n{} (TLS from the stack's CA; token service {}; iot/web:v1 and :v2 are in it)",
            out::bold(&format!("Private registry https://{url}")),
            r.token.realm()
        ),
    );
    line(
        m,
        "  # push a new version as the publisher (people and CI push; devices only pull):",
    );
    line(
        m,
        format!(
            "  podman push --cert-dir {} {creds} localhost/iot-web:v2 docker://{url}/iot/web:stable",
            cert_dir.display()
        ),
    );
    line(
        m,
        "  # roll it out, two devices pulling at a time; the operator pins the tag to a digest:",
    );
    line(
        m,
        format!(
            "  kubectl apply -f - <<EOF\n  apiVersion: iot.nationtech.io/v1alpha1\n  kind: Deployment\n  metadata: {{name: pulled, namespace: default}}\n  spec:\n    selector: {{matchLabels: {{site: lab}}}}\n    rollout: {{maxConcurrentPulls: 2}}\n    score:\n      PodmanV0:\n        services: [{{name: web, image: {url}/iot/web:stable, ports: [{{hostPort: 8081, containerPort: 80}}]}}]\n  EOF"
        ),
    );
    line(
        m,
        "  kubectl get iotdep pulled -o jsonpath='{.status.images}'; echo    # the pinned digest",
    );
    line(m, "  iotctl devices                # pull progress while it runs");
    line(m, "  # a tag that moved changes nothing until you say so:");
    line(
        m,
        "  kubectl annotate iotdep pulled iot.nationtech.io/resolve-images=$(date +%s) --overwrite",
    );
    line(
        m,
        format!(
            "  tail -f {}    # the registry's own log",
            r.registry.log_path().display()
        ),
    );
}
