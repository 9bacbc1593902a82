// Log capture and the Ctrl-C guard around decodes: see common.h for the contracts.
#include "common.h"

// ---------------------------------------------------------------------------------------------
// Logging: silence llama.cpp unless verbose, but keep the last error lines to put in exceptions.

std::mutex g_log_mutex;
static bool g_verbose = false;
static std::string g_last_error;
// every error line since clear_last_error(), first lines only, bounded: a failed grammar parse logs
// the fault first and a generic "failed to parse grammar" last
static std::string g_error_lines;
bool g_fa_auto_disabled = false;

void log_callback(ggml_log_level level, const char *text, void *) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (std::strstr(text, "Flash Attention not supported")) g_fa_auto_disabled = true;
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        std::string t(text);
        while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
        if (!t.empty()) g_last_error = t;
        if (level == GGML_LOG_LEVEL_ERROR && !t.empty() && g_error_lines.size() < 1024) {
            const std::string first = t.substr(0, std::min(t.find('\n'), (size_t)300));
            g_error_lines += (g_error_lines.empty() ? "" : "; ") + first;
        }
    }
    if (g_verbose) fputs(text, stderr);
}

void clear_last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_error.clear();
    g_error_lines.clear();
}

std::string error_lines() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    return g_error_lines;
}

std::string last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    return g_last_error.empty() ? std::string() : " (llama.cpp: " + g_last_error + ")";
}

void set_verbose(bool v) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_verbose = v;
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C during a decode. While llama_decode runs (GIL released, possibly for seconds on a long
// prompt) Python cannot act on SIGINT, so a guard swaps in a handler that only sets a flag;
// llama.cpp's abort callback polls it between graph nodes (CPU backends) and the decode returns
// early. After the decode the previous handler is restored and the caller raises KeyboardInterrupt.

static std::atomic<bool> g_interrupted{false};
unsigned long g_main_thread = 0;

static void on_sigint(int) { g_interrupted.store(true); }

bool abort_requested(void *) { return g_interrupted.load(); }

struct SigintGuard {
    struct sigaction old {};
    bool installed = false;
    SigintGuard() {
        g_interrupted.store(false);
        if (PyThread_get_thread_ident() != g_main_thread) return;  // worker threads leave SIGINT alone
        struct sigaction sa {};
        sa.sa_handler = on_sigint;
        sigemptyset(&sa.sa_mask);
        installed = sigaction(SIGINT, &sa, &old) == 0;
    }
    ~SigintGuard() {
        if (installed) sigaction(SIGINT, &old, nullptr);
    }
};

// Decode `batch` (already filled) with the GIL released; raise on failure, and raise
// KeyboardInterrupt when Ctrl-C arrived during the decode (see SigintGuard).
void decode_or_raise(llama_context *ctx, llama_batch &batch, const char *what) {
    int32_t rc;
    bool interrupted;
    clear_last_error();
    {
        SigintGuard guard;
        py::gil_scoped_release release;
        rc = llama_decode(ctx, batch);
        interrupted = g_interrupted.load();
    }
    if (interrupted || rc == 2) {
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        throw py::error_already_set();
    }
    if (rc != 0)
        throw std::runtime_error(std::string(what) + ": llama_decode failed with code " + std::to_string(rc) + last_error());
}
