"""Checks on GGUF files from outside, before llama.cpp or the heads loader use them.

Contract: a damaged or hostile file gives a Python exception that names the file and the fault
(ValueError here; the engine turns it into HeadsError or ModelLoadError), never a crash, a hang or
an allocation beyond the file's size.

The files are read with ggml's own gguf reader through the extension (``native.gguf_metadata``):
in this llama.cpp version it bounds every count, string and array by the bytes left in the file,
so a lying header costs nothing, and the checks see exactly what llama.cpp sees. gguf-py's
GGUFReader is not used on untrusted files: it maps the whole file and builds Python objects per
array element, with exceptions of any type on damage.

``check_model_file`` stands in for the GGML_ASSERTs of llama.cpp's model loader: most damage makes
llama.cpp throw (a clean load failure), but a few kinds abort the process. Each check below names
the assert it prevents. tests/test_fuzz.py mutates model files and shows which classes of damage
still reach llama.cpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from medusa_edge._loader import native

INT_TYPES = ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64")


@dataclass(frozen=True)
class TensorInfo:
    type: str  # ggml type name, e.g. "f32", "q8_0"
    shape: tuple  # (ne0, ne1, ne2, ne3), ggml order
    offset: int  # absolute file offset of the data (inside the file: checked by the reader)
    nbytes: int


@dataclass(frozen=True)
class GgufMeta:
    """A GGUF file's key/values and tensor table (no tensor data)."""

    path: str
    what: str  # "heads file", "model file": starts every error message
    version: int
    file_size: int
    data_offset: int
    kv: dict  # key -> (type label: "u32", "str", "arr[str]", ...; value: int, float, bool, bytes, numpy array, list of bytes)
    tensors: dict  # name -> TensorInfo

    def fail(self, why: str) -> ValueError:
        return ValueError(f"{self.what} {self.path}: {why}")

    def type_of(self, key: str):
        return self.kv[key][0] if key in self.kv else None

    def get_int(self, key: str, lo: int, hi: int, default=None, required: bool = True):
        """Integer value of ``key`` (any GGUF integer type) in [lo, hi]."""
        if key not in self.kv:
            if required:
                raise self.fail(f"missing key {key}")
            return default
        t, v = self.kv[key]
        if t not in INT_TYPES:
            raise self.fail(f"key {key} is of type {t}, not an integer")
        if not lo <= v <= hi:
            raise self.fail(f"key {key} = {v} is outside [{lo}, {hi}]")
        return int(v)

    def get_bool(self, key: str, default: bool) -> bool:
        if key not in self.kv:
            return default
        t, v = self.kv[key]
        if t != "bool":
            raise self.fail(f"key {key} is of type {t}, not bool")
        return bool(v)

    def get_str(self, key: str, default=None):
        """String value of ``key`` (UTF-8), ``default`` when absent."""
        if key not in self.kv:
            return default
        t, v = self.kv[key]
        if t != "str":
            raise self.fail(f"key {key} is of type {t}, not str")
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"key {key} is not valid UTF-8") from None


def read_gguf(path: str, what: str = "GGUF file") -> GgufMeta:
    """The key/values and tensor table of ``path``; ValueError naming the file if it is unreadable."""
    d = native.gguf_metadata(path, what)
    dec = lambda b: b.decode("utf-8", "surrogateescape")  # noqa: E731  (keys stay distinct)
    kv = {dec(k): v for k, v in d["kv"].items()}
    tensors = {dec(k): TensorInfo(t, tuple(shape), off, nb) for k, (t, shape, off, nb) in d["tensors"].items()}
    return GgufMeta(path, what, d["version"], d["file_size"], d["data_offset"], kv, tensors)


# -- model files --------------------------------------------------------------------------------------

#: ggml types with a CPU dot product: what a weight matrix may be (the CPU backend crashes or aborts in
#: mul_mat/get_rows on the others: integer types, f64, the activation-only q8_1 and q8_K). Same list as
#: matrix_type_ok in native/heads.cpp.
MATRIX_TYPES = frozenset(
    "f32 f16 bf16 q1_0 q2_0 q4_0 q4_1 q5_0 q5_1 q8_0 mxfp4 nvfp4 q2_K q3_K q4_K q5_K q6_K iq2_xxs iq2_xs iq2_s "
    "iq3_xxs iq3_s iq1_s iq1_m iq4_nl iq4_xs tq1_0 tq2_0".split()
)
LLAMA_MAX_LAYERS = 512  # llama-hparams.h (llama.cpp 0c1e570, llama-cpp-python 0.3.36)
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
BYTE_TOKEN = 6  # LLAMA_TOKEN_TYPE_BYTE


