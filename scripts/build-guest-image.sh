#!/usr/bin/env bash
# Builds the device guest image that VM devices boot: Debian bookworm from Debian's
# own packages (debootstrap), with systemd, cloud-init, podman and runc, and no
# agent. The agent arrives through cloud-init at first boot, as on a real device.
# qemu-guest-agent lets the host look inside, as libvirt does: tests and iot-up list
# the guest's containers through it, since a VM has no namespace to nsenter.
#
#   scripts/build-guest-image.sh [--arch x86_64|aarch64]     (default x86_64)
#
# Output, cached under $IOT_CACHE/guest/<arch>-<key>/ where <key> hashes this script
# (so any change to the recipe builds a new image and a stale one is never used):
#   vmlinuz, initrd.img  the Debian kernel and initramfs, for qemu's direct boot
#   rootfs.img           ext4 root filesystem (raw, sparse); VMs boot qcow2 overlays
#   busybox              the guest arch's static busybox (the VM's test images)
#   packages.txt         every installed package and version (what went in)
# Prints the directory on stdout. Cold: about 4 minutes for x86_64, longer for
# aarch64 (its package scripts run under qemu-user). Needs root.
#
# Rebuildable rather than bit-for-bit: apt resolves the newest bookworm versions at
# build time, and packages.txt records them. The filesystem UUID and hash seed are
# fixed, so the boot arguments never change.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_root "build-guest-image.sh"

arch=x86_64
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=$2; shift 2 ;;
    *) die "unknown flag $1 (known: --arch x86_64|aarch64)" ;;
  esac
done
case "$arch" in
  x86_64) deb_arch=amd64; kernel_pkg=linux-image-amd64 ;;
  aarch64) deb_arch=arm64; kernel_pkg=linux-image-arm64 ;;
  *) die "--arch must be x86_64 or aarch64, not $arch" ;;
esac

key=$(sha256sum "$0" | cut -c1-12)
out="$IOT_CACHE/guest/$arch-$key"
if [ -f "$out/done" ]; then
  step "guest image ($arch) cached: $out"
  echo "$out"
  exit 0
fi
for tool in debootstrap mkfs.ext4; do
  command -v "$tool" >/dev/null || die "$tool missing; run scripts/setup-host.sh"
done
if [ "$arch" != "$(uname -m)" ] && [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$arch" ]; then
  # The guest's package scripts run under qemu-user: register it with the kernel
  # (a container or minimal VM may not have done so at boot).
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  conf="/usr/lib/binfmt.d/qemu-$arch.conf"
  [ -f "$conf" ] || die "$conf missing; run scripts/setup-host.sh (qemu-user-static)"
  /lib/systemd/systemd-binfmt "$conf" || die "registering qemu-$arch with binfmt_misc failed"
fi

work="$IOT_CACHE/guest/.build-$arch-$$"
root="$work/root"
rm -rf "$work"
mkdir -p "$root" "$IOT_CACHE/guest/debs-$deb_arch"
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mirror=http://deb.debian.org/debian
# Everything but cloud-init: its dependency on the virtual python3-cffi-backend-api
# package trips debootstrap's resolver, so it goes in afterwards with apt.
base=systemd,systemd-sysv,udev,dbus,"$kernel_pkg",ifupdown,iproute2,iptables,podman,runc,conmon,containernetworking-plugins,catatonit,busybox-static,ca-certificates,e2fsprogs,kmod,procps,qemu-guest-agent
log "debootstrap bookworm ($deb_arch) into $root (a few minutes)"
debootstrap --arch="$deb_arch" --variant=minbase --include="$base" \
  --cache-dir="$IOT_CACHE/guest/debs-$deb_arch" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
log "apt: cloud-init (after python3-cffi-backend, see above)"
in_root apt-get install -y -q --no-install-recommends python3-cffi-backend >"$work/apt.log" 2>&1 \
  && in_root apt-get install -y -q --no-install-recommends cloud-init >>"$work/apt.log" 2>&1 \
  || { tail -20 "$work/apt.log" >&2; die "installing cloud-init failed (log above)"; }
in_root apt-get clean

log "configuring the guest"
echo "iot-device" >"$root/etc/hostname"
printf 'LABEL=iotroot / ext4 defaults,errors=remount-ro 0 1\n' >"$root/etc/fstab"
# Only the NoCloud seed (the CD or disk labelled cidata): no time lost probing clouds.
cat >"$root/etc/cloud/cloud.cfg.d/90-iot-datasource.cfg" <<'EOF'
datasource_list: [ NoCloud, None ]
EOF
# Timers and jobs a device does not need, each a minute of CPU under emulation.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer dpkg-db-backup.timer; do
  in_root systemctl disable "$unit" >/dev/null 2>&1 || true
done
# The root account has no password; cloud-init's user-data decides who logs in.
in_root passwd -l root >/dev/null
rm -f "$root/etc/resolv.conf"
touch "$root/etc/resolv.conf"
in_root dpkg-query -W -f='${Package} ${Version}\n' >"$work/packages.txt"

for m in dev/pts dev sys proc; do umount "$root/$m"; done
mkdir -p "$work/out"
cp "$(ls "$root"/boot/vmlinuz-* | sort | tail -1)" "$work/out/vmlinuz"
cp "$(ls "$root"/boot/initrd.img-* | sort | tail -1)" "$work/out/initrd.img"
cp "$root/bin/busybox" "$work/out/busybox"
cp "$work/packages.txt" "$work/out/packages.txt"
# Room for containers and images on top of the system (the file stays sparse).
used_mb=$(du -sm "$root" | cut -f1)
size_mb=$((used_mb + 1536))
log "mkfs.ext4 -d ($size_mb MiB, sparse)"
mkfs.ext4 -q -L iotroot -U 6f1b8a52-3c0e-4d1e-9a57-0b7c2d3e4f51 -E hash_seed=2f1d3c4b-5a69-4788-9a0b-1c2d3e4f5061 \
  -d "$root" "$work/out/rootfs.img" "${size_mb}M"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/out" "$out"
touch "$out/done"
step "guest image ($arch): $out ($(du -sh --apparent-size "$out/rootfs.img" | cut -f1) apparent, $(du -sh "$out/rootfs.img" | cut -f1) on disk; $(wc -l <"$out/packages.txt") packages)"
echo "$out"
