#!/usr/bin/env bash
# On the GPU machine: bf16 tg128 of the Llama-1B-shaped model under tuning knobs, each
# twice, interleaved with the default (same binary). KNOBS="A=1,B=2 C=3" (commas join
# variables of one variant). Carry .cuda-base and the staged build (NEW).
set -o pipefail
cd "$(dirname "$0")/../.."
C=.cuda-base M=${M:-/tmp/llama1b} NEW=${NEW:-.cuda-carryM}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/gguf-*.whl && export PYTHONPATH=/tmp/site
xz -dc $NEW/samepage.xz > /tmp/new && chmod +x /tmp/new
[ -e /tmp/tokenizer.json ] || xz -dc $C/tokenizer.json.xz > /tmp/tokenizer.json
[ -e $M/hf ] || timeout 240 python3 scripts/cuda/make_llama1b.py $M /tmp/tokenizer.json > /dev/null 2>&1
for r in 1 2; do
  for v in default $KNOBS; do
    e=${v//,/ }; [ "$v" = default ] && e=
    t=$(env $e timeout 60 /tmp/new bench --backend cuda -m $M/${F:-hf} -p 0 -n 128 -r 3 2>&1 | grep -o 'tg128 | [0-9.]* ± [0-9.]*')
    echo "$v: $t"
  done
done
