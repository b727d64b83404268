#!/usr/bin/env bash
# The main command: brings up the whole platform on this machine (Kubernetes API
# server + etcd, nats-server, the operator, and devices in network namespaces),
# then prints a command menu and stays up until Ctrl-C. `--auto` runs the
# end-to-end regression instead and exits 0/1. `--devices N` starts N devices.
# `--vm [--arch x86_64|aarch64]` adds a VM device booted with cloud-init (the
# regression then runs against it); `--devices 0 --vm` leaves only the VM.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_root "up.sh"
cd "$IOT_REPO"

want_vm=0 vm_arch=x86_64 prev="" servers=--apiserver
for a in "$@"; do
  case "$a" in
    --vm) want_vm=1 ;;
    # Each mode builds its own parts when first asked for: the full kube-apiserver
    # only for --sso, the node's binaries only for --cluster.
    --sso) [ "$servers" = --cluster ] || servers=--kube-apiserver ;;
    --cluster) servers=--cluster ;;
    --arch=*) vm_arch=${a#--arch=} ;;
  esac
  [ "$prev" = "--arch" ] && vm_arch=$a
  prev=$a
done
case "$vm_arch" in arm64) vm_arch=aarch64 ;; amd64) vm_arch=x86_64 ;; esac
[ "$want_vm" = 1 ] || vm_arch=""
"$IOT_REPO/scripts/setup-host.sh" "$servers" ${vm_arch:+--vm=$vm_arch}
log "Building release binaries (first time: a few minutes)"
cargo build --release -p iot-operator -p iot-agent -p iotctl -p example_iot_apply_deployment -p iot-up -p iot-auth -p iot-dashboard
if [ -n "$vm_arch" ] && [ "$vm_arch" != "$(uname -m)" ]; then
  log "Building the agent for the $vm_arch VM"
  cargo build --profile device --target "$vm_arch-unknown-linux-gnu" -p iot-agent
fi
export CONTAINERS_CONF="$IOT_REPO/dev/containers.conf"
if [ "$servers" = --cluster ]; then
  log "Building the platform's images (the node imports them; there is no registry)"
  "$IOT_REPO/scripts/build-image.sh" >/dev/null
fi
# Every process started from here carries this, so a later run can find and stop
# what a killed run left behind.
export IOT_UP_STATE_DIR="${IOT_UP_STATE_DIR:-/run/iot-up}"
exec "$IOT_REPO/target/release/iot-up" "$@"
