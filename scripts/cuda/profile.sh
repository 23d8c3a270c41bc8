#!/usr/bin/env bash
# On the GPU machine: per-kernel times of one decode step and of a 512-token prefill of
# the Llama-1B-shaped bf16 model, from Nsight Compute (ncu profiles each node of the
# captured CUDA graphs one by one: kernel durations without launch gaps; compare with
# the graph's total from SAMEPAGE_CUDA_TRACE=1 for the overhead between kernels). CACHE=all
# flushes the caches before each kernel (ncu's default); the default here, none, keeps
# them as the graph would (activations written by the previous kernel sit in L2).
# Stage first (scripts/cuda/stage.sh; samepage.xz, tokenizer.json.xz, the gguf wheel in
# .cuda-carry); carry .cuda-carry. FORMATS="hf q8_0.gguf" picks the models.
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/samepage-cuda-out}; mkdir -p "$OUT"
C=.cuda-carry M=${M:-/tmp/llama1b}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/gguf-*.whl && export PYTHONPATH=/tmp/site
B=${B:-/tmp/samepage}
[ -x $B ] || { xz -dc $C/samepage.xz > $B && chmod +x $B; }
[ -e /tmp/tokenizer.json ] || xz -dc $C/tokenizer.json.xz > /tmp/tokenizer.json
[ -e $M/hf ] || timeout 240 python3 scripts/cuda/make_llama1b.py $M /tmp/tokenizer.json > "$OUT/make.log" 2>&1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
for f in ${FORMATS:-hf}; do
  tag=${f%%.*}
  SAMEPAGE_CUDA_TRACE=1 timeout 120 $B bench --backend cuda -m $M/$f -p 16 -n 128 -r 1 2>&1 | tail -5 | tee "$OUT/trace_$tag.log"
  # Decode: skip the prefill and the first tokens, then two steps' kernels.
  timeout 240 $NCU --clock-control none --cache-control ${CACHE:-none} --graph-profiling node --launch-skip ${SKIP:-3000} --launch-count ${COUNT:-300} \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
    $B bench --backend cuda -m $M/$f -p 16 -n 64 -r 1 > "$OUT/ncu_decode_$tag.csv" 2> "$OUT/ncu_decode_$tag.err"
  echo "decode $tag: rc $? $(wc -l < "$OUT/ncu_decode_$tag.csv") lines"
  [ -n "${PREFILL:-1}" ] && { timeout 240 $NCU --clock-control none --cache-control ${CACHE:-none} --graph-profiling node --launch-count ${PCOUNT:-400} \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
    $B bench --backend cuda -m $M/$f -p 512 -n 1 -r 1 > "$OUT/ncu_prefill_$tag.csv" 2> "$OUT/ncu_prefill_$tag.err"
  echo "prefill $tag: rc $? $(wc -l < "$OUT/ncu_prefill_$tag.csv") lines"; }
done
