#include "embedder.h"

Embedder::Embedder(std::shared_ptr<Model> model_, int n_batch_, int n_threads, int flash_attn, int pooling_type)
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

Embedder::~Embedder() {
    if (batch_ok) llama_batch_free(batch);
    if (ctx) llama_free(ctx);
}

py::list Embedder::embed(const std::vector<std::vector<int32_t>> &seqs) {
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
