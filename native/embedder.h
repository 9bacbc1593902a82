// Embedder: embeddings on a llama.cpp context of its own.
#pragma once

#include "model.h"

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
    Embedder(std::shared_ptr<Model> model_, int n_batch_, int n_threads, int flash_attn, int pooling_type);
    ~Embedder();
    Embedder(const Embedder &) = delete;
    Embedder &operator=(const Embedder &) = delete;

    // One float32 array per sequence: [n_tokens, n_embd] without pooling, else [n_embd].
    py::list embed(const std::vector<std::vector<int32_t>> &seqs);
};
