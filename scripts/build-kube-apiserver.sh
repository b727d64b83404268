#!/usr/bin/env bash
# Builds a full upstream kube-apiserver 1.20.2 (RBAC, ServiceAccounts, TokenRequest,
# apps/v1, coordination.k8s.io Leases, OIDC, audit log) offline from Debian's own
# packages, for the chart, RBAC and SSO tests:
#   - source: bookworm's `kubernetes` source package (its orig tarball carries vendor/)
#   - Go: bullseye's golang-1.15 (the tree vendors reflect2 1.0.1, which breaks on Go
#     1.18 and later)
# Host apt sources are never touched: apt runs with its own source list and state
# under $IOT_CACHE/kube-build. etcd comes from build-apiserver.sh.
#
# Output (cached): $IOT_BIN/kube-apiserver. A rerun with the binary present and this
# script unchanged returns at once.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_GIT_VERSION="v1.20.2"
GO_DEB_VERSION="1.15.15-1~deb11u4"
WORK="$IOT_CACHE/kube-build"
STAMP="$IOT_BIN/.kube-apiserver.sha256"

SELF="$(realpath "$0")"
script_hash() { sha256sum "$SELF" | cut -d' ' -f1; }

if [ -x "$IOT_BIN/kube-apiserver" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(script_hash)" ]; then
  step "kube-apiserver already built ($IOT_BIN/kube-apiserver)"
  exit 0
fi
mkdir -p "$IOT_BIN" "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/dl"

log "Step 1/4: fetch the kubernetes source package (bookworm) and Go 1.15 (bullseye) with apt (~95 MB)"
cat >"$WORK/apt/sources.list" <<'EOF'
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bullseye main
EOF
APT=(-q -o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache"
     -o APT::Sandbox::User=root)
arch=$(dpkg --print-architecture)
orig="$WORK/dl/kubernetes_${K8S_DEB_VERSION%-*}.orig.tar.gz"
go_deb="$WORK/dl/golang-1.15-go_${GO_DEB_VERSION}_${arch}.deb"
if [ ! -f "$orig" ] || [ ! -f "$go_deb" ]; then
  apt-get "${APT[@]}" update >"$WORK/apt.log" 2>&1 || die "step 1: apt-get update failed; see $WORK/apt.log"
  (cd "$WORK/dl" && apt-get "${APT[@]}" source --download-only "kubernetes=$K8S_DEB_VERSION" \
     && apt-get "${APT[@]}" download "golang-1.15-go=$GO_DEB_VERSION" "golang-1.15-src=$GO_DEB_VERSION") \
     >>"$WORK/apt.log" 2>&1 || die "step 1: apt-get source/download failed (pinned $K8S_DEB_VERSION, Go $GO_DEB_VERSION); see $WORK/apt.log"
fi

# apt checked the files against the signed archive; pin the source tarball too, so a
# rebuilt package under the same version cannot slip in. If Debian drops these
# versions from deb.debian.org, step 1 fails here: bump the pins and re-test.
echo "b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc  $orig" | sha256sum -c --quiet - \
  || die "step 1: $orig does not match its pinned sha256"

# On failure, do not leave the ~1.5 GB tree and Go caches behind.
trap 'rm -rf "$WORK/gopath" "$WORK/go" "$WORK/gocache"' EXIT

log "Step 2/4: unpack"
rm -rf "$WORK/go" "$WORK/gopath"
mkdir -p "$WORK/go" "$WORK/gopath/src/k8s.io"
for d in "$WORK"/dl/golang-1.15-*.deb; do dpkg -x "$d" "$WORK/go"; done
TREE="$WORK/gopath/src/k8s.io/kubernetes"
mkdir -p "$TREE"
tar -xzf "$orig" -C "$TREE" --strip-components=1
export GOROOT="$WORK/go/usr/lib/go-1.15"
export PATH="$GOROOT/bin:$PATH" GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GO111MODULE=off GOFLAGS=
go version | grep -q 'go1.15' || die "step 2: unpacked Go is not 1.15"

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
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X k8s.io/kubernetes/vendor/$p.gitVersion=$K8S_GIT_VERSION -X k8s.io/kubernetes/vendor/$p.gitMajor=1 -X k8s.io/kubernetes/vendor/$p.gitMinor=20"
done
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
