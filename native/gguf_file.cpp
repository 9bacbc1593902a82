#include "gguf_file.h"

// a + b, false on uint64 overflow. (Products need no check: the reader bounds tensor sizes, and
// Heads bounds its counts so that n_heads * (6 * n_layers + 8) and the like stay far inside int64.)
static bool add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (b > UINT64_MAX - a) return false;
    *out = a + b;
    return true;
}

std::string gguf_kv_type_label(const gguf_context *g, int64_t id) {
    const gguf_type t = gguf_get_kv_type(g, id);
    const char *name = gguf_type_name(t);
    if (t != GGUF_TYPE_ARRAY) return name ? name : "?";
    const char *elem = gguf_type_name(gguf_get_arr_type(g, id));
    return std::string("arr[") + (elem ? elem : "?") + "]";
}

GgufFile::GgufFile(const std::string &path_, const std::string &what_) : path(path_), what(what_) {
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) fail("cannot open file");
    char magic[4] = {0, 0, 0, 0};
    const size_t got = fread(magic, 1, 4, f);
    const int64_t end = fseeko(f, 0, SEEK_END) == 0 ? (int64_t)ftello(f) : -1;
    fclose(f);
    if (got != 4 || std::memcmp(magic, "GGUF", 4) != 0) fail("not a GGUF file (bad magic)");
    if (end < 0) fail("cannot determine the file size");
    size = (uint64_t)end;
    gguf_init_params p{};
    p.no_alloc = true;
    p.ctx = &meta;
    clear_last_error();
    g = gguf_init_from_file(path.c_str(), p);
    if (!g) {
        release();
        fail("corrupt or truncated GGUF" + last_error());
    }
    // A truncated download parses (the reader stops at the tensor table) but fails here.
    const uint64_t data_off = gguf_get_data_offset(g);
    for (int64_t t = 0; t < gguf_get_n_tensors(g); ++t) {
        uint64_t begin, end_t;
        if (!add_u64(data_off, gguf_get_tensor_offset(g, t), &begin) || !add_u64(begin, gguf_get_tensor_size(g, t), &end_t) ||
            end_t > size) {
            const std::string name = gguf_get_tensor_name(g, t);
            release();
            fail("truncated (tensor " + name + " ends past the end of the file, which has " + std::to_string(size) + " bytes)");
        }
    }
}

void GgufFile::release() {
    if (g) gguf_free(g), g = nullptr;
    if (meta) ggml_free(meta), meta = nullptr;
}

int64_t GgufFile::get_int(const char *key, int64_t lo, int64_t hi, const int64_t *dflt) const {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        if (dflt) return *dflt;
        fail(std::string("missing key ") + key);
    }
    int64_t v = 0;
    uint64_t u = 0;
    bool is_unsigned = true;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8: u = gguf_get_val_u8(g, id); break;
        case GGUF_TYPE_UINT16: u = gguf_get_val_u16(g, id); break;
        case GGUF_TYPE_UINT32: u = gguf_get_val_u32(g, id); break;
        case GGUF_TYPE_UINT64: u = gguf_get_val_u64(g, id); break;
        case GGUF_TYPE_INT8: v = gguf_get_val_i8(g, id), is_unsigned = false; break;
        case GGUF_TYPE_INT16: v = gguf_get_val_i16(g, id), is_unsigned = false; break;
        case GGUF_TYPE_INT32: v = gguf_get_val_i32(g, id), is_unsigned = false; break;
        case GGUF_TYPE_INT64: v = gguf_get_val_i64(g, id), is_unsigned = false; break;
        default: fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(g, id) + ", not an integer");
    }
    const bool in_range = is_unsigned ? u <= (uint64_t)hi && (int64_t)u >= lo : v >= lo && v <= hi;
    if (!in_range)
        fail(std::string("key ") + key + " = " + (is_unsigned ? std::to_string(u) : std::to_string(v)) + " is outside [" +
             std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return is_unsigned ? (int64_t)u : v;
}

bool GgufFile::get_bool(const char *key, bool dflt) const {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) return dflt;
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL)
        fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(g, id) + ", not bool");
    return gguf_get_val_bool(g, id);
}

std::string GgufFile::get_str(const char *key, const std::string &dflt) const {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) return dflt;
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING)
        fail(std::string("key ") + key + " is of type " + gguf_kv_type_label(g, id) + ", not str");
    return gguf_get_val_str(g, id);
}

std::pair<const ggml_tensor *, uint64_t> GgufFile::tensor(const std::string &name) const {
    const int64_t tid = gguf_find_tensor(g, name.c_str());
    const ggml_tensor *m = tid < 0 || !meta ? nullptr : ggml_get_tensor(meta, name.c_str());
    if (!m) fail("missing tensor " + name);
    return {m, gguf_get_data_offset(g) + gguf_get_tensor_offset(g, tid)};
}

