#!/usr/bin/env bash
# On the GPU machine, after bench_llama1b.sh built /tmp/llama1b: where a decode token's
# time goes (SAMEPAGE_CUDA_TRACE=1/2: host gap/launch/wait vs the graph's GPU time, and
# per-op GPU times), and A/B of record-time fusion (SAMEPAGE_CUDA_FUSE=0). With
# BIN_OLD=path also the previous binary, back to back on the same machine.
set -o pipefail
M=${M:-/tmp/llama1b}; B=${BIN:-/tmp/samepage}
b() { timeout 150 "$@" bench --backend cuda -m $M/hf -p 16 -n 128 -r 3 2>&1 | grep -vE "^\s*$"; }
echo "== trace (fused)"; SAMEPAGE_CUDA_TRACE=2 b $B
echo "== trace (FUSE=0)"; SAMEPAGE_CUDA_FUSE=0 SAMEPAGE_CUDA_TRACE=2 b $B
for i in 1 2; do
  [ -n "$BIN_OLD" ] && { echo "== old binary"; b $BIN_OLD; }
  echo "== new, fused"; b $B
  echo "== new, FUSE=0"; SAMEPAGE_CUDA_FUSE=0 b $B
done
