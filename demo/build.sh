#!/usr/bin/env bash
# Reproduce the bundled demo model from scratch: corpus -> tokenizer + base -> Medusa-1 and
# Medusa-2 heads -> GGUF via `python -m convert` -> measured side by side -> the winner copied
# into medusa_edge/models/. Seeds fixed; about 20 minutes on 2 CPU cores. Not run in CI.
#   demo/build.sh [WORKDIR]        (default build/demo-pipeline)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-build/demo-pipeline}
PY=$PWD/.venv/bin/python
mkdir -p "$W"
W=$(cd "$W" && pwd)
$PY -c "import torch, transformers, sentencepiece, llama_cpp; print('versions: torch', torch.__version__, '| transformers', transformers.__version__, '| sentencepiece', sentencepiece.__version__, '| llama-cpp-python', llama_cpp.__version__)" | tee "$W/versions.txt"
$PY demo/corpus.py --out "$W/data" --n 60000 --seed 0
(cd demo && $PY train_base.py --data "$W/data" --out "$W/base-hf" --steps 800 --batch 8 --seq 128 \
   --hidden 320 --layers 8 --heads 5 --ffn 896 --seed 0)
$PY demo/train_medusa.py --base "$W/base-hf" --data "$W/data" --out "$W/medusa1-hf" --mode medusa1 --steps 400 --seed 0
$PY demo/train_medusa.py --base "$W/base-hf" --data "$W/data" --out "$W/medusa2-hf" --mode medusa2 --steps 400 --seed 0
for m in medusa1 medusa2; do
  $PY -m convert "$W/$m-hf" -o "$W/$m-gguf" --quant Q8_0 --heads-type q8_0 --tree demo/tree.json
done
for m in medusa1 medusa2; do
  g=$(ls "$W/$m-gguf"/*-Q8_0.gguf | grep -v '\.medusa\.gguf$')
  echo "== $m, in-domain (held-out prompts)" | tee -a "$W/bench.txt"
  $PY -m medusa_edge.cli bench "$g" --prompts "$W/data/prompts.jsonl" --no-chat -n 40 --max-tokens 96 --tree heads --tree chain:3 \
      --no-llama-cpp -o "$W/bench-$m-domain" --quiet | tee -a "$W/bench.txt"
  echo "== $m, MT-Bench first turns" | tee -a "$W/bench.txt"
  $PY -m medusa_edge.cli bench "$g" --prompts ../shared/bench/mt_bench_questions.jsonl -n 40 --max-tokens 96 --tree heads \
      --tree chain:3 --no-llama-cpp -o "$W/bench-$m-mtbench" --quiet | tee -a "$W/bench.txt"
done
echo "compare the two in $W/bench.txt, then copy the winner:"
echo "  cp <winner>-gguf/*-Q8_0.gguf medusa_edge/models/demo-model.gguf; cp <winner>-gguf/*-Q8_0.medusa.gguf medusa_edge/models/demo-model.medusa.gguf"
