#!/usr/bin/env bash
# On the GPU machine: the GPU test suite of a staged build, then old/new `samepage bench`
# back to back on the Llama-1B-shaped models (make_llama1b.py), the graph's GPU time per
# token (SAMEPAGE_CUDA_TRACE=1) and an ncu per-kernel decode profile of the new build.
# NEW=<dir with samepage.xz, gpu_tests, gemv_bench> OLD=<dir with samepage_head.xz, the
# baseline>; C (.cuda-base) holds the gguf wheel, tokenizer.json.xz, torch_decode.py. Carry them.
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/samepage-cuda-out}; mkdir -p "$OUT"
C=.cuda-base M=${M:-/tmp/llama1b} NEW=${NEW:-.cuda-carryM} OLD=${OLD:-.cuda-base}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/gguf-*.whl && export PYTHONPATH=/tmp/site
xz -dc $NEW/samepage.xz > /tmp/new && chmod +x /tmp/new
xz -dc $OLD/samepage_head.xz > /tmp/old && chmod +x /tmp/old
[ -e /tmp/tokenizer.json ] || xz -dc $C/tokenizer.json.xz > /tmp/tokenizer.json
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -z "$NOTEST" ]; then
  SAMEPAGE_REQUIRE_GPU=1 timeout 300 $NEW/gpu_tests --test-threads 1 2>&1 | tail -40 | tee "$OUT/tests.log"
fi
[ -e $M/hf ] || timeout 240 python3 scripts/cuda/make_llama1b.py $M /tmp/tokenizer.json > "$OUT/make.log" 2>&1
for f in ${FORMATS:-hf q8_0.gguf q4_k_m.gguf}; do
  for b in old new old new; do
    o=$(SAMEPAGE_CUDA_TRACE=${TRACE:-0} timeout 100 /tmp/$b bench --backend cuda -m $M/$f -p 512 -n 128 -r 2 2>&1)
    echo "== $b $f $(echo "$o" | grep -E '^\| llama|cuda trace' | tr '\n' ' ')"
    echo "$o" | grep -q '^| llama' || echo "$o" | tail -3
  done
done 2>&1 | tee "$OUT/bench.log"
for e in $EXTRA; do  # EXTRA="SAMEPAGE_CUDA_PREFETCH=0 ..." A/B of the new build (model: EXTRA_M)
  echo "== new $e $(env $e timeout 100 /tmp/new bench --backend cuda -m $M/${EXTRA_M:-hf} -p 512 -n 128 -r 2 2>&1 | grep -E '^\| llama' | tr '\n' ' ')"
done 2>&1 | tee -a "$OUT/bench.log"
if [ -x "$NEW/gemv_bench" ]; then
  GEMV_BENCH_DTYPES=${GEMV_DTYPES:-bf16,q8_0,q4_k,q6_k,q4_0,q4_1,q5_0,q5_k} timeout 200 $NEW/gemv_bench 2>&1 | tee "$OUT/gemv.log"
fi
if [ -n "$NCU" ]; then
  SAMEPAGE_CUDA_TRACE=1 timeout 100 /tmp/new bench --backend cuda -m $M/hf -p 16 -n 128 -r 1 2>&1 | grep "cuda trace" | tail -1 | tee -a "$OUT/bench.log"
  timeout 200 /usr/local/cuda/bin/ncu --clock-control none --cache-control none --graph-profiling node --launch-skip 3000 --launch-count 300 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv /tmp/new bench --backend cuda -m $M/hf -p 16 -n 64 -r 1 > "$OUT/ncu_decode.csv" 2>/dev/null
  timeout 200 /usr/local/cuda/bin/ncu --clock-control none --cache-control none --graph-profiling node --launch-count 1200 \
    --metrics gpu__time_duration.sum --csv /tmp/new bench --backend cuda -m $M/hf -p 512 -n 1 -r 1 > "$OUT/ncu_prefill.csv" 2>/dev/null
fi
if [ -n "$TORCH" ]; then  # the PyTorch peer, same call (TORCH=compile adds torch.compile)
  timeout 150 python3 $C/torch_decode.py 2>&1 | tail -4 | tee -a "$OUT/bench.log"
  [ "$TORCH" = compile ] && timeout 240 python3 $C/torch_decode.py compile 2>&1 | tail -4 | tee -a "$OUT/bench.log"
fi
