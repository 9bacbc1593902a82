// Heads: Medusa heads loaded from a heads GGUF and evaluated with ggml on the model's backend.
#pragma once

#include "context.h"
#include "gguf_file.h"

// Medusa heads on ggml. head_i(h) = W_out_i (x_L), x_0 = h, x_{j+1} = x_j + SiLU(W_ij x_j + b_ij).
// With root input (schema 2), the first ResBlock reads the root token's embedding too:
// x_1 = h + SiLU(W_i0 [h; e(root)] + b_i0), e = the model file's token_embd rows (get_rows).
//
// Loading validates the heads file (and, for shared output, the model file's lm_head) completely
// before any device memory is taken. The weights go to the backend of the model's device; if that
// device cannot run an op of the heads graph, the heads run on the CPU instead (see build()).

// The heads file's metadata, every value type- and range-checked: the one validator of these keys,
// used by Heads::parse and (through the heads_metadata binding) by medusa_edge/heads/check.py, which
// adds the keys only Python reads (tree, rank accuracies, base vocabulary hash).
struct HeadsMeta {
    // Bounds on the metadata: far above any real head set, and they keep all size arithmetic in
    // int64 (n_heads * (2 * n_layers + 1) tensors; an [n_embd, n_vocab] matrix must also fit the file).
    static constexpr int64_t kMaxHeads = 256, kMaxLayers = 256, kMaxDim = (int64_t(1) << 24) - 1;
    static constexpr int64_t kSchemaVersion = 3;  // medusa_edge/heads/schema.py SCHEMA_VERSION (a test compares them)

    int64_t version = 1;
    int32_t n_heads = 0, n_layers = 0, n_embd = 0, n_vocab = 0;
    bool shared_output = false, root_input = false;
    std::vector<int32_t> draft_vocab;  // schema 3: strictly increasing ids; empty: every token
    int32_t n_draft = 0;               // rows the heads score: draft_vocab's size, n_vocab without one

    // ValueError (std::invalid_argument) naming the file and the key for anything out of bounds,
    // and when the file has fewer tensors than the metadata asks for.
    static HeadsMeta read(const GgufFile &hf);
};

struct Heads {

    std::string path;
    int32_t n_heads = 0, n_layers = 0, n_embd = 0, n_vocab = 0;
    bool shared_output = false;
    bool root_input = false;  // the first ResBlock reads [h; e(root)]
    // Draft vocabulary (schema 3): the heads score only these full-vocabulary ids (strictly
    // increasing, so ties between draft rows break toward the lower full id, as without one). Empty:
    // every token. n_draft = rows of the output matrices the pass multiplies by (n_vocab without one).
    std::vector<int32_t> draft_vocab;
    int32_t n_draft = 0;
    int n_threads = 1;

    // What to load (filled once by parse(), then uploaded to a backend, again after a fallback).
    struct WeightSpec {
        std::string name, file;
        uint64_t offset, nbytes;
        ggml_type type;
        int64_t ne0, ne1;
        // non-empty: only these rows of the file's [ne0, *] matrix, in this order (ne1 = rows.size());
        // each row is read as stored (same type, same bytes), so every logit is the full product's
        std::vector<int32_t> rows;
    };
    std::vector<WeightSpec> specs;
    std::vector<std::vector<int>> w_idx, b_idx;  // [head][layer] -> index into specs / weights
    std::vector<int> out_idx;                    // [head] (all equal when shared)
    int embd_idx = -1;                           // the model's token_embd (root input only)

    ggml_backend_t backend = nullptr;
    bool on_fallback = false;  // the heads run on the CPU because the first backend lacked an op
    std::string backend_name;
    std::unique_ptr<RpcUse> rpc_use;  // heads on an RPC device: its endpoint is in use (model.h)
    std::string test_unsupported_op;  // MEDUSA_EDGE_TEST_UNSUPPORTED_OP: pretend the first backend lacks this op
    ggml_context *wctx = nullptr;       // weight tensors
    ggml_backend_buffer_t wbuf = nullptr;
    std::vector<ggml_tensor *> weights;  // [specs]
    // compute graphs, one per shape (top_k, heads used), each allocated once and kept: a tree cut
    // short at the end of an answer and grown again reuses them. The current one in these fields.
    struct Graph {
        ggml_context *gctx = nullptr;
        ggml_cgraph *graph = nullptr;
        ggml_gallocr_t galloc = nullptr;
        ggml_tensor *in_h = nullptr, *in_root = nullptr;
        // [k, n_used] i32; [1, k, n_used] f32: probabilities, or logits where no log-probs are read
        ggml_tensor *out_ids = nullptr, *out_probs = nullptr;
    };
    std::map<std::tuple<int32_t, int32_t, bool>, Graph> graphs;  // (top_k, heads used, log-probs)
    static constexpr size_t MAX_GRAPHS = 16;  // shapes kept at most (all dropped when full)
    int64_t n_builds = 0;                     // graphs built so far (for tests)
    // per pass, for tests: host-to-device writes, device-to-host reads, and waits for the backend
    int64_t n_uploads = 0, n_reads = 0, n_syncs = 0;
    int32_t graph_k = -1, graph_n = -1;
    bool graph_logp = true;
    ggml_context *gctx = nullptr;
    ggml_cgraph *graph = nullptr;
    ggml_gallocr_t galloc = nullptr;
    ggml_tensor *in_h = nullptr, *in_root = nullptr;
    ggml_tensor *out_ids = nullptr, *out_probs = nullptr;
    // Own output matrices of one type are loaded into one [n_embd, n_vocab, n_heads] tensor, so one
    // batched product computes every head's logits (null otherwise: per-head tensors in `weights`).
    ggml_tensor *out_stack = nullptr;

