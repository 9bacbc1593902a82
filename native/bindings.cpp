// The Python module medusa_edge._native: bindings only. Each binding's docstring states its
// contract; medusa_edge/_native.pyi repeats them with the types.
#include "common.h"
#include "context.h"
#include "embedder.h"
#include "gguf_file.h"
#include "heads.h"
#include "model.h"
#include "sampler.h"

#include "ggml-rpc.h"  // RPC_PROTO_* only: the RPC functions are reached through ggml's registry

PYBIND11_MODULE(_native, m) {
    m.doc() = "medusa_edge native layer: llama.cpp model/context, tree batches, KV commit, ggml Medusa heads";

    g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
    static bool backend_ready = false;
    if (!backend_ready) {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        backend_ready = true;
    }
    m.def("set_verbose", &set_verbose, "Pass llama.cpp's log through to stderr (errors are always kept for exceptions).");
    m.def("max_parallel_sequences", []() { return (int)llama_max_parallel_sequences(); },
          "The most seq ids a llama.cpp context can hold (the upper bound of Context's n_seq_max).");
    // A GPU of this machine. Not llama_supports_gpu_offload(): that is also true for a build with the
    // RPC backend and no GPU (RPC servers are offload targets), which has no GPU here. RPC devices
    // are never in ggml's registry (Model passes them to llama.cpp explicitly), so they never count.
    m.def("supports_gpu_offload", []() {
        return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) != nullptr ||
               ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU) != nullptr;
    }, "Whether llama.cpp has a GPU of this machine to offload layers to (RPC servers do not count).");
    m.def("system_info", []() { return std::string(llama_print_system_info()); },
          "llama.cpp's system line: the CPU features and backends it was built with.");


    m.def("supports_rpc", []() { return llama_supports_rpc(); },
          "Whether this llama.cpp build has its RPC backend (built with GGML_RPC=on).");
    m.def("rpc_protocol", []() { return py::make_tuple(RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION); },
          "(major, minor, patch) of the RPC protocol this llama.cpp speaks (ggml-rpc.h): a server must have the "
          "same major and a minor no newer.");
    m.def("rpc_in_use", &rpc_in_use, py::arg("endpoint"),
          "Whether a model or heads of this process hold RPC endpoint `endpoint` (and so maybe its one connection).");

    py::class_<Model, std::shared_ptr<Model>>(m, "Model")
        .def(py::init<const std::string &, int, bool, bool, const std::vector<std::string> &>(), py::arg("path"),
             py::arg("n_gpu_layers") = 0, py::arg("vocab_only") = false, py::kw_only(), py::arg("use_extra_bufts"),
             py::arg("rpc_servers") = std::vector<std::string>(),
             "Load a GGUF model with n_gpu_layers offloaded (vocab_only: the tokenizer alone; use_extra_bufts: allow "
             "llama.cpp's extra weight buffer types; rpc_servers: 'host:port' of running llama.cpp RPC servers, whose "
             "devices come first among those the offloaded layers split over; each must answer, or llama.cpp aborts); "
             "RuntimeError when llama.cpp cannot load it or has no RPC backend.")
        .def_property_readonly("rpc_servers", [](const Model &s) { return s.rpc_servers; },
                               "The RPC servers the model was loaded over ([] without).")
        .def_property_readonly("devices", [](const Model &s) {
            std::vector<std::string> out;
            for (auto d : s.devices) out.push_back(Model::device_label(d));
            return out;
        }, "Loaded over RPC: the devices the offloaded layers split over, 'NAME (description)' in llama.cpp's order; "
           "[] otherwise.")
        .def_property_readonly("output_device", [](const Model &s) {
            return s.rpc_servers.empty() ? std::string() : Model::device_label(s.output_dev);
        }, "Loaded over RPC: the device of the output layer ('CPU' when it is not offloaded); '' otherwise.")
        .def_property_readonly("n_vocab", [](const Model &s) { return llama_vocab_n_tokens(s.vocab); },
                               "Tokens in the vocabulary.")
        .def_property_readonly("n_embd", [](const Model &s) { return llama_model_n_embd_out(s.model); },
                               "Width of the hidden state the model outputs (what the heads read).")
        .def_property_readonly("n_params", [](const Model &s) { return llama_model_n_params(s.model); },
                               "The model's parameter count.")
        .def_property_readonly("size_bytes", [](const Model &s) { return llama_model_size(s.model); },
                               "Bytes of the model's weight tensors.")
        .def_property_readonly("is_recurrent", [](const Model &s) { return llama_model_is_recurrent(s.model) || llama_model_is_hybrid(s.model); },
                               "Whether the architecture is recurrent or hybrid (a Context refuses such a model).")
        .def_property_readonly("bos", [](const Model &s) { return llama_vocab_bos(s.vocab); },
                               "The BOS token id, -1 when the vocabulary has none.")
        .def_property_readonly("eos", [](const Model &s) { return llama_vocab_eos(s.vocab); },
                               "The EOS token id, -1 when the vocabulary has none.")
        .def_property_readonly("add_bos", [](const Model &s) { return llama_vocab_get_add_bos(s.vocab); },
                               "Whether tokenizing with add_special puts BOS first.")
        .def("is_eog", [](const Model &s, int32_t t) { return llama_vocab_is_eog(s.vocab, t); },
             "Whether token `t` ends generation (EOS, EOT and the like).")
        .def("vocab_fingerprint", [](const Model &s) { return fnv1a_tokens(s.vocab); },
             "FNV-1a 64 over every token's text plus a NUL: the base fingerprint a heads file records.")
        .def("meta", &Model::meta, "The GGUF metadata value of `key` as a string, '' when absent.")
        .def("chat_template", &Model::chat_template, "The model's default chat template, '' when it has none.")
        .def("description", [](const Model &s) {
            char buf[256];
            llama_model_desc(s.model, buf, sizeof(buf));
            return std::string(buf);
        }, "llama.cpp's one-line description of the model (architecture, size, weight type).")
        .def("tokenize", &Model::tokenize, py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = false,
             "Token ids of `text` (add_special: BOS/EOS as the model adds them; parse_special: special-token text "
             "becomes special tokens).")
        .def("token_to_piece", &Model::token_to_piece, py::arg("token"), py::arg("special") = false,
             "The bytes of `token` (special: special tokens as their text); IndexError outside the vocabulary.");

    py::class_<TreeShape, std::shared_ptr<TreeShape>>(m, "TreeShape")
        .def(py::init<std::vector<int32_t>, std::vector<std::vector<int32_t>>>(), py::arg("depth"), py::arg("seq_sets"),
             "A tree's fixed shape: each node's depth and seq ids, node 0 the root carrying every leaf's seq id; "
             "ValueError otherwise.")
        .def_property_readonly("n_nodes", &TreeShape::n, "Nodes in the tree, root included.")
        .def_readonly("n_leaves", &TreeShape::n_leaves, "Leaves of the tree: one more than the largest seq id.");

    py::class_<Context>(m, "Context")
        .def(py::init<std::shared_ptr<Model>, int, int, int, int, bool, int, int, int, int, int, int>(), py::arg("model"),
             py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("n_seq_max"), py::arg("f32_kv") = false,
             py::arg("flash_attn") = -1, py::arg("n_ubatch") = 0, py::arg("n_threads_batch") = 0, py::arg("type_k") = -1,
             py::arg("type_v") = -1, py::arg("n_outputs_max_per_seq") = 0,
             "A llama.cpp context for tree verification: one unified KV stream, n_seq_max seq ids, flash_attn 1/0/-1 "
             "(auto), KV types type_k/type_v (-1: F16, or F32 with f32_kv); ValueError for a recurrent, hybrid or "
             "encoder-decoder model or a setting out of range.")
        .def("set_backend_greedy", &Context::set_backend_greedy, py::arg("on"),
             "Device-side greedy on every seq id: argmax/argmax_row read llama.cpp's sampled tokens, no raw logits are "
             "copied (logits() raises); off copies them again.")
        .def_readonly("backend_greedy", &Context::backend_greedy, "Whether device-side greedy is on (set_backend_greedy).")
        .def("_logits_buffer_row", [](const Context &c, int32_t row) {
            // tests: llama.cpp's host logits buffer for a row, read without the backend-greedy check
            const float *p = llama_get_logits_ith(c.ctx, c.row_base + row);
            if (!p) throw std::runtime_error("no logits buffer row");
            py::array_t<float> out(llama_vocab_n_tokens(c.model->vocab));
            std::memcpy(out.mutable_data(), p, sizeof(float) * out.size());
            return out;
        }, "Tests: a copy of llama.cpp's host logits buffer at output row `row`, read without the backend-greedy check.")
        .def("_poison_logits_buffer", [](Context &c) {
            // tests: fill the host logits buffer's rows of the last decode with NaN
            const int32_t n_vocab = llama_vocab_n_tokens(c.model->vocab);
            for (int32_t r = 0; r < c.n_outputs; ++r) {
                float *p = llama_get_logits_ith(c.ctx, c.row_base + r);
                if (p) std::fill(p, p + n_vocab, NAN);
            }
        }, "Tests: fill the host logits buffer's rows of the last decode with NaN.")
        .def_property_readonly("type_k", [](const Context &c) { return c.type_k; }, "The ggml type of the KV cache's keys.")
        .def_property_readonly("type_v", [](const Context &c) { return c.type_v; }, "The ggml type of the KV cache's values.")
        .def("synchronize", [](Context &c) {
            py::gil_scoped_release release;
            llama_synchronize(c.ctx);
        }, "Wait, with the GIL released, until the backend has finished the last decode.")
        .def_property_readonly("n_ubatch", [](const Context &c) { return (int)llama_n_ubatch(c.ctx); },
                               "The micro-batch size: llama.cpp computes a decode in pieces of at most this many tokens.")
        .def_readonly("n_ctx", &Context::n_ctx, "KV cells of the context (llama.cpp may round the requested size up).")
        .def_readonly("flash_attn", &Context::flash_attn, "Whether attention runs as flash attention (auto resolved).")
        .def_readonly("epoch", &Context::epoch,
                      "A counter that every call changing the KV cache bumps (prefill, decode_tree, commit, truncate).")
        .def_readonly("n_batch", &Context::n_batch, "The most tokens one decode takes.")
        .def_readonly("n_seq_max", &Context::n_seq_max, "Seq ids the context holds: the most leaves a tree may have.")
        .def_property_readonly("n_threads", [](const Context &c) { return (int)llama_n_threads(c.ctx); },
                               "Threads of one-token decodes.")
        .def_property_readonly("n_threads_batch", [](const Context &c) { return (int)llama_n_threads_batch(c.ctx); },
                               "Threads of decodes of more than one token.")
        .def("set_threads", &Context::set_threads, py::arg("n_threads"), py::arg("n_threads_batch"),
             "Threads of one-token and of larger decodes from the next decode on (each at least 1).")
        .def("prefill", &Context::prefill, py::arg("tokens"), py::arg("n_past"), py::arg("hidden") = true,
             "Decode `tokens` at positions n_past.. on every seq id, the last one output row 0 (hidden: decoded alone "
             "so its hidden state is readable; else in llama-cpp-python's chunks, logits equal to its own).")
        .def("decode_tree", &Context::decode_tree, py::arg("tree"), py::arg("tokens"), py::arg("n_past"),
             "Decode one tree: node i (tokens[i]) at n_past + depth[i] on its seq ids, node i output row i; ValueError "
             "when it does not fit the batch, the seq ids or the free KV cells.")
        .def("commit", &Context::commit, py::arg("tree"), py::arg("path"), py::arg("n_past"),
             "Keep the accepted `path` (node indices, root first) at positions n_past.. on every seq id, and nothing "
             "else beyond n_past; no recompute.")
        .def("truncate", &Context::truncate, py::arg("pos"), "Drop every KV cell at positions >= pos, in every sequence.")
        .def("cache_pos_max", &Context::cache_pos_max, py::arg("seq"),
             "The largest position sequence `seq` holds in the KV cache, -1 when it holds none.")
        .def("argmax", &Context::argmax, py::arg("n_rows"),
             "int32 [n_rows]: the argmax of output rows 0..n_rows-1 of the last decode, the lowest id on ties.")
        .def("argmax_row", &Context::argmax_row, py::arg("row"), "The argmax of output row `row`, the lowest id on ties.")
        .def("logits", &Context::logits, py::arg("row"),
             "float32 [n_vocab]: a copy of output row `row`'s logits; RuntimeError while device-side greedy is on.")
        .def("hidden", &Context::hidden, py::arg("row"),
             "float32 [n_embd]: a copy of output row `row`'s hidden state; RuntimeError for a decode without embeddings "
             "(prefill with hidden=False).")
        .def("perf", [](const Context &c) {
            auto d = llama_perf_context(c.ctx);
            return py::dict(py::arg("t_eval_ms") = d.t_eval_ms, py::arg("n_eval") = d.n_eval,
                            py::arg("t_p_eval_ms") = d.t_p_eval_ms, py::arg("n_p_eval") = d.n_p_eval,
                            py::arg("n_reused") = d.n_reused);
        }, "llama_perf_context's counters: evals, their ms, and n_reused (decodes that reused the previous compute graph).");

    py::class_<Sampler>(m, "Sampler")
        .def(py::init<int32_t, uint32_t, float, int32_t, float, float, float, int32_t, float, float, float,
                      std::shared_ptr<Model>, const std::string &, const std::string &,
                      const std::vector<std::pair<int32_t, float>> &>(), py::arg("n_vocab"),
             py::arg("seed"), py::arg("temp"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("repeat_penalty"),
             py::arg("penalty_last_n"), py::arg("frequency_penalty") = 0.0f, py::arg("presence_penalty") = 0.0f,
             py::arg("typical_p") = 1.0f, py::kw_only(), py::arg("model") = py::none(), py::arg("grammar") = "",
             py::arg("grammar_root") = "root", py::arg("logit_bias") = std::vector<std::pair<int32_t, float>>(),
             "A llama.cpp sampler chain; with `grammar` (GBNF text, root rule `grammar_root`) llama.cpp's grammar sampler "
             "follows the penalties, as in llama-cpp-python; `logit_bias` ([(token, bias)]) is llama.cpp's logit-bias "
             "sampler, first in the chain (where llama-cpp-python's logits processor runs). ValueError for a grammar "
             "llama.cpp cannot parse or a bias outside the vocabulary or not finite.")
        .def("sample", &Sampler::sample, py::arg("ctx"), py::arg("row"),
             "Draw a token from output row `row` of ctx's last decode and accept it into the chain (penalty history, "
             "grammar state); ValueError when the grammar allows no token.");

    m.def("heads_metadata",
          [](const std::string &path) {
              const HeadsMeta h = HeadsMeta::read(GgufFile(path, "heads file"));
              py::dict d;
              d["schema_version"] = h.version, d["n_heads"] = h.n_heads, d["n_layers"] = h.n_layers;
              d["n_embd"] = h.n_embd, d["n_vocab"] = h.n_vocab, d["n_draft"] = h.n_draft;
              d["shared_output"] = h.shared_output, d["root_input"] = h.root_input;
              d["draft_vocab"] = h.draft_vocab.empty() ? py::object(py::none())
                                                       : py::object(py::array_t<int32_t>((py::ssize_t)h.draft_vocab.size(), h.draft_vocab.data()));
              return d;
          },
          py::arg("path"),
          "The heads file's metadata as Heads validates it (schema_version, n_heads, n_layers, n_embd, n_vocab, "
          "n_draft, shared_output, root_input, draft_vocab: an int32 array or None); ValueError naming the file "
          "and the key for anything invalid. Reads no tensor data.");
    m.def("heads_schema_version", []() { return HeadsMeta::kSchemaVersion; }, "The newest heads schema this build reads.");
    m.def("gguf_metadata", [](const std::string &path, const std::string &what) { return GgufFile(path, what).to_python(); },
          py::arg("path"), py::arg("what") = "GGUF file",
          "A GGUF file's key/values and tensor table, read by ggml's size-bounded gguf reader (no tensor data). "
          "Raises ValueError naming the file for anything unreadable.");

    py::class_<Embedder>(m, "Embedder")
        .def(py::init<std::shared_ptr<Model>, int, int, int, int>(), py::arg("model"), py::arg("n_batch"), py::arg("n_threads"),
             py::arg("flash_attn") = -1, py::arg("pooling_type") = -1,
             "Embeddings on a llama.cpp context of their own (n_batch tokens per call, pooling_type -1: the model's); "
             "ValueError for a reranking model or a setting out of range.")
        .def_property_readonly("n_batch", [](const Embedder &e) { return e.n_batch; }, "The most tokens of one embed() call.")
        .def_property_readonly("n_seq_max", [](const Embedder &e) { return e.n_seq_max; },
                               "The most sequences of one embed() call.")
        .def_property_readonly("pooling_type", [](const Embedder &e) { return e.pooling; },
                               "The llama_pooling_type in use: 0 none, 1 mean, 2 cls, 3 last.")
        .def("embed", &Embedder::embed, py::arg("seqs"),
             "One float32 array per token sequence, decoded in one batch: [n_tokens, n_embd] without pooling, else "
             "[n_embd]; ValueError for too many sequences or tokens.");

    py::class_<Heads>(m, "Heads")
        .def(py::init([](const std::string &path, const std::string &model_path, int n_threads, bool use_gpu, int32_t top_k,
                         const std::shared_ptr<Model> &output_of) {
                 return std::make_unique<Heads>(path, model_path, n_threads, use_gpu, top_k,
                                                output_of ? output_of->output_dev : nullptr);
             }), py::arg("path"), py::arg("model_path"), py::arg("n_threads"), py::arg("use_gpu") = false,
             py::arg("top_k") = 0, py::arg("output_of") = nullptr,
             "Medusa heads from heads file `path` (shared-output and root-input heads read model file `model_path` "
             "too), on the first GPU with use_gpu, else the CPU; with `output_of`, a Model loaded over RPC whose "
             "output layer is offloaded, on that layer's device instead. ValueError naming the file for anything "
             "invalid. top_k > 0 builds the graph for top_k candidates of every head at load (a backend fallback then "
             "happens here, not at the first step).")
        .def_readonly("n_heads", &Heads::n_heads, "Heads in the file.")
        .def_readonly("n_layers", &Heads::n_layers, "ResBlocks per head.")
        .def_readonly("n_embd", &Heads::n_embd, "Width of the hidden state the heads read.")
        .def_readonly("n_vocab", &Heads::n_vocab, "The base model's vocabulary size.")
        .def_readonly("shared_output", &Heads::shared_output, "Whether the heads share the base model's lm_head.")
        .def_readonly("root_input", &Heads::root_input,
                      "Whether the first ResBlock reads the root token's embedding too (propose needs `root`).")
        .def_readonly("n_draft", &Heads::n_draft, "rows the heads score: the draft vocabulary's size, n_vocab without one")
        .def_property_readonly("draft_vocab", [](const Heads &h) { return py::array_t<int32_t>((py::ssize_t)h.draft_vocab.size(), h.draft_vocab.data()); },
                               "the draft vocabulary's full ids (empty without one)")
        .def_property_readonly("stacked_output", [](const Heads &h) { return h.out_stack != nullptr; },
                               "Whether the heads' own output matrices are one stacked tensor (one batched product).")
        .def_readonly("backend", &Heads::backend_name,
                      "The ggml backend the heads run on, with the reason when they fell back to the CPU.")
        .def_readonly("n_graph_builds", &Heads::n_builds, "Tests: heads graphs built so far.")
        .def_readonly("n_uploads", &Heads::n_uploads, "Tests: host-to-device input writes so far, one per pass.")
        .def_readonly("n_reads", &Heads::n_reads, "Tests: device-to-host output reads so far, one per pass.")
        .def_readonly("n_syncs", &Heads::n_syncs, "Tests: waits for the backend so far, one per pass.")
        .def_readonly("on_fallback", &Heads::on_fallback,
                      "Whether the heads run on the CPU because the first backend lacked an op of their graph.")
        .def("propose", &Heads::propose, py::arg("ctx"), py::arg("row"), py::arg("top_k"), py::arg("n_heads_used") = -1,
             py::arg("root") = -1, py::arg("logp") = true,
             "(ids [n_used, top_k] best first, log-probs or None without logp) of the heads at output row `row`.")
        .def("propose_hidden", &Heads::propose_hidden, py::arg("hidden"), py::arg("top_k"), py::arg("n_heads_used") = -1,
             py::arg("root") = -1, py::arg("logp") = true, "propose() for a hidden state given as a vector.")
        .def("graph_ops", &Heads::graph_ops, py::arg("top_k"), py::arg("n_heads_used") = -1, py::arg("logp") = true,
             "The op names of the heads graph of that shape, in order.");
}
