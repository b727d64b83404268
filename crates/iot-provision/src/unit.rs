//! What lands on the device: the systemd unit and the first-boot install script.

pub const AGENT_BINARY: &str = "/usr/local/bin/iot-agent";
pub const AGENT_ENV_FILE: &str = "/etc/iot-agent/agent.env";
pub const AGENT_IDENTITY_FILE: &str = "/etc/iot-agent/identity.json";
pub const AGENT_CA_FILE: &str = "/etc/iot-agent/ca.pem";
pub const INSTALL_SCRIPT: &str = "/usr/local/lib/iot-agent/install-from-seed";

/// The agent's unit. It runs as root because the rootful podman socket is the
/// agent's whole job (and is root-equivalent whatever the unit says), but with no
/// capabilities, a read-only view of the system and only the socket families it
/// uses, so a compromised agent can do no more than the podman API allows.
pub fn agent_unit() -> String {
    format!(
        "\
[Unit]
Description=IoT fleet agent: keeps podman matching this device's desired state
Wants=network-online.target podman.socket
After=network-online.target podman.socket
# Keep trying for as long as the device is up: NATS may be unreachable for hours.
StartLimitIntervalSec=0

[Service]
Type=simple
EnvironmentFile={AGENT_ENV_FILE}
ExecStart={AGENT_BINARY}
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
UMask=0077

[Install]
WantedBy=multi-user.target
"
    )
}

/// What the install script takes from the seed, with the hashes it checks.
pub(crate) struct SeedContents<'a> {
    pub agent_sha256: &'a str,
    pub enrollment_sha256: Option<String>,
    pub ca_sha256: Option<String>,
    pub preload_images: &'a [String],
}

/// The first-boot script: finds the seed (the `cidata` disk a VM or USB stick
/// carries, or a Pi's boot partition); copies the agent binary, the enrollment and
/// the CA off it and checks each copy's sha256 before it is installed; loads any
/// preloaded images; enables the agent. Then, with everything in place, it removes
/// the enrollment secret from the seed when the seed is writable (a USB stick, a
/// Pi's vfat boot partition), so a seed left in a drawer or a device's SD card
/// read on another machine gives nothing away.
pub(crate) fn install_script(c: &SeedContents<'_>) -> String {
    let loads: String = c
        .preload_images
        .iter()
        .map(|f| format!("podman load --quiet --input \"$src/{f}\" >/dev/null\n"))
        .collect();
    let take = |name: &str, dest: &str, mode: &str, sha: &str, what: &str| {
        format!(
            "\
install -D -m {mode} \"$src/{name}\" {dest}.new
if ! echo '{sha}  {dest}.new' | sha256sum --check --status; then
  rm -f {dest}.new
  echo 'iot-agent: {what} on the seed does not match the provisioned sha256; not installed' >&2
  exit 1
fi
mv {dest}.new {dest}
"
        )
    };
    let agent = take(crate::AGENT_FILE, AGENT_BINARY, "0755", c.agent_sha256, "the binary");
    let enrollment = c
        .enrollment_sha256
        .as_deref()
        .map(|sha| {
            take(
                crate::ENROLLMENT_FILE,
                AGENT_IDENTITY_FILE,
                "0600",
                sha,
                "the enrollment",
            )
        })
        .unwrap_or_default();
    let ca = c
        .ca_sha256
        .as_deref()
        .map(|sha| take(crate::CA_FILE, AGENT_CA_FILE, "0644", sha, "the CA certificate"))
        .unwrap_or_default();
    let scrub = if c.enrollment_sha256.is_some() {
        format!(
            "\
# The device has its copy (0600, root): the seed's goes, if the seed can be written.
# Overwritten before it is unlinked: FAT frees a deleted file's clusters but leaves
# its bytes in them. (Flash wear levelling may still keep an old copy in blocks the
# card no longer maps; a device whose seed must be trusted empty is re-enrolled.)
if [ -n \"$mnt\" ]; then mount -o remount,rw \"$mnt\" 2>/dev/null || true; fi
if shred -n 1 -z -u \"$src/{e}\" 2>/dev/null && [ ! -e \"$src/{e}\" ]; then
  sync
  echo 'iot-agent: removed the enrollment secret from the seed'
else
  echo 'iot-agent: the seed is read-only; its copy of the enrollment secret stays on it (rotate it: iotctl device enroll again)'
fi
",
            e = crate::ENROLLMENT_FILE
        )
    } else {
        String::new()
    };
    format!(
        "\
#!/bin/sh
# Installs the fleet agent from the provisioning seed and enables it; any failure
# stops here, before the unit is enabled. Written by iot-provision.
set -eu
src=''
mnt=''
finish() {{
  rc=$?
  if [ -n \"$mnt\" ]; then umount \"$mnt\" && rmdir \"$mnt\"; fi
  if [ \"$rc\" != 0 ]; then echo \"iot-agent: install failed (exit $rc); the agent is not enabled\" >&2; fi
}}
trap finish EXIT
for dev in /dev/disk/by-label/cidata /dev/disk/by-label/CIDATA; do
  if [ -e \"$dev\" ]; then
    mnt=$(mktemp -d)
    mount -o ro \"$dev\" \"$mnt\"
    src=$mnt
    break
  fi
done
if [ -z \"$src\" ] && [ -f /boot/firmware/{file} ]; then src=/boot/firmware; fi
if [ -z \"$src\" ]; then
  echo 'iot-agent: no seed carrying {file} (no cidata disk, no /boot/firmware/{file})' >&2
  exit 1
fi
{agent}{enrollment}{ca}{loads}# On disk before anything runs from it: a power cut during the first minute
# must not leave a half-written binary or image store (containers/storage does
# not fsync all it writes).
sync
echo \"iot-agent: installed $({AGENT_BINARY} --version)\"
systemctl daemon-reload
systemctl enable --now podman.socket iot-agent.service
{scrub}",
        file = crate::AGENT_FILE
    )
}