def check_model_file(path: str) -> None:
    """Raise ValueError (naming the file and the fault) for damage that llama.cpp 0c1e570's model
    loader, or its first decode, answers with an abort instead of an error. Reads the metadata only
    (tens of milliseconds for a 150k-token vocabulary). Sound: a file llama.cpp can use passes.

    Where llama.cpp itself would throw on the same value (a key of the wrong type, a missing key),
    this leaves the file to it; every check here is a GGML_ASSERT/GGML_ABORT or a crash seen in
    tests/test_fuzz.py, named next to it."""
    meta = read_gguf(path, "cannot load model")  # the prefix of llama.cpp load failures (native Model)
    arch = meta.get_str("general.architecture")
    if arch:
        _check_hparams(meta, arch)
    _check_vocab(meta)
    _check_tensor_types(meta)
    # llama.cpp maps the file and hands the weights to ggml in place: ggml-backend.cpp
    # GGML_ASSERT(ptr % TENSOR_ALIGNMENT == 0) fails for data not 32-byte aligned in the file (a
    # general.alignment below 32; the GGUF default is 32).
    for name, t in meta.tensors.items():
        if t.offset % 32:
            raise meta.fail(f"tensor {name} starts at byte {t.offset}, not a multiple of 32 (general.alignment too small)")


def _int(meta: GgufMeta, key: str):
    """An integer value (the largest element of an integer array), or None: llama.cpp rejects other types itself."""
    if key not in meta.kv:
        return None
    t, v = meta.kv[key]
    if t in INT_TYPES:
        return int(v)
    if t.startswith("arr[") and t[4:-1] in INT_TYPES:
        return int(v.max()) if len(v) else 0
    return None


def _per_layer(meta: GgufMeta, key: str):
    """An integer key llama.cpp reads per layer (scalar or array) as a list, or None."""
    if key not in meta.kv:
        return None
    t, v = meta.kv[key]
    if t in INT_TYPES:
        return [int(v)]
    if t.startswith("arr[") and t[4:-1] in INT_TYPES:
        return [int(x) for x in v]
    return None


def _check_hparams(meta: GgufMeta, arch: str) -> None:
    # llama-model.cpp load_hparams: GGML_ASSERT(n_layer_all > 0 && n_layer_all <= LLAMA_MAX_LAYERS)
    n_layer = _int(meta, f"{arch}.block_count")
    if n_layer is not None and not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        raise meta.fail(f"{arch}.block_count = {n_layer} is outside [1, {LLAMA_MAX_LAYERS}]")
    # GGML_ASSERT(n_layer_nextn <= n_layer_all)
    nextn = _int(meta, f"{arch}.nextn_predict_layers")
    if nextn is not None and n_layer is not None and not 0 <= nextn <= n_layer:
        raise meta.fail(f"{arch}.nextn_predict_layers = {nextn} is outside [0, block_count = {n_layer}]")
    # the expert asserts that follow (0 when absent, as llama.cpp reads them)
    n_expert = _int(meta, f"{arch}.expert_count") or 0
    used = _int(meta, f"{arch}.expert_used_count") or 0
    groups = _int(meta, f"{arch}.expert_group_count") or 0
    group_used = _int(meta, f"{arch}.expert_group_used_count") or 0
    ok = 0 <= n_expert <= LLAMA_MAX_EXPERTS and 0 <= used <= n_expert
    if n_expert > 0:
        ok = ok and used > 0 and 0 <= groups < n_expert
        if groups > 1:
            ok = ok and n_expert % groups == 0 and 0 < group_used < groups
    else:
        ok = ok and used == 0 and groups == 0
    if not ok:
        raise meta.fail(
            f"inconsistent expert counts: expert_count {n_expert}, expert_used_count {used}, "
            f"expert_group_count {groups}, expert_group_used_count {group_used}"
        )
    # Shapes that agree with the tensors but not with attention: at the first decode ggml.c
    # GGML_ASSERT(ggml_can_mul_mat(k, q)) when head_count is not a multiple of head_count_kv (per
    # layer; 0 means a layer without attention), and ggml-cpu rope GGML_ASSERT(n_dims % 2 == 0) for
    # an odd rotary dimension (rope.dimension_count, which llama.cpp requires to equal the head size
    # for "llama").
    heads, heads_kv = _per_layer(meta, f"{arch}.attention.head_count"), _per_layer(meta, f"{arch}.attention.head_count_kv")
    if heads_kv is None:
        heads_kv = heads
    if heads and heads_kv and len(heads) != len(heads_kv) and 1 in (len(heads), len(heads_kv)):
        n = max(len(heads), len(heads_kv))  # a scalar holds for every layer
        heads, heads_kv = (heads * n)[:n] if len(heads) == 1 else heads, (heads_kv * n)[:n] if len(heads_kv) == 1 else heads_kv
    for il, (h, hkv) in enumerate(zip(heads or [], heads_kv or [])):
        if hkv > 0 and h % hkv:
            raise meta.fail(f"layer {il}: attention.head_count {h} is not a multiple of attention.head_count_kv {hkv}")
    n_rot = _int(meta, f"{arch}.rope.dimension_count")
    n_embd = _int(meta, f"{arch}.embedding_length")
    if n_rot is None and arch == "llama" and heads and heads[0] > 0 and n_embd:
        n_rot = n_embd // heads[0]
    if n_rot is not None and n_rot % 2:
        raise meta.fail(f"rotary dimension {n_rot} ({arch}.rope.dimension_count, or the head size) is odd")
    # GGML_ASSERT(rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED)
    key = f"{arch}.rope.scaling.type"
    if meta.type_of(key) == "str" and meta.kv[key][1].decode("utf-8", "replace") not in ROPE_SCALING_TYPES:
        raise meta.fail(f"{key} is {meta.kv[key][1][:40]!r}, not one of {', '.join(ROPE_SCALING_TYPES)}")


