// medusa_native: the mechanism under medusa_edge, on the llama.cpp that llama-cpp-python installed.
//
// Objects (each owns its llama.cpp/ggml resources and frees them once, in its destructor):
//   Model    a llama_model (and its vocab)
//   Context  a llama_context set up for tree verification, plus one reusable llama_batch
//   Sampler  a llama_sampler chain (penalties, top-k, top-p, min-p, temperature, dist)
//   Heads    Medusa heads loaded from a heads GGUF and evaluated with ggml on the model's backend
//
// Policy (which tree, what to accept) lives in Python. Every failure is a C++ exception that
// pybind11 turns into a Python exception; nothing here may abort the process, so every llama.cpp
// precondition that would GGML_ASSERT is checked before the call.

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

static std::mutex g_log_mutex;
static bool g_verbose = false;
static std::string g_last_error;
// every error line since clear_last_error(), first lines only, bounded: a failed grammar parse logs
// the fault first and a generic "failed to parse grammar" last
static std::string g_error_lines;
// llama.cpp resolves flash_attn_type = AUTO while creating a context and exposes the result only
// in its log ("Flash Attention not supported, set to disabled" when a device lacks the op).
static bool g_fa_auto_disabled = false;

static void log_callback(ggml_log_level level, const char *text, void *) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (std::strstr(text, "Flash Attention not supported")) g_fa_auto_disabled = true;
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        std::string t(text);
        while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
        if (!t.empty()) g_last_error = t;
        if (level == GGML_LOG_LEVEL_ERROR && !t.empty() && g_error_lines.size() < 1024) {
            const std::string first = t.substr(0, std::min(t.find('\n'), (size_t)300));
            g_error_lines += (g_error_lines.empty() ? "" : "; ") + first;
        }
    }
    if (g_verbose) fputs(text, stderr);
}

static void clear_last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_error.clear();
    g_error_lines.clear();
}

static std::string error_lines() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    return g_error_lines;
}

static std::string last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    return g_last_error.empty() ? std::string() : " (llama.cpp: " + g_last_error + ")";
}

static void set_verbose(bool v) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_verbose = v;
}

