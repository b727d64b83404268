#!/usr/bin/env bash
# Builds the platform's container images locally, with no base image (none can be
# pulled here, and none is needed): each is a scratch root holding one binary, the
# exact shared libraries it links (from ldd; none for a static binary), CA
# certificates and a non-root user. Every image but the pause image is tagged with
# the workspace version, the charts' appVersion.
#
#   operator  localhost/iot-operator:<v>      the release binary; also saved as the
#             release artifact dist/iot-operator-<v>.oci.tar, which is pushed to a
#             registry (`skopeo copy oci-archive:...`)
#   callout   localhost/iot-auth-callout:<v>  the release binary of crate iot-auth
#   registry-token  localhost/iot-registry-token:<v>  the release binary of crate
#             iot-registry: the registry's token realm (iot-nats chart, registryToken)
#   nats      localhost/iot-nats:<v>          the nats-server the project installs
#             ($IOT_BIN/nats-server, static Go); its own version is a label
#   pause     localhost/iot-pause:3.2         the Kubernetes sandbox image: a static
#             C program written here (a kubelet's sandbox_image cannot be pulled)
#
#   scripts/build-image.sh [--only NAME]... [--repository REPO]
#     --only NAME        operator, callout, registry-token, nats or pause; repeatable
#                        (default: all)
#     --repository REPO  the operator's repository (default localhost/iot-operator)
#
# Rebuilding is cheap when nothing changed: cargo builds incrementally, and an image
# whose files and settings hash to the digest recorded in its label is kept as it is
# (same image id, so whoever imports it elsewhere can tell nothing changed).
# The last line on stdout is the operator's image name when the operator is built.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$IOT_REPO"

operator_repo=localhost/iot-operator
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --repository) operator_repo=$2; shift 2 ;;
    --only)
      case "${2:-}" in
        operator|callout|registry-token|nats|pause) only+=("$2") ;;
        *) die "--only takes operator, callout, registry-token, nats or pause (got '${2:-}')" ;;
      esac
      shift 2 ;;
    *) die "unknown flag $1 (known: --only NAME, --repository REPO)" ;;
  esac
