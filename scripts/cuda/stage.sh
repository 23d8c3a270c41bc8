#!/usr/bin/env bash
# Build the CUDA backend's test binaries and benchmark here (no CUDA needed) and copy
# them into .cuda-carry/ (git-ignored), to be carried to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.cuda-carry/' .git/info/exclude 2>/dev/null || echo '/.cuda-carry/' >> .git/info/exclude
mkdir -p .cuda-carry
bin() { grep -o '"executable":"[^"]*"' | sed 's/"executable":"//;s/"$//' | grep "$1" | head -1; }
msgs=$(cargo test -p samepage-backend-cuda --no-run --message-format=json 2>/dev/null)
cp "$(echo "$msgs" | bin '/gpu-')" .cuda-carry/gpu_tests
cp "$(echo "$msgs" | bin '/samepage_backend_cuda-')" .cuda-carry/unit_tests
cargo build -p samepage-backend-cuda --release --example gemv_bench
cp target/release/examples/gemv_bench .cuda-carry/
strip .cuda-carry/* || true
ls -la .cuda-carry
