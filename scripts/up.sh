#!/usr/bin/env bash
# The main command: brings up the whole platform on this machine (Kubernetes API
# server + etcd, nats-server, the operator, and devices in network namespaces),
# then prints a command menu and stays up until Ctrl-C. `--auto` runs the
# end-to-end regression instead and exits 0/1. `--devices N` starts N devices.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_root "up.sh"
cd "$IOT_REPO"

"$IOT_REPO/scripts/setup-host.sh" --apiserver
log "Building release binaries (first time: a few minutes)"
cargo build --release -p iot-operator -p iot-agent -p iotctl -p example_iot_apply_deployment -p iot-up -p iot-auth -p iot-dashboard
export CONTAINERS_CONF="$IOT_REPO/dev/containers.conf"
# Every process started from here carries this, so a later run can find and stop
# what a killed run left behind.
export IOT_UP_STATE_DIR="${IOT_UP_STATE_DIR:-/run/iot-up}"
exec "$IOT_REPO/target/release/iot-up" "$@"
