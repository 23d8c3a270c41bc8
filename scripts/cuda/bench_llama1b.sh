#!/usr/bin/env bash
# On the GPU machine: build the Llama-3.2-1B-shaped benchmark model (make_llama1b.py),
# then, in the same run, `samepage bench` (pp512/tg128) for bf16 / Q8_0 / Q4_K_M, an
# end-to-end `samepage run`, GPU memory in use, and the PyTorch peer (torch_decode.py).
# Stage here first (scripts/cuda/stage.sh bench); carry .cuda-carry.
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/samepage-cuda-out}; mkdir -p "$OUT"
C=${C:-.cuda-carry} M=${M:-/tmp/llama1b}
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/gguf-*.whl && export PYTHONPATH=/tmp/site
xz -dc $C/samepage.xz > /tmp/samepage && chmod +x /tmp/samepage
xz -dc $C/tokenizer.json.xz > /tmp/tokenizer.json
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
# Run "$@" and report the peak GPU memory in use (whole card, and this process) while it runs.
peak() {
  "$@" & local p=$! mx=0 app=0 u a
  while kill -0 $p 2>/dev/null; do
    u=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    a=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', ' -v p=$p '$1==p{print $2}')
    [ "${u:-0}" -gt $mx ] && mx=$u; [ "${a:-0}" -gt $app ] && app=$a
    sleep 0.1
  done
  wait $p; local rc=$?
  echo "peak GPU memory.used: $mx MiB (card), $app MiB (process); idle before: $IDLE MiB"
  return $rc
}
timeout 240 python3 scripts/cuda/make_llama1b.py $M /tmp/tokenizer.json 2>&1 | tee "$OUT/make.log"
ls -la $M $M/hf | tee -a "$OUT/make.log"
IDLE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for m in $M/hf $M/q8_0.gguf $M/q4_k_m.gguf; do
  [ -e $m ] || continue
  echo "== bench $m"
  peak timeout 150 /tmp/samepage bench --backend cuda -m $m -p 512 -n 128 -r 3
  # tg128 with 512 tokens already in the context (positions 512-639).
  timeout 150 /tmp/samepage bench --backend cuda -m $m -p 0 -n 128 -d 512 -r 3 | grep tg128
done 2>&1 | tee "$OUT/bench.log"
echo "== torch peer" | tee "$OUT/torch.log"
timeout 120 python3 $C/torch_decode.py 2>&1 | tee -a "$OUT/torch.log"
echo "== run (end to end, guest sampling)" | tee "$OUT/run.log"
for m in $M/hf $M/q4_k_m.gguf; do
  [ -e $m ] || continue
  peak timeout 60 /tmp/samepage run --backend cuda -m $m --raw -p "The capital of France is" -n 256 --ctx 1024 --seed 1 2>&1 | tail -c 1500
done 2>&1 | tee -a "$OUT/run.log"
if [ "${TORCH_COMPILE:-0}" = 1 ]; then
  echo "== torch peer with torch.compile" | tee -a "$OUT/torch.log"
  timeout 200 python3 $C/torch_decode.py compile 2>&1 | tee -a "$OUT/torch.log"
fi
