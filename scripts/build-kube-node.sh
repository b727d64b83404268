#!/usr/bin/env bash
# Builds the node side of Kubernetes 1.20.2 from the same pinned source as
# build-kube-apiserver.sh: kubelet, kube-controller-manager, kube-scheduler and
# kube-proxy. Only `up.sh --cluster` and the in-cluster tests need them; the
# API-server-only paths never run this. About 5 minutes on 2 cores, cold.
#
# Output (cached): $IOT_BIN/{kubelet,kube-controller-manager,kube-scheduler,kube-proxy}.
# A rerun with the binaries present and these scripts unchanged returns at once.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/kube-src.sh"

BINS=(kubelet kube-controller-manager kube-scheduler kube-proxy)
STAMP="$IOT_BIN/.kube-node.sha256"
SELF="$(realpath "$0")"
script_hash() { cat "$SELF" "$KUBE_SRC_SELF" | sha256sum | cut -d' ' -f1; }

have_all() { local b; for b in "${BINS[@]}"; do [ -x "$IOT_BIN/$b" ] || return 1; done; }
if have_all && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(script_hash)" ]; then
  step "kubelet, kube-controller-manager, kube-scheduler, kube-proxy already built ($IOT_BIN)"
  exit 0
fi
mkdir -p "$IOT_BIN"

log "Step 1/3: fetch the kubernetes source package and Go 1.15 (cached after the first time)"
kube_src_fetch
SCRATCH="$KUBE_WORK/node-build"
# On failure, do not leave the ~1.5 GB tree and Go cache behind.
trap 'rm -rf "$SCRATCH"' EXIT
log "Step 2/3: unpack"
kube_src_unpack "$SCRATCH"
cd "$KUBE_TREE"
# None of these four needs pkg/generated/openapi, so no openapi-gen step.
ldflags=$(kube_ldflags)
start=$(date +%s)
for b in "${BINS[@]}"; do
  log "Step 3/3: go build $b (log in $KUBE_WORK/node-build.log)"
  nice go build -ldflags "$ldflags" -o "$KUBE_WORK/$b" "./cmd/$b" >>"$KUBE_WORK/node-build.log" 2>&1 \
    || die "go build $b failed; last lines:
$(tail -20 "$KUBE_WORK/node-build.log")"
  install -m 0755 "$KUBE_WORK/$b" "$IOT_BIN/$b" && rm -f "$KUBE_WORK/$b"
  "$IOT_BIN/$b" --version 2>&1 | grep -q "$K8S_GIT_VERSION" || die "built $b does not report $K8S_GIT_VERSION"
done
script_hash >"$STAMP"
step "built ${BINS[*]} in $(( $(date +%s) - start )) s"