// FNV-1a 64 over every token text followed by a NUL byte: the base fingerprint that the heads
// GGUF records (medusa_edge/schema.py computes the same from tokenizer.ggml.tokens).
static uint64_t fnv1a_tokens(const llama_vocab *vocab) {
    uint64_t h = 14695981039346656037ULL;
    const int n = llama_vocab_n_tokens(vocab);
    for (int i = 0; i < n; ++i) {
        const char *t = llama_vocab_get_text(vocab, i);
        for (const unsigned char *p = (const unsigned char *)t; *p; ++p) {
            h ^= *p;
            h *= 1099511628211ULL;
        }
        h ^= 0;
        h *= 1099511628211ULL;
    }
    return h;
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C during a decode. While llama_decode runs (GIL released, possibly for seconds on a long
// prompt) Python cannot act on SIGINT, so a guard swaps in a handler that only sets a flag;
// llama.cpp's abort callback polls it between graph nodes (CPU backends) and the decode returns
// early. After the decode the previous handler is restored and the caller raises KeyboardInterrupt.

static std::atomic<bool> g_interrupted{false};
static unsigned long g_main_thread = 0;  // Python's main thread: the only one SIGINT is meant for

static void on_sigint(int) { g_interrupted.store(true); }

static bool abort_requested(void *) { return g_interrupted.load(); }

struct SigintGuard {
    struct sigaction old {};
    bool installed = false;
    SigintGuard() {
        g_interrupted.store(false);
        if (PyThread_get_thread_ident() != g_main_thread) return;  // worker threads leave SIGINT alone
        struct sigaction sa {};
        sa.sa_handler = on_sigint;
        sigemptyset(&sa.sa_mask);
        installed = sigaction(SIGINT, &sa, &old) == 0;
    }
    ~SigintGuard() {
        if (installed) sigaction(SIGINT, &old, nullptr);
    }
};

// ---------------------------------------------------------------------------------------------

struct Model {
    llama_model *model = nullptr;
    const llama_vocab *vocab = nullptr;
    std::string path;

    // use_extra_bufts = false keeps llama.cpp off its extra weight buffer types (CPU repacking,
    // AMX): the Python side turns it off where those crash (medusa_edge/hwguard.py).
    Model(const std::string &path_, int n_gpu_layers, bool vocab_only, bool use_extra_bufts) : path(path_) {
        llama_model_params p = llama_model_default_params();
        p.n_gpu_layers = n_gpu_layers;
        p.vocab_only = vocab_only;
        p.use_extra_bufts = use_extra_bufts;
        clear_last_error();
        model = llama_model_load_from_file(path.c_str(), p);
        if (!model) throw std::runtime_error("cannot load model " + path + last_error());
        vocab = llama_model_get_vocab(model);
    }
    ~Model() {
        if (model) llama_model_free(model);
    }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;

    std::string meta(const std::string &key) const {
        std::vector<char> buf(256);
        int32_t n = llama_model_meta_val_str(model, key.c_str(), buf.data(), buf.size());
        if (n < 0) return std::string();
        if ((size_t)n >= buf.size()) {
            buf.resize(n + 1);
            llama_model_meta_val_str(model, key.c_str(), buf.data(), buf.size());
        }
        return std::string(buf.data(), n);
    }

    std::string chat_template() const {
        const char *t = llama_model_chat_template(model, nullptr);
        return t ? std::string(t) : std::string();
    }

    std::vector<int32_t> tokenize(const std::string &text, bool add_special, bool parse_special) const {
        int32_t n = -llama_tokenize(vocab, text.data(), (int32_t)text.size(), nullptr, 0, add_special, parse_special);
        std::vector<int32_t> out(std::max(n, 0));
        if (n > 0) {
            int32_t got = llama_tokenize(vocab, text.data(), (int32_t)text.size(), out.data(), n, add_special, parse_special);
            if (got < 0) throw std::runtime_error("tokenization failed");
            out.resize(got);
        }
        return out;
    }

    py::bytes token_to_piece(int32_t token, bool special) const {
        check_token(token);
        char buf[256];
        int32_t n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, special);
        if (n >= 0) return py::bytes(buf, n);
        std::vector<char> big(-n);
        n = llama_token_to_piece(vocab, token, big.data(), (int32_t)big.size(), 0, special);
        return py::bytes(big.data(), std::max(n, 0));
    }

    void check_token(int32_t token) const {
        if (token < 0 || token >= llama_vocab_n_tokens(vocab))
            throw std::out_of_range("token id " + std::to_string(token) + " is outside the vocabulary");
    }
};

// ---------------------------------------------------------------------------------------------
// A tree's shape, fixed per tree: depth and seq-id set of each node (node 0 = root).

struct TreeShape {
    std::vector<int32_t> depth;                 // [n]
    std::vector<std::vector<int32_t>> seq_sets;  // [n][*]
    int32_t n_leaves = 0;

    TreeShape(std::vector<int32_t> depth_, std::vector<std::vector<int32_t>> seq_sets_)
        : depth(std::move(depth_)), seq_sets(std::move(seq_sets_)) {
        if (depth.empty() || depth.size() != seq_sets.size())
            throw std::invalid_argument("TreeShape: depth and seq_sets must be non-empty and of equal length");
        for (auto &s : seq_sets)
            for (int32_t id : s) n_leaves = std::max(n_leaves, id + 1);
        if (seq_sets[0].size() != (size_t)n_leaves)
            throw std::invalid_argument("TreeShape: the root must carry every leaf's seq id");
    }
    int n() const { return (int)depth.size(); }
};

// ---------------------------------------------------------------------------------------------

// Decode `batch` (already filled) with the GIL released; raise on failure, and raise
// KeyboardInterrupt when Ctrl-C arrived during the decode (see SigintGuard).
static void decode_or_raise(llama_context *ctx, llama_batch &batch, const char *what) {
    int32_t rc;
    bool interrupted;
    clear_last_error();
    {
        SigintGuard guard;
        py::gil_scoped_release release;
        rc = llama_decode(ctx, batch);
        interrupted = g_interrupted.load();
    }
    if (interrupted || rc == 2) {
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        throw py::error_already_set();
    }
    if (rc != 0)
        throw std::runtime_error(std::string(what) + ": llama_decode failed with code " + std::to_string(rc) + last_error());
}

// Greedy for llama.cpp's backend sampling that hands back the token alone. llama.cpp's own greedy
// sampler leaves the row's logits as an output of the sampling graph, and llama.cpp copies every
// such row to the host (seen: llama_get_logits_ith then returns that copy); this one clears them,
// so a decode with it on every seq id copies no logits at all (tests/test_engine.py checks).
namespace argmax_only {
const char *name(const llama_sampler *) { return "medusa-argmax"; }
void apply(llama_sampler *, llama_token_data_array *cur_p) {  // on the host: first maximum, as the device's
    cur_p->selected = 0;
    for (size_t i = 1; i < cur_p->size; ++i)
        if (cur_p->data[i].logit > cur_p->data[cur_p->selected].logit) cur_p->selected = (int64_t)i;
}
bool backend_init(llama_sampler *, ggml_backend_buffer_type_t, uint32_t) { return true; }
void backend_apply(llama_sampler *, ggml_context *ctx, ggml_cgraph *, llama_sampler_data *data) {
    data->sampled = ggml_argmax(ctx, ggml_reshape_1d(ctx, data->logits, ggml_nelements(data->logits)));
    data->logits = nullptr;
}
llama_sampler_i iface = {name, nullptr, apply, nullptr, nullptr, nullptr, backend_init, nullptr, backend_apply,
                         nullptr, nullptr, nullptr};
}  // namespace argmax_only

struct Context {
    std::shared_ptr<Model> model;
    llama_context *ctx = nullptr;
    llama_batch batch{};
    bool batch_ok = false;
    int32_t n_batch = 0, n_seq_max = 0, n_ctx = 0;
    bool flash_attn = false;  // resolved: whether the context computes attention with flash attention
    uint64_t epoch = 0;       // bumped by every call that changes the KV cache (callers detect edits by others)
    int32_t n_outputs = 0;  // rows with outputs in the last decode
    int32_t row_base = 0;   // batch index of output row 0 (llama_get_*_ith take batch indices)
    bool embeddings_on = false;
    std::vector<float> scratch;
    int type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;  // of the KV cache
    // Device-side greedy (set_backend_greedy): an argmax chain on every seq id, so llama.cpp takes
    // each output row's argmax in the compute graph (ggml_argmax, lowest id on ties on the CPU) and
    // copies no logits back; argmax/argmax_row then read the sampled tokens.
    std::vector<llama_sampler *> greedy;
    bool backend_greedy = false;

    // flash_attn: 1 on, 0 off, -1 llama.cpp's AUTO (on where the device supports it).
    // n_ubatch: llama.cpp splits every decode into micro-batches of at most this many tokens
    // (<= 0: n_batch); the exact mode keeps it inside the batch-invariant region.
    // n_threads serves one-token decodes, n_threads_batch (<= 0: n_threads) every larger batch.
    // type_k/type_v: ggml types of the KV cache (< 0: F16, or F32 with f32_kv), as llama-cpp-python's.
    // n_outputs_max_per_seq: output rows one seq id may carry in a decode with device-side samplers
    // (a tree's leaf is carried by its path: depth + 1 rows); <= 0: llama.cpp's default.
    Context(std::shared_ptr<Model> model_, int n_ctx_, int n_batch_, int n_threads, int n_seq_max_,
            bool f32_kv, int flash_attn_, int n_ubatch_, int n_threads_batch, int type_k = -1, int type_v = -1,
            int n_outputs_max_per_seq = 0)
        : model(std::move(model_)) {
        if (llama_model_is_recurrent(model->model) || llama_model_is_hybrid(model->model))
            throw std::invalid_argument("model " + model->path +
                                        " has a recurrent or hybrid architecture, whose state cannot branch: Medusa tree "
                                        "verification needs a pure-attention model (Llama, Mistral, Qwen2/3, ...)");
        if (llama_model_has_encoder(model->model))
            throw std::invalid_argument("model " + model->path + " is an encoder-decoder model; only decoder-only models are supported");
        if (n_seq_max_ < 1 || n_seq_max_ > (int)llama_max_parallel_sequences())
            throw std::invalid_argument("n_seq_max must be in [1, " + std::to_string(llama_max_parallel_sequences()) + "]");
        llama_context_params p = llama_context_default_params();
        p.n_ctx = n_ctx_;
        p.n_batch = n_batch_;
        p.n_ubatch = n_ubatch_ > 0 ? std::min(n_ubatch_, n_batch_) : n_batch_;
        p.n_seq_max = n_seq_max_;
        p.n_threads = n_threads;
        p.n_threads_batch = n_threads_batch > 0 ? n_threads_batch : n_threads;
        p.kv_unified = true;  // coupled sequences (a tree) need one KV stream
        if (n_outputs_max_per_seq > 0) p.n_outputs_max_per_seq = (uint32_t)n_outputs_max_per_seq;
        p.embeddings = false;
        p.pooling_type = LLAMA_POOLING_TYPE_NONE;
        p.flash_attn_type = flash_attn_ < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                            : flash_attn_ ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        if (f32_kv) {
            p.type_k = GGML_TYPE_F32;
            p.type_v = GGML_TYPE_F32;
        }
        // the types llama.cpp's own CLI offers for the cache (-ctk/-ctv); others reach ops it may abort on
        static const int kv_types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                                       GGML_TYPE_Q4_1, GGML_TYPE_IQ4_NL, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1};
        for (int t : {type_k, type_v})
            if (t >= 0 && std::find(std::begin(kv_types), std::end(kv_types), t) == std::end(kv_types))
                throw std::invalid_argument("KV cache type " + std::to_string(t) + " is not a ggml type a KV cache can hold "
                                            "(f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1)");
        if (type_k >= 0) p.type_k = (ggml_type)type_k;
        if (type_v >= 0) p.type_v = (ggml_type)type_v;
        p.abort_callback = abort_requested;
        p.abort_callback_data = nullptr;
        clear_last_error();
        {
            std::lock_guard<std::mutex> lock(g_log_mutex);
            g_fa_auto_disabled = false;
        }
        ctx = llama_init_from_model(model->model, p);
        if (!ctx) throw std::runtime_error("cannot create a llama.cpp context" + last_error());
        this->type_k = (int)p.type_k;
        this->type_v = (int)p.type_v;
        {
            std::lock_guard<std::mutex> lock(g_log_mutex);
            flash_attn = flash_attn_ > 0 || (flash_attn_ < 0 && !g_fa_auto_disabled);
        }
        n_batch = (int32_t)llama_n_batch(ctx);
        n_seq_max = (int32_t)llama_n_seq_max(ctx);
        n_ctx = (int32_t)llama_n_ctx(ctx);
        batch = llama_batch_init(n_batch, 0, n_seq_max);
        batch_ok = true;
    }
    ~Context() {
        if (batch_ok) llama_batch_free(batch);
        if (ctx) {
            detach_greedy();
            llama_free(ctx);
        }
    }

    // On: every seq id gets a greedy chain in the graph (the next decode rebuilds it); off: none,
    // and raw logits are copied again. Raises if llama.cpp refuses a seq id's sampler.
    void set_backend_greedy(bool on) {
        if (on == backend_greedy) return;
        if (on) {  // fresh chains: llama.cpp initialises a chain for the backend once, when attached
            for (int32_t s = 0; s < n_seq_max; ++s) {
                llama_sampler *ch = llama_sampler_chain_init(llama_sampler_chain_default_params());
                llama_sampler_chain_add(ch, llama_sampler_init(&argmax_only::iface, nullptr));
                greedy.push_back(ch);
                if (!llama_set_sampler(ctx, s, ch)) {
                    detach_greedy();
                    throw std::runtime_error("llama.cpp refused a device-side sampler for seq id " + std::to_string(s) + last_error());
                }
            }
        } else {
            detach_greedy();
        }
        backend_greedy = on;
    }

    void detach_greedy() {
        for (size_t s = 0; s < greedy.size(); ++s) llama_set_sampler(ctx, (llama_seq_id)s, nullptr);
        for (llama_sampler *g : greedy) llama_sampler_free(g);
        greedy.clear();
        backend_greedy = false;
    }

    int32_t sampled_token(int32_t row) const {
        if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
        const llama_token t = llama_get_sampled_token_ith(ctx, row_base + row);
        if (t < 0 || t >= llama_vocab_n_tokens(model->vocab))
            throw std::runtime_error("no device-sampled token for row " + std::to_string(row) + last_error());
        return t;
    }
    Context(const Context &) = delete;
    Context &operator=(const Context &) = delete;

    llama_memory_t mem() const { return llama_get_memory(ctx); }

    // Threads for one-token decodes and for larger batches from the next decode on (the caller
    // picks them per decode; llama_set_n_threads only stores the two numbers).
    void set_threads(int n_threads, int n_threads_batch) {
        if (n_threads < 1 || n_threads_batch < 1) throw std::invalid_argument("thread counts must be at least 1");
        llama_set_n_threads(ctx, n_threads, n_threads_batch);
    }

    void set_embeddings(bool on) {
        if (on != embeddings_on) {
            llama_set_embeddings(ctx, on);
            embeddings_on = on;
        }
    }

    void run_decode(const char *what) { decode_or_raise(ctx, batch, what); }

    void check_fits(int32_t n_past, int32_t n_tokens, int32_t max_depth_plus_one) const {
        if (n_tokens > n_batch)
            throw std::invalid_argument("batch of " + std::to_string(n_tokens) + " tokens exceeds n_batch " + std::to_string(n_batch));
        if (n_past < 0 || n_past + max_depth_plus_one > n_ctx)
            throw std::invalid_argument("positions up to " + std::to_string(n_past + max_depth_plus_one) +
                                        " do not fit the context of " + std::to_string(n_ctx) + " tokens");
    }

    // Prompt tokens at n_past.., tagged with every seq id, in chunks of n_batch. Only the last token
    // gets an output row. hidden = true decodes that token alone with embeddings on (embeddings
    // force an output for every row), so its hidden state is readable; hidden = false keeps the
    // chunking of plain llama.cpp decoding (llama-cpp-python's eval), so the logits equal its bit for bit.
    void prefill(const std::vector<int32_t> &tokens, int32_t n_past, bool hidden) {
        ++epoch;
        const int32_t n = (int32_t)tokens.size();
        if (n == 0) throw std::invalid_argument("prefill needs at least one token");
        if (n_past < 0 || n_past + n > n_ctx)
            throw std::invalid_argument("prompt of " + std::to_string(n) + " tokens at position " + std::to_string(n_past) +
                                        " does not fit the context of " + std::to_string(n_ctx) + " tokens");
        for (int32_t t : tokens) model->check_token(t);
        auto fill = [&](int32_t from, int32_t to, bool last_out) {
            batch.n_tokens = to - from;
            for (int32_t i = from; i < to; ++i) {
                const int32_t r = i - from;
                batch.token[r] = tokens[i];
                batch.pos[r] = n_past + i;
                batch.n_seq_id[r] = n_seq_max;
                for (int32_t s = 0; s < n_seq_max; ++s) batch.seq_id[r][s] = s;
                batch.logits[r] = 0;
            }
            if (last_out) batch.logits[batch.n_tokens - 1] = 1;
        };
        set_embeddings(false);
        const int32_t n_bulk = hidden ? n - 1 : n;
        for (int32_t from = 0; from < n_bulk; from += n_batch) {
            const int32_t to = std::min(n_bulk, from + n_batch);
            fill(from, to, !hidden && to == n);
            run_decode("prompt");
        }
        row_base = batch.n_tokens - 1;
        if (hidden) {
            set_embeddings(true);
            fill(n - 1, n, true);
            run_decode("prompt");
            row_base = 0;
        }
        n_outputs = 1;
    }

    // One tree: node i at n_past + depth[i] carrying seq_sets[i]; every node gets an output row.
    void decode_tree(const TreeShape &tree, i32_array tokens, int32_t n_past) {
        ++epoch;
        const int n = tree.n();
        if (tokens.ndim() != 1 || tokens.shape(0) != n)
            throw std::invalid_argument("decode_tree: expected " + std::to_string(n) + " tokens");
        if (tree.n_leaves > n_seq_max)
            throw std::invalid_argument("tree has " + std::to_string(tree.n_leaves) + " leaves but the context holds " +
                                        std::to_string(n_seq_max) + " sequences");
        const int32_t max_depth = *std::max_element(tree.depth.begin(), tree.depth.end());
        check_fits(n_past, n, max_depth + 1);
        if (n_past + n > n_ctx)  // every node takes a KV cell; the cache holds n_past committed cells
            throw std::invalid_argument("a tree of " + std::to_string(n) + " nodes does not fit the " +
                                        std::to_string(n_ctx - n_past) + " free cells of the KV cache");
        const int32_t *tok = tokens.data();
        for (int i = 0; i < n; ++i) model->check_token(tok[i]);
        set_embeddings(true);
        batch.n_tokens = n;
        for (int i = 0; i < n; ++i) {
            batch.token[i] = tok[i];
            batch.pos[i] = n_past + tree.depth[i];
            const auto &s = tree.seq_sets[i];
            batch.n_seq_id[i] = (int32_t)s.size();
            std::copy(s.begin(), s.end(), batch.seq_id[i]);
            batch.logits[i] = 1;
        }
        run_decode("tree verification");
        n_outputs = n;
        row_base = 0;
    }

    // docs/design.md section 3: keep the accepted cells in place (no recompute).
    // `path` is the accepted node list (root first); afterwards positions [n_past, n_past + len(path))
    // hold the path, tagged with every seq id, and nothing else is left beyond n_past.
    void commit(const TreeShape &tree, const std::vector<int32_t> &path, int32_t n_past) {
        ++epoch;
        if (path.empty() || path[0] != 0) throw std::invalid_argument("commit: the path must start at the root (node 0)");
        for (int32_t v : path)
            if (v < 0 || v >= tree.n()) throw std::invalid_argument("commit: node index out of range");
        const int32_t k = (int32_t)path.size();
        const auto &keep = tree.seq_sets[path.back()];  // leaves under the last accepted node
        std::vector<char> under(n_seq_max, 0);
        for (int32_t s : keep) under[s] = 1;
        const int32_t src = keep[0];
        llama_memory_t m = mem();
        for (int32_t s : keep) llama_memory_seq_rm(m, s, n_past + k, -1);
        for (int32_t s = 0; s < n_seq_max; ++s) {
            if (under[s]) continue;
            llama_memory_seq_rm(m, s, n_past, -1);
            llama_memory_seq_cp(m, src, s, n_past, n_past + k);
        }
    }

    // Drop everything at positions >= pos, in every sequence.
    void truncate(int32_t pos) {
        ++epoch;
        llama_memory_seq_rm(mem(), -1, pos, -1);
    }

    int32_t cache_pos_max(int32_t seq) const { return llama_memory_seq_pos_max(mem(), seq); }

    const float *row_logits(int32_t row) const {
        if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
        if (backend_greedy)
            throw std::runtime_error("raw logits are not copied while the device samples greedily (set_backend_greedy(False))");
        const float *p = llama_get_logits_ith(ctx, row_base + row);
        if (!p) throw std::runtime_error("no logits for row " + std::to_string(row) + last_error());
        return p;
    }

    // [n_rows] argmax of the logits of rows 0..n_rows-1 (lowest id wins ties, like llama.cpp's greedy).
    py::array_t<int32_t> argmax(int32_t n_rows) const {
        if (n_rows < 0 || n_rows > n_outputs) throw std::out_of_range("argmax: more rows than outputs");
        const int32_t n_vocab = llama_vocab_n_tokens(model->vocab);
        py::array_t<int32_t> out(n_rows);
        auto o = out.mutable_unchecked<1>();
        for (int32_t r = 0; r < n_rows; ++r) {
            if (backend_greedy) {
                o(r) = sampled_token(r);
                continue;
            }
            const float *l = row_logits(r);
            o(r) = (int32_t)(std::max_element(l, l + n_vocab) - l);
        }
        return out;
    }

    // argmax of one row's logits (lowest id wins ties): greedy acceptance reads only the rows it walks.
    int32_t argmax_row(int32_t row) const {
        if (backend_greedy) return sampled_token(row);
        const int32_t n_vocab = llama_vocab_n_tokens(model->vocab);
        const float *l = row_logits(row);
        return (int32_t)(std::max_element(l, l + n_vocab) - l);
    }

    py::array_t<float> logits(int32_t row) const {
        const int32_t n_vocab = llama_vocab_n_tokens(model->vocab);
        const float *l = row_logits(row);
        py::array_t<float> out(n_vocab);
        std::memcpy(out.mutable_data(), l, sizeof(float) * n_vocab);
        return out;
    }

    const float *row_hidden(int32_t row) const {
        if (!embeddings_on) throw std::runtime_error("hidden state requested for a batch decoded without embeddings");
        if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
        const float *p = llama_get_embeddings_ith(ctx, row_base + row);
        if (!p) throw std::runtime_error("no hidden state for row " + std::to_string(row) + last_error());
        return p;
    }

    py::array_t<float> hidden(int32_t row) const {
        const int32_t n = llama_model_n_embd_out(model->model);
        py::array_t<float> out(n);
        std::memcpy(out.mutable_data(), row_hidden(row), sizeof(float) * n);
        return out;
    }
};

