// Context: a llama_context set up for tree verification (unified KV, one seq id per tree leaf),
// its reusable batch, the KV commit, and the reads of a decode's rows (argmax, logits, hidden
// states); TreeShape: the fixed shape of one tree.
#pragma once

#include "model.h"

// ---------------------------------------------------------------------------------------------
// A tree's shape, fixed per tree: depth and seq-id set of each node (node 0 = root).

struct TreeShape {
    std::vector<int32_t> depth;                 // [n]
    std::vector<std::vector<int32_t>> seq_sets;  // [n][*]
    int32_t n_leaves = 0;

    TreeShape(std::vector<int32_t> depth_, std::vector<std::vector<int32_t>> seq_sets_);
    int n() const { return (int)depth.size(); }
};

// ---------------------------------------------------------------------------------------------

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
            int n_outputs_max_per_seq = 0);
    ~Context();

    // On: every seq id gets a greedy chain in the graph (the next decode rebuilds it); off: none,
    // and raw logits are copied again. Raises if llama.cpp refuses a seq id's sampler.
    void set_backend_greedy(bool on);
    void detach_greedy();
    int32_t sampled_token(int32_t row) const;
    Context(const Context &) = delete;
    Context &operator=(const Context &) = delete;
    llama_memory_t mem() const { return llama_get_memory(ctx); }

    // Threads for one-token decodes and for larger batches from the next decode on (the caller
    // picks them per decode; llama_set_n_threads only stores the two numbers).
    void set_threads(int n_threads, int n_threads_batch);
    void set_embeddings(bool on);
    void run_decode(const char *what) { decode_or_raise(ctx, batch, what); }

    void check_fits(int32_t n_past, int32_t n_tokens, int32_t max_depth_plus_one) const;

    // Prompt tokens at n_past.., tagged with every seq id, in chunks of n_batch. Only the last token
    // gets an output row. hidden = true decodes that token alone with embeddings on (embeddings
    // force an output for every row), so its hidden state is readable; hidden = false keeps the
    // chunking of plain llama.cpp decoding (llama-cpp-python's eval), so the logits equal its bit for bit.
    void prefill(const std::vector<int32_t> &tokens, int32_t n_past, bool hidden);

    // One tree: node i at n_past + depth[i] carrying seq_sets[i]; every node gets an output row.
    void decode_tree(const TreeShape &tree, i32_array tokens, int32_t n_past);

    // docs/design.md section 3: keep the accepted cells in place (no recompute).
    // `path` is the accepted node list (root first); afterwards positions [n_past, n_past + len(path))
    // hold the path, tagged with every seq id, and nothing else is left beyond n_past.
    void commit(const TreeShape &tree, const std::vector<int32_t> &path, int32_t n_past);

    // Drop everything at positions >= pos, in every sequence.
    void truncate(int32_t pos);
    int32_t cache_pos_max(int32_t seq) const { return llama_memory_seq_pos_max(mem(), seq); }

    const float *row_logits(int32_t row) const;

    // [n_rows] argmax of the logits of rows 0..n_rows-1 (lowest id wins ties, like llama.cpp's greedy).
    py::array_t<int32_t> argmax(int32_t n_rows) const;

    // argmax of one row's logits (lowest id wins ties): greedy acceptance reads only the rows it walks.
    int32_t argmax_row(int32_t row) const;
    py::array_t<float> logits(int32_t row) const;
    const float *row_hidden(int32_t row) const;
    py::array_t<float> hidden(int32_t row) const;
};
