// Model: a llama_model and its vocabulary; the vocabulary's fingerprint that heads files record.
#pragma once

#include "common.h"

struct Model {
    llama_model *model = nullptr;
    const llama_vocab *vocab = nullptr;
    std::string path;

    // use_extra_bufts = false keeps llama.cpp off its extra weight buffer types (CPU repacking,
    // AMX): the Python side turns it off where those crash (medusa_edge/guards/hw.py).
    Model(const std::string &path_, int n_gpu_layers, bool vocab_only, bool use_extra_bufts);
    ~Model();
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    std::string meta(const std::string &key) const;
    std::string chat_template() const;
    std::vector<int32_t> tokenize(const std::string &text, bool add_special, bool parse_special) const;
    py::bytes token_to_piece(int32_t token, bool special) const;
    void check_token(int32_t token) const;
};

// FNV-1a 64 over every token text followed by a NUL byte: the base fingerprint that the heads
// GGUF records (medusa_edge/heads/schema.py computes the same from tokenizer.ggml.tokens).
uint64_t fnv1a_tokens(const llama_vocab *vocab);