// ---------------------------------------------------------------------------------------------

struct Sampler {
    llama_sampler *chain = nullptr;
    // With a grammar: the model whose vocabulary the grammar sampler points into (kept alive), the
    // chain's penalties and grammar members (owned by the chain), and a reused candidates buffer.
    std::shared_ptr<Model> model;
    llama_sampler *penalties = nullptr, *grammar = nullptr, *bias = nullptr;
    bool greedy = false;
    int32_t n_vocab = 0;
    std::vector<llama_token_data> cur;

    // Same order as llama-cpp-python's Llama._init_sampler, so equal settings give equal draws:
    // logit bias (when given), penalties, grammar (GBNF, when given), then greedy, or top-k,
    // typical, top-p, min-p, temperature, dist(seed). temp == 0: greedy; temp < 0: dist over the
    // penalised (and grammar-masked) logits, nothing truncated (llama-cpp-python).
    // The bias comes first because llama-cpp-python applies logit_bias as a logits processor, a
    // custom sampler it adds before the penalties; both add the float32 bias to the float32 logit.
    // A grammar that llama.cpp cannot parse, or a bias for a token outside the vocabulary or not
    // finite, is a std::invalid_argument naming its fault.
    Sampler(int32_t n_vocab_, uint32_t seed, float temp, int32_t top_k, float top_p, float min_p, float repeat_penalty,
            int32_t penalty_last_n, float frequency_penalty, float presence_penalty, float typical_p,
            std::shared_ptr<Model> model_, const std::string &grammar_str, const std::string &grammar_root,
            const std::vector<std::pair<int32_t, float>> &logit_bias)
        : model(std::move(model_)), greedy(temp == 0.0f), n_vocab(n_vocab_) {
        std::vector<llama_logit_bias> lb;
        lb.reserve(logit_bias.size());
        for (const auto &kv : logit_bias) {
            if (kv.first < 0 || kv.first >= n_vocab)
                throw std::invalid_argument("logit_bias names token " + std::to_string(kv.first) + ", outside the vocabulary [0, " +
                                            std::to_string(n_vocab) + ")");
            if (!std::isfinite(kv.second))
                throw std::invalid_argument("logit_bias for token " + std::to_string(kv.first) + " is not a finite number");
            lb.push_back(llama_logit_bias{kv.first, kv.second});
        }
        llama_sampler *g = nullptr;
        if (!grammar_str.empty()) {
            if (!model) throw std::invalid_argument("a grammar needs the model (its vocabulary)");
            if (grammar_root.empty()) throw std::invalid_argument("the grammar's root rule name is empty");
            if (n_vocab != llama_vocab_n_tokens(model->vocab)) throw std::invalid_argument("n_vocab is not the model's");
            clear_last_error();
            g = llama_sampler_init_grammar(model->vocab, grammar_str.c_str(), grammar_root.c_str());
            if (!g) {
                std::string why = error_lines();
                throw std::invalid_argument("the grammar could not be parsed" + (why.empty() ? std::string() : " (llama.cpp: " + why + ")"));
            }
        }
        chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
        if (!lb.empty()) {
            bias = llama_sampler_init_logit_bias(n_vocab, (int32_t)lb.size(), lb.data());
            llama_sampler_chain_add(chain, bias);
        }
        penalties = llama_sampler_init_penalties(n_vocab, penalty_last_n, repeat_penalty, frequency_penalty, presence_penalty);
        llama_sampler_chain_add(chain, penalties);
        if (g) llama_sampler_chain_add(chain, grammar = g);
        if (temp < 0.0f) {
            llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
        } else if (temp == 0.0f) {
            llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        } else {
            llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
            llama_sampler_chain_add(chain, llama_sampler_init_typical(typical_p, 1));
            llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 1));
            llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 1));
            llama_sampler_chain_add(chain, llama_sampler_init_temp(temp));
            llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
        }
    }
    ~Sampler() {
        if (chain) llama_sampler_free(chain);
    }
    Sampler(const Sampler &) = delete;
    Sampler &operator=(const Sampler &) = delete;

    // Draw from output row `row` of the context's last decode; the token is accepted into the chain
    // (penalty history, grammar state).
    int32_t sample(Context &c, int32_t row) {
        const float *logits = c.row_logits(row);  // bounds check
        if (!grammar) return llama_sampler_sample(chain, c.ctx, c.row_base + row);
        // With a grammar: llama_sampler_sample's steps (candidates in id order, the chain's members
        // applied in order, accept the selected token), with two differences that change no choice.
        // A grammar that allows no token here is an exception, not an accept of a forbidden token
        // (which llama.cpp aborts on for an end-of-generation token). Greedy first checks the
        // penalised argmax alone against the grammar: the grammar only masks tokens to -inf, so when
        // it allows the argmax that is the greedy choice of the masked logits (the first maximum
        // stays the first), and only a rejected argmax costs the grammar over the whole vocabulary.
        cur.resize(n_vocab);
        for (int32_t t = 0; t < n_vocab; ++t) cur[t] = llama_token_data{t, logits[t], 0.0f};
        llama_token_data_array cur_p = {cur.data(), cur.size(), -1, false};
        llama_token token = LLAMA_TOKEN_NULL;
        if (greedy) {
            if (bias) llama_sampler_apply(bias, &cur_p);
            llama_sampler_apply(penalties, &cur_p);
            int32_t best = 0;
            for (int32_t t = 1; t < n_vocab; ++t)
                if (cur[t].logit > cur[best].logit) best = t;
            llama_token_data one = cur[best];
            llama_token_data_array one_p = {&one, 1, -1, false};
            llama_sampler_apply(grammar, &one_p);
            if (one.logit != -INFINITY) {
                token = one.id;
            } else {
                llama_sampler_apply(grammar, &cur_p);
                best = 0;
                for (int32_t t = 1; t < n_vocab; ++t)
                    if (cur[t].logit > cur[best].logit) best = t;
                if (cur[best].logit == -INFINITY) dead_end();
                token = cur[best].id;
            }
        } else {
            const int n = llama_sampler_chain_n(chain);
            for (int i = 0; i < n; ++i) {
                llama_sampler *s = llama_sampler_chain_get(chain, i);
                llama_sampler_apply(s, &cur_p);
                if (s == grammar && !any_allowed(cur_p)) dead_end();
            }
            if (cur_p.selected < 0 || cur_p.selected >= (int64_t)cur_p.size) throw std::runtime_error("the sampler selected no token");
            token = cur_p.data[cur_p.selected].id;
        }
        llama_sampler_accept(chain, token);
        return token;
    }
    void accept(int32_t token) { llama_sampler_accept(chain, token); }
    void reset() { llama_sampler_reset(chain); }

    static bool any_allowed(const llama_token_data_array &a) {
        for (size_t i = 0; i < a.size; ++i)
            if (a.data[i].logit != -INFINITY) return true;
        return false;
    }
    [[noreturn]] static void dead_end() {
        throw std::invalid_argument("the grammar allows no token here: no token of the vocabulary continues the text it "
                                    "has matched so far (a literal the tokenizer cannot spell?)");
    }
};

// ---------------------------------------------------------------------------------------------
// GGUF files from outside: heads files, and the model file that shared-output heads take their
// lm_head from.
//
// Contract: a damaged or hostile file gives std::invalid_argument (Python ValueError) that names the
// file and the fault; never an abort, a signal, a hang, or an allocation beyond the file's size.
// ggml's gguf reader (this llama.cpp version) already bounds every count, string and array by the
// bytes left in the file, rejects unknown value types, nested arrays and duplicate keys or tensor
// names, and checks tensor dimensions, types (in range, rows a whole number of blocks), offsets
// (consecutive, aligned) and byte sizes against overflow. What it leaves to the caller is checked here:
//   - a value's type before gguf_get_val_* (which GGML_ASSERTs, killing the process, on a mismatch);
//   - value ranges before narrowing (a u64 head count must not wrap into a small int32);
//   - tensor data inside the file (the reader never compares the data section with the file's end);
//   - tensor types and shapes the heads graph can run (in Heads).

// a + b, false on uint64 overflow. (Products need no check: the reader bounds tensor sizes, and
// Heads bounds its counts so that n_heads * (6 * n_layers + 8) and the like stay far inside int64.)
static bool add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (b > UINT64_MAX - a) return false;
    *out = a + b;
    return true;
}

// GGUF value type as text: "u32", "str", "arr[str]", ...
static std::string gguf_kv_type_label(const gguf_context *g, int64_t id) {
    const gguf_type t = gguf_get_kv_type(g, id);
    const char *name = gguf_type_name(t);
    if (t != GGUF_TYPE_ARRAY) return name ? name : "?";
    const char *elem = gguf_type_name(gguf_get_arr_type(g, id));
    return std::string("arr[") + (elem ? elem : "?") + "]";
}

struct GgufFile {
    std::string path, what;  // what: "heads file", "model file" (starts every error message)
    gguf_context *g = nullptr;
    ggml_context *meta = nullptr;  // one no-data tensor per entry: shapes and types
    uint64_t size = 0;             // bytes in the file

