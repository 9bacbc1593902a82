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

from ._loader import native
from . import schema

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


# -- heads files ------------------------------------------------------------------------------------

#: Bounds on a heads file's metadata, as in native Heads (kMaxHeads, kMaxLayers, kMaxDim).
MAX_HEADS = 256
MAX_LAYERS = 256
MAX_DIM = (1 << 24) - 1
#: A stored tree larger than this is damage (the context holds at most 256 leaves anyway).
MAX_TREE_PATHS = 1024
MAX_TREE_RANK = 1 << 15


def heads_info(meta: GgufMeta) -> dict:
    """The heads metadata the engine uses, every value type- and range-checked (ValueError naming
    the file and the key otherwise). Tensor shapes and types are checked by the native loader."""
    arch = meta.get_str("general.architecture")
    if arch != schema.ARCH:
        raise meta.fail(f"general.architecture is {arch!r}, not 'medusa' (is this a base model?)")
    version = meta.get_int(schema.KEY_SCHEMA_VERSION, 1, 2**31 - 1, required=False)
    if version is not None and version > schema.SCHEMA_VERSION:
        raise meta.fail(f"schema version {version} is newer than this medusa-edge ({schema.SCHEMA_VERSION})")
    info = {
        "n_heads": meta.get_int(schema.KEY_HEAD_COUNT, 1, MAX_HEADS),
        "n_layers": meta.get_int(schema.KEY_BLOCK_COUNT, 0, MAX_LAYERS),
        "n_embd": meta.get_int(schema.KEY_EMBEDDING_LENGTH, 1, MAX_DIM),
        "n_vocab": meta.get_int(schema.KEY_VOCAB_SIZE, 1, MAX_DIM),
        "shared_output": meta.get_bool(schema.KEY_SHARED_OUTPUT, False),
        "root_input": meta.get_bool(schema.KEY_ROOT_INPUT, False),
        "tree": meta.get_str(schema.KEY_TREE),
        "rank_accuracy": meta.get_str(schema.KEY_RANK_ACCURACY),
        "base_vocab_hash": meta.get_str(schema.KEY_BASE_VOCAB_HASH),
        "schema_version": version,
    }
    meta.get_int(schema.KEY_BASE_VOCAB_SIZE, 0, MAX_DIM, required=False)
    meta.get_int(schema.KEY_BASE_EMBEDDING_LENGTH, 0, MAX_DIM, required=False)
    h = info["base_vocab_hash"]
    if h is not None and (len(h) != 16 or any(c not in "0123456789abcdef" for c in h)):
        raise meta.fail(f"{schema.KEY_BASE_VOCAB_HASH} is {h!r}, not 16 lowercase hex digits")
    needed = info["n_heads"] * (2 * info["n_layers"] + (0 if info["shared_output"] else 1))
    if needed > len(meta.tensors):
        raise meta.fail(
            f"the metadata asks for {needed} tensors ({info['n_heads']} heads, {info['n_layers']} layers"
            f"{', shared output' if info['shared_output'] else ''}) but the file has {len(meta.tensors)}"
        )
    if info["root_input"] and info["n_layers"] < 1:
        raise meta.fail(f"{schema.KEY_ROOT_INPUT} is set but the heads have no ResBlock to read the root token")
    info["draft_vocab"] = _check_draft_vocab(meta, version or 1, info["n_vocab"])
    info["n_draft"] = info["n_vocab"] if info["draft_vocab"] is None else len(info["draft_vocab"])
    if info["tree"] is not None:
        _check_tree(meta, info["tree"], info["n_heads"], info["n_draft"])
    if info["rank_accuracy"] is not None:
        info["rank_accuracy"] = _check_rank_accuracy(meta, info["rank_accuracy"], info["n_heads"])
    return info


def _check_rank_accuracy(meta: GgufMeta, text: str, n_heads: int) -> list:
    """medusa.rank_accuracy: JSON [n_heads][k] of probabilities, each head's summing to at most 1."""
    def bad(why):
        return meta.fail(f"{schema.KEY_RANK_ACCURACY} is not valid: {why}")

    if len(text) > 64 * 1024:
        raise bad("longer than 64 KiB")
    try:
        acc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON ({type(e).__name__})") from None
    if not isinstance(acc, list) or len(acc) != n_heads:
        raise bad(f"not a list of {n_heads} lists (one per head)")
    for row in acc:
        if not isinstance(row, list) or not 1 <= len(row) <= 64:
            raise bad("each head needs a list of 1 to 64 accuracies")
        if any(type(a) not in (int, float) or not 0.0 <= a <= 1.0 for a in row) or sum(row) > 1.0 + 1e-3:
            raise bad("accuracies must be numbers in [0, 1] summing to at most 1 per head")
    return [[float(a) for a in row] for row in acc]


def _check_draft_vocab(meta: GgufMeta, version: int, n_vocab: int):
    """medusa.draft_vocab (schema 3), as native Heads::parse_draft_vocab checks it: an i32 array of
    1 to n_vocab ids, each in [0, n_vocab), strictly increasing. The ids (int32 array), or None."""
    key = schema.KEY_DRAFT_VOCAB
    if key not in meta.kv:
        return None
    if version < 3:
        raise meta.fail(f"{key} needs schema version 3, the file says {version}")
    t, v = meta.kv[key]
    if t != "arr[i32]":
        raise meta.fail(f"key {key} is of type {t}, not an array of i32")
    if not 1 <= len(v) <= n_vocab:
        raise meta.fail(f"{key} has {len(v)} ids, not 1 to n_vocab = {n_vocab}")
    ids = np.asarray(v, dtype=np.int32)
    bad = np.nonzero((ids < 0) | (ids >= n_vocab))[0]
    if len(bad):
        raise meta.fail(f"{key}[{bad[0]}] = {ids[bad[0]]} is outside [0, {n_vocab})")
    down = np.nonzero(np.diff(ids.astype(np.int64)) <= 0)[0]
    if len(down):
        i = int(down[0])
        raise meta.fail(f"{key} is not strictly increasing (ids {ids[i]}, {ids[i + 1]} at {i}, {i + 1}): ids must be unique and sorted")
    return ids


def _check_tree(meta: GgufMeta, text: str, n_heads: int, n_draft: int = MAX_TREE_RANK + 1) -> None:
    """medusa.tree: JSON list of paths, each a list of ranks (ints >= 0, below the draft vocabulary's
    size: a head proposes at most that many), prefix-closed, no deeper than the heads. Sizes are
    bounded before Tree.from_paths (whose cost grows with them)."""
    from .tree import Tree, TreeError

    def bad(why):
        return meta.fail(f"{schema.KEY_TREE} is not a valid tree: {why}")

    try:
        paths = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON ({type(e).__name__})") from None
    if not isinstance(paths, list) or len(paths) > MAX_TREE_PATHS:
        raise bad(f"not a list of at most {MAX_TREE_PATHS} paths")
    for p in paths:
        if not isinstance(p, list) or not 1 <= len(p) <= n_heads:
            raise bad(f"path {str(p)[:40]} is not a list of 1 to {n_heads} ranks (the file has {n_heads} heads)")
        hi = min(MAX_TREE_RANK, n_draft - 1)
        if any(type(r) is not int or not 0 <= r <= hi for r in p):
            raise bad(f"path {str(p)[:40]} holds a rank that is not an integer in [0, {hi}]"
                      + (f" (the draft vocabulary has {n_draft} tokens)" if n_draft <= MAX_TREE_RANK else ""))
    try:
        Tree.from_paths(paths)
    except TreeError as e:
        raise bad(str(e)) from None


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
