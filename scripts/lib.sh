# Shared helpers for the project's shell scripts. Sourced, not executed.
# Everything the scripts build or download is cached under $IOT_CACHE so that a
# second run on the same machine takes seconds.
IOT_CACHE="${IOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/harmony-iot}"
IOT_BIN="$IOT_CACHE/bin"
IOT_VENV="$IOT_CACHE/venv"
IOT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export IOT_CACHE IOT_BIN IOT_VENV IOT_REPO

log()  { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
step() { printf '\033[1;34m  ->\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31mERROR:\033[0m %s\n' "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 must run as root (it installs Debian packages)"
}
