#!/usr/bin/env bash
# On the GPU machine, after bench_llama1b.sh built /tmp/llama1b: the previous binary
# (.cuda-carry/samepage_old.xz) against the new one back to back (bf16, Q8_0, Q4_K_M
# tg128), and the per-op GPU trace (SAMEPAGE_CUDA_TRACE=2) of both.
set -o pipefail
M=${M:-/tmp/llama1b}; B=/tmp/samepage
xz -dc .cuda-carry/samepage_old.xz > /tmp/samepage_old && chmod +x /tmp/samepage_old
b() { timeout 150 "$1" bench --backend cuda -m "$2" -p ${P:-16} -n 128 -r 3 2>&1 | grep -vE "^\s*$"; }
for m in $M/hf $M/q8_0.gguf $M/q4_k_m.gguf; do
  for i in 1 2; do
    echo "== old $m"; b /tmp/samepage_old $m
    echo "== new $m"; b $B $m
  done
done
echo "== trace new"; SAMEPAGE_CUDA_TRACE=2 b $B $M/hf
echo "== trace old"; SAMEPAGE_CUDA_TRACE=2 b /tmp/samepage_old $M/hf
