//! The part of cloud-init's `#cloud-config` schema that provisioning uses, as types.

use serde::Serialize;

use crate::{AdminUser, Error};

#[derive(Debug, Clone, Serialize)]
pub struct CloudConfig {
    pub hostname: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Password logins over ssh; off: passwords are for the console only.
    pub ssh_pwauth: bool,
    pub write_files: Vec<WriteFile>,
    /// Commands run once, at the end of the first boot (cloud-final), in order.
    pub runcmd: Vec<Vec<String>>,
}

impl CloudConfig {
    /// The user-data document, with the `#cloud-config` header cloud-init requires.
    pub fn render(&self, device_id: &str) -> Result<String, Error> {
        Ok(format!(
            "#cloud-config\n# Provisions fleet device {device_id}: installs the agent from this seed,\n# writes its settings and enrollment (0600) and a hardened systemd unit.\n{}",
            serde_yaml_ng::to_string(self)?
        ))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub shell: String,
    pub sudo: String,
    pub lock_passwd: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hashed_passwd: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

impl User {
    pub fn admin(a: &AdminUser) -> Self {
        User {
            name: a.name.clone(),
            groups: vec!["adm".into(), "systemd-journal".into()],
            shell: "/bin/bash".into(),
            sudo: "ALL=(ALL) NOPASSWD:ALL".into(),
            lock_passwd: a.password_hash.is_none(),
            hashed_passwd: a.password_hash.clone(),
            ssh_authorized_keys: a.ssh_authorized_keys.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteFile {
    pub path: String,
    pub owner: String,
    pub permissions: String,
    pub content: String,
}

impl WriteFile {
    pub fn new(path: &str, permissions: &str, content: String) -> Self {
        WriteFile {
            path: path.into(),
            owner: "root:root".into(),
            permissions: permissions.into(),
            content,
        }
    }
}