py::dict GgufFile::to_python() const {
    py::dict kv;
    for (int64_t id = 0; id < gguf_get_n_kv(g); ++id) {
        const gguf_type t = gguf_get_kv_type(g, id);
        py::object v;
        switch (t) {
            case GGUF_TYPE_UINT8: v = py::int_(gguf_get_val_u8(g, id)); break;
            case GGUF_TYPE_INT8: v = py::int_(gguf_get_val_i8(g, id)); break;
            case GGUF_TYPE_UINT16: v = py::int_(gguf_get_val_u16(g, id)); break;
            case GGUF_TYPE_INT16: v = py::int_(gguf_get_val_i16(g, id)); break;
            case GGUF_TYPE_UINT32: v = py::int_(gguf_get_val_u32(g, id)); break;
            case GGUF_TYPE_INT32: v = py::int_(gguf_get_val_i32(g, id)); break;
            case GGUF_TYPE_UINT64: v = py::int_(gguf_get_val_u64(g, id)); break;
            case GGUF_TYPE_INT64: v = py::int_(gguf_get_val_i64(g, id)); break;
            case GGUF_TYPE_FLOAT32: v = py::float_(gguf_get_val_f32(g, id)); break;
            case GGUF_TYPE_FLOAT64: v = py::float_(gguf_get_val_f64(g, id)); break;
            case GGUF_TYPE_BOOL: v = py::bool_(gguf_get_val_bool(g, id)); break;
            case GGUF_TYPE_STRING: v = py::bytes(gguf_get_val_str(g, id)); break;
            case GGUF_TYPE_ARRAY: v = array_to_python(id); break;
            default: fail("key " + std::string(gguf_get_key(g, id)) + " has an unknown type");
        }
        kv[py::bytes(gguf_get_key(g, id))] = py::make_tuple(gguf_kv_type_label(g, id), v);
    }
    py::dict tensors;
    for (int64_t t = 0; t < gguf_get_n_tensors(g); ++t) {
        const char *name = gguf_get_tensor_name(g, t);
        const ggml_tensor *m = meta ? ggml_get_tensor(meta, name) : nullptr;
        py::tuple shape = m ? py::tuple(py::make_tuple(m->ne[0], m->ne[1], m->ne[2], m->ne[3])) : py::tuple();
        tensors[py::bytes(name)] = py::make_tuple(ggml_type_name(gguf_get_tensor_type(g, t)), shape,
                                                  gguf_get_data_offset(g) + gguf_get_tensor_offset(g, t), gguf_get_tensor_size(g, t));
    }
    py::dict d;
    d["version"] = gguf_get_version(g);
    d["alignment"] = gguf_get_alignment(g);
    d["data_offset"] = gguf_get_data_offset(g);
    d["file_size"] = size;
    d["n_tensors"] = gguf_get_n_tensors(g);
    d["kv"] = kv;
    d["tensors"] = tensors;
    return d;
}

py::object GgufFile::array_to_python(int64_t id) const {
    const gguf_type et = gguf_get_arr_type(g, id);
    const size_t n = gguf_get_arr_n(g, id);
    if (et == GGUF_TYPE_STRING) {
        py::list out(n);
        for (size_t i = 0; i < n; ++i) out[i] = py::bytes(gguf_get_arr_str(g, id, i));
        return std::move(out);
    }
    const char *dtype = nullptr;
    switch (et) {
        case GGUF_TYPE_UINT8: dtype = "u1"; break;
        case GGUF_TYPE_INT8: dtype = "i1"; break;
        case GGUF_TYPE_UINT16: dtype = "<u2"; break;
        case GGUF_TYPE_INT16: dtype = "<i2"; break;
        case GGUF_TYPE_UINT32: dtype = "<u4"; break;
        case GGUF_TYPE_INT32: dtype = "<i4"; break;
        case GGUF_TYPE_UINT64: dtype = "<u8"; break;
        case GGUF_TYPE_INT64: dtype = "<i8"; break;
        case GGUF_TYPE_FLOAT32: dtype = "<f4"; break;
        case GGUF_TYPE_FLOAT64: dtype = "<f8"; break;
        case GGUF_TYPE_BOOL: dtype = "?"; break;  // stored one byte each
        default: fail("key " + std::string(gguf_get_key(g, id)) + " is an array of an unknown type");
    }
    py::array out(py::dtype(dtype), std::vector<py::ssize_t>{(py::ssize_t)n});
    if (n) std::memcpy(out.mutable_data(), gguf_get_arr_data(g, id), n * out.itemsize());
    return std::move(out);
}
