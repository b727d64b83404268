//! `--sso`: people log in through the OIDC stand-in for Zitadel, and the full
//! kube-apiserver (with `--oidc-*` flags and RBAC) maps their groups to the chart's
//! iot-fleet-* roles. The roles and bindings come from the chart itself, rendered
//! with the demo groups, so what the demo shows is what a cluster install gets.

use std::process::Command;

use iot_launch::{KubeApiServer, OidcStandIn};

/// The demo users of hack/oidc/users.json and what each may do here.
pub const DEMO_USERS: [(&str, &str, &str); 6] = [
    ("alice", "fleet-admins", "everything on Deployments, in every namespace"),
    ("dave", "fleet-deployers", "create, change and delete Deployments"),
    ("vera", "fleet-viewers", "read only: writes are Forbidden"),
    (
        "nora",
        "fleet-deployers, but only in Zitadel's nested claim",
        "nothing: what a Zitadel without the flatGroups Action gives",
    ),
    (
        "olga",
        "fleet-viewers; fleet-admins in another project",
        "read only: other projects' roles do not count",
    ),
    ("sam", "no groups", "nothing"),
];

/// Chart values binding the stand-in's groups to the fleet roles.
const SSO_SETS: [&str; 3] = [
    "sso.groups.viewers={fleet-viewers}",
    "sso.groups.deployers={fleet-deployers}",
    "sso.groups.admins={fleet-admins}",
];

pub struct Sso {
    pub oidc: OidcStandIn,
    pub api: KubeApiServer,
}

/// Renders the chart with the demo groups and applies only its people-facing
/// RBAC: the iot-fleet-* ClusterRoles and the `-sso-` bindings (the operator runs
/// from this launcher, not from the chart's Deployment).
pub fn apply_fleet_roles(api: &KubeApiServer) -> anyhow::Result<usize> {
    let root = iot_launch::paths::repo_root();
    let mut render = Command::new("python3");
    render
        .arg(root.join("hack/helm.py"))
        .args(["template"])
        .arg(root.join("deploy/chart/iot-operator"))
        .args(["--release", "iot", "--namespace", "iot-system"]);
    for s in SSO_SETS {
        render.args(["--set", s]);
    }
    let (ok, rendered, err) = iot_launch::run_captured(render, None)?;
    anyhow::ensure!(ok, "rendering the chart's fleet roles failed: {err}");
    let docs = people_rbac(&rendered);
    anyhow::ensure!(
        docs.len() >= 6,
        "the chart rendered {} fleet role documents, expected 6",
        docs.len()
    );
    let (ok, out, err) = api.kubectl(&["apply", "-f", "-"], Some(&docs.join("\n---\n")))?;
    anyhow::ensure!(ok, "applying the fleet roles failed: {out}{err}");
    Ok(docs.len())
}

/// The rendered documents that are people's roles and their SSO bindings.
fn people_rbac(rendered: &str) -> Vec<&str> {
    rendered
        .split("\n---")
        .filter(|doc| {
            let role = doc.contains("\nkind: ClusterRole\n") && doc.contains("\n  name: iot-fleet-");
            let binding = doc.contains("\nkind: ClusterRoleBinding\n") && doc.contains("-sso-");
            role || binding
        })
        .collect()
}

/// `iotctl login` for the menu, writing a kubeconfig that uses the plugin.
pub fn login_command(sso: &Sso, kubeconfig: &std::path::Path) -> String {
    format!(
        "iotctl login --print-kubeconfig --server {} --certificate-authority {} > {}",
        sso.api.url(),
        sso.api.ca_file().display(),
        kubeconfig.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_only_people_roles_and_sso_bindings() {
        let rendered = "---\n# a\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: iot\n\
            ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: iot-fleet-viewer\n\
            ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: iot-system-iot-iot-operator\n\
            ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: iot-system-iot-iot-operator-sso-viewers\n\
            ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: iot-system-iot-iot-operator\n";
        let docs = people_rbac(rendered);
        assert_eq!(docs.len(), 2, "{docs:#?}");
        assert!(docs[0].contains("iot-fleet-viewer") && docs[1].contains("-sso-viewers"));
    }
}
