#!/usr/bin/env bash
# Build the wasm32 guests (guests/*) into guests/target/wasm32-unknown-unknown/release/.
#
# Uses the normal rustup target when it is installed (or can be installed). Otherwise it
# falls back to building std from source with Debian's rustc-web toolchain
# (apt-get install rustc-web cargo-web rust-web-src) and the rustup toolchain's rust-lld.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here/guests"
target=wasm32-unknown-unknown

if command -v rustup >/dev/null 2>&1 && { rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >/dev/null 2>&1; }; then
    cargo build --release --target "$target" "$@"
else
    if [ ! -x /usr/bin/rustc ] || [ ! -d /usr/lib/rustlib/src ]; then
        echo "build-guests: no wasm32 std here; install Debian's rustc-web cargo-web rust-web-src" >&2
        exit 1
    fi
    sysroot="$(rustc --print sysroot 2>/dev/null || true)"
    lld="$sysroot/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"
    [ -x "$lld" ] || lld="$(command -v rust-lld || true)"
    if [ -z "$lld" ]; then echo "build-guests: rust-lld not found" >&2; exit 1; fi
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$lld" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
        /usr/bin/cargo build --release --target "$target" -Zbuild-std=std,panic_abort "$@"
fi
ls -la "$here/guests/target/$target/release/"*.wasm