    // device: run on this device (the output layer's of a model loaded over RPC, Model::output_dev);
    // null: as init_backend says.
    Heads(const std::string &path_, const std::string &model_path, int n_threads_, bool use_gpu, int32_t top_k = 0,
          ggml_backend_dev_t device = nullptr);
    ~Heads() { release(); }
    Heads(const Heads &) = delete;
    Heads &operator=(const Heads &) = delete;
    void release_graph();
    void use_graph(const Graph &g, int32_t k, int32_t n, bool logp);
    void release_weights();
    void release();
    void load(const std::string &model_path, bool use_gpu, int32_t top_k, ggml_backend_dev_t device);

    // Validate the heads file (and the model file's lm_head for shared output) and fill specs.
    void parse(const std::string &model_path);

    // medusa.draft_vocab (schema 3): an i32 array of 1 to n_vocab full ids, each in [0, n_vocab),
    // strictly increasing (so unique). Anything else is one clear error naming the key.

    // The backend of the device that holds the model's layers when offloading, else the CPU.
    //
    // Ideally the device holding the model's output layer. llama.cpp's public API (llama.h and
    // ggml-backend.h of this version) has no call that names the device of a model tensor (that is
    // llama_model::dev_output(), internal C++), so with offloading this takes the first GPU: the right
    // one with a single GPU; with several, llama.cpp's default layer split usually puts the output layer
    // on the last one, and the hidden state then crosses devices once per step. A model loaded over
    // RPC computes its output layer's device itself (Model::output_dev), and `device` is that one.
    void init_backend(bool use_gpu, ggml_backend_dev_t device = nullptr);
    void init_cpu_backend();

    // Create the weight tensors on `backend` and read their data from the files.
    void upload();

    // The first graph node the backend cannot run (its op name), or null. The test hook makes the
    // first backend refuse one op by name, so the fallback runs on machines with a CPU only.
    const char *unsupported_op() const;

    // Heads on a GPU never abort: a device that lacks an op of the heads graph (ggml_top_k over a large
    // vocabulary on CUDA without CUB, a weight type without a kernel, ...) would abort inside
    // ggml_backend_graph_compute. Then the whole heads graph moves to the CPU backend (weights reloaded
    // there): one device for all of it, no per-op scheduling. Said once on stderr and in `backend`.
    void fall_back_to_cpu(const std::string &op);

    // The graph for top-k of the first n_used heads. logp: also each candidate's probability (a
    // softmax over the vocabulary); without it the candidates are ranked by logit, the same order
    // (softmax is monotonic) save where two probabilities round equal, and k = 1 is an argmax.
    void build(int32_t k, int32_t n_used, bool logp);

    // The op names of the graph for (k, n_used, logp), in order (tests: which nodes a pass runs).
    std::vector<std::string> graph_ops(int32_t k, int32_t n_used, bool logp);
    void check_shape(int32_t k, int32_t &n_used) const;

    // ids [n_used, k] int32 (best first) and log-probs [n_used, k] float32 (None without logp) for
    // hidden state h; n_used <= n_heads: only the heads a tree of that depth reads are computed.
    // `root`: the token the base chose at h's position; required by root-input heads, ignored by the
    // others. One pass: the inputs are written and the outputs read asynchronously where the backend
    // can, around one graph launch, with one wait for the backend at the end.
    py::tuple run(const float *h, int32_t k, int32_t n_used, int32_t root, bool logp);
    py::tuple propose(Context &c, int32_t row, int32_t k, int32_t n_used, int32_t root, bool logp);
    py::tuple propose_hidden(f32_array h, int32_t k, int32_t n_used, int32_t root, bool logp);
};
