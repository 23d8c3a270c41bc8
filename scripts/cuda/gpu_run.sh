#!/usr/bin/env bash
# On the GPU machine (the `device` tool): run the CUDA backend's carried test binaries
# and the GEMV benchmark, logs under $OUT. Build and stage them here first:
#   scripts/cuda/stage.sh
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/samepage-cuda-out}
mkdir -p "$OUT"
export SAMEPAGE_REQUIRE_GPU=1 RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
rc=0
.cuda-carry/unit_tests 2>&1 | tee "$OUT/unit.log" || rc=1
.cuda-carry/gpu_tests --test-threads=1 --nocapture 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  .cuda-carry/gemv_bench 2>&1 | tee "$OUT/bench.log" || rc=1
fi
exit $rc
