//! What lands on the device: the systemd unit and the first-boot install script.

pub const AGENT_BINARY: &str = "/usr/local/bin/iot-agent";
pub const AGENT_ENV_FILE: &str = "/etc/iot-agent/agent.env";
pub const AGENT_IDENTITY_FILE: &str = "/etc/iot-agent/identity.json";
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

/// The first-boot script: finds the seed (the `cidata` disk a VM or USB stick
/// carries, or a Pi's boot partition), copies the agent binary off it, checks the
/// copy's sha256 and only then installs it, and loads any preloaded images.
pub fn install_script(agent_sha256: &str, preload_images: &[String]) -> String {
    let loads: String = preload_images
        .iter()
        .map(|f| format!("podman load --quiet --input \"$src/{f}\" >/dev/null\n"))
        .collect();
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
install -D -m 0755 \"$src/{file}\" {AGENT_BINARY}.new
if ! echo '{agent_sha256}  {AGENT_BINARY}.new' | sha256sum --check --status; then
  rm -f {AGENT_BINARY}.new
  echo 'iot-agent: the binary on the seed does not match the provisioned sha256; not installed' >&2
  exit 1
fi
mv {AGENT_BINARY}.new {AGENT_BINARY}
{loads}# On disk before anything runs from it: a power cut during the first minute
# must not leave a half-written binary or image store (containers/storage does
# not fsync all it writes).
sync
echo \"iot-agent: installed $({AGENT_BINARY} --version)\"
systemctl daemon-reload
systemctl enable --now podman.socket iot-agent.service
",
        file = crate::AGENT_FILE
    )
}
