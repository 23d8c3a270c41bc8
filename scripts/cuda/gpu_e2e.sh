#!/usr/bin/env bash
# On the GPU machine: the CUDA backend's conformance/zero-copy/safety tests, the end-to-end
# SmolLM2 tests on CUDA and Vulkan (crates/cli/tests/all/gpu.rs), and the wgpu backend's
# tests on the H100 through Vulkan. SAMEPAGE_REQUIRE_GPU=1. Carry .cuda-carry2 and .gl.
# SmolLM2 travels in two halves (one call's tree is limited to 64 MiB): the first half
# was left at /tmp/smol.a by the previous call on the same (warm) machine, or is in
# .cuda-carry2/smol.a.
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/samepage-cuda-out}; mkdir -p "$OUT"
C=.cuda-carry2
export SAMEPAGE_REQUIRE_GPU=1 RUST_BACKTRACE=1
WGPU=${WGPU:-1}  # WGPU=0: CUDA only (no .gl loaders, no wgpu_all.xz carried)
if [ "$WGPU" = 1 ]; then
  for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
# The test binaries look for the repository where they were built.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
a=/tmp/smol.a; [ -e $C/smol.a ] && a=$C/smol.a
cat $a $C/smol.b > /tmp/smollm2.gguf
sha256sum /tmp/smollm2.gguf | tee "$OUT/e2e.log"
export SAMEPAGE_MODEL=/tmp/smollm2.gguf
for b in cli_all wgpu_all; do [ -e $C/$b.xz ] && xz -dc $C/$b.xz > /tmp/$b && chmod +x /tmp/$b; done
rc=0
echo "== cuda conformance/zero-copy/safety" | tee -a "$OUT/e2e.log"
$C/unit_tests 2>&1 | tail -3 | tee -a "$OUT/e2e.log" || rc=1
timeout 200 $C/gpu_tests --test-threads=1 2>&1 | tee "$OUT/cuda_tests.log" | tail -4 | tee -a "$OUT/e2e.log" || rc=1
echo "== end to end (gpu.rs)" | tee -a "$OUT/e2e.log"
timeout 240 /tmp/cli_all ${E2E_FILTER:-gpu::} --test-threads=1 --nocapture 2>&1 | grep -v XDG_RUNTIME | tee -a "$OUT/e2e.log" || rc=1
if [ "$WGPU" = 1 ]; then
  echo "== wgpu backend tests on Vulkan" | tee -a "$OUT/e2e.log"
  timeout 200 /tmp/wgpu_all --test-threads=1 2>&1 | grep -v XDG_RUNTIME | tee "$OUT/wgpu_tests.log" | grep -E "^test result|FAILED|panicked|adapter|skipped" | head -40 | tee -a "$OUT/e2e.log" || rc=1
fi
echo "rc=$rc" | tee -a "$OUT/e2e.log"
exit $rc