    GgufFile(const std::string &path_, const std::string &what_) : path(path_), what(what_) {
        FILE *f = fopen(path.c_str(), "rb");
        if (!f) fail("cannot open file");
        char magic[4] = {0, 0, 0, 0};
        const size_t got = fread(magic, 1, 4, f);
        const int64_t end = fseeko(f, 0, SEEK_END) == 0 ? (int64_t)ftello(f) : -1;
        fclose(f);
        if (got != 4 || std::memcmp(magic, "GGUF", 4) != 0) fail("not a GGUF file (bad magic)");
        if (end < 0) fail("cannot determine the file size");
        size = (uint64_t)end;
        gguf_init_params p{};
        p.no_alloc = true;
        p.ctx = &meta;
        clear_last_error();
        g = gguf_init_from_file(path.c_str(), p);
        if (!g) {
            release();
            fail("corrupt or truncated GGUF" + last_error());
        }
        // A truncated download parses (the reader stops at the tensor table) but fails here.
        const uint64_t data_off = gguf_get_data_offset(g);
        for (int64_t t = 0; t < gguf_get_n_tensors(g); ++t) {
            uint64_t begin, end_t;
            if (!add_u64(data_off, gguf_get_tensor_offset(g, t), &begin) || !add_u64(begin, gguf_get_tensor_size(g, t), &end_t) ||
                end_t > size) {
                const std::string name = gguf_get_tensor_name(g, t);
                release();
                fail("truncated (tensor " + name + " ends past the end of the file, which has " + std::to_string(size) + " bytes)");
            }
        }
    }
    ~GgufFile() { release(); }
    GgufFile(const GgufFile &) = delete;
    GgufFile &operator=(const GgufFile &) = delete;

    void release() {
        if (g) gguf_free(g), g = nullptr;
        if (meta) ggml_free(meta), meta = nullptr;
    }

    [[noreturn]] void fail(const std::string &why) const { throw std::invalid_argument(what + " " + path + ": " + why); }

    // Integer value of `key`, of any GGUF integer type, checked to lie in [lo, hi]. Absent: `dflt`,
    // or an error when dflt is null.
    int64_t get_int(const char *key, int64_t lo, int64_t hi, const int64_t *dflt = nullptr) const {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0) {
            if (dflt) return *dflt;
            fail(std::string("missing key ") + key);
        }
        int64_t v = 0;
        uint64_t u = 0;
        bool is_unsigned = true;
        switch (gguf_get_kv_type(g, id)) {
            case GGUF_TYPE_UINT8: u = gguf_get_val_u8(g, id); break;
            case GGUF_TYPE_UINT16: u = gguf_get_val_u16(g, id); break;
            case GGUF_TYPE_UINT32: u = gguf_get_val_u32(g, id); break;
            case GGUF_TYPE_UINT64: u = gguf_get_val_u64(g, id); break;
            case GGUF_TYPE_INT8: v = gguf_get_val_i8(g, id), is_unsigned = false; break;
            case GGUF_TYPE_INT16: v = gguf_get_val_i16(g, id), is_unsigned = false; break;
            case GGUF_TYPE_INT32: v = gguf_get_val_i32(g, id), is_unsigned = false; break;
            case GGUF_TYPE_INT64: v = gguf_get_val_i64(g, id), is_unsigned = false; break;
            default: fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(g, id) + ", not an integer");
        }
        const bool in_range = is_unsigned ? u <= (uint64_t)hi && (int64_t)u >= lo : v >= lo && v <= hi;
        if (!in_range)
            fail(std::string("key ") + key + " = " + (is_unsigned ? std::to_string(u) : std::to_string(v)) + " is outside [" +
                 std::to_string(lo) + ", " + std::to_string(hi) + "]");
        return is_unsigned ? (int64_t)u : v;
    }

    bool get_bool(const char *key, bool dflt) const {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0) return dflt;
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL)
            fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(g, id) + ", not bool");
        return gguf_get_val_bool(g, id);
    }

    // String value of `key`; `dflt` when absent.
    std::string get_str(const char *key, const std::string &dflt) const {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0) return dflt;
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING)
            fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(g, id) + ", not str");
        return gguf_get_val_str(g, id);
    }

    // Tensor `name`: its metadata (shape and type as the reader checked them) and the absolute file
    // offset of its data (inside the file: checked by the constructor).
    std::pair<const ggml_tensor *, uint64_t> tensor(const std::string &name) const {
        const int64_t tid = gguf_find_tensor(g, name.c_str());
        const ggml_tensor *m = tid < 0 || !meta ? nullptr : ggml_get_tensor(meta, name.c_str());
        if (!m) fail("missing tensor " + name);
        return {m, gguf_get_data_offset(g) + gguf_get_tensor_offset(g, tid)};
    }

    // {"version", "alignment", "data_offset", "file_size", "n_tensors",
    //  "kv": {key: (type label, value)}, "tensors": {name: (ggml type name, shape, offset, nbytes)}}
    // Strings are bytes (GGUF does not promise UTF-8); numeric arrays are numpy arrays; string arrays
    // lists of bytes. Everything here was already read into memory by the reader (bounded by the file).
    py::dict to_python() const {
        py::dict kv;
        for (int64_t id = 0; id < gguf_get_n_kv(g); ++id) {
            const gguf_type t = gguf_get_kv_type(g, id);
            py::object v;
            switch (t) {
                case GGUF_TYPE_UINT8: v = py::int_(gguf_get_val_u8(g, id)); break;
                case GGUF_TYPE_INT8: v = py::int_(gguf_get_val_i8(g, id)); break;
                case GGUF_TYPE_UINT16: v = py::int_(gguf_get_val_u16(g, id)); break;
                case GGUF_TYPE_INT16: v = py::int_(gguf_get_val_i16(g, id)); break;
                case GGUF_TYPE_UINT32: v = py::int_(gguf_get_val_u32(g, id)); break;
                case GGUF_TYPE_INT32: v = py::int_(gguf_get_val_i32(g, id)); break;
                case GGUF_TYPE_UINT64: v = py::int_(gguf_get_val_u64(g, id)); break;
                case GGUF_TYPE_INT64: v = py::int_(gguf_get_val_i64(g, id)); break;
                case GGUF_TYPE_FLOAT32: v = py::float_(gguf_get_val_f32(g, id)); break;
                case GGUF_TYPE_FLOAT64: v = py::float_(gguf_get_val_f64(g, id)); break;
                case GGUF_TYPE_BOOL: v = py::bool_(gguf_get_val_bool(g, id)); break;
                case GGUF_TYPE_STRING: v = py::bytes(gguf_get_val_str(g, id)); break;
                case GGUF_TYPE_ARRAY: v = array_to_python(id); break;
                default: fail("key " + std::string(gguf_get_key(g, id)) + " has an unknown type");
            }
            kv[py::bytes(gguf_get_key(g, id))] = py::make_tuple(gguf_kv_type_label(g, id), v);
        }
        py::dict tensors;
        for (int64_t t = 0; t < gguf_get_n_tensors(g); ++t) {
            const char *name = gguf_get_tensor_name(g, t);
            const ggml_tensor *m = meta ? ggml_get_tensor(meta, name) : nullptr;
            py::tuple shape = m ? py::tuple(py::make_tuple(m->ne[0], m->ne[1], m->ne[2], m->ne[3])) : py::tuple();
            tensors[py::bytes(name)] = py::make_tuple(ggml_type_name(gguf_get_tensor_type(g, t)), shape,
                                                      gguf_get_data_offset(g) + gguf_get_tensor_offset(g, t), gguf_get_tensor_size(g, t));
        }
        py::dict d;
        d["version"] = gguf_get_version(g);
        d["alignment"] = gguf_get_alignment(g);
        d["data_offset"] = gguf_get_data_offset(g);
        d["file_size"] = size;
        d["n_tensors"] = gguf_get_n_tensors(g);
        d["kv"] = kv;
        d["tensors"] = tensors;
        return d;
    }

  private:
    py::object array_to_python(int64_t id) const {
        const gguf_type et = gguf_get_arr_type(g, id);
        const size_t n = gguf_get_arr_n(g, id);
        if (et == GGUF_TYPE_STRING) {
            py::list out(n);
            for (size_t i = 0; i < n; ++i) out[i] = py::bytes(gguf_get_arr_str(g, id, i));
            return std::move(out);
        }
        const char *dtype = nullptr;
        switch (et) {
            case GGUF_TYPE_UINT8: dtype = "u1"; break;
            case GGUF_TYPE_INT8: dtype = "i1"; break;
            case GGUF_TYPE_UINT16: dtype = "<u2"; break;
            case GGUF_TYPE_INT16: dtype = "<i2"; break;
            case GGUF_TYPE_UINT32: dtype = "<u4"; break;
            case GGUF_TYPE_INT32: dtype = "<i4"; break;
            case GGUF_TYPE_UINT64: dtype = "<u8"; break;
            case GGUF_TYPE_INT64: dtype = "<i8"; break;
            case GGUF_TYPE_FLOAT32: dtype = "<f4"; break;
            case GGUF_TYPE_FLOAT64: dtype = "<f8"; break;
            case GGUF_TYPE_BOOL: dtype = "?"; break;  // stored one byte each
            default: fail("key " + std::string(gguf_get_key(g, id)) + " is an array of an unknown type");
        }
        py::array out(py::dtype(dtype), std::vector<py::ssize_t>{(py::ssize_t)n});
        if (n) std::memcpy(out.mutable_data(), gguf_get_arr_data(g, id), n * out.itemsize());
        return std::move(out);
    }
};

// Medusa heads on ggml. head_i(h) = W_out_i (x_L), x_0 = h, x_{j+1} = x_j + SiLU(W_ij x_j + b_ij).
// With root input (schema 2), the first ResBlock reads the root token's embedding too:
// x_1 = h + SiLU(W_i0 [h; e(root)] + b_i0), e = the model file's token_embd rows (get_rows).
//
// Loading validates the heads file (and, for shared output, the model file's lm_head) completely
// before any device memory is taken. The weights go to the backend of the model's device; if that
// device cannot run an op of the heads graph, the heads run on the CPU instead (see build()).

// Matrix types the heads graph may multiply: those the CPU backend (also the fallback) has a dot
// product for. Not Q8_1/Q8_K (activation-only types without one), not the integer types or F64: the
// CPU backend would crash on them. (medusa_edge/gguf_check.py MATRIX_TYPES is the same list.)
static bool matrix_type_ok(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q1_0: case GGML_TYPE_Q2_0: case GGML_TYPE_NVFP4:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ2_XXS: case GGML_TYPE_IQ2_XS: case GGML_TYPE_IQ2_S: case GGML_TYPE_IQ3_XXS: case GGML_TYPE_IQ3_S:
        case GGML_TYPE_IQ1_S: case GGML_TYPE_IQ1_M: case GGML_TYPE_IQ4_NL: case GGML_TYPE_IQ4_XS:
        case GGML_TYPE_TQ1_0: case GGML_TYPE_TQ2_0: case GGML_TYPE_MXFP4:
            return true;
        default:
            return false;
    }
}

struct Heads {
    // Bounds on the metadata: far above any real head set, and they keep all size arithmetic in
    // int64 (n_heads * (2 * n_layers + 1) tensors; an [n_embd, n_vocab] matrix must also fit the file).
    static constexpr int64_t kMaxHeads = 256, kMaxLayers = 256, kMaxDim = (int64_t(1) << 24) - 1;
    static constexpr int64_t kSchemaVersion = 3;  // medusa_edge/schema.py SCHEMA_VERSION

    std::string path;
    int32_t n_heads = 0, n_layers = 0, n_embd = 0, n_vocab = 0;
    bool shared_output = false;
    bool root_input = false;  // the first ResBlock reads [h; e(root)]
    // Draft vocabulary (schema 3): the heads score only these full-vocabulary ids (strictly
    // increasing, so ties between draft rows break toward the lower full id, as without one). Empty:
    // every token. n_draft = rows of the output matrices the pass multiplies by (n_vocab without one).
    std::vector<int32_t> draft_vocab;
    int32_t n_draft = 0;
    int n_threads = 1;

