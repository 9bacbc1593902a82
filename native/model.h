// Model: a llama_model and its vocabulary; the vocabulary's fingerprint that heads files record;
// the RPC devices a model's layers may be split over (llama.cpp's RPC backend).
#pragma once

#include "common.h"

// While one of these lives, this process holds (or may hold) a connection to each of its RPC
// endpoints: llama.cpp keeps one connection per endpoint open while any buffer or backend on it
// exists, and a server serves one connection at a time, so a second connection from here (the
// Python side's reachability probe) would wait behind ours. A model loaded over RPC holds one for
// its endpoints, heads on an RPC device one for that device's endpoint.
struct RpcUse {
    std::vector<std::string> endpoints;
    explicit RpcUse(std::vector<std::string> endpoints_);
    ~RpcUse();
    RpcUse(const RpcUse &) = delete;
    RpcUse &operator=(const RpcUse &) = delete;
};
// Whether an RpcUse of `endpoint` (the same "host:port" string) is alive in this process.
bool rpc_in_use(const std::string &endpoint);
// The device's endpoint when it is an RPC device (its description is the endpoint), else "".
std::string rpc_endpoint_of(ggml_backend_dev_t dev);

struct Model {
    llama_model *model = nullptr;
    const llama_vocab *vocab = nullptr;
    std::string path;
    // Loaded with RPC servers only: the devices the layers were split over, in llama.cpp's order
    // (every server's devices, then the local GPUs), and the device of the output layer (null: the
    // CPU). Empty/null otherwise (llama.cpp's own device choice, not recorded here).
    std::vector<ggml_backend_dev_t> devices;
    ggml_backend_dev_t output_dev = nullptr;
    std::vector<std::string> rpc_servers;
    std::unique_ptr<RpcUse> rpc_use;

    // use_extra_bufts = false keeps llama.cpp off its extra weight buffer types (CPU repacking,
    // AMX): the Python side turns it off where those crash (medusa_edge/guards/hw.py).
    // rpc_servers ("host:port", each a running llama.cpp RPC server): their devices come first in
    // the split, before the local GPUs, as llama.cpp's own --rpc orders them; n_gpu_layers then
    // counts the layers on all of those devices together (< 0: all, output layer included). The
    // servers must be reachable (llama.cpp aborts the process otherwise: the Python side probes
    // them first); RuntimeError when this llama.cpp has no RPC backend.
    Model(const std::string &path_, int n_gpu_layers, bool vocab_only, bool use_extra_bufts,
          const std::vector<std::string> &rpc_servers_ = {});
    ~Model();
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    std::string meta(const std::string &key) const;
    std::string chat_template() const;
    std::vector<int32_t> tokenize(const std::string &text, bool add_special, bool parse_special) const;
    py::bytes token_to_piece(int32_t token, bool special) const;
    void check_token(int32_t token) const;
    // "NAME (description)" of a device; "CPU" for null.
    static std::string device_label(ggml_backend_dev_t dev);
};

// FNV-1a 64 over every token text followed by a NUL byte: the base fingerprint that the heads
// GGUF records (medusa_edge/heads/schema.py computes the same from tokenizer.ggml.tokens).
uint64_t fnv1a_tokens(const llama_vocab *vocab);
