#!/usr/bin/env bash
# Install what building samepage needs on a fresh machine, then build the wasm guests.
# On Debian/Ubuntu without a rustup wasm32 target, the guests are built with Debian's
# rustc-web toolchain and std from source (see scripts/build-guests.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
need_apt=()
if ! { command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; }; then
    [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src ] || need_apt+=(rustc-web cargo-web rust-web-src)
fi
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v python3 >/dev/null && python3 -c 'import pip' 2>/dev/null || echo "setup: python3 with pip is needed to fetch the test model" >&2
"$root/scripts/build-guests.sh" >/dev/null
echo "setup: guests built"
