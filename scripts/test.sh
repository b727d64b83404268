#!/usr/bin/env bash
# The one command that runs every test. Installs what it needs first (idempotent).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$IOT_REPO"

# --cluster: the API servers and the single-node Kubernetes (its binaries built once,
# then cached); --vm: the x86_64 guest image for the VM device test.
"$IOT_REPO/scripts/setup-host.sh" --cluster --vm
export CONTAINERS_CONF="$IOT_REPO/dev/containers.conf"
# Incremental caches only pay off when editing; on a CI disk they are gigabytes
# of dead weight.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

log "cargo fmt --check"
cargo fmt --all --check
# Every package of the lock file, every platform's: the layout test reads the
# resolved graph offline (`cargo metadata --offline`), which a build alone does
# not download.
cargo fetch --locked --quiet
log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "platform images (scripts/build-image.sh; the in-cluster test runs them as pods)"
"$IOT_REPO/scripts/build-image.sh" >/dev/null
"$IOT_REPO/scripts/check-agent-size.sh"
log "cargo test (unit + integration against real nats-server, podman and the API server)"
cargo test --workspace --quiet --no-fail-fast
"$IOT_REPO/scripts/cross-aarch64.sh"
log "all tests passed"