done
[ ${#only[@]} -gt 0 ] || only=(operator callout registry-token nats pause)
wanted() { [[ " ${only[*]} " == *" $1 "* ]]; }

export CONTAINERS_CONF="${CONTAINERS_CONF:-$IOT_REPO/dev/containers.conf}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || die "cannot read the workspace version from Cargo.toml"
source_url=https://github.com/nationtech/harmony-iot
digest_label=io.nationtech.iot.input-digest

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# scratch_image [--no-certs] TITLE BINARY TARGET IMAGE [--change INSTRUCTION]...
#   A scratch image: BINARY at TARGET (mode 0755) with the loader and libraries ldd
#   lists for it, /etc/passwd and /etc/group with nonroot (65532), a /tmp, and the
#   system CA certificates unless --no-certs. The --change instructions (USER,
#   ENTRYPOINT, CMD, LABEL) are podman import's; the OCI title, version and source
#   labels are added here. The tar is reproducible (sorted names, fixed times), so
#   its hash, with the instructions, says whether the image must change.
scratch_image() {
  local certs=yes
  if [ "$1" = --no-certs ]; then certs=no; shift; fi
  local title=$1 bin=$2 target=$3 image=$4
  shift 4
  local changes=("$@"
    --change "LABEL org.opencontainers.image.title=$title"
    --change "LABEL org.opencontainers.image.version=${image##*:}"
    --change "LABEL org.opencontainers.image.source=$source_url")
  [ -x "$bin" ] || die "$title: no executable at $bin"
  local root="$work/$title"
  rm -rf "$root" && mkdir -p "$root"
  chmod 0755 "$root"  # mktemp makes $work 0700; the root must not lock the non-root user out
  install -D -m 0755 "$bin" "$root$target"
  # The dynamic loader and every library the binary links, at the same paths. ldd
  # fails on a static binary, which needs none.
  if ldd "$bin" >/dev/null 2>&1; then
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
      install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
  fi
  if [ "$certs" = yes ]; then
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  mkdir -p "$root/tmp" "$root/etc" && chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  local tar="$work/$title.tar"
  tar -C "$root" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$tar" .

  local digest
  digest=$({ sha256sum <"$tar"; printf '%s\n' "${changes[@]}"; } | sha256sum | cut -c1-64)
  local current
  current=$(podman image inspect --format "{{index .Labels \"$digest_label\"}}" "$image" 2>/dev/null || true)
  if [ "$current" = "$digest" ]; then
    step "$image unchanged"
  else
    podman import -q "${changes[@]}" --change "LABEL $digest_label=$digest" "$tar" "$image" >/dev/null \
      || die "podman import of $image failed"
    # The previous build of this tag is now untagged; drop it (unless a container uses it).
    podman image prune -f --filter "label=org.opencontainers.image.title=$title" >/dev/null 2>&1 || true
    local size
    size=$(podman image inspect --format '{{.Size}}' "$image")
    step "built $image ($(awk -v b="$size" 'BEGIN { printf "%.1f MB", b / 1e6 }'))"
  fi
  rm -rf "$root" "$tar"
}

crates=()
wanted operator && crates+=(-p iot-operator)
wanted callout && crates+=(-p iot-auth)
wanted registry-token && crates+=(-p iot-registry)
if [ ${#crates[@]} -gt 0 ]; then
  log "cargo build --release ${crates[*]} (a few minutes cold)"
  cargo build --release --locked -q "${crates[@]}"
fi

if wanted callout; then
  scratch_image iot-auth-callout "$IOT_REPO/target/release/iot-auth-callout" /usr/local/bin/iot-auth-callout \
    "localhost/iot-auth-callout:$version" \
    --change 'USER 65532:65532' \
    --change 'ENTRYPOINT ["/usr/local/bin/iot-auth-callout"]'
fi

if wanted registry-token; then
  scratch_image iot-registry-token "$IOT_REPO/target/release/iot-registry-token" /usr/local/bin/iot-registry-token \
    "localhost/iot-registry-token:$version" \
    --change 'USER 65532:65532' \
    --change 'ENTRYPOINT ["/usr/local/bin/iot-registry-token"]'
fi

if wanted nats; then
  nats="$IOT_BIN/nats-server"
  [ -e "$nats" ] || die "no nats-server at $nats (scripts/setup-host.sh installs it)"
  nats=$(readlink -f "$nats")
  # "nats-server: v2.15.1" -> 2.15.1
  nats_version=$("$nats" --version | sed -n 's/^nats-server: v\{0,1\}\([^ ]*\)$/\1/p')
  [ -n "$nats_version" ] || die "cannot read the version of $nats"
  ! ldd "$nats" >/dev/null 2>&1 || die "$nats is dynamically linked; the image expects the static release build"
  scratch_image iot-nats "$nats" /usr/local/bin/nats-server "localhost/iot-nats:$version" \
    --change 'USER 65532:65532' \
    --change 'ENTRYPOINT ["/usr/local/bin/nats-server"]' \
    --change "LABEL io.nationtech.iot.nats-server.version=$nats_version"
fi

if wanted pause; then
  # What a pod's sandbox runs: it holds the pod's namespaces and does nothing else,
  # as PID 1 of the pod's PID namespace when that is shared, so it reaps zombies.
  cat >"$work/pause.c" <<'C'
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

/* SIGINT or SIGTERM: the sandbox is being stopped; that is a clean exit. */
static void on_stop(int sig) {
  (void)sig;
  _exit(0);
}

/* SIGCHLD: reap every child that has ended, so none stays a zombie. */
static void on_child(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction stop = {.sa_handler = on_stop};
  struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
  sigemptyset(&stop.sa_mask);
  sigemptyset(&child.sa_mask);
  if (sigaction(SIGINT, &stop, NULL) || sigaction(SIGTERM, &stop, NULL) || sigaction(SIGCHLD, &child, NULL)) {
    perror("pause: sigaction");
    return 1;
  }
  if (getpid() != 1) {
    fputs("pause: warning: not PID 1, so orphans are not reaped here\n", stderr);
  }
  for (;;) {
    pause();
  }
}
C
  gcc -static -Os -s -Wall -Wextra -Werror -o "$work/pause" "$work/pause.c" || die "compiling pause.c failed"
  # 65535, as upstream's pause image since 3.5; a kubelet usually sets the user anyway.
  scratch_image --no-certs iot-pause "$work/pause" /pause localhost/iot-pause:3.2 \
    --change 'USER 65535:65535' \
    --change 'ENTRYPOINT ["/pause"]'
fi

if wanted operator; then
  image="$operator_repo:$version"
  scratch_image iot-operator "$IOT_REPO/target/release/iot-operator" /usr/local/bin/iot-operator "$image" \
    --change 'USER 65532:65532' \
    --change 'ENTRYPOINT ["/usr/local/bin/iot-operator"]' \
    --change 'CMD ["run"]'
  mkdir -p dist
  archive="dist/iot-operator-$version.oci.tar"
  rm -f "$archive"
  podman save -q --format oci-archive -o "$archive" "$image" || die "podman save failed"
  step "saved $archive"
  echo "$image"
fi
