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
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// ---------------------------------------------------------------------------------------------
// Logging: silence llama.cpp unless verbose, but keep the last error lines to put in exceptions.

static std::mutex g_log_mutex;
static bool g_verbose = false;
static std::string g_last_error;

static void log_callback(ggml_log_level level, const char *text, void *) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        std::string t(text);
        while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
        if (!t.empty()) g_last_error = t;
    }
    if (g_verbose) fputs(text, stderr);
}

static void clear_last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_error.clear();
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

    Model(const std::string &path_, int n_gpu_layers, bool vocab_only) : path(path_) {
        llama_model_params p = llama_model_default_params();
        p.n_gpu_layers = n_gpu_layers;
        p.vocab_only = vocab_only;
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

struct Context {
    std::shared_ptr<Model> model;
    llama_context *ctx = nullptr;
    llama_batch batch{};
    bool batch_ok = false;
    int32_t n_batch = 0, n_seq_max = 0, n_ctx = 0;
    int32_t n_outputs = 0;  // rows with outputs in the last decode
    int32_t row_base = 0;   // batch index of output row 0 (llama_get_*_ith take batch indices)
    bool embeddings_on = false;
    std::vector<float> scratch;

    Context(std::shared_ptr<Model> model_, int n_ctx_, int n_batch_, int n_threads, int n_seq_max_,
            bool f32_kv, bool flash_attn)
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
        p.n_ubatch = n_batch_;
        p.n_seq_max = n_seq_max_;
        p.n_threads = n_threads;
        p.n_threads_batch = n_threads;
        p.kv_unified = true;  // coupled sequences (a tree) need one KV stream
        p.embeddings = false;
        p.pooling_type = LLAMA_POOLING_TYPE_NONE;
        p.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        if (f32_kv) {
            p.type_k = GGML_TYPE_F32;
            p.type_v = GGML_TYPE_F32;
        }
        p.abort_callback = abort_requested;
        p.abort_callback_data = nullptr;
        clear_last_error();
        ctx = llama_init_from_model(model->model, p);
        if (!ctx) throw std::runtime_error("cannot create a llama.cpp context" + last_error());
        n_batch = (int32_t)llama_n_batch(ctx);
        n_seq_max = (int32_t)llama_n_seq_max(ctx);
        n_ctx = (int32_t)llama_n_ctx(ctx);
        batch = llama_batch_init(n_batch, 0, n_seq_max);
        batch_ok = true;
    }
    ~Context() {
        if (batch_ok) llama_batch_free(batch);
        if (ctx) llama_free(ctx);
    }
    Context(const Context &) = delete;
    Context &operator=(const Context &) = delete;

    llama_memory_t mem() const { return llama_get_memory(ctx); }

    void set_embeddings(bool on) {
        if (on != embeddings_on) {
            llama_set_embeddings(ctx, on);
            embeddings_on = on;
        }
    }

    // Decode `batch` (already filled) with the GIL released; raise on failure, and raise
    // KeyboardInterrupt when Ctrl-C arrived during the decode (see SigintGuard).
    void run_decode(const char *what) {
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

    // Strategy B of DESIGN.md section 3: keep the accepted cells in place.
    // `path` is the accepted node list (root first); afterwards positions [n_past, n_past + len(path))
    // hold the path, tagged with every seq id, and nothing else is left beyond n_past.
    void commit(const TreeShape &tree, const std::vector<int32_t> &path, int32_t n_past) {
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
    void truncate(int32_t pos) { llama_memory_seq_rm(mem(), -1, pos, -1); }

    int32_t cache_pos_max(int32_t seq) const { return llama_memory_seq_pos_max(mem(), seq); }

    const float *row_logits(int32_t row) const {
        if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
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
            const float *l = row_logits(r);
            o(r) = (int32_t)(std::max_element(l, l + n_vocab) - l);
        }
        return out;
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

    // Same order as llama-cpp-python's Llama._init_sampler, so equal settings give equal draws:
    // penalties, top-k, top-p, min-p, temperature, dist(seed). temp <= 0 means greedy.
    Sampler(int32_t n_vocab, uint32_t seed, float temp, int32_t top_k, float top_p, float min_p, float repeat_penalty,
            int32_t penalty_last_n, float frequency_penalty, float presence_penalty) {
        chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, penalty_last_n, repeat_penalty, frequency_penalty, presence_penalty));
        if (temp <= 0.0f) {
            llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        } else {
            llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
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

    // Draw from output row `row` of the context's last decode; the token is accepted into the chain.
    int32_t sample(Context &c, int32_t row) {
        c.row_logits(row);  // bounds check
        return llama_sampler_sample(chain, c.ctx, c.row_base + row);
    }
    void accept(int32_t token) { llama_sampler_accept(chain, token); }
    void reset() { llama_sampler_reset(chain); }
};

// ---------------------------------------------------------------------------------------------
// Medusa heads on ggml. head_i(h) = W_out_i (x_L), x_0 = h, x_{j+1} = x_j + SiLU(W_ij x_j + b_ij).

struct GgufFile {
    gguf_context *g = nullptr;
    ggml_context *meta = nullptr;
    GgufFile(const std::string &path, const char *what) {
        FILE *f = fopen(path.c_str(), "rb");
        if (!f) throw std::invalid_argument(std::string(what) + " " + path + ": cannot open file");
        char magic[4] = {0, 0, 0, 0};
        size_t got = fread(magic, 1, 4, f);
        fclose(f);
        if (got != 4 || std::memcmp(magic, "GGUF", 4) != 0)
            throw std::invalid_argument(std::string(what) + " " + path + ": not a GGUF file (bad magic)");
        gguf_init_params p{};
        p.no_alloc = true;
        p.ctx = &meta;
        clear_last_error();
        g = gguf_init_from_file(path.c_str(), p);
        if (!g) throw std::invalid_argument(std::string(what) + " " + path + ": corrupt or truncated GGUF" + last_error());
    }
    ~GgufFile() {
        if (g) gguf_free(g);
        if (meta) ggml_free(meta);
    }
    GgufFile(const GgufFile &) = delete;
    GgufFile &operator=(const GgufFile &) = delete;
};

static int64_t file_size(const std::string &path) {
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    int64_t n = ftell(f);
    fclose(f);
    return n;
}

struct Heads {
    std::string path;
    int32_t n_heads = 0, n_layers = 0, n_embd = 0, n_vocab = 0;
    bool shared_output = false;
    ggml_backend_t backend = nullptr;
    ggml_context *wctx = nullptr;                  // weight tensors
    ggml_backend_buffer_t wbuf = nullptr;
    std::vector<std::vector<ggml_tensor *>> w, b;  // [head][layer]
    std::vector<ggml_tensor *> w_out;               // [head] (all equal when shared)
    // compute graph, rebuilt when top_k or the number of heads used changes
    int32_t graph_k = -1, graph_n = -1;
    ggml_context *gctx = nullptr;
    ggml_cgraph *graph = nullptr;
    ggml_gallocr_t galloc = nullptr;
    ggml_tensor *in_h = nullptr;
    std::vector<ggml_tensor *> out_ids, out_probs;
    std::string backend_name;

    static int64_t key_i(gguf_context *g, const char *key, const std::string &path) {
        int64_t id = gguf_find_key(g, key);
        if (id < 0) throw std::invalid_argument("heads file " + path + ": missing key " + key);
        switch (gguf_get_kv_type(g, id)) {
            case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
            case GGUF_TYPE_INT32: return gguf_get_val_i32(g, id);
            case GGUF_TYPE_UINT64: return (int64_t)gguf_get_val_u64(g, id);
            case GGUF_TYPE_INT64: return gguf_get_val_i64(g, id);
            default: throw std::invalid_argument("heads file " + path + ": key " + key + " is not an integer");
        }
    }

    Heads(const std::string &path_, const std::string &model_path, int n_threads, bool use_gpu) : path(path_) {
        try {
            load(model_path, n_threads, use_gpu);
        } catch (...) {
            release();
            throw;
        }
    }
    ~Heads() { release(); }
    Heads(const Heads &) = delete;
    Heads &operator=(const Heads &) = delete;

    void release() {
        if (galloc) ggml_gallocr_free(galloc), galloc = nullptr;
        if (gctx) ggml_free(gctx), gctx = nullptr;
        if (wbuf) ggml_backend_buffer_free(wbuf), wbuf = nullptr;
        if (wctx) ggml_free(wctx), wctx = nullptr;
        if (backend) ggml_backend_free(backend), backend = nullptr;
    }

    void load(const std::string &model_path, int n_threads, bool use_gpu) {
        GgufFile hf(path, "heads file");
        gguf_context *g = hf.g;
        int64_t arch_id = gguf_find_key(g, "general.architecture");
        if (arch_id < 0 || gguf_get_kv_type(g, arch_id) != GGUF_TYPE_STRING || std::string(gguf_get_val_str(g, arch_id)) != "medusa")
            throw std::invalid_argument("heads file " + path + ": general.architecture is not 'medusa' (is this a base model?)");
        n_heads = (int32_t)key_i(g, "medusa.head_count", path);
        n_layers = (int32_t)key_i(g, "medusa.block_count", path);
        n_embd = (int32_t)key_i(g, "medusa.embedding_length", path);
        n_vocab = (int32_t)key_i(g, "medusa.vocab_size", path);
        {
            int64_t id = gguf_find_key(g, "medusa.shared_output");
            shared_output = id >= 0 && gguf_get_val_bool(g, id);
        }
        if (n_heads < 1 || n_layers < 0 || n_embd < 1 || n_vocab < 1)
            throw std::invalid_argument("heads file " + path + ": bad head count or sizes in the metadata");

        // Check that all tensor data lies inside the file (a truncated download fails here).
        const int64_t fsize = file_size(path);
        const size_t data_off = gguf_get_data_offset(g);
        for (int64_t t = 0; t < gguf_get_n_tensors(g); ++t) {
            const size_t end = data_off + gguf_get_tensor_offset(g, t) + gguf_get_tensor_size(g, t);
            if ((int64_t)end > fsize)
                throw std::invalid_argument("heads file " + path + ": truncated (tensor " + gguf_get_tensor_name(g, t) +
                                            " ends at byte " + std::to_string(end) + ", file has " + std::to_string(fsize) + ")");
        }

        // Backend: the GPU that holds the model's layers when offloading, else the CPU.
        if (use_gpu) {
            ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
            if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
            if (dev) backend = ggml_backend_dev_init(dev, nullptr);
        }
        if (!backend) {
            ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
            if (!dev) throw std::runtime_error("no CPU backend registered in ggml");
            backend = ggml_backend_dev_init(dev, nullptr);
            if (!backend) throw std::runtime_error("cannot initialise the CPU backend");
        }
        backend_name = ggml_backend_name(backend);
        {
            // Through the registry, so this works whether the CPU backend is linked in or loaded dynamically.
            ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend));
            auto set_threads = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
            if (set_threads) set_threads(backend, n_threads);
        }

        const int n_tensors = n_heads * (2 * n_layers + 1) + 1;
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * (size_t)n_tensors;
        ip.no_alloc = true;
        wctx = ggml_init(ip);
        if (!wctx) throw std::runtime_error("ggml_init failed");

        struct Pending {
            ggml_tensor *t;
            std::string file;
            size_t offset;
        };
        std::vector<Pending> pending;
        auto take = [&](gguf_context *src, ggml_context *src_meta, const std::string &src_path, const std::string &name,
                        int64_t ne0, int64_t ne1) -> ggml_tensor * {
            int64_t tid = gguf_find_tensor(src, name.c_str());
            if (tid < 0) throw std::invalid_argument("heads file " + path + ": missing tensor " + name);
            ggml_tensor *m = ggml_get_tensor(src_meta, name.c_str());
            if (m->ne[0] != ne0 || m->ne[1] != ne1 || m->ne[2] != 1 || m->ne[3] != 1)
                throw std::invalid_argument("heads file " + path + ": tensor " + name + " has shape [" + std::to_string(m->ne[0]) +
                                            ", " + std::to_string(m->ne[1]) + "], expected [" + std::to_string(ne0) + ", " +
                                            std::to_string(ne1) + "]");
            ggml_tensor *t = ggml_new_tensor_2d(wctx, m->type, ne0, ne1);
            ggml_set_name(t, name.c_str());
            pending.push_back({t, src_path, gguf_get_data_offset(src) + gguf_get_tensor_offset(src, tid)});
            return t;
        };
        w.assign(n_heads, {});
        b.assign(n_heads, {});
        w_out.assign(n_heads, nullptr);
        for (int i = 0; i < n_heads; ++i) {
            for (int j = 0; j < n_layers; ++j) {
                const std::string p = "medusa." + std::to_string(i) + ".res." + std::to_string(j);
                w[i].push_back(take(g, hf.meta, path, p + ".weight", n_embd, n_embd));
                b[i].push_back(take(g, hf.meta, path, p + ".bias", n_embd, 1));
            }
            if (!shared_output) w_out[i] = take(g, hf.meta, path, "medusa." + std::to_string(i) + ".output.weight", n_embd, n_vocab);
        }
        std::unique_ptr<GgufFile> base;
        if (shared_output) {
            // "version 2" heads reuse the base lm_head: read output.weight (or the tied embedding) from the base GGUF.
            base = std::make_unique<GgufFile>(model_path, "model file");
            std::string name = gguf_find_tensor(base->g, "output.weight") >= 0 ? "output.weight" : "token_embd.weight";
            ggml_tensor *t = take(base->g, base->meta, model_path, name, n_embd, n_vocab);
            for (int i = 0; i < n_heads; ++i) w_out[i] = t;
        }
        wbuf = ggml_backend_alloc_ctx_tensors(wctx, backend);
        if (!wbuf) throw std::runtime_error("cannot allocate " + backend_name + " memory for the Medusa heads");
        std::vector<char> buf;
        for (auto &pd : pending) {
            FILE *f = fopen(pd.file.c_str(), "rb");
            if (!f) throw std::invalid_argument("cannot open " + pd.file);
            const size_t nb = ggml_nbytes(pd.t);
            buf.resize(nb);
            const bool ok = fseek(f, (long)pd.offset, SEEK_SET) == 0 && fread(buf.data(), 1, nb, f) == nb;
            fclose(f);
            if (!ok) throw std::invalid_argument("heads file " + pd.file + ": truncated while reading " + ggml_get_name(pd.t));
            ggml_backend_tensor_set(pd.t, buf.data(), 0, nb);
        }
    }

    void build(int32_t k, int32_t n_used) {
        if (graph_k == k && graph_n == n_used) return;
        if (galloc) ggml_gallocr_free(galloc), galloc = nullptr;
        if (gctx) ggml_free(gctx), gctx = nullptr;
        const size_t n_nodes = (size_t)n_heads * (4 * n_layers + 8) + 16;
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false);
        ip.no_alloc = true;
        gctx = ggml_init(ip);
        graph = ggml_new_graph_custom(gctx, n_nodes, false);
        in_h = ggml_new_tensor_1d(gctx, GGML_TYPE_F32, n_embd);
        ggml_set_input(in_h);
        out_ids.clear();
        out_probs.clear();
        for (int i = 0; i < n_used; ++i) {
            ggml_tensor *x = in_h;
            for (int j = 0; j < n_layers; ++j) {
                ggml_tensor *y = ggml_add(gctx, ggml_mul_mat(gctx, w[i][j], x), ggml_reshape_1d(gctx, b[i][j], n_embd));
                x = ggml_add(gctx, x, ggml_silu(gctx, y));
            }
            ggml_tensor *logits = ggml_mul_mat(gctx, w_out[i], x);        // [n_vocab, 1]
            ggml_tensor *ids = ggml_top_k(gctx, logits, k);               // [k, 1] i32, in no particular order
            ggml_tensor *probs = ggml_soft_max(gctx, logits);             // [n_vocab, 1]
            ggml_tensor *rows = ggml_reshape_2d(gctx, probs, 1, n_vocab);  // one "row" per token
            ggml_tensor *top = ggml_get_rows(gctx, rows, ggml_reshape_1d(gctx, ids, k));  // [1, k]
            ggml_set_output(ids);
            ggml_set_output(top);
            ggml_build_forward_expand(graph, ids);
            ggml_build_forward_expand(graph, top);
            out_ids.push_back(ids);
            out_probs.push_back(top);
        }
        galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        if (!ggml_gallocr_alloc_graph(galloc, graph)) throw std::runtime_error("cannot allocate the Medusa heads' compute graph");
        graph_k = k;
        graph_n = n_used;
    }

    // ids [n_used, k] int32 (best first) and log-probs [n_used, k] float32 for hidden state h;
    // n_used <= n_heads: only the heads a tree of that depth reads are computed.
    py::tuple run(const float *h, int32_t k, int32_t n_used) {
        if (k < 1 || k > n_vocab) throw std::invalid_argument("top_k must be in [1, n_vocab]");
        if (n_used < 0) n_used = n_heads;
        if (n_used < 1 || n_used > n_heads)
            throw std::invalid_argument("n_heads_used must be in [1, " + std::to_string(n_heads) + "]");
        build(k, n_used);
        ggml_backend_tensor_set(in_h, h, 0, sizeof(float) * n_embd);
        ggml_status st;
        {
            py::gil_scoped_release release;
            st = ggml_backend_graph_compute(backend, graph);
        }
        if (st != GGML_STATUS_SUCCESS) throw std::runtime_error("Medusa heads: graph compute failed on " + backend_name);
        py::array_t<int32_t> ids({n_used, k});
        py::array_t<float> logp({n_used, k});
        std::vector<int32_t> id(k), order(k);
        std::vector<float> pr(k);
        for (int i = 0; i < n_used; ++i) {
            ggml_backend_tensor_get(out_ids[i], id.data(), 0, sizeof(int32_t) * k);
            ggml_backend_tensor_get(out_probs[i], pr.data(), 0, sizeof(float) * k);
            // rank order: probability descending, lower id first on ties
            for (int j = 0; j < k; ++j) order[j] = j;
            std::sort(order.begin(), order.end(), [&](int a, int b) { return pr[a] > pr[b] || (pr[a] == pr[b] && id[a] < id[b]); });
            int32_t *io = ids.mutable_data(i, 0);
            float *lo = logp.mutable_data(i, 0);
            for (int j = 0; j < k; ++j) {
                io[j] = id[order[j]];
                lo[j] = std::log(std::max(pr[order[j]], 1e-30f));
            }
        }
        return py::make_tuple(ids, logp);
    }

    py::tuple propose(Context &c, int32_t row, int32_t k, int32_t n_used) {
        if (llama_model_n_embd_out(c.model->model) != n_embd)
            throw std::invalid_argument("heads n_embd does not match the model");
        return run(c.row_hidden(row), k, n_used);
    }

    py::tuple propose_hidden(f32_array h, int32_t k, int32_t n_used) {
        if (h.ndim() != 1 || h.shape(0) != n_embd)
            throw std::invalid_argument("hidden state must be a vector of n_embd = " + std::to_string(n_embd) + " floats");
        return run(h.data(), k, n_used);
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
        .def(py::init<const std::string &, int, bool>(), py::arg("path"), py::arg("n_gpu_layers") = 0,
             py::arg("vocab_only") = false)
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
        .def(py::init<std::shared_ptr<Model>, int, int, int, int, bool, bool>(), py::arg("model"), py::arg("n_ctx"),
             py::arg("n_batch"), py::arg("n_threads"), py::arg("n_seq_max"), py::arg("f32_kv") = false,
             py::arg("flash_attn") = false)
        .def_readonly("n_ctx", &Context::n_ctx)
        .def_readonly("n_batch", &Context::n_batch)
        .def_readonly("n_seq_max", &Context::n_seq_max)
        .def("prefill", &Context::prefill, py::arg("tokens"), py::arg("n_past"), py::arg("hidden") = true)
        .def("decode_tree", &Context::decode_tree, py::arg("tree"), py::arg("tokens"), py::arg("n_past"))
        .def("commit", &Context::commit, py::arg("tree"), py::arg("path"), py::arg("n_past"))
        .def("truncate", &Context::truncate, py::arg("pos"))
        .def("cache_pos_max", &Context::cache_pos_max, py::arg("seq"))
        .def("argmax", &Context::argmax, py::arg("n_rows"))
        .def("logits", &Context::logits, py::arg("row"))
        .def("hidden", &Context::hidden, py::arg("row"))
        .def("perf", [](const Context &c) {
            auto d = llama_perf_context(c.ctx);
            return py::dict(py::arg("t_eval_ms") = d.t_eval_ms, py::arg("n_eval") = d.n_eval,
                            py::arg("t_p_eval_ms") = d.t_p_eval_ms, py::arg("n_p_eval") = d.n_p_eval);
        });

    py::class_<Sampler>(m, "Sampler")
        .def(py::init<int32_t, uint32_t, float, int32_t, float, float, float, int32_t, float, float>(), py::arg("n_vocab"),
             py::arg("seed"), py::arg("temp"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("repeat_penalty"),
             py::arg("penalty_last_n"), py::arg("frequency_penalty") = 0.0f, py::arg("presence_penalty") = 0.0f)
        .def("sample", &Sampler::sample, py::arg("ctx"), py::arg("row"))
        .def("accept", &Sampler::accept, py::arg("token"))
        .def("reset", &Sampler::reset);

    py::class_<Heads>(m, "Heads")
        .def(py::init<const std::string &, const std::string &, int, bool>(), py::arg("path"), py::arg("model_path"),
             py::arg("n_threads"), py::arg("use_gpu") = false)
        .def_readonly("n_heads", &Heads::n_heads)
        .def_readonly("n_layers", &Heads::n_layers)
        .def_readonly("n_embd", &Heads::n_embd)
        .def_readonly("n_vocab", &Heads::n_vocab)
        .def_readonly("shared_output", &Heads::shared_output)
        .def_readonly("backend", &Heads::backend_name)
        .def("propose", &Heads::propose, py::arg("ctx"), py::arg("row"), py::arg("top_k"), py::arg("n_heads_used") = -1)
        .def("propose_hidden", &Heads::propose_hidden, py::arg("hidden"), py::arg("top_k"), py::arg("n_heads_used") = -1);
}
