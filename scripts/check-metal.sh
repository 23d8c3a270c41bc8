#!/usr/bin/env bash
# Type-check the Metal path of the wgpu backend for aarch64-apple-darwin (no Apple SDK is
# needed for `cargo check`). Uses the rustup target when installed, else Debian's
# rustc-web with std built from source (see scripts/build-guests.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target=aarch64-apple-darwin
export CARGO_TARGET_DIR="$root/target/macos"
if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    cargo check --target "$target" -p samepage-backend-wgpu
else
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo check --target "$target" -Zbuild-std=std,panic_abort -p samepage-backend-wgpu
fi
