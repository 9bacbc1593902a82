// medusa_native: the mechanism under medusa_edge, on the llama.cpp that llama-cpp-python installed.
//
// Objects (each owns its llama.cpp/ggml resources and frees them once, in its destructor):
//   Model     a llama_model (and its vocab)                                    model.h
//   Context   a llama_context set up for tree verification, plus one reusable  context.h
//             llama_batch; TreeShape, the fixed shape of one tree
//   Sampler   a llama_sampler chain (penalties, top-k, top-p, min-p, temperature, dist)  sampler.h
//   GgufFile  a GGUF file from outside, read by ggml's bounded reader          gguf_file.h
//   Heads     Medusa heads loaded from a heads GGUF and evaluated with ggml on the model's backend  heads.h
//   Embedder  embeddings on a llama.cpp context of their own                   embedder.h
// bindings.cpp holds the Python module; medusa_edge/_native.pyi states each binding's contract.
//
// Policy (which tree, what to accept) lives in Python. Every failure is a C++ exception that
// pybind11 turns into a Python exception; nothing here may abort the process, so every llama.cpp
// precondition that would GGML_ASSERT is checked before the call.
//
// This header: the includes every file shares, the log capture that puts llama.cpp's error lines
// into exceptions, and decode_or_raise (a decode with the GIL released that Ctrl-C can stop).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <map>
#include <tuple>
#include <vector>

namespace py = pybind11;

using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// ---------------------------------------------------------------------------------------------
// Logging: silence llama.cpp unless verbose, but keep the last error lines to put in exceptions.

// Guards the log state below; log_callback may run on llama.cpp's threads.
extern std::mutex g_log_mutex;
// llama.cpp resolves flash_attn_type = AUTO while creating a context and exposes the result only
// in its log ("Flash Attention not supported, set to disabled" when a device lacks the op).
// Read and reset under g_log_mutex (Context's constructor).
extern bool g_fa_auto_disabled;

// The llama_log_set callback: keeps error/warning lines, echoes everything to stderr when verbose.
void log_callback(ggml_log_level level, const char *text, void *);
// Forget the error lines kept so far (call before the llama.cpp call whose errors are wanted).
void clear_last_error();
// Every error line since clear_last_error(), first lines only, "; "-joined, bounded.
std::string error_lines();
// " (llama.cpp: <last error or warning line>)", or "" when none: the suffix of an exception message.
std::string last_error();
// Pass llama.cpp's log through to stderr (errors are kept for exceptions either way).
void set_verbose(bool v);

// ---------------------------------------------------------------------------------------------
// Ctrl-C during a decode (common.cpp has the mechanism).

// Python's main thread: the only one SIGINT is meant for (set once, at module import).
extern unsigned long g_main_thread;

// The abort callback every llama_context here is created with: true once Ctrl-C arrived during
// the current decode_or_raise.
bool abort_requested(void *);

// Decode `batch` (already filled) with the GIL released; raise on failure, and raise
// KeyboardInterrupt when Ctrl-C arrived during the decode. `what` starts the error message.
void decode_or_raise(llama_context *ctx, llama_batch &batch, const char *what);
