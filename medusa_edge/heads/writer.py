"""Write a heads GGUF (the "medusa" sidecar) from arrays, following ``schema``.

Used by the converter, the heads trainer and the tests. Weights are numpy arrays in torch
layout: ResBlock weight [H, H] (out, in), bias [H], W_out [V, H].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from medusa_edge.heads import schema

HEAD_TYPES = ("f32", "f16", "q8_0")


@dataclass
class HeadsMeta:
    n_heads: int
    n_layers: int
    n_embd: int
    n_vocab: int
    shared_output: bool
    tree: Optional[Sequence[Sequence[int]]]
    base_vocab_hash: str
    rank_accuracy: Optional[Sequence[Sequence[float]]] = None  # [n_heads][k], see schema
    root_input: bool = False  # the first ResBlock reads [h; e(root)] (schema version 2)
    # the full ids the heads score, strictly increasing (schema version 3); None: all n_vocab
    draft_vocab: Optional[Sequence[int]] = None


def write_heads_gguf(
    path: str,
    meta: HeadsMeta,
    tensors: Iterable[tuple[str, np.ndarray]],
    head_type: str = "f16",
    progress=None,
) -> None:
    """Write ``tensors`` (schema names -> torch-layout arrays, consumed one at a time) to ``path``.
    An item ``(name, data, qtype)`` is written as already encoded in GGML type ``qtype`` (what
    ``restrict_heads_file`` copies).

    The file is written to ``path + '.tmp'`` and renamed at the end, so a failure leaves nothing.
    """
    import gguf

    if head_type not in HEAD_TYPES:
        raise ValueError(f"heads type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, schema.ARCH)
    try:
        _add_heads_meta(w, meta, head_type)
        for item in tensors:
            if len(item) == 3:
                name, data, qtype = item
                w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
                continue
            name, arr = item
            qtype = heads_tensor_type(name, arr.shape, head_type)
            w.add_tensor(name, _encode_block(arr, qtype), raw_dtype=qtype)
            if progress is not None:
                progress(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _add_heads_meta(w, meta: HeadsMeta, head_type: str) -> None:
    if meta.root_input and meta.n_layers < 1:
        raise ValueError("root_input heads need at least one ResBlock")
    draft = None if meta.draft_vocab is None else check_draft_vocab(meta.draft_vocab, meta.n_vocab)
    w.add_uint32(schema.KEY_SCHEMA_VERSION, 3 if draft is not None else 2 if meta.root_input else 1)
    w.add_uint32(schema.KEY_HEAD_COUNT, meta.n_heads)
    w.add_uint32(schema.KEY_BLOCK_COUNT, meta.n_layers)
    w.add_uint32(schema.KEY_EMBEDDING_LENGTH, meta.n_embd)
    w.add_uint32(schema.KEY_VOCAB_SIZE, meta.n_vocab)
    w.add_bool(schema.KEY_SHARED_OUTPUT, meta.shared_output)
    if meta.root_input:
        w.add_bool(schema.KEY_ROOT_INPUT, True)
    if draft is not None:
        w.add_array(schema.KEY_DRAFT_VOCAB, [int(t) for t in draft])
    if meta.tree is not None:
        w.add_string(schema.KEY_TREE, json.dumps([list(map(int, p)) for p in meta.tree]))
    if meta.rank_accuracy is not None:
        w.add_string(schema.KEY_RANK_ACCURACY, json.dumps([[round(float(a), 5) for a in r] for r in meta.rank_accuracy]))
    w.add_uint32(schema.KEY_BASE_VOCAB_SIZE, meta.n_vocab)
    w.add_uint32(schema.KEY_BASE_EMBEDDING_LENGTH, meta.n_embd)
    w.add_string(schema.KEY_BASE_VOCAB_HASH, meta.base_vocab_hash)
    w.add_file_type(0 if head_type == "f32" else 1 if head_type == "f16" else 7)


def check_draft_vocab(ids, n_vocab: int) -> np.ndarray:
    """``ids`` as an int32 array, checked as the schema requires (ValueError otherwise): 1 to
    n_vocab full ids, each in [0, n_vocab), strictly increasing."""
    a = np.asarray(ids)
    if a.ndim != 1 or not 1 <= len(a) <= n_vocab:
        raise ValueError(f"a draft vocabulary needs 1 to n_vocab = {n_vocab} ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"draft vocabulary ids must be integers, got {a.dtype}")
    if int(a.min()) < 0 or int(a.max()) >= n_vocab:
        raise ValueError(f"draft vocabulary ids must lie in [0, {n_vocab}), got {int(a.min())}..{int(a.max())}")
    if len(a) > 1 and not bool((np.diff(a.astype(np.int64)) > 0).all()):
        raise ValueError("draft vocabulary ids must be unique and sorted ascending")
    return a.astype(np.int32)


# -- streaming: one tensor (and one block of rows) at a time, bounded memory -----------------------

#: rows are encoded in blocks of about this many f32 bytes
STREAM_BLOCK_BYTES = 32 << 20


@dataclass
class StreamTensor:
    """A tensor to stream into a GGUF: ``shape`` in numpy/torch order (rows first), its GGML
    type, and ``rows(r0, r1)`` returning rows [r0, r1) as float32 (the whole vector for 1-D)."""

    name: str
    shape: tuple
    qtype: "object"  # gguf.GGMLQuantizationType
    rows: Callable[[int, int], np.ndarray]

    @property
    def nbytes(self) -> int:
        import gguf

        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(tuple(self.shape), self.qtype)))


def _encode_block(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F32:
        return arr
    if qtype == T.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def heads_tensor_type(name: str, shape: Sequence[int], head_type: str):
    """The GGML type a heads tensor is stored in: biases and vectors f32; matrices as
    ``head_type``, except q8_0 rows not a multiple of 32 long, which stay f16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if head_type not in HEAD_TYPES:
        raise ValueError(f"heads type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
    if name.endswith(".bias") or len(shape) == 1 or head_type == "f32":
        return T.F32
    if head_type == "f16" or shape[-1] % 32:
        return T.F16
    return T.Q8_0


def write_gguf_streaming(
    path: str,
    arch: str,
    add_meta: Callable[[object], None],
    tensors: Sequence[StreamTensor],
    progress=None,
    block_bytes: int = STREAM_BLOCK_BYTES,
) -> None:
    """Write a GGUF whose tensors are produced block by block: memory stays near one block.

    ``add_meta(writer)`` adds the key/values; ``progress(n_bytes)`` is called after each block.
    Written to ``path + '.tmp'`` and renamed at the end; a failure (or Ctrl-C) leaves nothing.
    """
    import gguf

    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, arch)
    try:
        add_meta(w)
        for t in tensors:
            w.add_tensor_info(t.name, tuple(int(d) for d in t.shape), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for t in tensors:
            w.write_padding(fout, fout.tell())
            n_rows = int(t.shape[0]) if len(t.shape) > 1 else 1
            row_bytes = 4 * int(np.prod(t.shape)) // max(n_rows, 1)
            step = max(1, block_bytes // max(row_bytes, 1))
            written = 0
            for r0 in range(0, n_rows, step):
                r1 = min(n_rows, r0 + step)
                block = t.rows(r0, r1) if len(t.shape) > 1 else t.rows(0, 1)
                want = (r1 - r0, *t.shape[1:]) if len(t.shape) > 1 else tuple(t.shape)
                if tuple(block.shape) != tuple(want):
                    raise ValueError(f"tensor {t.name}: rows {r0}:{r1} have shape {tuple(block.shape)}, expected {want}")
                data = _encode_block(block, t.qtype)
                data.tofile(fout)
                written += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
                del block, data
            if written != t.nbytes:
                raise ValueError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
            w.write_padding(fout, written)
        w.state = gguf.gguf_writer.WriterState.WEIGHTS
        w.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            w.close()
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def write_heads_gguf_streaming(
    path: str, meta: HeadsMeta, tensors: Sequence[StreamTensor], head_type: str = "f16", progress=None,
    block_bytes: int = STREAM_BLOCK_BYTES,
) -> None:
    """``write_heads_gguf`` for large heads: ``tensors`` (schema names, types from
    ``heads_tensor_type``) are read and encoded a block of rows at a time."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f"heads type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
    write_gguf_streaming(path, schema.ARCH, lambda w: _add_heads_meta(w, meta, head_type), tensors, progress, block_bytes)


def heads_tensors(
    res: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], out: Optional[Sequence[np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    """Schema names for in-memory heads: res[i][j] = (W [H,H] or, root input at j = 0, [H,2H], b [H]);
    out[i] = W_out [V,H] or None."""
    for i, layers in enumerate(res):
        for j, (wt, b) in enumerate(layers):
            yield schema.res_weight(i, j), wt
            yield schema.res_bias(i, j), b
        if out is not None:
            yield schema.output_weight(i), out[i]


def draft_vocab_from_counts(counts, n: int) -> np.ndarray:
    """The ``n`` most frequent token ids of ``counts`` (counts[id] = occurrences), ties (unseen
    tokens too) broken toward the lower id, returned sorted ascending as the schema stores them."""
    c = np.asarray(counts)
    if c.ndim != 1 or len(c) < 1:
        raise ValueError("token counts must be a non-empty vector, one count per vocabulary id")
    if not 1 <= n <= len(c):
        raise ValueError(f"a draft vocabulary of {n} tokens: needs 1 to n_vocab = {len(c)}")
    top = np.argsort(-c.astype(np.int64), kind="stable")[:n]
    return np.sort(top).astype(np.int32)


def restrict_heads_file(src: str, dst: str, draft_vocab) -> dict:
    """Write heads file ``src`` restricted to ``draft_vocab`` (full ids) as ``dst`` (schema 3).

    ResBlocks are copied as stored; own output matrices keep only the draft rows, byte for byte
    (so each remaining logit is exactly the original's); shared-output heads get the id list
    only. A ``src`` that already has a draft vocabulary may be restricted to a subset of it. The
    stored ``rank_accuracy`` is kept: it was measured over the full vocabulary, an upper bound for
    the restricted heads (by at most the share of targets outside the draft vocabulary). The
    tree is kept; its ranks must stay below the new size. Returns the new file's heads_info."""
    import gguf

    from medusa_edge.guards.gguf_file import read_gguf
    from medusa_edge.heads.check import heads_info

    info = heads_info(read_gguf(src, "heads file"))  # validated before gguf-py reads it
    ids = check_draft_vocab(draft_vocab, info["n_vocab"])
    old = info["draft_vocab"]
    if old is None:
        rows = ids.astype(np.int64)
    else:
        rows = np.searchsorted(old, ids)
        if (rows >= len(old)).any() or (old[np.minimum(rows, len(old) - 1)] != ids).any():
            raise ValueError(f"heads file {src} already has a draft vocabulary; the new one must be a subset of it")
    reader = gguf.GGUFReader(src)
    ft = reader.fields.get("general.file_type")
    file_type = int(ft.parts[ft.data[0]][0]) if ft is not None else 1
    head_type = {0: "f32", 1: "f16", 7: "q8_0"}.get(file_type, "f16")
    out_names = {schema.output_weight(i) for i in range(info["n_heads"])}

    def tensors():
        for t in reader.tensors:
            data = np.asarray(t.data)  # rows first: [ne1, ne0] floats, or [ne1, bytes per row]
            if t.name in out_names:
                data = data[rows]
            yield t.name, data, t.tensor_type

    meta = HeadsMeta(info["n_heads"], info["n_layers"], info["n_embd"], info["n_vocab"], info["shared_output"],
                     json.loads(info["tree"]) if info["tree"] else None, info["base_vocab_hash"],
                     info["rank_accuracy"], info["root_input"], ids.tolist())
    if meta.tree and max(max(p) for p in meta.tree) >= len(ids):
        raise ValueError(f"the stored tree proposes rank {max(max(p) for p in meta.tree)}, beyond a draft vocabulary of {len(ids)}")
    write_heads_gguf(dst, meta, tensors(), head_type)
    return heads_info(read_gguf(dst, "heads file"))
