# Shared helpers for the project's shell scripts. Sourced, not executed.
# Everything the scripts build or download is cached under $IOT_CACHE so that a
# second run on the same machine takes seconds.
IOT_CACHE="${IOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/harmony-iot}"
IOT_BIN="$IOT_CACHE/bin"
IOT_VENV="$IOT_CACHE/venv"
IOT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export IOT_CACHE IOT_BIN IOT_VENV IOT_REPO

# Colours only for a terminal: a log file or a pipe gets plain text.
if [ -t 2 ]; then _blue=$'\033[1;34m' _red=$'\033[1;31m' _off=$'\033[0m'; else _blue='' _red='' _off=''; fi
log()  { printf '%s==>%s %s\n' "$_blue" "$_off" "$*" >&2; }
step() { printf '%s  ->%s %s\n' "$_blue" "$_off" "$*" >&2; }
die()  { printf '%sERROR:%s %s\n' "$_red" "$_off" "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 must run as root (it installs Debian packages)"
}
