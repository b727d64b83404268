#!/usr/bin/env bash
# The arm64 device check, on its own because the arm64 guest image takes about
# 25 minutes to build the first time (its package scripts run under qemu-user),
# which does not fit CI's budget next to everything else; once cached, this whole
# script takes about 10 minutes. It runs, against an emulated arm64 Debian guest
# with the cross-built agent installed by cloud-init:
#   1. the main command's regression: scripts/up.sh --vm --arch aarch64 --auto
#   2. the power-cycle test (reset, clean shutdown, delete while off)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_root "test-arm64-vm.sh"
cd "$IOT_REPO"

"$IOT_REPO/scripts/setup-host.sh" --apiserver --vm=aarch64
export CONTAINERS_CONF="$IOT_REPO/dev/containers.conf"
log "aarch64 release agent"
cargo build --profile device --quiet --target aarch64-unknown-linux-gnu -p iot-agent
log "scripts/up.sh --vm --arch aarch64 --devices 0 --auto"
"$IOT_REPO/scripts/up.sh" --vm --arch aarch64 --devices 0 --auto
log "power cycles of an arm64 VM device (crates/iot-e2e/tests/vm_device.rs)"
IOT_VM_TEST_ARCH=aarch64 cargo test --quiet -p iot-e2e --test vm_device -- --nocapture
log "arm64 VM device checks passed"
