#include "heads.h"

// Matrix types the heads graph may multiply: those the CPU backend (also the fallback) has a dot
// product for. Not Q8_1/Q8_K (activation-only types without one), not the integer types or F64: the
// CPU backend would crash on them. (medusa_edge/guards/gguf_file.py MATRIX_TYPES is the same list.)
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

Heads::Heads(const std::string &path_, const std::string &model_path, int n_threads_, bool use_gpu, int32_t top_k,
             ggml_backend_dev_t device)
    : path(path_) {
    n_threads = std::max(1, n_threads_);
    try {
        load(model_path, use_gpu, top_k, device);
    } catch (...) {
        release();
        throw;
    }
}

void Heads::release_graph() {  // every cached graph, and one left half-built by an exception
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

void Heads::use_graph(const Graph &g, int32_t k, int32_t n, bool logp) {
    gctx = g.gctx, graph = g.graph, galloc = g.galloc, in_h = g.in_h, in_root = g.in_root;
    out_ids = g.out_ids, out_probs = g.out_probs;
    graph_k = k, graph_n = n, graph_logp = logp;
}

void Heads::release_weights() {
    if (wbuf) ggml_backend_buffer_free(wbuf), wbuf = nullptr;
    if (wctx) ggml_free(wctx), wctx = nullptr;
    weights.clear();
    out_stack = nullptr;
}

void Heads::release() {
    release_graph();
    release_weights();
    if (backend) ggml_backend_free(backend), backend = nullptr;
    rpc_use.reset();
}

void Heads::load(const std::string &model_path, bool use_gpu, int32_t top_k, ggml_backend_dev_t device) {
    const char *forced = std::getenv("MEDUSA_EDGE_TEST_UNSUPPORTED_OP");
    test_unsupported_op = forced ? forced : "";
    parse(model_path);
    init_backend(use_gpu, device);
    upload();
    // top_k > 0: check the graph the caller builds first (top_k of every head) now, so that a
    // fallback happens at load time; build() checks again for every other (k, n_used).
    if (top_k > 0) build(std::min<int32_t>(top_k, n_draft), n_heads, true);
}

static void read_draft_vocab(const GgufFile &hf, HeadsMeta &m) {
    m.n_draft = m.n_vocab;
    const int64_t version = m.version;
    const char *key = "medusa.draft_vocab";
    const int64_t id = gguf_find_key(hf.g, key);
    if (id < 0) return;
    if (version < 3) hf.fail(std::string(key) + " needs schema version 3, the file says " + std::to_string(version));
    if (gguf_get_kv_type(hf.g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(hf.g, id) != GGUF_TYPE_INT32)
        hf.fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(hf.g, id) + ", not an array of i32");
    const size_t n = gguf_get_arr_n(hf.g, id);
    if (n < 1 || n > (size_t)m.n_vocab)
        hf.fail(std::string(key) + " has " + std::to_string(n) + " ids, not 1 to n_vocab = " + std::to_string(m.n_vocab));
    const int32_t *v = (const int32_t *)gguf_get_arr_data(hf.g, id);
    for (size_t i = 0; i < n; ++i) {
        if (v[i] < 0 || v[i] >= m.n_vocab)
            hf.fail(std::string(key) + "[" + std::to_string(i) + "] = " + std::to_string(v[i]) + " is outside [0, " +
                    std::to_string(m.n_vocab) + ")");
        if (i > 0 && v[i] <= v[i - 1])
            hf.fail(std::string(key) + " is not strictly increasing (ids " + std::to_string(v[i - 1]) + ", " +
                    std::to_string(v[i]) + " at " + std::to_string(i - 1) + ", " + std::to_string(i) + "): ids must be unique and sorted");
    }
    m.draft_vocab.assign(v, v + n);
    m.n_draft = (int32_t)n;
}

HeadsMeta HeadsMeta::read(const GgufFile &hf) {
    HeadsMeta m;
    if (hf.get_str("general.architecture", "") != "medusa")
        hf.fail("general.architecture is not 'medusa' (is this a base model?)");
    const int64_t one = 1;
    m.version = hf.get_int("medusa.schema_version", 1, INT32_MAX, &one);
    if (m.version > kSchemaVersion)
        hf.fail("schema version " + std::to_string(m.version) + " is newer than this medusa-edge (" + std::to_string(kSchemaVersion) + ")");
    m.n_heads = (int32_t)hf.get_int("medusa.head_count", 1, kMaxHeads);
    m.n_layers = (int32_t)hf.get_int("medusa.block_count", 0, kMaxLayers);
    m.n_embd = (int32_t)hf.get_int("medusa.embedding_length", 1, kMaxDim);
    m.n_vocab = (int32_t)hf.get_int("medusa.vocab_size", 1, kMaxDim);
    m.shared_output = hf.get_bool("medusa.shared_output", false);
    m.root_input = hf.get_bool("medusa.root_input", false);
    if (m.root_input && m.n_layers < 1) hf.fail("medusa.root_input is set but the heads have no ResBlock to read the root token");
    read_draft_vocab(hf, m);
    const int64_t needed = (int64_t)m.n_heads * (2 * m.n_layers + (m.shared_output ? 0 : 1));  // <= 256 * 513
    if (needed > gguf_get_n_tensors(hf.g))
        hf.fail("the metadata asks for " + std::to_string(needed) + " tensors (" + std::to_string(m.n_heads) + " heads, " +
                std::to_string(m.n_layers) + " layers" + (m.shared_output ? ", shared output" : "") + ") but the file has " +
                std::to_string(gguf_get_n_tensors(hf.g)));
    return m;
}

void Heads::parse(const std::string &model_path) {
    GgufFile hf(path, "heads file");
    const HeadsMeta m = HeadsMeta::read(hf);
    n_heads = m.n_heads, n_layers = m.n_layers, n_embd = m.n_embd, n_vocab = m.n_vocab;
    shared_output = m.shared_output, root_input = m.root_input;
    draft_vocab = m.draft_vocab, n_draft = m.n_draft;

    // Tensor `name` of `src`, required to be [ne0, ne1] of an allowed type (matrices: matrix_type_ok,
    // biases: F32, as medusa_edge/heads/writer.py writes them).
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


void Heads::init_backend(bool use_gpu, ggml_backend_dev_t device) {
    if (device) {
        backend = ggml_backend_dev_init(device, nullptr);
        if (!backend) throw std::runtime_error("cannot initialise " + Model::device_label(device) + " for the Medusa heads");
        const std::string ep = rpc_endpoint_of(device);
        if (!ep.empty()) rpc_use = std::make_unique<RpcUse>(std::vector<std::string>{ep});
    } else if (use_gpu) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
        if (dev) backend = ggml_backend_dev_init(dev, nullptr);
    }
    if (!backend) init_cpu_backend();
    backend_name = ggml_backend_name(backend);
}

void Heads::init_cpu_backend() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) throw std::runtime_error("no CPU backend registered in ggml");
    backend = ggml_backend_dev_init(dev, nullptr);
    if (!backend) throw std::runtime_error("cannot initialise the CPU backend");
    // Through the registry, so this works whether the CPU backend is linked in or loaded dynamically.
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto set_threads = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (set_threads) set_threads(backend, n_threads);
}

