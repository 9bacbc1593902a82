#!/usr/bin/env bash
# Create .venv (once) and install medusa-edge into it, compiling llama.cpp at most once per machine:
# llama-cpp-python is built first (pip caches the wheel), then the extension is built against it
# without build isolation, so pip never compiles a second llama.cpp.
# GPU: CMAKE_ARGS="-DGGML_CUDA=on" scripts/setup.sh   (or -DGGML_METAL=on on macOS, the default there)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -r requirements.txt
pip install -q --no-build-isolation --no-deps -e .
