#!/usr/bin/env bash
# aarch64, for Raspberry Pi 4/5 and other ARM64 boards: cross-builds the device
# side (the agent, the wire contracts, the KV crate) with Debian's cross toolchain,
# runs their tests under qemu-user on this x86_64 machine, and builds the release
# agent. The toolchain settings are in .cargo/config.toml; setup-host.sh installs
# the packages and the Rust target.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$IOT_REPO"
T=aarch64-unknown-linux-gnu

log "aarch64: contract, KV and agent tests under qemu-aarch64-static"
cargo test --target "$T" --quiet -p harmony-reconciler-contracts
cargo test --target "$T" --quiet -p iot-nats -p iot-agent --lib --bins

log "aarch64: the agent as it ships (device profile)"
cargo build --profile device --target "$T" --quiet -p iot-agent
bin="target/$T/device/iot-agent"
# ELF e_machine (2 bytes at offset 18) is 0x00b7 for AArch64: the tests above ran
# emulated, not natively.
machine=$(od -An -tx2 -j18 -N2 "$bin" | tr -d ' ')
[ "$machine" = "00b7" ] || die "$bin is not an aarch64 binary (e_machine $machine)"
version=$(qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" --version) \
  || die "the aarch64 agent does not start under qemu-aarch64-static"
step "$version for aarch64: $(du -k "$bin" | cut -f1) KiB"
