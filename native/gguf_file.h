// GgufFile: a GGUF file from outside, read by ggml's size-bounded gguf reader.
#pragma once

#include "common.h"

// GGUF files from outside: heads files, and the model file that shared-output heads take their
// lm_head from.
//
// Contract: a damaged or hostile file gives std::invalid_argument (Python ValueError) that names the
// file and the fault; never an abort, a signal, a hang, or an allocation beyond the file's size.
// ggml's gguf reader (this llama.cpp version) already bounds every count, string and array by the
// bytes left in the file, rejects unknown value types, nested arrays and duplicate keys or tensor
// names, and checks tensor dimensions, types (in range, rows a whole number of blocks), offsets
// (consecutive, aligned) and byte sizes against overflow. What it leaves to the caller is checked here:
//   - a value's type before gguf_get_val_* (which GGML_ASSERTs, killing the process, on a mismatch);
//   - value ranges before narrowing (a u64 head count must not wrap into a small int32);
//   - tensor data inside the file (the reader never compares the data section with the file's end);
//   - tensor types and shapes the heads graph can run (in Heads).

// GGUF value type as text: "u32", "str", "arr[str]", ...
std::string gguf_kv_type_label(const gguf_context *g, int64_t id);

struct GgufFile {
    std::string path, what;  // what: "heads file", "model file" (starts every error message)
    gguf_context *g = nullptr;
    ggml_context *meta = nullptr;  // one no-data tensor per entry: shapes and types
    uint64_t size = 0;             // bytes in the file

    GgufFile(const std::string &path_, const std::string &what_);
    ~GgufFile() { release(); }
    GgufFile(const GgufFile &) = delete;
    GgufFile &operator=(const GgufFile &) = delete;
    void release();
    [[noreturn]] void fail(const std::string &why) const { throw std::invalid_argument(what + " " + path + ": " + why); }

    // Integer value of `key`, of any GGUF integer type, checked to lie in [lo, hi]. Absent: `dflt`,
    // or an error when dflt is null.
    int64_t get_int(const char *key, int64_t lo, int64_t hi, const int64_t *dflt = nullptr) const;
    bool get_bool(const char *key, bool dflt) const;

    // String value of `key`; `dflt` when absent.
    std::string get_str(const char *key, const std::string &dflt) const;

    // Tensor `name`: its metadata (shape and type as the reader checked them) and the absolute file
    // offset of its data (inside the file: checked by the constructor).
    std::pair<const ggml_tensor *, uint64_t> tensor(const std::string &name) const;

    // {"version", "alignment", "data_offset", "file_size", "n_tensors",
    //  "kv": {key: (type label, value)}, "tensors": {name: (ggml type name, shape, offset, nbytes)}}
    // Strings are bytes (GGUF does not promise UTF-8); numeric arrays are numpy arrays; string arrays
    // lists of bytes. Everything here was already read into memory by the reader (bounded by the file).
    py::dict to_python() const;

  private:
    py::object array_to_python(int64_t id) const;
};
