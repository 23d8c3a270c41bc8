#!/usr/bin/env bash
# On the GPU machine, one call: the CUDA crate's tests, then bf16 Llama-1B-shape decode
# A/B of the rope(q)+rope(k)+kv_store fusion: the previous binary
# (.cuda-carry/samepage_old.xz), the new one with SAMEPAGE_CUDA_FUSE_ROPE_KV=0, and the
# new one fused, back to back; TRACE=1 (graph GPU time per token) and TRACE=2 (per op).
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/samepage-cuda-out}; mkdir -p "$OUT"
C=.cuda-carry M=/tmp/llama1b
export SAMEPAGE_REQUIRE_GPU=1 RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/gguf-*.whl && export PYTHONPATH=/tmp/site
xz -dc $C/samepage.xz > /tmp/samepage && chmod +x /tmp/samepage
xz -dc $C/samepage_old.xz > /tmp/samepage_old && chmod +x /tmp/samepage_old
xz -dc $C/tokenizer.json.xz > /tmp/tokenizer.json
(timeout 200 python3 scripts/cuda/make_llama1b.py $M /tmp/tokenizer.json --formats hf > "$OUT/make.log" 2>&1) &
mk=$!
rc=0
echo "== unit_tests"; $C/unit_tests 2>&1 | tail -3 || rc=1
echo "== gpu_tests"; timeout 200 $C/gpu_tests --test-threads=1 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "fused|^test result|FAILED|panicked" || rc=1
wait $mk; tail -2 "$OUT/make.log"
b() { timeout 100 "$@" bench --backend cuda -m $M/hf -p 16 -n 128 -r 3 2>&1 | grep -vE "^\s*$"; }
for i in 1 2; do
  echo "== old binary"; b /tmp/samepage_old
  echo "== new, ROPE_KV=0"; SAMEPAGE_CUDA_FUSE_ROPE_KV=0 b /tmp/samepage
  echo "== new, fused"; b /tmp/samepage
done
echo "== trace1 new ROPE_KV=0"; SAMEPAGE_CUDA_FUSE_ROPE_KV=0 SAMEPAGE_CUDA_TRACE=1 b /tmp/samepage | grep -E "trace|tg" | tail -3
echo "== trace1 new fused"; SAMEPAGE_CUDA_TRACE=1 b /tmp/samepage | grep -E "trace|tg" | tail -3
echo "== trace2 new fused"; SAMEPAGE_CUDA_TRACE=2 b /tmp/samepage | grep -vE "cuda trace" | head -30
for x in old new; do
  bin=/tmp/samepage; [ $x = old ] && bin=/tmp/samepage_old
  echo "== run $x"; timeout 60 $bin run --backend cuda -m $M/hf --raw -p "The capital of France is" -n 48 --ctx 256 --seed 1 --temp 0 2>/dev/null | tail -c 600 | tee "$OUT/run_$x.txt"
done
cmp -s "$OUT/run_old.txt" "$OUT/run_new.txt" && echo "run: old and new text identical" || echo "run: texts differ"
echo "rc=$rc"; exit $rc
