#!/usr/bin/env bash
# Builds the CRD-serving Kubernetes API server (our own small main over upstream
# k8s.io/apiextensions-apiserver) and etcd, purely from Debian sid packages, inside a
# debootstrap chroot so the host's apt sources are never touched.
#
# Output (cached): $IOT_BIN/iot-apiserver and $IOT_BIN/etcd. A rerun with the
# binaries present and the Go source unchanged returns in well under a second.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SRC_DIR="$IOT_REPO/hack/apiserver"
ROOT="$IOT_CACHE/sid-root"
STAMP="$IOT_BIN/.apiserver-src.sha256"
# Pinned versions: sid moves daily. If these are gone we fail loudly rather than build
# against something untested.
APIEXT_VERSION_PREFIX="0.36."
K8S_GIT_VERSION="v1.36.4"

src_hash() { cat "$SRC_DIR"/*.go "$0" | sha256sum | cut -d' ' -f1; }

if [ -x "$IOT_BIN/iot-apiserver" ] && [ -x "$IOT_BIN/etcd" ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$(src_hash)" ]; then
  step "API server and etcd already built ($IOT_BIN)"
  exit 0
fi

need_root "build-apiserver.sh"
mkdir -p "$IOT_BIN" "$IOT_CACHE"

cleanup_mounts() {
  mountpoint -q "$ROOT/proc" && umount -l "$ROOT/proc" || true
}
trap cleanup_mounts EXIT

if [ ! -f "$ROOT/.debootstrap-done" ]; then
  command -v debootstrap >/dev/null || die "debootstrap missing: run scripts/setup-host.sh first"
  log "Step 1/4: debootstrap Debian sid into $ROOT (about 25 s, ~250 MB)"
  rm -rf "$ROOT"
  debootstrap --variant=minbase sid "$ROOT" http://deb.debian.org/debian >"$IOT_CACHE/debootstrap.log" 2>&1 \
    || die "step 1 (debootstrap sid) failed; see $IOT_CACHE/debootstrap.log"
  touch "$ROOT/.debootstrap-done"
else
  step "Step 1/4: sid chroot already present"
fi

mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"

if [ ! -f "$ROOT/.packages-done" ]; then
  log "Step 2/4: apt-get install golang-go, apiextensions-apiserver source, etcd-server in the chroot (about 60 s, ~410 MB download)"
  # `dpkg --configure -a` first: a run killed mid-install (a CI timeout, a reboot)
  # leaves dpkg half done, and apt then refuses every command until it is finished.
  chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c '
    dpkg --configure -a &&
    apt-get -o Acquire::Check-Valid-Until=false update -q &&
    apt-get install -y -q --no-install-recommends golang-go golang-k8s-apiextensions-apiserver-dev etcd-server ca-certificates
  ' >"$IOT_CACHE/apt-sid.log" 2>&1 || die "step 2 (apt-get install in the sid chroot) failed; see $IOT_CACHE/apt-sid.log"
  touch "$ROOT/.packages-done"
else
  step "Step 2/4: sid packages already installed"
fi

ver=$(chroot "$ROOT" dpkg-query -W -f='${Version}' golang-k8s-apiextensions-apiserver-dev)
case "$ver" in
  "$APIEXT_VERSION_PREFIX"*) step "apiextensions-apiserver source version $ver" ;;
  *) die "step 2: sid now ships golang-k8s-apiextensions-apiserver-dev $ver, but this script is tested with ${APIEXT_VERSION_PREFIX}x; update hack/apiserver and APIEXT_VERSION_PREFIX" ;;
esac

log "Step 3/4: go build iot-apiserver (about 2-3 min on 2 cores; progress in $IOT_CACHE/go-build.log)"
rm -rf "$ROOT/build" && mkdir -p "$ROOT/build/src/iot-apiserver"
cp "$SRC_DIR"/*.go "$ROOT/build/src/iot-apiserver/"
VPKG=k8s.io/component-base/version
LDFLAGS="-s -w -X $VPKG.gitVersion=$K8S_GIT_VERSION -X $VPKG.gitMajor=1 -X $VPKG.gitMinor=36"
(
  chroot "$ROOT" /usr/bin/env GO111MODULE=off GOPATH=/build:/usr/share/gocode GOCACHE=/build-cache GOFLAGS=-mod=mod \
    bash -c "cd /build/src/iot-apiserver && go build -v -ldflags '$LDFLAGS' -o /build/iot-apiserver ." \
    >"$IOT_CACHE/go-build.log" 2>&1
) &
build_pid=$!
start=$(date +%s)
while kill -0 "$build_pid" 2>/dev/null; do
  sleep 10
  n=$(wc -l <"$IOT_CACHE/go-build.log" 2>/dev/null || echo 0)
  step "  ... $(( $(date +%s) - start ))s elapsed, $n packages compiled"
done
wait "$build_pid" || die "step 3 (go build) failed; last lines:
$(tail -20 "$IOT_CACHE/go-build.log")"

log "Step 4/4: install binaries into $IOT_BIN"
install -m 0755 "$ROOT/build/iot-apiserver" "$IOT_BIN/iot-apiserver"
install -m 0755 "$ROOT/usr/bin/etcd" "$IOT_BIN/etcd"
src_hash >"$STAMP"
step "built $IOT_BIN/iot-apiserver ($(du -h "$IOT_BIN/iot-apiserver" | cut -f1)) and $IOT_BIN/etcd"
