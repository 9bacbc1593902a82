"""A malformed GGUF never kills the process.

Mutants of small valid files, built deterministically (fixed seeds): bit flips, byte overwrites,
truncations, inserted and deleted bytes, and edits of the GGUF structure (values of other types,
huge or negative-as-unsigned counts and sizes, wrong shapes and tensor types, lying headers).

Heads files (own output matrices, and shared output): each mutant must either raise a clear error
(HeadsError naming the file, or TreeError) or load and decode exactly as plain decoding of the same
model does, which Medusa guarantees for any heads. The native loader is also called directly, past the
Python checks, and must give ValueError naming the file or load.

Model files: each mutant goes through ``Engine`` and a short greedy decode; any Python exception is
fine (llama.cpp refusing the file, or a damaged vocabulary refusing the prompt). Crashes are failures
for the classes of damage that medusa_edge guards (GUARDED_MODEL_CLASSES: gguf_file.check_model_file
stands in for llama.cpp's aborts there); crashes in the other classes are llama.cpp's own, printed.

Each file is loaded in a worker subprocess, a batch per worker, one result line per file; when a
worker dies by a signal or hangs, the next unreported file is recorded as the culprit and a new worker
goes on after it. Run with -s to see the counts.
"""

from __future__ import annotations

import os
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="workers are observed through POSIX signals")

# -- a small GGUF writer that can lie -----------------------------------------------------------------
# Trusted parse of a valid file into a Doc, edits on the Doc, serialisation with any types, counts and
# offsets the mutation asks for (gguf-py's writer refuses most of them).

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# ggml types: block size and bytes per block
GGML_TYPES = {0: (1, 4), 1: (1, 2), 8: (32, 34), 12: (256, 144), 14: (256, 210), 15: (256, 292), 24: (1, 1), 26: (1, 4),
              28: (1, 8), 30: (1, 2), 9: (32, 36)}


@dataclass
class Tensor:
    name: bytes
    shape: list  # ggml order
    type: int
    data: bytes


@dataclass
class Doc:
    version: int
    kvs: list  # [key bytes, type, value]; arrays: value = (elem type, list)
    tensors: list
    alignment: int = 32
    meta_end: int = 0  # where the data section starts in the parsed file


def parse_gguf(raw: bytes) -> Doc:
    """Parse a valid GGUF (our own fixtures only: no checks)."""
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, raw, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        s = raw[pos : pos + n]
        pos += n
        return s

    def value(t):
        if t == STR:
            return string()
        if t == ARR:
            et, n = take("<I"), take("<Q")
            return (et, [value(et) for _ in range(n)])
        return take(_FMT[t])

    assert raw[:4] == b"GGUF"
    pos = 4
    version, n_t, n_kv = take("<I"), take("<Q"), take("<Q")
    kvs = []
    for _ in range(n_kv):
        k = string()
        t = take("<I")
        kvs.append([k, t, value(t)])
    infos = []
    for _ in range(n_t):
        name = string()
        nd = take("<I")
        shape = [take("<Q") for _ in range(nd)]
        infos.append((name, shape, take("<I"), take("<Q")))
    align = next((v for k, t, v in kvs if k == b"general.alignment"), 32)
    data_off = (pos + align - 1) // align * align
    tensors = []
    for name, shape, typ, off in infos:
        blk, bpb = GGML_TYPES[typ]
        nbytes = int(np.prod(shape)) // blk * bpb
        tensors.append(Tensor(name, list(shape), typ, raw[data_off + off : data_off + off + nbytes]))
    return Doc(version, kvs, tensors, align, data_off)


def enc_value(t, v) -> bytes:
    if t == STR:
        return struct.pack("<Q", len(v)) + v
    if t == ARR:
        et, items = v[:2]
        n = v[2] if len(v) > 2 else len(items)  # a lying count
        return struct.pack("<IQ", et, n) + b"".join(enc_value(et, x) for x in items)
    return struct.pack(_FMT[t], v)


