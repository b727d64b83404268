#!/usr/bin/env bash
# Builds a full upstream kube-apiserver 1.20.2 (RBAC, ServiceAccounts, TokenRequest,
# apps/v1, coordination.k8s.io Leases, OIDC, audit log) offline from Debian's own
# packages, for the chart, RBAC and SSO tests. The pinned source and Go come from
# kube-src.sh (shared with build-kube-node.sh). etcd comes from build-apiserver.sh.
#
# Output (cached): $IOT_BIN/kube-apiserver. A rerun with the binary present and these
# scripts unchanged returns at once.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/kube-src.sh"
STAMP="$IOT_BIN/.kube-apiserver.sha256"
SELF="$(realpath "$0")"
script_hash() { cat "$SELF" "$KUBE_SRC_SELF" | sha256sum | cut -d' ' -f1; }

if [ -x "$IOT_BIN/kube-apiserver" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(script_hash)" ]; then
  step "kube-apiserver already built ($IOT_BIN/kube-apiserver)"
  exit 0
fi
mkdir -p "$IOT_BIN"
WORK="$KUBE_WORK"

log "Step 1/4: fetch the kubernetes source package (bookworm) and Go 1.15 (bullseye) with apt (~95 MB)"
kube_src_fetch

# On failure, do not leave the ~1.5 GB tree and Go caches behind.
trap 'rm -rf "$WORK/apiserver-build"' EXIT

log "Step 2/4: unpack"
kube_src_unpack "$WORK/apiserver-build"
TREE="$KUBE_TREE"

log "Step 3/4: generate pkg/generated/openapi with the vendored openapi-gen"
cd "$TREE"
go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
# The same package set upstream's Makefile.generated_files uses: every directory
# tagged +k8s:openapi-gen, staging named by its vendor/ path, minus two examples.
top=$(find . -mindepth 1 -maxdepth 1 -type d ! -name vendor ! -name '_*' ! -name '.*')
# shellcheck disable=SC2086 # $top is a list of plain directory names
inputs=$(grep -rl --include='*.go' '^// *+k8s:openapi-gen=' $top \
  | sed 's|^\./staging/src|vendor|; s|^\./||' \
  | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
  | xargs -n1 dirname | sort -u \
  | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
[ -n "$inputs" ] || die "step 3: no +k8s:openapi-gen packages found"
"$WORK/openapi-gen" -i "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h hack/boilerplate/boilerplate.generatego.txt -r "$WORK/openapi-violations.report" \
  >"$WORK/openapi-gen.log" 2>&1 || die "step 3: openapi-gen failed; see $WORK/openapi-gen.log"
[ -s pkg/generated/openapi/zz_generated.openapi.go ] || die "step 3: openapi-gen wrote nothing"

log "Step 4/4: go build kube-apiserver (about 5 min on 2 cores; log in $WORK/go-build.log)"
ldflags=$(kube_ldflags)
start=$(date +%s)
nice go build -ldflags "$ldflags" -o "$WORK/kube-apiserver" ./cmd/kube-apiserver >"$WORK/go-build.log" 2>&1 \
  || die "step 4 (go build) failed; last lines:
$(tail -20 "$WORK/go-build.log")"
install -m 0755 "$WORK/kube-apiserver" "$IOT_BIN/kube-apiserver"
"$IOT_BIN/kube-apiserver" --version | grep -q "$K8S_GIT_VERSION" || die "built kube-apiserver does not report $K8S_GIT_VERSION"
# The unpacked tree, Go caches and build outputs are ~1.7 GB and only needed to
# rebuild (the trap removes the tree and caches).
rm -f "$WORK/kube-apiserver" "$WORK/openapi-gen"
script_hash >"$STAMP"
step "built $IOT_BIN/kube-apiserver ($(du -h "$IOT_BIN/kube-apiserver" | cut -f1)) in $(( $(date +%s) - start )) s"
