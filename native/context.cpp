#include "context.h"

TreeShape::TreeShape(std::vector<int32_t> depth_, std::vector<std::vector<int32_t>> seq_sets_)
    : depth(std::move(depth_)), seq_sets(std::move(seq_sets_)) {
    if (depth.empty() || depth.size() != seq_sets.size())
        throw std::invalid_argument("TreeShape: depth and seq_sets must be non-empty and of equal length");
    for (auto &s : seq_sets)
        for (int32_t id : s) n_leaves = std::max(n_leaves, id + 1);
    if (seq_sets[0].size() != (size_t)n_leaves)
        throw std::invalid_argument("TreeShape: the root must carry every leaf's seq id");
}

// ---------------------------------------------------------------------------------------------

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

Context::Context(std::shared_ptr<Model> model_, int n_ctx_, int n_batch_, int n_threads, int n_seq_max_,
                 bool f32_kv, int flash_attn_, int n_ubatch_, int n_threads_batch, int type_k, int type_v,
                 int n_outputs_max_per_seq)
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

Context::~Context() {
    if (batch_ok) llama_batch_free(batch);
    if (ctx) {
        detach_greedy();
        llama_free(ctx);
    }
}

void Context::set_backend_greedy(bool on) {
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

void Context::detach_greedy() {
    for (size_t s = 0; s < greedy.size(); ++s) llama_set_sampler(ctx, (llama_seq_id)s, nullptr);
    for (llama_sampler *g : greedy) llama_sampler_free(g);
    greedy.clear();
    backend_greedy = false;
}

int32_t Context::sampled_token(int32_t row) const {
    if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
    const llama_token t = llama_get_sampled_token_ith(ctx, row_base + row);
    if (t < 0 || t >= llama_vocab_n_tokens(model->vocab))
        throw std::runtime_error("no device-sampled token for row " + std::to_string(row) + last_error());
    return t;
}

void Context::set_threads(int n_threads, int n_threads_batch) {
    if (n_threads < 1 || n_threads_batch < 1) throw std::invalid_argument("thread counts must be at least 1");
    llama_set_n_threads(ctx, n_threads, n_threads_batch);
}

void Context::set_embeddings(bool on) {
    if (on != embeddings_on) {
        llama_set_embeddings(ctx, on);
        embeddings_on = on;
    }
}

void Context::check_fits(int32_t n_past, int32_t n_tokens, int32_t max_depth_plus_one) const {
    if (n_tokens > n_batch)
        throw std::invalid_argument("batch of " + std::to_string(n_tokens) + " tokens exceeds n_batch " + std::to_string(n_batch));
    if (n_past < 0 || n_past + max_depth_plus_one > n_ctx)
        throw std::invalid_argument("positions up to " + std::to_string(n_past + max_depth_plus_one) +
                                    " do not fit the context of " + std::to_string(n_ctx) + " tokens");
}

void Context::prefill(const std::vector<int32_t> &tokens, int32_t n_past, bool hidden) {
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

void Context::decode_tree(const TreeShape &tree, i32_array tokens, int32_t n_past) {
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

void Context::commit(const TreeShape &tree, const std::vector<int32_t> &path, int32_t n_past) {
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

void Context::truncate(int32_t pos) {
    ++epoch;
    llama_memory_seq_rm(mem(), -1, pos, -1);
}

const float *Context::row_logits(int32_t row) const {
    if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
    if (backend_greedy)
        throw std::runtime_error("raw logits are not copied while the device samples greedily (set_backend_greedy(False))");
    const float *p = llama_get_logits_ith(ctx, row_base + row);
    if (!p) throw std::runtime_error("no logits for row " + std::to_string(row) + last_error());
    return p;
}

py::array_t<int32_t> Context::argmax(int32_t n_rows) const {
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

int32_t Context::argmax_row(int32_t row) const {
    if (backend_greedy) return sampled_token(row);
    const int32_t n_vocab = llama_vocab_n_tokens(model->vocab);
    const float *l = row_logits(row);
    return (int32_t)(std::max_element(l, l + n_vocab) - l);
}

py::array_t<float> Context::logits(int32_t row) const {
    const int32_t n_vocab = llama_vocab_n_tokens(model->vocab);
    const float *l = row_logits(row);
    py::array_t<float> out(n_vocab);
    std::memcpy(out.mutable_data(), l, sizeof(float) * n_vocab);
    return out;
}

const float *Context::row_hidden(int32_t row) const {
    if (!embeddings_on) throw std::runtime_error("hidden state requested for a batch decoded without embeddings");
    if (row < 0 || row >= n_outputs) throw std::out_of_range("output row " + std::to_string(row) + " out of range");
    const float *p = llama_get_embeddings_ith(ctx, row_base + row);
    if (!p) throw std::runtime_error("no hidden state for row " + std::to_string(row) + last_error());
    return p;
}

py::array_t<float> Context::hidden(int32_t row) const {
    const int32_t n = llama_model_n_embd_out(model->model);
    py::array_t<float> out(n);
    std::memcpy(out.mutable_data(), row_hidden(row), sizeof(float) * n);
    return out;
}