def _check_vocab(meta: GgufMeta) -> None:
    model = meta.get_str("tokenizer.ggml.model")
    # No vocabulary: llama-vocab.cpp GGML_ASSERT(tokenizer && ...) / GGML_ABORT on the first tokenize.
    if model in ("none", "no_vocab"):
        raise meta.fail(f"tokenizer.ggml.model is {model!r}: the model has no vocabulary, and medusa-edge needs one")
    if meta.type_of("tokenizer.ggml.tokens") != "arr[str]":
        return  # llama.cpp refuses the file itself
    tokens = meta.kv["tokenizer.ggml.tokens"][1]
    # llama-vocab.cpp load: GGML_ASSERT(id_to_token.size() == token_to_id.size()), i.e. token texts
    # must be distinct, after an empty token i became "[EMPTY_i]".
    seen = {}
    for i, t in enumerate(tokens):
        t = t or f"[EMPTY_{i}]".encode()
        j = seen.setdefault(t, i)
        if j != i:
            raise meta.fail(f"tokens {j} and {i} of tokenizer.ggml.tokens are both {t[:40]!r} (a vocabulary needs distinct tokens)")
    # WPM (BERT) vocabularies have no byte tokens: llama-vocab.cpp token_to_byte GGML_ABORTs on one
    # while llama.cpp caches every token's text at load.
    if model == "bert" and meta.type_of("tokenizer.ggml.token_type") == "arr[i32]":
        types = meta.kv["tokenizer.ggml.token_type"][1]
        if (types[: len(tokens)] == BYTE_TOKEN).any():
            raise meta.fail("a WPM ('bert') vocabulary with byte tokens (token type 6)")


def _check_tensor_types(meta: GgufMeta) -> None:
    """Weights the CPU backend can compute with: matrices of MATRIX_TYPES (ggml-cpu crashes in mul_mat
    or get_rows, or the scheduler GGML_ASSERTs, on integer, f64, q8_1 and q8_K weights), and vectors
    (norms, biases) in f32 (ggml-cpu binary_op GGML_ABORTs on others; llama.cpp's converters always
    write 1-D tensors as f32)."""
    for name, t in meta.tensors.items():
        is_vector = all(d == 1 for d in t.shape[1:])
        if is_vector and t.type != "f32":
            raise meta.fail(f"tensor {name} is a vector of type {t.type}; llama.cpp computes with f32 vectors only")
        if not is_vector and t.type not in MATRIX_TYPES:
            raise meta.fail(f"tensor {name} has type {t.type}, which llama.cpp's CPU backend cannot multiply")