def write_gguf(doc: Doc, *, n_tensors=None, n_kv=None, magic=b"GGUF", offsets=None) -> bytes:
    """Serialise ``doc``; offsets are consecutive and aligned unless ``offsets`` overrides them."""
    out = [magic, struct.pack("<IQQ", doc.version, len(doc.tensors) if n_tensors is None else n_tensors,
                              len(doc.kvs) if n_kv is None else n_kv)]
    for k, t, v in doc.kvs:
        out.append(enc_value(STR, k) + struct.pack("<I", t) + enc_value(t, v))
    off, data = 0, []
    for i, tn in enumerate(doc.tensors):
        o = off if offsets is None else offsets[i]
        out.append(enc_value(STR, tn.name) + struct.pack("<I", len(tn.shape)) + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in tn.shape)
                   + struct.pack("<IQ", tn.type, o & (2**64 - 1)))
        pad = (-len(tn.data)) % doc.alignment
        data.append(tn.data + b"\0" * pad)
        off += len(tn.data) + pad
    head = b"".join(out)
    head += b"\0" * ((-len(head)) % doc.alignment)
    return head + b"".join(data)


def copy_doc(doc: Doc) -> Doc:
    return Doc(doc.version, [list(kv) for kv in doc.kvs], [Tensor(t.name, list(t.shape), t.type, t.data) for t in doc.tensors], doc.alignment)


# -- mutations ------------------------------------------------------------------------------------------


@dataclass
class Mutant:
    id: str  # file name stem; unique
    cls: str  # class of damage, e.g. "retype", "bitflip"
    desc: str  # what was done
    data: bytes


# values of every GGUF type, for retyping a key
RETYPES = [(BOOL, True), (U8, 255), (I8, -1), (U16, 65535), (I16, -1), (U32, 2**32 - 1), (I32, -1), (F32, float("nan")),
           (F64, 1e300), (U64, 2**64 - 1), (I64, -(2**63)), (STR, b"x"), (STR, b""), (ARR, (U32, [1, 2])),
           (ARR, (STR, [b"a"])), (ARR, (U8, []))]
# integer values for size-like keys: zero, tiny, huge, negative stored as unsigned, truncating u64
INT_VALUES = [(U32, 0), (U32, 1), (U32, 2), (U32, 2**16), (U32, 2**24), (U32, 2**31 - 1), (U32, 2**31), (U32, 2**32 - 1),
              (I32, -1), (I32, -(2**31)), (U64, 2**63), (U64, 2**64 - 1), (I64, -1), (U8, 3), (I16, 2)]
TENSOR_TYPES = [1, 8, 12, 14, 15, 24, 26, 28, 30, 9, 4, 31, 99, 2**31]  # f16 q8_0 q4_K q6_K q8_K i8 i32 f64 bf16 q8_1, gone, bogus


