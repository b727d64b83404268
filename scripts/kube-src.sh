# Shared by build-kube-apiserver.sh and build-kube-node.sh: fetches the pinned
# Kubernetes 1.20.2 source (bookworm's `kubernetes` source package, whose orig tarball
# carries vendor/) and Go 1.15 (bullseye's golang-1.15; the tree vendors reflect2 1.0.1,
# which breaks on Go 1.18 and later), then unpacks both for a GOPATH-mode build.
# Host apt sources are never touched: apt runs with its own source list and state
# under $KUBE_WORK. Sourced after lib.sh, not executed.
K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_GIT_VERSION="v1.20.2"
GO_DEB_VERSION="1.15.15-1~deb11u4"
KUBE_WORK="$IOT_CACHE/kube-build"
KUBE_SRC_SELF="$(realpath "${BASH_SOURCE[0]}")"

# Fetches (once) and checks the source tarball and the Go debs into $KUBE_WORK/dl.
kube_src_fetch() {
  mkdir -p "$KUBE_WORK/apt/lists/partial" "$KUBE_WORK/apt/cache/archives/partial" "$KUBE_WORK/dl"
  cat >"$KUBE_WORK/apt/sources.list" <<'SRC'
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bullseye main
SRC
  local apt=(-q -o "Dir::Etc::SourceList=$KUBE_WORK/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$KUBE_WORK/apt/lists" -o "Dir::Cache=$KUBE_WORK/apt/cache"
       -o APT::Sandbox::User=root)
  local arch; arch=$(dpkg --print-architecture)
  KUBE_ORIG="$KUBE_WORK/dl/kubernetes_${K8S_DEB_VERSION%-*}.orig.tar.gz"
  local go_deb="$KUBE_WORK/dl/golang-1.15-go_${GO_DEB_VERSION}_${arch}.deb"
  if [ ! -f "$KUBE_ORIG" ] || [ ! -f "$go_deb" ]; then
    apt-get "${apt[@]}" update >"$KUBE_WORK/apt.log" 2>&1 || die "apt-get update failed; see $KUBE_WORK/apt.log"
    (cd "$KUBE_WORK/dl" && apt-get "${apt[@]}" source --download-only "kubernetes=$K8S_DEB_VERSION" \
       && apt-get "${apt[@]}" download "golang-1.15-go=$GO_DEB_VERSION" "golang-1.15-src=$GO_DEB_VERSION") \
       >>"$KUBE_WORK/apt.log" 2>&1 || die "apt-get source/download failed (pinned $K8S_DEB_VERSION, Go $GO_DEB_VERSION); see $KUBE_WORK/apt.log"
  fi
  # apt checked the files against the signed archive; pin the source tarball too, so a
  # rebuilt package under the same version cannot slip in. If Debian drops these
  # versions from deb.debian.org, this fails: bump the pins and re-test.
  echo "b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc  $KUBE_ORIG" | sha256sum -c --quiet - \
    || die "$KUBE_ORIG does not match its pinned sha256"
}

# Unpacks Go and the tree into $1 (a scratch directory the caller removes) and
# exports a GOPATH-mode Go 1.15 environment; sets KUBE_TREE.
kube_src_unpack() {
  local scratch=$1
  rm -rf "$scratch" && mkdir -p "$scratch/go" "$scratch/gopath/src/k8s.io"
  local d; for d in "$KUBE_WORK"/dl/golang-1.15-*.deb; do dpkg -x "$d" "$scratch/go"; done
  KUBE_TREE="$scratch/gopath/src/k8s.io/kubernetes"
  mkdir -p "$KUBE_TREE"
  tar -xzf "$KUBE_ORIG" -C "$KUBE_TREE" --strip-components=1
  export GOROOT="$scratch/go/usr/lib/go-1.15"
  export PATH="$GOROOT/bin:$PATH" GOPATH="$scratch/gopath" GOCACHE="$scratch/gocache" GO111MODULE=off GOFLAGS=
  go version | grep -q 'go1.15' || die "unpacked Go is not 1.15"
}

# The version ldflags upstream's build sets, so `--version` says v1.20.2.
kube_ldflags() {
  local f="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f="$f -X k8s.io/kubernetes/vendor/$p.gitVersion=$K8S_GIT_VERSION -X k8s.io/kubernetes/vendor/$p.gitMajor=1 -X k8s.io/kubernetes/vendor/$p.gitMinor=20"
  done
  echo "$f"
}
