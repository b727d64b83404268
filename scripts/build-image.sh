#!/usr/bin/env bash
# Builds the operator's container image locally, with no base image (none can be
# pulled here, and none is needed): a scratch root holding the release binary, the
# exact shared libraries it links (from ldd), CA certificates and a non-root user.
# Tags localhost/iot-operator:<workspace version> and saves an OCI archive in dist/,
# the release artifact that is pushed to a registry (`skopeo copy oci-archive:...`).
#
#   scripts/build-image.sh [--repository REPO]   (default localhost/iot-operator)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$IOT_REPO"

repo=localhost/iot-operator
while [ $# -gt 0 ]; do
  case "$1" in
    --repository) repo=$2; shift 2 ;;
    *) die "unknown flag $1 (known: --repository REPO)" ;;
  esac
done
export CONTAINERS_CONF="${CONTAINERS_CONF:-$IOT_REPO/dev/containers.conf}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || die "cannot read the workspace version from Cargo.toml"

log "cargo build --release -p iot-operator (a few minutes cold)"
cargo build --release --locked -q -p iot-operator
bin="$IOT_REPO/target/release/iot-operator"

root=$(mktemp -d)
trap 'rm -rf "$root" "$root.tar"' EXIT
chmod 0755 "$root"  # mktemp makes it 0700, which would lock the non-root user out of /
install -D -m 0755 "$bin" "$root/usr/local/bin/iot-operator"
# The dynamic loader and every library the binary links, at the same paths.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$root/tmp" && chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
tar -C "$root" --owner=0 --group=0 --numeric-owner -cf "$root.tar" .

image="$repo:$version"
podman import -q \
  --change 'USER 65532:65532' \
  --change 'ENTRYPOINT ["/usr/local/bin/iot-operator"]' \
  --change 'CMD ["run"]' \
  --change "LABEL org.opencontainers.image.title=iot-operator" \
  --change "LABEL org.opencontainers.image.version=$version" \
  --change "LABEL org.opencontainers.image.source=https://github.com/nationtech/harmony-iot" \
  "$root.tar" "$image" >/dev/null || die "podman import failed"
rm -f "$root.tar"
# The previous build of this tag is now untagged; drop it (unless a container uses it).
podman image prune -f --filter "label=org.opencontainers.image.title=iot-operator" >/dev/null 2>&1 || true
mkdir -p dist
archive="dist/iot-operator-$version.oci.tar"
rm -f "$archive"
podman save -q --format oci-archive -o "$archive" "$image" || die "podman save failed"
size=$(podman image inspect --format '{{.Size}}' "$image")
step "built $image ($(( size / 1024 / 1024 )) MiB) and $archive"
echo "$image"
