#include "model.h"

#include <set>

static std::mutex g_rpc_mutex;
static std::map<std::string, int> g_rpc_users;  // endpoint -> live RpcUse objects naming it

RpcUse::RpcUse(std::vector<std::string> endpoints_) : endpoints(std::move(endpoints_)) {
    std::lock_guard<std::mutex> lock(g_rpc_mutex);
    for (const auto &ep : endpoints) ++g_rpc_users[ep];
}

RpcUse::~RpcUse() {
    std::lock_guard<std::mutex> lock(g_rpc_mutex);
    for (const auto &ep : endpoints)
        if (--g_rpc_users[ep] <= 0) g_rpc_users.erase(ep);
}

bool rpc_in_use(const std::string &endpoint) {
    std::lock_guard<std::mutex> lock(g_rpc_mutex);
    return g_rpc_users.count(endpoint) > 0;
}

std::string rpc_endpoint_of(ggml_backend_dev_t dev) {
    if (!dev) return std::string();
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    // every RPC device belongs to the reg named "RPC"; its description is its server's endpoint
    if (!reg || std::string(ggml_backend_reg_name(reg)) != "RPC") return std::string();
    return ggml_backend_dev_description(dev);
}

std::string Model::device_label(ggml_backend_dev_t dev) {
    if (!dev) return "CPU";
    return std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev) + ")";
}

// The devices llama.cpp's default selection (llama_prepare_model_devices in llama.cpp's
// src/llama.cpp) would give a model if the servers' RPC devices were registered: every server's
// devices first, in the order given, then the local discrete GPUs (one per device id), then the
// integrated GPUs of one backend when there is no discrete GPU. They are passed explicitly
// instead of registering the servers in ggml's registry, so that no other model of this process
// (a baseline, a later load without rpc_servers) gets them by default.
static std::vector<ggml_backend_dev_t> rpc_model_devices(const std::vector<std::string> &servers) {
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    if (!rpc) throw std::runtime_error("this llama.cpp was built without its RPC backend (GGML_RPC=on)");
    using add_server_t = ggml_backend_reg_t (*)(const char *);
    auto add_server = (add_server_t)ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server");
    if (!add_server) throw std::runtime_error("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server");
    std::vector<ggml_backend_dev_t> devs;
    std::set<std::string> seen;
    for (const auto &ep : servers) {
        if (!seen.insert(ep).second) throw std::invalid_argument("RPC server " + ep + " is listed twice");
        ggml_backend_reg_t reg = add_server(ep.c_str());
        if (!reg || ggml_backend_reg_dev_count(reg) == 0)
            throw std::runtime_error("RPC server " + ep + " offers no device");
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) devs.push_back(ggml_backend_reg_dev_get(reg, i));
    }
    std::vector<ggml_backend_dev_t> gpus, igpus;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_GPU: {
                ggml_backend_dev_props props;
                ggml_backend_dev_get_props(dev, &props);
                bool dup = false;
                for (ggml_backend_dev_t g : gpus) {
                    ggml_backend_dev_props gp;
                    ggml_backend_dev_get_props(g, &gp);
                    dup |= props.device_id && gp.device_id && std::strcmp(props.device_id, gp.device_id) == 0;
                }
                if (!dup) gpus.push_back(dev);
                break;
            }
            case GGML_BACKEND_DEVICE_TYPE_IGPU:
                if (igpus.empty() || ggml_backend_dev_backend_reg(dev) == ggml_backend_dev_backend_reg(igpus.back()))
                    igpus.push_back(dev);
                break;
            default:
                break;
        }
    }
    devs.insert(devs.end(), gpus.begin(), gpus.end());
    if (gpus.empty()) devs.insert(devs.end(), igpus.begin(), igpus.end());
    return devs;
}

Model::Model(const std::string &path_, int n_gpu_layers, bool vocab_only, bool use_extra_bufts,
             const std::vector<std::string> &rpc_servers_)
    : path(path_) {
    llama_model_params p = llama_model_default_params();
    p.n_gpu_layers = n_gpu_layers;
    p.vocab_only = vocab_only;
    p.use_extra_bufts = use_extra_bufts;
    std::vector<ggml_backend_dev_t> devs_null;  // p.devices: NULL-terminated
    std::vector<float> split;                   // p.tensor_split: llama_max_devices() entries
    const bool rpc = !rpc_servers_.empty() && !vocab_only;
    if (rpc) {
        devices = rpc_model_devices(rpc_servers_);
        if (devices.size() > llama_max_devices())
            throw std::invalid_argument(std::to_string(devices.size()) + " devices, more than llama.cpp's " +
                                        std::to_string(llama_max_devices()));
        devs_null = devices;
        devs_null.push_back(nullptr);
        p.devices = devs_null.data();
        // llama.cpp's default split (by each device's free memory; a device that reports none counts
        // the host's), computed here and passed explicitly so that output_dev below is computed
        // from the very numbers llama.cpp splits by (free memory moves between two queries).
        split.assign(llama_max_devices(), 0.0f);
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        for (size_t i = 0; i < devices.size(); ++i) {
            size_t free = 0, total = 0;
            ggml_backend_dev_memory(devices[i], &free, &total);
            if (free == 0 && total == 0 && cpu) ggml_backend_dev_memory(cpu, &free, &total);
            split[i] = (float)free;
        }
        p.tensor_split = split.data();
        rpc_servers = rpc_servers_;
        rpc_use = std::make_unique<RpcUse>(rpc_servers);
    }
    clear_last_error();
    model = llama_model_load_from_file(path.c_str(), p);
    if (!model) throw std::runtime_error("cannot load model " + path + last_error());
    vocab = llama_model_get_vocab(model);
    if (rpc) {
        // The output layer's device, as llama_model::load_tensors assigns it (get_layer_buft_list of
        // layer n_layer_all): llama.cpp offloads from the last layer down, the output layer first,
        // and a layer goes to the device whose share of the cumulative split holds its position.
        const int n_layer_all = llama_model_n_layer(model) + llama_model_n_layer_nextn(model);
        const int ngl = n_gpu_layers >= 0 ? n_gpu_layers : n_layer_all + 1;
        const int i_gpu_start = std::max(n_layer_all + 1 - ngl, 0);
        const int act_gpu_layers = std::min(ngl, n_layer_all + 1);
        const int il = n_layer_all;
        if (!(il < i_gpu_start || il - i_gpu_start >= act_gpu_layers)) {
            std::vector<float> cum(devices.size());
            float sum = 0.0f;
            for (size_t i = 0; i < cum.size(); ++i) sum += split[i], cum[i] = sum;
            for (auto &c : cum) c /= sum;
            size_t at = std::upper_bound(cum.begin(), cum.end(), float(il - i_gpu_start) / act_gpu_layers) - cum.begin();
            output_dev = devices.at(std::min(at, devices.size() - 1));
        }
    }
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