    // What to load (filled once by parse(), then uploaded to a backend, again after a fallback).
    struct WeightSpec {
        std::string name, file;
        uint64_t offset, nbytes;
        ggml_type type;
        int64_t ne0, ne1;
        // non-empty: only these rows of the file's [ne0, *] matrix, in this order (ne1 = rows.size());
        // each row is read as stored (same type, same bytes), so every logit is the full product's
        std::vector<int32_t> rows;
    };
    std::vector<WeightSpec> specs;
    std::vector<std::vector<int>> w_idx, b_idx;  // [head][layer] -> index into specs / weights
    std::vector<int> out_idx;                    // [head] (all equal when shared)
    int embd_idx = -1;                           // the model's token_embd (root input only)

    ggml_backend_t backend = nullptr;
    bool on_fallback = false;  // the heads run on the CPU because the first backend lacked an op
    std::string backend_name;
    std::string test_unsupported_op;  // MEDUSA_EDGE_TEST_UNSUPPORTED_OP: pretend the first backend lacks this op
    ggml_context *wctx = nullptr;       // weight tensors
    ggml_backend_buffer_t wbuf = nullptr;
    std::vector<ggml_tensor *> weights;  // [specs]
    // compute graphs, one per shape (top_k, heads used), each allocated once and kept: a tree cut
    // short at the end of an answer and grown again reuses them. The current one in these fields.
    struct Graph {
        ggml_context *gctx = nullptr;
        ggml_cgraph *graph = nullptr;
        ggml_gallocr_t galloc = nullptr;
        ggml_tensor *in_h = nullptr, *in_root = nullptr;
        // [k, n_used] i32; [1, k, n_used] f32: probabilities, or logits where no log-probs are read
        ggml_tensor *out_ids = nullptr, *out_probs = nullptr;
    };
    std::map<std::tuple<int32_t, int32_t, bool>, Graph> graphs;  // (top_k, heads used, log-probs)
    static constexpr size_t MAX_GRAPHS = 16;  // shapes kept at most (all dropped when full)
    int64_t n_builds = 0;                     // graphs built so far (for tests)
    // per pass, for tests: host-to-device writes, device-to-host reads, and waits for the backend
    int64_t n_uploads = 0, n_reads = 0, n_syncs = 0;
    int32_t graph_k = -1, graph_n = -1;
    bool graph_logp = true;
    ggml_context *gctx = nullptr;
    ggml_cgraph *graph = nullptr;
    ggml_gallocr_t galloc = nullptr;
    ggml_tensor *in_h = nullptr, *in_root = nullptr;
    ggml_tensor *out_ids = nullptr, *out_probs = nullptr;
    // Own output matrices of one type are loaded into one [n_embd, n_vocab, n_heads] tensor, so one
    // batched product computes every head's logits (null otherwise: per-head tensors in `weights`).
    ggml_tensor *out_stack = nullptr;

    Heads(const std::string &path_, const std::string &model_path, int n_threads_, bool use_gpu) : path(path_) {
        n_threads = std::max(1, n_threads_);
        try {
            load(model_path, use_gpu);
        } catch (...) {
            release();
            throw;
        }
    }
    ~Heads() { release(); }
    Heads(const Heads &) = delete;
    Heads &operator=(const Heads &) = delete;

    void release_graph() {  // every cached graph, and one left half-built by an exception
        bool current_cached = false;
        for (auto &kv : graphs) {
            current_cached |= kv.second.gctx == gctx;
            if (kv.second.galloc) ggml_gallocr_free(kv.second.galloc);
            if (kv.second.gctx) ggml_free(kv.second.gctx);
        }
        graphs.clear();
        if (!current_cached) {
            if (galloc) ggml_gallocr_free(galloc);
            if (gctx) ggml_free(gctx);
        }
        galloc = nullptr, gctx = nullptr, graph = nullptr, in_h = nullptr, in_root = nullptr;
        out_ids = out_probs = nullptr;
        graph_k = graph_n = -1;
    }
    void use_graph(const Graph &g, int32_t k, int32_t n, bool logp) {
        gctx = g.gctx, graph = g.graph, galloc = g.galloc, in_h = g.in_h, in_root = g.in_root;
        out_ids = g.out_ids, out_probs = g.out_probs;
        graph_k = k, graph_n = n, graph_logp = logp;
    }
    void release_weights() {
        if (wbuf) ggml_backend_buffer_free(wbuf), wbuf = nullptr;
        if (wctx) ggml_free(wctx), wctx = nullptr;
        weights.clear();
        out_stack = nullptr;
    }
    void release() {
        release_graph();
        release_weights();
        if (backend) ggml_backend_free(backend), backend = nullptr;
    }

    void load(const std::string &model_path, bool use_gpu) {
        const char *forced = std::getenv("MEDUSA_EDGE_TEST_UNSUPPORTED_OP");
        test_unsupported_op = forced ? forced : "";
        parse(model_path);
        init_backend(use_gpu);
        upload();
        // Check the graph the engine builds first (top-10 of every head) now, so that a fallback
        // happens at load time; build() checks again for every other (k, n_used).
        build(std::min<int32_t>(10, n_draft), n_heads, true);
    }

    // Validate the heads file (and the model file's lm_head for shared output) and fill specs.
    void parse(const std::string &model_path) {
        GgufFile hf(path, "heads file");
        if (hf.get_str("general.architecture", "") != "medusa")
            hf.fail("general.architecture is not 'medusa' (is this a base model?)");
        const int64_t one = 1;
        const int64_t version = hf.get_int("medusa.schema_version", 1, INT32_MAX, &one);
        if (version > kSchemaVersion)
            hf.fail("schema version " + std::to_string(version) + " is newer than this medusa-edge (" + std::to_string(kSchemaVersion) + ")");
        n_heads = (int32_t)hf.get_int("medusa.head_count", 1, kMaxHeads);
        n_layers = (int32_t)hf.get_int("medusa.block_count", 0, kMaxLayers);
        n_embd = (int32_t)hf.get_int("medusa.embedding_length", 1, kMaxDim);
        n_vocab = (int32_t)hf.get_int("medusa.vocab_size", 1, kMaxDim);
        shared_output = hf.get_bool("medusa.shared_output", false);
        root_input = hf.get_bool("medusa.root_input", false);
        if (root_input && n_layers < 1) hf.fail("medusa.root_input is set but the heads have no ResBlock to read the root token");
        parse_draft_vocab(hf, version);
        const int64_t needed = (int64_t)n_heads * (2 * n_layers + (shared_output ? 0 : 1));  // <= 256 * 513
        if (needed > gguf_get_n_tensors(hf.g))
            hf.fail("the metadata asks for " + std::to_string(needed) + " tensors (" + std::to_string(n_heads) + " heads, " +
                    std::to_string(n_layers) + " layers" + (shared_output ? ", shared output" : "") + ") but the file has " +
                    std::to_string(gguf_get_n_tensors(hf.g)));

        // Tensor `name` of `src`, required to be [ne0, ne1] of an allowed type (matrices: matrix_type_ok,
        // biases: F32, as medusa_edge/heads_gguf.py writes them).
        auto take = [&](const GgufFile &src, const std::string &name, int64_t ne0, int64_t ne1, bool matrix) -> int {
            const auto [m, offset] = src.tensor(name);
            if (m->ne[0] != ne0 || m->ne[1] != ne1 || m->ne[2] != 1 || m->ne[3] != 1)
                src.fail("tensor " + name + " has shape [" + std::to_string(m->ne[0]) + ", " + std::to_string(m->ne[1]) + ", " +
                         std::to_string(m->ne[2]) + ", " + std::to_string(m->ne[3]) + "], expected [" + std::to_string(ne0) + ", " +
                         std::to_string(ne1) + "]");
            if (matrix ? !matrix_type_ok(m->type) : m->type != GGML_TYPE_F32)
                src.fail("tensor " + name + " has type " + ggml_type_name(m->type) + ", which the heads cannot use" +
                         (matrix ? "" : " (biases are F32)"));
            for (size_t i = 0; i < specs.size(); ++i)  // a tied model's token_embd serves twice: load it once
                if (specs[i].file == src.path && specs[i].name == name) return (int)i;
            specs.push_back({name, src.path, offset, (uint64_t)ggml_nbytes(m), m->type, ne0, ne1});
            return (int)specs.size() - 1;
        };
        w_idx.assign(n_heads, {});
        b_idx.assign(n_heads, {});
        out_idx.assign(n_heads, -1);
        for (int i = 0; i < n_heads; ++i) {
            for (int j = 0; j < n_layers; ++j) {
                const std::string p = "medusa." + std::to_string(i) + ".res." + std::to_string(j);
                w_idx[i].push_back(take(hf, p + ".weight", (root_input && j == 0 ? 2 : 1) * (int64_t)n_embd, n_embd, true));
                b_idx[i].push_back(take(hf, p + ".bias", n_embd, 1, false));
            }
            if (!shared_output) out_idx[i] = take(hf, "medusa." + std::to_string(i) + ".output.weight", n_embd, n_draft, true);
        }
        if (shared_output) {
            // "version 2" heads reuse the base lm_head: output.weight (or the tied embedding) of the model file.
            GgufFile base(model_path, "model file");
            const std::string name = gguf_find_tensor(base.g, "output.weight") >= 0 ? "output.weight" : "token_embd.weight";
            const ggml_tensor *m = base.tensor(name).first;
            if (m->ne[0] != n_embd || m->ne[1] != n_vocab)  // a heads fault: name the heads file first
                hf.fail("made for an lm_head of [" + std::to_string(n_embd) + ", " + std::to_string(n_vocab) + "], but " + name +
                        " of model file " + model_path + " is [" + std::to_string(m->ne[0]) + ", " + std::to_string(m->ne[1]) + "]");
            int idx = take(base, name, n_embd, n_vocab, true);
            if (!draft_vocab.empty()) {
                // The draft rows of the base's matrix, as a spec of their own: the pass multiplies by
                // [n_embd, n_draft], and the full matrix is not loaded for it (a tied model's
                // token_embd is still loaded whole for root input below, as a separate spec).
                WeightSpec s = specs[idx];
                s.name += ".draft";
                s.ne1 = n_draft;
                s.nbytes = (uint64_t)ggml_row_size(s.type, s.ne0) * (uint64_t)n_draft;
                s.rows = draft_vocab;
                specs[idx] = s;  // take() added the full matrix just now: only its draft rows are needed
            }
            for (int i = 0; i < n_heads; ++i) out_idx[i] = idx;
        }
        if (root_input) {
            GgufFile base(model_path, "model file");
            if (gguf_find_tensor(base.g, "token_embd.weight") < 0)
                hf.fail("its heads read the root token's embedding, but model file " + model_path + " has no token_embd.weight");
            const ggml_tensor *m = base.tensor("token_embd.weight").first;
            if (m->ne[0] != n_embd || m->ne[1] != n_vocab)
                hf.fail("made for a token embedding of [" + std::to_string(n_embd) + ", " + std::to_string(n_vocab) + "], but token_embd.weight of model file " +
                        model_path + " is [" + std::to_string(m->ne[0]) + ", " + std::to_string(m->ne[1]) + "]");
            embd_idx = take(base, "token_embd.weight", n_embd, n_vocab, true);
        }
    }

