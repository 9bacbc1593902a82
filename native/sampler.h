// Sampler: a llama.cpp sampler chain that draws from a Context's output rows, in the order
// llama-cpp-python builds its chain, with llama.cpp's grammar and logit-bias samplers.
#pragma once

#include "context.h"

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
            const std::vector<std::pair<int32_t, float>> &logit_bias);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler &operator=(const Sampler &) = delete;

    // Draw from output row `row` of the context's last decode; the token is accepted into the chain
    // (penalty history, grammar state).
    int32_t sample(Context &c, int32_t row);
    static bool any_allowed(const llama_token_data_array &a);
    [[noreturn]] static void dead_end();
};
