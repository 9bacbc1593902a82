#include "model.h"

Model::Model(const std::string &path_, int n_gpu_layers, bool vocab_only, bool use_extra_bufts) : path(path_) {
    llama_model_params p = llama_model_default_params();
    p.n_gpu_layers = n_gpu_layers;
    p.vocab_only = vocab_only;
    p.use_extra_bufts = use_extra_bufts;
    clear_last_error();
    model = llama_model_load_from_file(path.c_str(), p);
    if (!model) throw std::runtime_error("cannot load model " + path + last_error());
    vocab = llama_model_get_vocab(model);
}

Model::~Model() {
    if (model) llama_model_free(model);
}

std::string Model::meta(const std::string &key) const {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(model, key.c_str(), buf.data(), buf.size());
    if (n < 0) return std::string();
    if ((size_t)n >= buf.size()) {
        buf.resize(n + 1);
        llama_model_meta_val_str(model, key.c_str(), buf.data(), buf.size());
    }
    return std::string(buf.data(), n);
}

std::string Model::chat_template() const {
    const char *t = llama_model_chat_template(model, nullptr);
    return t ? std::string(t) : std::string();
}

std::vector<int32_t> Model::tokenize(const std::string &text, bool add_special, bool parse_special) const {
    int32_t n = -llama_tokenize(vocab, text.data(), (int32_t)text.size(), nullptr, 0, add_special, parse_special);
    std::vector<int32_t> out(std::max(n, 0));
    if (n > 0) {
        int32_t got = llama_tokenize(vocab, text.data(), (int32_t)text.size(), out.data(), n, add_special, parse_special);
        if (got < 0) throw std::runtime_error("tokenization failed");
        out.resize(got);
    }
    return out;
}

py::bytes Model::token_to_piece(int32_t token, bool special) const {
    check_token(token);
    char buf[256];
    int32_t n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, special);
    if (n >= 0) return py::bytes(buf, n);
    std::vector<char> big(-n);
    n = llama_token_to_piece(vocab, token, big.data(), (int32_t)big.size(), 0, special);
    return py::bytes(big.data(), std::max(n, 0));
}

void Model::check_token(int32_t token) const {
    if (token < 0 || token >= llama_vocab_n_tokens(vocab))
        throw std::out_of_range("token id " + std::to_string(token) + " is outside the vocabulary");
}

uint64_t fnv1a_tokens(const llama_vocab *vocab) {
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