    // medusa.draft_vocab (schema 3): an i32 array of 1 to n_vocab full ids, each in [0, n_vocab),
    // strictly increasing (so unique). Anything else is one clear error naming the key.
    void parse_draft_vocab(const GgufFile &hf, int64_t version) {
        draft_vocab.clear();
        n_draft = n_vocab;
        const char *key = "medusa.draft_vocab";
        const int64_t id = gguf_find_key(hf.g, key);
        if (id < 0) return;
        if (version < 3) hf.fail(std::string(key) + " needs schema version 3, the file says " + std::to_string(version));
        if (gguf_get_kv_type(hf.g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(hf.g, id) != GGUF_TYPE_INT32)
            hf.fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(hf.g, id) + ", not an array of i32");
        const size_t n = gguf_get_arr_n(hf.g, id);
        if (n < 1 || n > (size_t)n_vocab)
            hf.fail(std::string(key) + " has " + std::to_string(n) + " ids, not 1 to n_vocab = " + std::to_string(n_vocab));
        const int32_t *v = (const int32_t *)gguf_get_arr_data(hf.g, id);
        for (size_t i = 0; i < n; ++i) {
            if (v[i] < 0 || v[i] >= n_vocab)
                hf.fail(std::string(key) + "[" + std::to_string(i) + "] = " + std::to_string(v[i]) + " is outside [0, " +
                        std::to_string(n_vocab) + ")");
            if (i > 0 && v[i] <= v[i - 1])
                hf.fail(std::string(key) + " is not strictly increasing (ids " + std::to_string(v[i - 1]) + ", " +
                        std::to_string(v[i]) + " at " + std::to_string(i - 1) + ", " + std::to_string(i) + "): ids must be unique and sorted");
        }
        draft_vocab.assign(v, v + n);
        n_draft = (int32_t)n;
    }

    // The backend of the device that holds the model's layers when offloading, else the CPU.
    //
    // Ideally the device holding the model's output layer. llama.cpp's public API (llama.h and
    // ggml-backend.h of this version) has no call that names the device of a model tensor (that is
    // llama_model::dev_output(), internal C++), so with offloading this takes the first GPU: the right
    // one with a single GPU; with several, llama.cpp's default layer split usually puts the output layer
    // on the last one, and the hidden state then crosses devices once per step.
    void init_backend(bool use_gpu) {
        if (use_gpu) {
            ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
            if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
            if (dev) backend = ggml_backend_dev_init(dev, nullptr);
        }
        if (!backend) init_cpu_backend();
        backend_name = ggml_backend_name(backend);
    }

    void init_cpu_backend() {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!dev) throw std::runtime_error("no CPU backend registered in ggml");
        backend = ggml_backend_dev_init(dev, nullptr);
        if (!backend) throw std::runtime_error("cannot initialise the CPU backend");
        // Through the registry, so this works whether the CPU backend is linked in or loaded dynamically.
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        auto set_threads = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
        if (set_threads) set_threads(backend, n_threads);
    }

    // Create the weight tensors on `backend` and read their data from the files.
    void upload() {
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * (specs.size() + 1);
        ip.no_alloc = true;
        wctx = ggml_init(ip);
        if (!wctx) throw std::runtime_error("ggml_init failed");
        bool stack = !shared_output && n_heads > 1;
        for (int i = 1; stack && i < n_heads; ++i) stack = specs[out_idx[i]].type == specs[out_idx[0]].type;
        std::vector<bool> in_stack(specs.size(), false);
        if (stack) {
            out_stack = ggml_new_tensor_3d(wctx, specs[out_idx[0]].type, n_embd, n_draft, n_heads);
            ggml_set_name(out_stack, "medusa.output.stacked");
            for (int i = 0; i < n_heads; ++i) in_stack[out_idx[i]] = true;
        }
        for (size_t i = 0; i < specs.size(); ++i) {
            const auto &s = specs[i];
            ggml_tensor *t = nullptr;
            if (!in_stack[i]) {
                t = ggml_new_tensor_2d(wctx, s.type, s.ne0, s.ne1);
                ggml_set_name(t, s.name.c_str());
            }
            weights.push_back(t);
        }
        wbuf = ggml_backend_alloc_ctx_tensors(wctx, backend);
        if (!wbuf) throw std::runtime_error("cannot allocate " + backend_name + " memory for the Medusa heads");
        std::vector<char> buf;
        for (size_t i = 0; i < specs.size(); ++i) {
            const WeightSpec &s = specs[i];
            FILE *f = fopen(s.file.c_str(), "rb");
            if (!f) throw std::invalid_argument("cannot open " + s.file);
            buf.resize(s.nbytes);
            bool ok = true;
            if (s.rows.empty()) {
                ok = fseeko(f, (off_t)s.offset, SEEK_SET) == 0 && fread(buf.data(), 1, s.nbytes, f) == s.nbytes;
            } else {  // selected rows (ids checked < the file matrix's rows by parse)
                const size_t rb = ggml_row_size(s.type, s.ne0);
                for (size_t r = 0; ok && r < s.rows.size(); ++r)
                    ok = fseeko(f, (off_t)(s.offset + (uint64_t)s.rows[r] * rb), SEEK_SET) == 0 && fread(buf.data() + r * rb, 1, rb, f) == rb;
            }
            fclose(f);
            if (weights[i]) {
                if (!ok || ggml_nbytes(weights[i]) != s.nbytes)
                    throw std::invalid_argument("heads file " + s.file + ": truncated while reading " + s.name + " (did the file change?)");
                ggml_backend_tensor_set(weights[i], buf.data(), 0, s.nbytes);
            } else {  // head h's slice of the stacked output matrices
                const int h = (int)(std::find(out_idx.begin(), out_idx.end(), (int)i) - out_idx.begin());
                if (!ok || out_stack->nb[2] != s.nbytes)
                    throw std::invalid_argument("heads file " + s.file + ": truncated while reading " + s.name + " (did the file change?)");
                ggml_backend_tensor_set(out_stack, buf.data(), (size_t)h * out_stack->nb[2], s.nbytes);
            }
        }
    }

    // The first graph node the backend cannot run (its op name), or null. The test hook makes the
    // first backend refuse one op by name, so the fallback runs on machines with a CPU only.
    const char *unsupported_op() const {
        for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) {
            ggml_tensor *node = ggml_graph_node(graph, i);
            if (!on_fallback && !test_unsupported_op.empty() && test_unsupported_op == ggml_op_desc(node)) return ggml_op_desc(node);
            if (!ggml_backend_supports_op(backend, node)) return ggml_op_desc(node);
        }
        return nullptr;
    }

    // Heads on a GPU never abort: a device that lacks an op of the heads graph (ggml_top_k over a large
    // vocabulary on CUDA without CUB, a weight type without a kernel, ...) would abort inside
    // ggml_backend_graph_compute. Then the whole heads graph moves to the CPU backend (weights reloaded
    // there): one device for all of it, no per-op scheduling. Said once on stderr and in `backend`.
    void fall_back_to_cpu(const std::string &op) {
        const std::string first = backend_name;
        release_graph();
        release_weights();
        ggml_backend_free(backend), backend = nullptr;
        on_fallback = true;
        init_cpu_backend();
        backend_name = std::string(ggml_backend_name(backend)) + " (fallback: " + first + " lacks " + op + ")";
        fprintf(stderr, "medusa_edge: the Medusa heads run on the CPU: %s cannot run %s\n", first.c_str(), op.c_str());
        upload();
    }

    // The graph for top-k of the first n_used heads. logp: also each candidate's probability (a
    // softmax over the vocabulary); without it the candidates are ranked by logit, the same order
    // (softmax is monotonic) save where two probabilities round equal, and k = 1 is an argmax.
    void build(int32_t k, int32_t n_used, bool logp) {
        if (graph_k == k && graph_n == n_used && graph_logp == logp) return;
        auto hit = graphs.find({k, n_used, logp});
        if (hit != graphs.end()) return use_graph(hit->second, k, n_used, logp);
        if (graphs.size() >= MAX_GRAPHS) release_graph();
        // the fields now describe a cached graph (or nothing): build the new one from scratch
        gctx = nullptr, galloc = nullptr, graph = nullptr;
        ++n_builds;
        // per head: 6 nodes per ResBlock at most (reshape of b, mul_mat, add, silu, add; the input
        // concat with root input) and up to 4 after them (reshape, concat, mul_mat, concat); then
        // top_k, soft_max, reshape, get_rows, views and reshapes of the batched product
        const size_t n_nodes = (size_t)n_heads * (6 * n_layers + 12) + 24;
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false);
        ip.no_alloc = true;
        gctx = ggml_init(ip);
        if (!gctx) throw std::runtime_error("ggml_init failed");
        graph = ggml_new_graph_custom(gctx, n_nodes, false);
        in_h = ggml_new_tensor_1d(gctx, GGML_TYPE_F32, n_embd);
        ggml_set_input(in_h);
        ggml_tensor *h_root = nullptr;  // [2 n_embd, 1]: h, then the root token's embedding
        if (root_input) {
            in_root = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, 1);
            ggml_set_input(in_root);
            ggml_tensor *e = ggml_get_rows(gctx, weights[embd_idx], in_root);  // [n_embd, 1] f32
            h_root = ggml_concat(gctx, ggml_reshape_2d(gctx, in_h, n_embd, 1), e, 0);
        } else {
            in_root = nullptr;
        }
        // ResBlocks per head; with a shared output matrix, one product of it with all n_used hidden
        // vectors (the matrix is read once, not once per head; each column is computed by the same
        // kernel as a single vector, so the results do not change)
        std::vector<ggml_tensor *> xs;
        for (int i = 0; i < n_used; ++i) {
            ggml_tensor *x = in_h;
            for (int j = 0; j < n_layers; ++j) {
                ggml_tensor *in = root_input && j == 0 ? h_root : x;
                ggml_tensor *y = ggml_add(gctx, ggml_mul_mat(gctx, weights[w_idx[i][j]], in), ggml_reshape_1d(gctx, weights[b_idx[i][j]], n_embd));
                x = ggml_add(gctx, x, ggml_silu(gctx, y));
            }
            xs.push_back(x);
        }
        // All heads' logits as one [n_vocab, n_used] tensor: with a shared matrix one product with all
        // hidden vectors (the matrix is read once); with stacked own matrices one batched product
        // (head i's slice times vector i); else one product per head, side by side. Each logit is the
        // same dot product, by the same kernel, in every layout (tests compare them bit for bit).
        ggml_tensor *xcat = ggml_reshape_2d(gctx, xs[0], n_embd, 1);
        for (int i = 1; i < n_used; ++i) xcat = ggml_concat(gctx, xcat, ggml_reshape_2d(gctx, xs[i], n_embd, 1), 1);
        ggml_tensor *logits = nullptr;
        if (shared_output) {
            logits = ggml_mul_mat(gctx, weights[out_idx[0]], xcat);
        } else if (out_stack) {
            ggml_tensor *w = ggml_view_3d(gctx, out_stack, n_embd, n_draft, n_used, out_stack->nb[1], out_stack->nb[2], 0);
            logits = ggml_reshape_2d(gctx, ggml_mul_mat(gctx, w, ggml_reshape_3d(gctx, xcat, n_embd, 1, n_used)), n_draft, n_used);
        } else {
            for (int i = 0; i < n_used; ++i) {
                ggml_tensor *li = ggml_mul_mat(gctx, weights[out_idx[i]], xs[i]);  // [n_draft, 1]
                logits = logits ? ggml_concat(gctx, logits, li, 1) : li;
            }
        }
        // one top-k (an argmax at k = 1 without log-probs) over the columns, one gather of the
        // top-k probabilities, or of the logits where no log-probs are wanted (no softmax)
        if (k == 1 && !logp) {
            out_ids = ggml_reshape_2d(gctx, ggml_argmax(gctx, logits), 1, n_used);  // [1, n_used] i32
            out_probs = nullptr;
        } else {
            out_ids = ggml_top_k(gctx, logits, k);                                   // [k, n_used] i32, unordered
            ggml_tensor *scores = logp ? ggml_soft_max(gctx, logits) : logits;        // [n_draft, n_used]
            ggml_tensor *rows = ggml_reshape_3d(gctx, scores, 1, n_draft, n_used);    // one "row" per token
            out_probs = ggml_get_rows(gctx, rows, out_ids);                           // [1, k, n_used]
        }
        ggml_set_output(out_ids);
        ggml_build_forward_expand(graph, out_ids);
        if (out_probs) {
            ggml_set_output(out_probs);
            ggml_build_forward_expand(graph, out_probs);
        }
        if (const char *op = unsupported_op()) {
            if (on_fallback) throw std::runtime_error("Medusa heads: the CPU backend cannot run " + std::string(op));
            ggml_free(gctx), gctx = nullptr;  // not cached yet
            fall_back_to_cpu(op);
            build(k, n_used, logp);  // once more, on the CPU (on_fallback stops a second fallback)
            return;
        }
        galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        if (!ggml_gallocr_alloc_graph(galloc, graph)) throw std::runtime_error("cannot allocate the Medusa heads' compute graph");
        graphs[{k, n_used, logp}] = Graph{gctx, graph, galloc, in_h, in_root, out_ids, out_probs};
        graph_k = k;
        graph_n = n_used;
        graph_logp = logp;
    }

    // The op names of the graph for (k, n_used, logp), in order (tests: which nodes a pass runs).
    std::vector<std::string> graph_ops(int32_t k, int32_t n_used, bool logp) {
        check_shape(k, n_used);
        build(k, n_used, logp);
        std::vector<std::string> ops;
        for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) ops.emplace_back(ggml_op_desc(ggml_graph_node(graph, i)));
        return ops;
    }

    void check_shape(int32_t k, int32_t &n_used) const {
        if (k < 1 || k > n_draft)
            throw std::invalid_argument(draft_vocab.empty() ? "top_k must be in [1, n_vocab]"
                                                            : "top_k must be in [1, " + std::to_string(n_draft) + "] (the heads' draft vocabulary)");
        if (n_used < 0) n_used = n_heads;
        if (n_used < 1 || n_used > n_heads)
            throw std::invalid_argument("n_heads_used must be in [1, " + std::to_string(n_heads) + "]");
    }

    // ids [n_used, k] int32 (best first) and log-probs [n_used, k] float32 (None without logp) for
    // hidden state h; n_used <= n_heads: only the heads a tree of that depth reads are computed.
    // `root`: the token the base chose at h's position; required by root-input heads, ignored by the
    // others. One pass: the inputs are written and the outputs read asynchronously where the backend
    // can, around one graph launch, with one wait for the backend at the end.
    py::tuple run(const float *h, int32_t k, int32_t n_used, int32_t root, bool logp) {
        check_shape(k, n_used);
        if (root_input && (root < 0 || root >= n_vocab))
            throw std::invalid_argument(root < 0 ? "these heads read the root token: pass root (the base's token at this position)"
                                                 : "root token id out of range [0, n_vocab)");
        build(k, n_used, logp);
        std::vector<int32_t> all_id((size_t)k * n_used), order(k);
        std::vector<float> all_pr(out_probs ? (size_t)k * n_used : 0);
        ggml_status st;
        {
            py::gil_scoped_release release;
            ggml_backend_tensor_set_async(backend, in_h, h, 0, sizeof(float) * n_embd);
            if (root_input) ggml_backend_tensor_set_async(backend, in_root, &root, 0, sizeof(int32_t));
            ++n_uploads;
            st = ggml_backend_graph_compute_async(backend, graph);
            if (st == GGML_STATUS_SUCCESS) {
                ggml_backend_tensor_get_async(backend, out_ids, all_id.data(), 0, sizeof(int32_t) * all_id.size());
                if (out_probs) ggml_backend_tensor_get_async(backend, out_probs, all_pr.data(), 0, sizeof(float) * all_pr.size());
                ++n_reads;
            }
            ggml_backend_synchronize(backend);
            ++n_syncs;
        }
        if (st != GGML_STATUS_SUCCESS) throw std::runtime_error("Medusa heads: graph compute failed on " + backend_name);
        py::array_t<int32_t> ids({n_used, k});
        py::array_t<float> logp_out(logp ? std::vector<py::ssize_t>{n_used, k} : std::vector<py::ssize_t>{0, 0});
        for (int i = 0; i < n_used; ++i) {
            int32_t *id = all_id.data() + (size_t)i * k;  // head i's column
            for (int j = 0; j < k; ++j) {
                if (id[j] < 0 || id[j] >= n_draft)
                    throw std::runtime_error("Medusa heads: " + backend_name + " returned token id " + std::to_string(id[j]));
                if (!draft_vocab.empty()) id[j] = draft_vocab[id[j]];  // draft row -> full id, before ranking ties by id
            }
            int32_t *io = ids.mutable_data(i, 0);
            if (!out_probs) {  // k = 1: the argmax
                io[0] = id[0];
                continue;
            }
            float *pr = all_pr.data() + (size_t)i * k;
            // NaN (damaged weights) ranks last: std::sort needs a strict weak order, or it may run off the array
            for (int j = 0; j < k; ++j)
                if (std::isnan(pr[j])) pr[j] = logp ? -1.0f : -INFINITY;
            // rank order: score descending, lower id first on ties
            for (int j = 0; j < k; ++j) order[j] = j;
            std::sort(order.begin(), order.end(), [&](int a, int b) { return pr[a] > pr[b] || (pr[a] == pr[b] && id[a] < id[b]); });
            for (int j = 0; j < k; ++j) io[j] = id[order[j]];
            if (logp) {
                float *lo = logp_out.mutable_data(i, 0);
                for (int j = 0; j < k; ++j) lo[j] = std::log(std::max(pr[order[j]], 1e-30f));
            }
        }
        if (!logp) return py::make_tuple(ids, py::none());
        return py::make_tuple(ids, logp_out);
    }

    py::tuple propose(Context &c, int32_t row, int32_t k, int32_t n_used, int32_t root, bool logp) {
        if (llama_model_n_embd_out(c.model->model) != n_embd)
            throw std::invalid_argument("heads n_embd does not match the model");
        return run(c.row_hidden(row), k, n_used, root, logp);
    }

    py::tuple propose_hidden(f32_array h, int32_t k, int32_t n_used, int32_t root, bool logp) {
        if (h.ndim() != 1 || h.shape(0) != n_embd)
            throw std::invalid_argument("hidden state must be a vector of n_embd = " + std::to_string(n_embd) + " floats");
        return run(h.data(), k, n_used, root, logp);
    }
};

