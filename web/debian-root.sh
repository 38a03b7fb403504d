#!/usr/bin/env bash
# The Debian route to a wasm32 Rust toolchain, for machines where rustup cannot add the
# wasm32-unknown-unknown target (docs/web.md): a Debian unstable root (debootstrap) holding
# Debian's rustc and cargo (>= the workspace's rust-version) with the prebuilt wasm32 standard
# library (libstd-rust-dev-wasm32) and wasm-ld. `cargo xtask web` builds the page's crate
# inside it (chroot, the repository bind-mounted at its own path). Needs root and
# deb.debian.org; about 400 MB and one to two minutes.
#
#   sudo bash web/debian-root.sh [ROOT]      (ROOT: $DDPM_WASM_ROOT, else /opt/ddpm-wasm-root)
set -euo pipefail
root=${1:-${DDPM_WASM_ROOT:-/opt/ddpm-wasm-root}}
[ "$(id -u)" = 0 ] || { echo "web/debian-root.sh: run as root (debootstrap and chroot need it)" >&2; exit 1; }
if [ -x "$root/usr/bin/cargo" ] && [ -d "$root/usr/lib/rustlib/wasm32-unknown-unknown" ]; then
  echo "web/debian-root.sh: $root already holds $(chroot "$root" rustc -V)"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
# Bookworm's rustc-web (1.85) is older than the workspace's rust-version (1.89): unstable's
# rustc is the one that builds it.
debootstrap --variant=minbase sid "$root" http://deb.debian.org/debian
chroot "$root" apt-get install -y -q --no-install-recommends \
  rustc cargo libstd-rust-dev-wasm32 lld ca-certificates
echo "web/debian-root.sh: $root holds $(chroot "$root" rustc -V)"