def structural_mutants(doc: Doc, tag: str, int_keys: list, str_keys: dict, tensor_names: list, rng) -> list:
    ms = []

    def add(cls, desc, data):
        ms.append(Mutant(f"{tag}-{len(ms):04d}-{cls}", cls, desc, data))

    def with_kv(edit):
        d = copy_doc(doc)
        edit(d)
        return write_gguf(d)

    keys = [kv[0] for kv in doc.kvs]
    for i, k in enumerate(keys):
        add("drop-key", f"drop {k.decode()}", with_kv(lambda d, i=i: d.kvs.pop(i)))
        for t, v in RETYPES:
            add("retype", f"{k.decode()} as type {t} = {v!r}"[:120], with_kv(lambda d, i=i, t=t, v=v: d.kvs.__setitem__(i, [k, t, v])))
    for k in int_keys:
        i = keys.index(k)
        for t, v in INT_VALUES:
            add("int-value", f"{k.decode()} = {v} (type {t})", with_kv(lambda d, i=i, t=t, v=v: d.kvs.__setitem__(i, [k, t, v])))
    for k, values in str_keys.items():
        i = keys.index(k) if k in keys else None
        for v in values:
            if i is None:
                add("str-value", f"add {k.decode()} = {v[:40]!r}", with_kv(lambda d, v=v, k=k: d.kvs.append([k, STR, v])))
            else:
                add("str-value", f"{k.decode()} = {v[:40]!r}", with_kv(lambda d, i=i, v=v, k=k: d.kvs.__setitem__(i, [k, STR, v])))
    # duplicate key, empty key, lying array count
    add("dup-key", "first key twice", with_kv(lambda d: d.kvs.append(list(d.kvs[0]))))
    add("dup-key", "empty key", with_kv(lambda d: d.kvs.append([b"", U32, 1])))
    for i, (k, t, v) in enumerate(doc.kvs):
        if t == ARR:
            for n in (0, len(v[1]) + 1, 2**31, 2**63):
                add("array-count", f"{k.decode()} claims {n} elements", with_kv(lambda d, i=i, n=n: d.kvs.__setitem__(i, [k, ARR, (v[0], v[1], n)])))
            if v[1]:
                add("array-count", f"{k.decode()} one element short", with_kv(lambda d, i=i: d.kvs.__setitem__(i, [k, ARR, (v[0], v[1][:-1])])))
    # header
    for h in [dict(n_tensors=len(doc.tensors) + 1), dict(n_tensors=max(len(doc.tensors) - 1, 0)), dict(n_tensors=2**40),
              dict(n_tensors=2**63), dict(n_tensors=2**64 - 1), dict(n_kv=len(doc.kvs) + 1), dict(n_kv=2**40), dict(n_kv=2**64 - 1),
              dict(magic=b"GGUG")]:
        add("header", f"header {h}", write_gguf(doc, **h))
    for v in (0, 1, 2, 4, 2**31, 0x03000000):
        d = copy_doc(doc)
        d.version = v
        add("header", f"version {v}", write_gguf(d))
    for v in ((U32, 0), (U32, 3), (U32, 2**31), (STR, b"32"), (U32, 64)):
        d = copy_doc(doc)
        d.kvs.append([b"general.alignment", *v])
        if v == (U32, 64):
            d.alignment = 64  # valid: a different alignment, honoured
        add("alignment", f"general.alignment = {v}", write_gguf(d))
    # tensors
    names = [t.name for t in doc.tensors]
    for nm in tensor_names:
        j = names.index(nm)
        src = doc.tensors[j]

        def with_t(edit, j=j):
            d = copy_doc(doc)
            edit(d.tensors[j], d)
            return write_gguf(d)

        add("tensor", f"{nm.decode()} renamed", with_t(lambda t, d: setattr(t, "name", t.name + b"x")))
        add("tensor", f"{nm.decode()} duplicated name", with_t(lambda t, d: setattr(d.tensors[j - 1 if j else j + 1], "name", t.name)))
        shapes = [src.shape[::-1], [src.shape[0] * 2] + src.shape[1:], [src.shape[0] // 2, 2] + src.shape[1:] if len(src.shape) == 1 else
                  [src.shape[0], src.shape[1] // 2, 2], src.shape + [1, 1, 1, 1], [src.shape[0]] * 2 + [0], [2**62, 4], [-1 % 2**64] + src.shape[1:]]
        for sh in shapes:
            add("tensor-shape", f"{nm.decode()} shape {sh} (data unchanged)", with_t(lambda t, d, sh=sh: setattr(t, "shape", sh)))
        for ty in TENSOR_TYPES:
            add("tensor-type", f"{nm.decode()} type {ty} (data unchanged)", with_t(lambda t, d, ty=ty: setattr(t, "type", ty)))
            if ty in GGML_TYPES:
                blk, bpb = GGML_TYPES[ty]
                if src.shape[0] % blk == 0:
                    n = int(np.prod(src.shape)) // blk * bpb
                    junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                    add("tensor-type", f"{nm.decode()} type {ty} with data resized", with_t(
                        lambda t, d, ty=ty, junk=junk: (setattr(t, "type", ty), setattr(t, "data", junk))))
        for delta in (1, 32, -32, 2**40, 2**64 - 32):
            offs, off = [], 0
            for t in doc.tensors:
                offs.append(off)
                off += len(t.data) + (-len(t.data)) % doc.alignment
            offs[j] = (offs[j] + delta) % 2**64
            add("tensor-offset", f"{nm.decode()} offset {delta:+d}", write_gguf(doc, offsets=offs))
    return ms


def raw_mutants(raw: bytes, tag: str, n: int, rng) -> list:
    """Bit flips, byte overwrites, truncations, insertions, deletions; 3 in 4 aimed at the metadata."""
    meta_end = parse_gguf(raw).meta_end
    ms = []
    kinds = ["bitflip", "bytes", "truncate", "insert", "delete"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        hi = meta_end if rng.random() < 0.75 else len(raw)
        at = int(rng.integers(4, hi))  # the magic is a separate case (header mutants)
        b = bytearray(raw)
        if kind == "bitflip":
            flips = [(int(rng.integers(4, hi)) if k else at, int(rng.integers(0, 8))) for k in range(int(rng.integers(1, 9)))]
            for p, bit in flips:
                b[p] ^= 1 << bit
            desc = "flip " + ", ".join(f"bit {bit} of byte {p}" for p, bit in flips)
        elif kind == "bytes":
            n_b = int(rng.integers(1, 9))
            fill = [b"\x00" * n_b, b"\xff" * n_b, bytes(rng.integers(0, 256, n_b, dtype=np.uint8)), b"\x7f" + b"\xff" * (n_b - 1)][i % 4]
            b[at : at + n_b] = fill
            desc = f"bytes {at}..{at + n_b} := {fill.hex()}"
        elif kind == "truncate":
            b = b[:at]
            desc = f"truncated to {at} bytes"
        elif kind == "insert":
            ins = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
            b[at:at] = ins
            desc = f"inserted {ins.hex()} at {at}"
        else:
            n_b = int(rng.integers(1, 9))
            del b[at : at + n_b]
            desc = f"deleted {n_b} bytes at {at}"
        ms.append(Mutant(f"{tag}-raw{i:04d}-{kind}", kind, desc, bytes(b)))
    return ms


# -- heads mutants ----------------------------------------------------------------------------------------

HEADS_INT_KEYS = [b"medusa.schema_version", b"medusa.head_count", b"medusa.block_count", b"medusa.embedding_length", b"medusa.vocab_size"]
HEADS_STR_KEYS = {
    b"medusa.tree": [b"[[0],[0,0],[1]]", b"", b"[", b"{}", b'"x"', b"[]", b"[[-1]]", b"[[0,0]]", b"[[0],[0,0,0,0,0,0,0]]", b"[[1e999]]",
                     b"[[0.5]]", b"[[true]]", b"[[" + b"9" * 5000 + b"]]", b"[" * 100000, b"[[0]]" * 3, b"\xff\xfe", b"[[0]," * 3000 + b"]",
                     b"[" + b",".join(b"[%d]" % r for r in range(5000)) + b"]", b"[[40000]]", b"[[0],[0]]"],
    b"medusa.base.vocab_hash": [b"", b"zz", b"0123456789ABCDEF", b"\xff" * 16, b"0" * 16, b"0" * 17],
    b"general.architecture": [b"llama", b"", b"\xffmedusa", b"medusa\x00x"],
}


def heads_mutants(tmp, rng):
    from medusa_edge.testing import write_llama_gguf, write_random_heads

    base = write_llama_gguf(str(tmp / "base.gguf"), n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=32, seed=3)
    seeds = {
        "own": write_random_heads(str(tmp / "own.medusa.gguf"), base, n_heads=3, n_layers=1, seed=4, head_type="f32",
                                  tree=[[0], [0, 0], [1]]),
        "shared": write_random_heads(str(tmp / "shared.medusa.gguf"), base, n_heads=3, n_layers=1, seed=5, head_type="q8_0",
                                     shared_output=True),
    }
    ms = []
    for tag, hw in seeds.items():
        raw = open(hw.path, "rb").read()
        doc = parse_gguf(raw)
        names = [t.name for t in doc.tensors]
        pick = [names[0], names[1]] + ([b"medusa.0.output.weight"] if tag == "own" else [])
        ms.append(Mutant(f"{tag}-valid", "valid", "unchanged", raw))
        ms += structural_mutants(doc, tag, HEADS_INT_KEYS, HEADS_STR_KEYS if tag == "own" else {}, pick, rng)
        ms += raw_mutants(raw, tag, 150, rng)
    return base, ms


# -- model mutants ----------------------------------------------------------------------------------------

MODEL_INT_KEYS = [b"llama.context_length", b"llama.embedding_length", b"llama.block_count", b"llama.feed_forward_length",
                  b"llama.attention.head_count", b"llama.attention.head_count_kv", b"llama.rope.dimension_count",
                  b"llama.vocab_size", b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.unknown_token_id"]
MODEL_STR_KEYS = {
    b"general.architecture": [b"gpt2", b"mamba", b"bert", b"t5", b"qwen2", b"", b"\xff"],
    b"tokenizer.ggml.model": [b"gpt2", b"bert", b"t5", b"rwkv", b"ugm", b"none", b"no_vocab", b"", b"zzz"],
    b"tokenizer.chat_template": [b"{{", b"{% for m in messages %}{{ m.content }}{% endfor %}", b"\xff"],
}


def vocab_mutants(doc: Doc, tag: str) -> list:
    """Edits of the token list and its companions that llama.cpp's vocab loader may not survive."""
    ms = []
    keys = [kv[0] for kv in doc.kvs]
    ti, si, yi = (keys.index(k) for k in (b"tokenizer.ggml.tokens", b"tokenizer.ggml.scores", b"tokenizer.ggml.token_type"))
    toks = doc.kvs[ti][2][1]

    def add(cls, desc, edit):
        d = copy_doc(doc)
        edit(d)
        ms.append(Mutant(f"{tag}-{cls}-{len(ms):03d}", cls, desc, write_gguf(d)))

    def set_tok(d, j, v):
        d.kvs[ti][2] = (STR, toks[:j] + [v] + toks[j + 1 :])

    for j, src in [(500, 400), (300, 3), (5, 6), (1, 2), (645, 0), (259, 260)]:
        add("dup-token", f"token {j} := token {src} ({toks[src]!r})", lambda d, j=j, src=src: set_tok(d, j, toks[src]))
    for j in (0, 1, 100, 500):
        add("empty-token", f"token {j} empty", lambda d, j=j: set_tok(d, j, b""))
    add("empty-token", "token 100 empty and token 101 '[EMPTY_100]'",
        lambda d: (set_tok(d, 100, b""), d.kvs[ti].__setitem__(2, (STR, d.kvs[ti][2][1][:101] + [b"[EMPTY_100]"] + toks[102:]))))
    for j, v in [(10, b"<0xZZ>"), (10, b"<0x0A"), (13, b"\xff\xfe"), (300, b"\x00"), (300, b"a" * 5000), (13, b"<0x0A>")]:
        add("odd-token", f"token {j} := {v[:20]!r}", lambda d, j=j, v=v: set_tok(d, j, v))
    add("short-array", "scores one short", lambda d: d.kvs[si].__setitem__(2, (F32, d.kvs[si][2][1][:-1])))
    add("short-array", "token_type one short", lambda d: d.kvs[yi].__setitem__(2, (I32, d.kvs[yi][2][1][:-1])))
    add("short-array", "tokens one short", lambda d: d.kvs[ti].__setitem__(2, (STR, toks[:-1])))
    add("short-array", "tokens empty", lambda d: d.kvs[ti].__setitem__(2, (STR, [])))
    add("short-array", "tokens, scores, types: 3 each", lambda d: (d.kvs[ti].__setitem__(2, (STR, toks[:3])),
                                                                   d.kvs[si].__setitem__(2, (F32, d.kvs[si][2][1][:3])),
                                                                   d.kvs[yi].__setitem__(2, (I32, d.kvs[yi][2][1][:3]))))
    for et, v in [(I32, 0), (U32, 0), (F32, 0.0), (U8, 0), (I64, 0)]:
        add("array-type", f"token_type as type {et}", lambda d, et=et, v=v: d.kvs[yi].__setitem__(2, (et, [v] * len(toks))))
        add("array-type", f"scores as type {et}", lambda d, et=et, v=v: d.kvs[si].__setitem__(2, (et, [v] * len(toks))))
    for v in (-1, 99, 2**31 - 1, 7, 0):
        add("token-type", f"all token types {v}", lambda d, v=v: d.kvs[yi].__setitem__(2, (I32, [v] * len(toks))))
    add("token-type", "no byte tokens (type 1)", lambda d: d.kvs[yi].__setitem__(2, (I32, [1] * len(toks))))
    add("token-type", "all tokens byte-typed", lambda d: d.kvs[yi].__setitem__(2, (I32, [6] * len(toks))))
    mi = keys.index(b"tokenizer.ggml.model")
    add("token-type", "WPM ('bert') vocabulary with its byte tokens", lambda d: d.kvs[mi].__setitem__(2, b"bert"))
    add("scores", "scores NaN", lambda d: d.kvs[si].__setitem__(2, (F32, [float("nan")] * len(toks))))
    return ms


#: keys llama.cpp reads when present (absent from the fixture), with damaged values
MODEL_EXTRA_KEYS = [
    (b"llama.nextn_predict_layers", U32, 1), (b"llama.nextn_predict_layers", U32, 2), (b"llama.nextn_predict_layers", U32, 2**32 - 1),
    (b"llama.expert_count", U32, 2000), (b"llama.expert_count", U32, 4), (b"llama.expert_used_count", U32, 2),
    (b"llama.expert_used_count", ARR, (U32, [2])), (b"llama.expert_group_count", U32, 3),
    (b"llama.rope.scaling.type", STR, b"bogus"), (b"llama.rope.scaling.type", STR, b"yarn"), (b"llama.rope.scaling.factor", F32, 0.0),
    (b"llama.rope.freq_base", F32, float("nan")), (b"llama.rope.freq_base", F32, 0.0), (b"llama.attention.sliding_window", U32, 2**32 - 1),
    (b"llama.attention.layer_norm_rms_epsilon", F32, float("inf")), (b"llama.embedding_length_out", U32, 7),
    (b"llama.attention.key_length", U32, 7), (b"llama.attention.value_length", U32, 2**31), (b"llama.vocab_size", U32, 10**6),
    (b"tokenizer.ggml.padding_token_id", U32, 2**31), (b"tokenizer.ggml.eot_token_id", I32, -5),
    (b"tokenizer.ggml.merges", ARR, (STR, [b"a b", b"zz", b""])), (b"tokenizer.ggml.precompiled_charsmap", ARR, (U8, [1, 2, 3])),
    (b"tokenizer.ggml.add_space_prefix", U32, 1), (b"general.alignment", U32, 1),
]


def model_mutants(tmp, rng):
    from medusa_edge.testing import write_llama_gguf

    base = write_llama_gguf(str(tmp / "model.gguf"), n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=32, seed=6)
    raw = open(base.path, "rb").read()
    doc = parse_gguf(raw)
    ms = [Mutant("model-valid", "valid", "unchanged", raw)]
    struct_ms = structural_mutants(doc, "model", MODEL_INT_KEYS, MODEL_STR_KEYS,
                                   [b"token_embd.weight", b"blk.0.attn_q.weight", b"output_norm.weight", b"output.weight"], rng)
    # every retype of every key is a lot of files for one class of damage; keep a deterministic quarter
    ms += [m for k, m in enumerate(struct_ms) if m.cls != "retype" or k % 4 == 0]
    ms += vocab_mutants(doc, "model")
    for k, (key, t, v) in enumerate(MODEL_EXTRA_KEYS):
        d = copy_doc(doc)
        d.kvs = [kv for kv in d.kvs if kv[0] != key] + [[key, t, v]]
        ms.append(Mutant(f"model-addkey-{k:03d}", "add-key", f"{key.decode()} = {v!r} (type {t})"[:120], write_gguf(d)))
    ms += raw_mutants(raw, "model", 200, rng)
    # self-consistent files whose sizes do not make an attention model
    for k, kw in enumerate([dict(n_head=4, n_head_kv=3), dict(n_embd=60, n_head=4, n_head_kv=2), dict(n_embd=36, n_head=4, n_head_kv=4),
                            dict(n_head=8, n_head_kv=8), dict(n_ff=1), dict(n_embd=32, n_head=32, n_head_kv=1)]):
        p = str(tmp / f"hp{k}.gguf")
        write_llama_gguf(p, n_layer=1, **{"n_embd": 32, "n_head": 2, "n_head_kv": 1, "n_ff": 32, "seed": 7, **kw})
        ms.append(Mutant(f"model-hparams-{k}", "hparams", f"written with {kw}", open(p, "rb").read()))
    # a Unigram (T5) vocabulary with a damaged precompiled charsmap: the tokenizer walks it
    mi = [kv[0] for kv in doc.kvs].index(b"tokenizer.ggml.model")
    for k in range(6):
        blob = rng.integers(0, 256, 64 + 32 * k, dtype=np.uint8).tobytes()
        blob = struct.pack("<I", [16, 32, 0, 4, 60, 2**31][k]) + blob
        d = copy_doc(doc)
        d.kvs[mi][2] = b"t5"
        d.kvs.append([b"tokenizer.ggml.precompiled_charsmap", ARR, (U8, list(blob))])
        ms.append(Mutant(f"model-charsmap-{k}", "charsmap", f"t5 vocabulary, charsmap of {len(blob)} random bytes", write_gguf(d)))
    return base, ms


# -- driver ---------------------------------------------------------------------------------------------

WORKER_TIMEOUT_S = 20.0  # per file; tiny files load in milliseconds


def run_workers(mode: str, files: list, args: list, n_workers: int = 2) -> list:
    """Results [(status, detail)] in the order of ``files``, each file run once. Workers
    (``python test_fuzz.py worker MODE ARGS...``) get their files on stdin, one per line, and print
    ``RESULT <i> <status> <detail>`` after each. A worker that dies or stalls is replaced; the file it
    was on gets ("crash", signal and the assert from its stderr) or ("hang", ...)."""
    results = [None] * len(files)
    chunks = [list(range(w, len(files), n_workers)) for w in range(n_workers)]

    def drive(todo, wid):
        errlog = f"{files[0]}.worker{wid}.stderr" if files else os.devnull
        idle = 0  # workers in a row that reported nothing: a broken worker, not a broken file
        while todo and idle < 5:
            with open(errlog, "wb") as err:
                proc = subprocess.Popen([sys.executable, __file__, "worker", mode, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1"})
            proc.stdin.write("".join(f"{i}\t{files[i]}\n" for i in todo).encode())
            proc.stdin.close()
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            buf, done, last = b"", set(), time.monotonic()
            stalled = False
            while True:
                if not sel.select(timeout=1.0):
                    if time.monotonic() - last > WORKER_TIMEOUT_S:
                        stalled = True
                        proc.kill()  # our own child, by its handle
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                last = time.monotonic()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.startswith(b"RESULT\t"):
                        _, i, status, detail = line.decode("utf-8", "replace").split("\t", 3)
                        results[int(i)] = (status, detail)
                        done.add(int(i))
            proc.wait()
            sel.close()
            todo = [i for i in todo if i not in done]
            idle = 0 if done else idle + 1
            if not todo:
                break
            culprit = todo.pop(0)
            # the assert or exception that killed it, else the end of its stderr
            lines = open(errlog, "rb").read().decode("utf-8", "replace").strip().splitlines()[-20:]
            tail = " | ".join([l for l in lines if "GGML_ASSERT" in l or "error" in l or "terminate" in l][-2:] or lines[-3:])[-500:]
            if stalled:
                results[culprit] = ("hang", f"no result within {WORKER_TIMEOUT_S:.0f} s; stderr: {tail}")
            else:
                rc = proc.returncode
                how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
                results[culprit] = ("crash", f"{how}; stderr: {tail}")

    threads = [threading.Thread(target=drive, args=(c, w)) for w, c in enumerate(chunks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [files[i] for i, r in enumerate(results) if r is None]
    assert not missing, f"5 workers in a row died without a result (a broken worker?), {len(missing)} files not run; see *.stderr"
    return results


def write_mutants(tmp, ms) -> list:
    paths = []
    for m in ms:
        p = str(tmp / f"{m.id}.gguf")
        with open(p, "wb") as f:
            f.write(m.data)
        paths.append(p)
    return paths


def summarize(title, ms, results):
    log = os.environ.get("MEDUSA_FUZZ_LOG")  # every mutant's outcome, for a closer look
    if log:
        with open(log, "a") as f:
            for m, (status, detail) in zip(ms, results):
                f.write(f"{title}\t{m.id}\t{m.cls}\t{m.desc}\t{status}\t{detail}\n")
    counts = {"tried": len(ms), "loaded ok": 0, "clear errors": 0, "crashes": 0, "hangs": 0, "other": 0}
    for status, _ in results:
        key = {"ok": "loaded ok", "error": "clear errors", "crash": "crashes", "hang": "hangs"}.get(status, "other")
        counts[key] += 1
    print(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def failures(ms, results, paths, statuses, only=None):
    bad = []
    for m, (status, detail), p in zip(ms, results, paths):
        if status in statuses and (only is None or only(m)):
            bad.append(f"{os.path.basename(p)} [{m.cls}: {m.desc}] -> {status}: {detail[:300]}")
    return bad


def test_fuzz_heads_files(tmp_path):
    rng = np.random.default_rng(20240607)
    base, ms = heads_mutants(tmp_path, rng)
    assert len(ms) >= 500
    paths = write_mutants(tmp_path, ms)
    results = run_workers("heads", paths, [base.path])
    counts = summarize("heads files", ms, results)
    bad = failures(ms, results, paths, {"crash", "hang", "unclear", "wrong"})
    assert not bad, f"{len(bad)} of {len(ms)} heads mutants misbehaved:\n" + "\n".join(bad[:40])
    assert counts["loaded ok"] > 100 and counts["clear errors"] > 300  # both outcomes well exercised
    by_cls = {m.cls: s for m, (s, _) in zip(ms, results)}
    assert by_cls["valid"] == "ok"


#: Damage classes with zero crashes required: llama.cpp errors out on them by itself, or
#: gguf_file.check_model_file refuses what it would abort on (block_count, expert counts, rope,
#: head_count_kv, tokenizer model, duplicate tokens, tensor types and alignment: see there).
#: Not listed: "charsmap" (a Unigram vocabulary's precompiled charsmap, parsed by llama.cpp's
#: tokenizer; no crash seen, not guarded): a crash there is printed, not failed.
GUARDED_MODEL_CLASSES = {
    "valid", "drop-key", "retype", "int-value", "str-value", "dup-key", "array-count", "header", "alignment", "tensor",
    "tensor-shape", "tensor-type", "tensor-offset", "dup-token", "empty-token", "odd-token", "short-array", "array-type",
    "token-type", "scores", "add-key", "hparams", "bitflip", "bytes", "truncate", "insert", "delete",
}


def test_fuzz_model_files(tmp_path):
    rng = np.random.default_rng(20240608)
    base, ms = model_mutants(tmp_path, rng)
    paths = write_mutants(tmp_path, ms)
    results = run_workers("model", paths, [])
    summarize("model files", ms, results)
    unguarded = failures(ms, results, paths, {"crash", "hang"}, only=lambda m: m.cls not in GUARDED_MODEL_CLASSES)
    if unguarded:
        print(f"llama.cpp still aborts on {len(unguarded)} (unguarded classes):\n" + "\n".join(unguarded))
    bad = failures(ms, results, paths, {"crash", "hang", "unclear"}, only=lambda m: m.cls in GUARDED_MODEL_CLASSES)
    assert not bad, f"{len(bad)} of {len(ms)} model mutants crashed or hung:\n" + "\n".join(bad[:40])
    assert dict(zip([m.cls for m in ms], [s for s, _ in results]))["valid"] == "ok"


# -- worker ---------------------------------------------------------------------------------------------


def _worker(mode: str, args: list) -> None:
    import resource

    # A mutant that makes the loader allocate gigabytes shows up as an error or a crash, not a swapping machine.
    try:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    except (ValueError, OSError):  # not settable here (macOS): the test still runs, without that bound
        pass
    from medusa_edge import Engine, HeadsError, ModelLoadError, SamplingParams
    from medusa_edge._loader import native
    from medusa_edge.core.tree import TreeError

    greedy = SamplingParams(temperature=0.0)

    def decode(e, prompt, n):
        return [t for new in e.generate(prompt, greedy, n) for t in new]

    def report(i, status, detail=""):
        print(f"RESULT\t{i}\t{status}\t{detail}".replace("\n", " "), flush=True)

    if mode == "heads":
        model = args[0]
        plain = Engine(model, tree=None, n_ctx=64, n_threads=1)
        prompt = [1, 100, 200, 300]
        expected = decode(plain, prompt, 8)
        del plain
    for line in sys.stdin:
        i, path = line.rstrip("\n").split("\t")
        name = os.path.basename(path)
        if mode == "heads":
            # 1. the native loader alone, past the Python checks
            try:
                native.Heads(path, model, 1)
            except ValueError as e:
                if name not in str(e):
                    report(i, "unclear", f"native ValueError without the file name: {e}")
                    continue
            except Exception as e:  # noqa: BLE001
                report(i, "unclear", f"native {type(e).__name__}: {e}")
                continue
            # 2. the engine: a clear error, or the same text as plain decoding
            try:
                got = decode(Engine(model, path, tree="chain:2", n_ctx=64, n_threads=1), prompt, 8)
            except HeadsError as e:
                report(i, "error" if name in str(e) else "unclear", f"HeadsError: {e}")
                continue
            except TreeError as e:
                report(i, "error", f"TreeError: {e}")
                continue
            except Exception as e:  # noqa: BLE001
                report(i, "unclear", f"{type(e).__name__}: {e}")
                continue
            report(i, "ok" if got == expected else "wrong", f"{got} vs {expected}")
        else:
            try:
                e = Engine(path, tree=None, n_ctx=64, n_threads=1)
            except ModelLoadError as ex:
                report(i, "error" if name in str(ex) else "unclear", f"ModelLoadError: {ex}")
                continue
            except Exception as ex:  # noqa: BLE001
                report(i, "unclear", f"load {type(ex).__name__}: {ex}")
                continue
            try:
                prompt = e.model.tokenize("the water is", True, False) or [0]
                got = decode(e, prompt, 4)
            except Exception as ex:  # noqa: BLE001  a damaged vocabulary may refuse the prompt: still no crash
                report(i, "error", f"decode {type(ex).__name__}: {ex}")
                continue
            report(i, "ok", str(got))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3:])