void Heads::upload() {
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

const char *Heads::unsupported_op() const {
    for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) {
        ggml_tensor *node = ggml_graph_node(graph, i);
        if (!on_fallback && !test_unsupported_op.empty() && test_unsupported_op == ggml_op_desc(node)) return ggml_op_desc(node);
        if (!ggml_backend_supports_op(backend, node)) return ggml_op_desc(node);
    }
    return nullptr;
}

void Heads::fall_back_to_cpu(const std::string &op) {
    const std::string first = backend_name;
    release_graph();
    release_weights();
    ggml_backend_free(backend), backend = nullptr;
    rpc_use.reset();
    on_fallback = true;
    init_cpu_backend();
    backend_name = std::string(ggml_backend_name(backend)) + " (fallback: " + first + " lacks " + op + ")";
    fprintf(stderr, "medusa_edge: the Medusa heads run on the CPU: %s cannot run %s\n", first.c_str(), op.c_str());
    upload();
}

void Heads::build(int32_t k, int32_t n_used, bool logp) {
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

std::vector<std::string> Heads::graph_ops(int32_t k, int32_t n_used, bool logp) {
    check_shape(k, n_used);
    build(k, n_used, logp);
    std::vector<std::string> ops;
    for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) ops.emplace_back(ggml_op_desc(ggml_graph_node(graph, i)));
    return ops;
}

void Heads::check_shape(int32_t k, int32_t &n_used) const {
    if (k < 1 || k > n_draft)
        throw std::invalid_argument(draft_vocab.empty() ? "top_k must be in [1, n_vocab]"
                                                        : "top_k must be in [1, " + std::to_string(n_draft) + "] (the heads' draft vocabulary)");
    if (n_used < 0) n_used = n_heads;
    if (n_used < 1 || n_used > n_heads)
        throw std::invalid_argument("n_heads_used must be in [1, " + std::to_string(n_heads) + "]");
}

py::tuple Heads::run(const float *h, int32_t k, int32_t n_used, int32_t root, bool logp) {
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

py::tuple Heads::propose(Context &c, int32_t row, int32_t k, int32_t n_used, int32_t root, bool logp) {
    if (llama_model_n_embd_out(c.model->model) != n_embd)
        throw std::invalid_argument("heads n_embd does not match the model");
    return run(c.row_hidden(row), k, n_used, root, logp);
}

py::tuple Heads::propose_hidden(f32_array h, int32_t k, int32_t n_used, int32_t root, bool logp) {
    if (h.ndim() != 1 || h.shape(0) != n_embd)
        throw std::invalid_argument("hidden state must be a vector of n_embd = " + std::to_string(n_embd) + " floats");
    return run(h.data(), k, n_used, root, logp);
}