// ---------------------------------------------------------------------------------------------
// Embeddings, on a llama.cpp context of their own (embeddings on, pooling from the model's
// metadata), so generation's context, its KV cache and its prefix reuse are never touched. One
// call decodes a group of sequences in one batch (sequence i gets seq id i, every token an output
// row) after clearing the cache, as llama-cpp-python's Llama.embed does.

struct Embedder {
    std::shared_ptr<Model> model;
    llama_context *ctx = nullptr;
    llama_batch batch{};
    bool batch_ok = false;
    int32_t n_batch = 0, n_seq_max = 0, n_embd = 0;
    int pooling = LLAMA_POOLING_TYPE_NONE;

    // n_batch: the most tokens of one call (the context holds exactly one batch, and the whole
    // batch is one micro-batch: non-causal pooling needs a sequence in one piece). flash_attn: 1 on,
    // 0 off, -1 llama.cpp's AUTO (as for Context). pooling: a llama_pooling_type, -1 the model's.
    Embedder(std::shared_ptr<Model> model_, int n_batch_, int n_threads, int flash_attn, int pooling_type)
        : model(std::move(model_)) {
        if (pooling_type < -1 || pooling_type > LLAMA_POOLING_TYPE_LAST)
            throw std::invalid_argument("pooling type must be -1 (the model's), 0 none, 1 mean, 2 cls or 3 last, got " +
                                        std::to_string(pooling_type));
        if (n_batch_ < 1) throw std::invalid_argument("n_batch must be at least 1");
        if (n_threads < 1) throw std::invalid_argument("n_threads must be at least 1");
        llama_context_params p = llama_context_default_params();
        p.n_ctx = n_batch_;
        p.n_batch = n_batch_;
        p.n_ubatch = n_batch_;
        p.n_seq_max = std::min<int>(n_batch_, (int)llama_max_parallel_sequences());
        p.n_threads = n_threads;
        p.n_threads_batch = n_threads;
        p.kv_unified = true;
        p.embeddings = true;
        p.pooling_type = (enum llama_pooling_type)pooling_type;  // UNSPECIFIED: the model's own (GGUF metadata)
        p.flash_attn_type = flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                            : flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        p.abort_callback = abort_requested;
        p.abort_callback_data = nullptr;
        clear_last_error();
        ctx = llama_init_from_model(model->model, p);
        if (!ctx) throw std::runtime_error("cannot create a llama.cpp context for embeddings" + last_error());
        pooling = (int)llama_pooling_type(ctx);
        if (pooling == LLAMA_POOLING_TYPE_RANK) {
            llama_free(ctx);
            ctx = nullptr;
            throw std::invalid_argument("model " + model->path + " is a reranking model (pooling type rank), not an embedding model");
        }
        n_batch = (int32_t)llama_n_batch(ctx);
        n_seq_max = (int32_t)llama_n_seq_max(ctx);
        n_embd = llama_model_n_embd_out(model->model);
        batch = llama_batch_init(n_batch, 0, 1);
        batch_ok = true;
    }
    ~Embedder() {
        if (batch_ok) llama_batch_free(batch);
        if (ctx) llama_free(ctx);
    }
    Embedder(const Embedder &) = delete;
    Embedder &operator=(const Embedder &) = delete;

    // One float32 array per sequence: [n_tokens, n_embd] without pooling, else [n_embd].
    py::list embed(const std::vector<std::vector<int32_t>> &seqs) {
        if (seqs.empty() || (int32_t)seqs.size() > n_seq_max)
            throw std::invalid_argument("embed takes 1 to " + std::to_string(n_seq_max) + " sequences per call, got " +
                                        std::to_string(seqs.size()));
        size_t total = 0;
        for (const auto &s : seqs) {
            if (s.empty()) throw std::invalid_argument("embed: a sequence has no tokens");
            for (int32_t t : s) model->check_token(t);
            total += s.size();
        }
        if (total > (size_t)n_batch)
            throw std::invalid_argument("embed: " + std::to_string(total) + " tokens exceed the batch of " + std::to_string(n_batch));
        batch.n_tokens = 0;
        for (size_t i = 0; i < seqs.size(); ++i)
            for (size_t j = 0; j < seqs[i].size(); ++j) {
                const int32_t r = batch.n_tokens++;
                batch.token[r] = seqs[i][j];
                batch.pos[r] = (llama_pos)j;
                batch.n_seq_id[r] = 1;
                batch.seq_id[r][0] = (llama_seq_id)i;
                batch.logits[r] = 1;
            }
        llama_memory_clear(llama_get_memory(ctx), true);
        decode_or_raise(ctx, batch, "embeddings");
        py::list out;
        int32_t row = 0;
        for (size_t i = 0; i < seqs.size(); ++i) {
            const int32_t n = (int32_t)seqs[i].size();
            if (pooling == LLAMA_POOLING_TYPE_NONE) {
                py::array_t<float> a({(py::ssize_t)n, (py::ssize_t)n_embd});
                float *dst = a.mutable_data();
                for (int32_t j = 0; j < n; ++j) {
                    const float *e = llama_get_embeddings_ith(ctx, row + j);
                    if (!e) throw std::runtime_error("embeddings: llama.cpp returned no embedding for a token" + last_error());
                    std::copy(e, e + n_embd, dst + (size_t)j * n_embd);
                }
                out.append(a);
            } else {
                const float *e = llama_get_embeddings_seq(ctx, (llama_seq_id)i);
                if (!e) throw std::runtime_error("embeddings: llama.cpp returned no pooled embedding" + last_error());
                py::array_t<float> a((py::ssize_t)n_embd);
                std::copy(e, e + n_embd, a.mutable_data());
                out.append(a);
            }
            row += n;
        }
        return out;
    }
};

// ---------------------------------------------------------------------------------------------

