#!/usr/bin/env bash
# Set up (once) and stream a Medusa completion with its statistics.
# Until the bundled demo model lands, this runs on a random-weight tiny Llama with random heads,
# built on the spot in build/demo/: the text is gibberish and almost nothing is accepted, but every
# part of the pipeline (llama.cpp, ggml heads, tree verification, KV commit, streaming) runs for real.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p build/demo
if [ ! -f build/demo/random-tiny.gguf ]; then
  .venv/bin/python - <<'PY'
from medusa_edge.testing import write_llama_gguf, write_random_heads
m = write_llama_gguf("build/demo/random-tiny.gguf", n_embd=128, n_layer=4, seed=0)
write_random_heads("build/demo/random-tiny.medusa.gguf", m, n_heads=4, head_type="q8_0", tree=[[0], [0, 0], [1], [0, 0, 0]])
PY
fi
exec .venv/bin/medusa-edge generate build/demo/random-tiny.gguf -p "${1:-Once upon a time}" -n 64
