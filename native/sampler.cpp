#include "sampler.h"

Sampler::Sampler(int32_t n_vocab_, uint32_t seed, float temp, int32_t top_k, float top_p, float min_p, float repeat_penalty,
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

Sampler::~Sampler() {
    if (chain) llama_sampler_free(chain);
}

int32_t Sampler::sample(Context &c, int32_t row) {
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

bool Sampler::any_allowed(const llama_token_data_array &a) {
    for (size_t i = 0; i < a.size; ++i)
        if (a.data[i].logit != -INFINITY) return true;
    return false;
}

void Sampler::dead_end() {
    throw std::invalid_argument("the grammar allows no token here: no token of the vocabulary continues the text it "
                                "has matched so far (a literal the tokenizer cannot spell?)");
}