PYBIND11_MODULE(_native, m) {
    m.doc() = "medusa_edge native layer: llama.cpp model/context, tree batches, KV commit, ggml Medusa heads";

    g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
    static bool backend_ready = false;
    if (!backend_ready) {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        backend_ready = true;
    }
    m.def("set_verbose", &set_verbose, "Pass llama.cpp's log through to stderr (errors are always kept for exceptions).");
    m.def("max_parallel_sequences", []() { return (int)llama_max_parallel_sequences(); });
    m.def("supports_gpu_offload", []() { return llama_supports_gpu_offload(); });
    m.def("system_info", []() { return std::string(llama_print_system_info()); });


    py::class_<Model, std::shared_ptr<Model>>(m, "Model")
        .def(py::init<const std::string &, int, bool, bool>(), py::arg("path"), py::arg("n_gpu_layers") = 0,
             py::arg("vocab_only") = false, py::kw_only(), py::arg("use_extra_bufts"))
        .def_property_readonly("n_vocab", [](const Model &s) { return llama_vocab_n_tokens(s.vocab); })
        .def_property_readonly("n_embd", [](const Model &s) { return llama_model_n_embd_out(s.model); })
        .def_property_readonly("n_ctx_train", [](const Model &s) { return llama_model_n_ctx_train(s.model); })
        .def_property_readonly("n_params", [](const Model &s) { return llama_model_n_params(s.model); })
        .def_property_readonly("size_bytes", [](const Model &s) { return llama_model_size(s.model); })
        .def_property_readonly("is_recurrent", [](const Model &s) { return llama_model_is_recurrent(s.model) || llama_model_is_hybrid(s.model); })
        .def_property_readonly("bos", [](const Model &s) { return llama_vocab_bos(s.vocab); })
        .def_property_readonly("eos", [](const Model &s) { return llama_vocab_eos(s.vocab); })
        .def_property_readonly("add_bos", [](const Model &s) { return llama_vocab_get_add_bos(s.vocab); })
        .def("is_eog", [](const Model &s, int32_t t) { return llama_vocab_is_eog(s.vocab, t); })
        .def("token_text", [](const Model &s, int32_t t) { s.check_token(t); return py::bytes(llama_vocab_get_text(s.vocab, t)); })
        .def("vocab_fingerprint", [](const Model &s) { return fnv1a_tokens(s.vocab); })
        .def("meta", &Model::meta)
        .def("chat_template", &Model::chat_template)
        .def("description", [](const Model &s) {
            char buf[256];
            llama_model_desc(s.model, buf, sizeof(buf));
            return std::string(buf);
        })
        .def("tokenize", &Model::tokenize, py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = false)
        .def("token_to_piece", &Model::token_to_piece, py::arg("token"), py::arg("special") = false);

    py::class_<TreeShape, std::shared_ptr<TreeShape>>(m, "TreeShape")
        .def(py::init<std::vector<int32_t>, std::vector<std::vector<int32_t>>>(), py::arg("depth"), py::arg("seq_sets"))
        .def_property_readonly("n_nodes", &TreeShape::n)
        .def_readonly("n_leaves", &TreeShape::n_leaves);

    py::class_<Context>(m, "Context")
        .def(py::init<std::shared_ptr<Model>, int, int, int, int, bool, int, int, int, int, int, int>(), py::arg("model"),
             py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("n_seq_max"), py::arg("f32_kv") = false,
             py::arg("flash_attn") = -1, py::arg("n_ubatch") = 0, py::arg("n_threads_batch") = 0, py::arg("type_k") = -1,
             py::arg("type_v") = -1, py::arg("n_outputs_max_per_seq") = 0)
        .def("set_backend_greedy", &Context::set_backend_greedy, py::arg("on"),
             "Device-side greedy on every seq id: argmax/argmax_row read llama.cpp's sampled tokens, no raw logits are "
             "copied (logits() raises); off copies them again.")
        .def_readonly("backend_greedy", &Context::backend_greedy)
        .def("_logits_buffer_row", [](const Context &c, int32_t row) {
            // tests: llama.cpp's host logits buffer for a row, read without the backend-greedy check
            const float *p = llama_get_logits_ith(c.ctx, c.row_base + row);
            if (!p) throw std::runtime_error("no logits buffer row");
            py::array_t<float> out(llama_vocab_n_tokens(c.model->vocab));
            std::memcpy(out.mutable_data(), p, sizeof(float) * out.size());
            return out;
        })
        .def("_poison_logits_buffer", [](Context &c) {
            // tests: fill the host logits buffer's rows of the last decode with NaN
            const int32_t n_vocab = llama_vocab_n_tokens(c.model->vocab);
            for (int32_t r = 0; r < c.n_outputs; ++r) {
                float *p = llama_get_logits_ith(c.ctx, c.row_base + r);
                if (p) std::fill(p, p + n_vocab, NAN);
            }
        })
        .def_property_readonly("type_k", [](const Context &c) { return c.type_k; })
        .def_property_readonly("type_v", [](const Context &c) { return c.type_v; })
        .def("synchronize", [](Context &c) {
            py::gil_scoped_release release;
            llama_synchronize(c.ctx);
        })
        .def_property_readonly("n_ubatch", [](const Context &c) { return (int)llama_n_ubatch(c.ctx); })
        .def_readonly("n_ctx", &Context::n_ctx)
        .def_readonly("flash_attn", &Context::flash_attn)
        .def_readonly("epoch", &Context::epoch)
        .def_readonly("n_batch", &Context::n_batch)
        .def_readonly("n_seq_max", &Context::n_seq_max)
        .def_property_readonly("n_threads", [](const Context &c) { return (int)llama_n_threads(c.ctx); })
        .def_property_readonly("n_threads_batch", [](const Context &c) { return (int)llama_n_threads_batch(c.ctx); })
        .def("set_threads", &Context::set_threads, py::arg("n_threads"), py::arg("n_threads_batch"))
        .def("prefill", &Context::prefill, py::arg("tokens"), py::arg("n_past"), py::arg("hidden") = true)
        .def("decode_tree", &Context::decode_tree, py::arg("tree"), py::arg("tokens"), py::arg("n_past"))
        .def("commit", &Context::commit, py::arg("tree"), py::arg("path"), py::arg("n_past"))
        .def("truncate", &Context::truncate, py::arg("pos"))
        .def("cache_pos_max", &Context::cache_pos_max, py::arg("seq"))
        .def("argmax", &Context::argmax, py::arg("n_rows"))
        .def("argmax_row", &Context::argmax_row, py::arg("row"))
        .def("logits", &Context::logits, py::arg("row"))
        .def("hidden", &Context::hidden, py::arg("row"))
        .def("perf", [](const Context &c) {
            auto d = llama_perf_context(c.ctx);
            return py::dict(py::arg("t_eval_ms") = d.t_eval_ms, py::arg("n_eval") = d.n_eval,
                            py::arg("t_p_eval_ms") = d.t_p_eval_ms, py::arg("n_p_eval") = d.n_p_eval,
                            py::arg("n_reused") = d.n_reused);
        }, "llama_perf_context's counters: evals, their ms, and n_reused (decodes that reused the previous compute graph).");

    py::class_<Sampler>(m, "Sampler")
        .def(py::init<int32_t, uint32_t, float, int32_t, float, float, float, int32_t, float, float, float,
                      std::shared_ptr<Model>, const std::string &, const std::string &,
                      const std::vector<std::pair<int32_t, float>> &>(), py::arg("n_vocab"),
             py::arg("seed"), py::arg("temp"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("repeat_penalty"),
             py::arg("penalty_last_n"), py::arg("frequency_penalty") = 0.0f, py::arg("presence_penalty") = 0.0f,
             py::arg("typical_p") = 1.0f, py::kw_only(), py::arg("model") = py::none(), py::arg("grammar") = "",
             py::arg("grammar_root") = "root", py::arg("logit_bias") = std::vector<std::pair<int32_t, float>>(),
             "A llama.cpp sampler chain; with `grammar` (GBNF text, root rule `grammar_root`) llama.cpp's grammar sampler "
             "follows the penalties, as in llama-cpp-python; `logit_bias` ([(token, bias)]) is llama.cpp's logit-bias "
             "sampler, first in the chain (where llama-cpp-python's logits processor runs). ValueError for a grammar "
             "llama.cpp cannot parse or a bias outside the vocabulary or not finite.")
        .def("sample", &Sampler::sample, py::arg("ctx"), py::arg("row"))
        .def("accept", &Sampler::accept, py::arg("token"))
        .def("reset", &Sampler::reset);

    m.def("gguf_metadata", [](const std::string &path, const std::string &what) { return GgufFile(path, what).to_python(); },
          py::arg("path"), py::arg("what") = "GGUF file",
          "A GGUF file's key/values and tensor table, read by ggml's size-bounded gguf reader (no tensor data). "
          "Raises ValueError naming the file for anything unreadable.");

    py::class_<Embedder>(m, "Embedder")
        .def(py::init<std::shared_ptr<Model>, int, int, int, int>(), py::arg("model"), py::arg("n_batch"), py::arg("n_threads"),
             py::arg("flash_attn") = -1, py::arg("pooling_type") = -1)
        .def_property_readonly("n_batch", [](const Embedder &e) { return e.n_batch; })
        .def_property_readonly("n_seq_max", [](const Embedder &e) { return e.n_seq_max; })
        .def_property_readonly("n_embd", [](const Embedder &e) { return e.n_embd; })
        .def_property_readonly("pooling_type", [](const Embedder &e) { return e.pooling; })
        .def("embed", &Embedder::embed, py::arg("seqs"));

    py::class_<Heads>(m, "Heads")
        .def(py::init<const std::string &, const std::string &, int, bool>(), py::arg("path"), py::arg("model_path"),
             py::arg("n_threads"), py::arg("use_gpu") = false)
        .def_readonly("n_heads", &Heads::n_heads)
        .def_readonly("n_layers", &Heads::n_layers)
        .def_readonly("n_embd", &Heads::n_embd)
        .def_readonly("n_vocab", &Heads::n_vocab)
        .def_readonly("shared_output", &Heads::shared_output)
        .def_readonly("root_input", &Heads::root_input)
        .def_readonly("n_draft", &Heads::n_draft, "rows the heads score: the draft vocabulary's size, n_vocab without one")
        .def_property_readonly("draft_vocab", [](const Heads &h) { return py::array_t<int32_t>((py::ssize_t)h.draft_vocab.size(), h.draft_vocab.data()); },
                               "the draft vocabulary's full ids (empty without one)")
        .def_property_readonly("stacked_output", [](const Heads &h) { return h.out_stack != nullptr; })
        .def_readonly("backend", &Heads::backend_name)
        .def_readonly("n_graph_builds", &Heads::n_builds)
        .def_readonly("n_uploads", &Heads::n_uploads)
        .def_readonly("n_reads", &Heads::n_reads)
        .def_readonly("n_syncs", &Heads::n_syncs)
        .def_readonly("on_fallback", &Heads::on_fallback)
        .def("propose", &Heads::propose, py::arg("ctx"), py::arg("row"), py::arg("top_k"), py::arg("n_heads_used") = -1,
             py::arg("root") = -1, py::arg("logp") = true,
             "(ids [n_used, top_k] best first, log-probs or None without logp) of the heads at output row `row`.")
        .def("propose_hidden", &Heads::propose_hidden, py::arg("hidden"), py::arg("top_k"), py::arg("n_heads_used") = -1,
             py::arg("root") = -1, py::arg("logp") = true, "propose() for a hidden state given as a vector.")
        .def("graph_ops", &Heads::graph_ops, py::arg("top_k"), py::arg("n_heads_used") = -1, py::arg("logp") = true,
             "The op names of the heads graph of that shape, in order.");
}
