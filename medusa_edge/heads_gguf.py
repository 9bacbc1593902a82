"""Write a heads GGUF (the "medusa" sidecar) from arrays, following ``schema``.

Used by the converter, the heads trainer and the tests. Weights are numpy arrays in torch
layout: ResBlock weight [H, H] (out, in), bias [H], W_out [V, H].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from . import schema

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


def _encode(arr: np.ndarray, head_type: str, is_bias: bool):
    """(data, raw_dtype) for GGUFWriter.add_tensor; biases and 1-D tensors stay f32."""
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if is_bias or arr.ndim == 1 or head_type == "f32":
        return arr, gguf.GGMLQuantizationType.F32
    if head_type == "f16":
        return arr.astype(np.float16), gguf.GGMLQuantizationType.F16
    if head_type == "q8_0":
        if arr.shape[-1] % 32:
            return arr.astype(np.float16), gguf.GGMLQuantizationType.F16
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    raise ValueError(f"heads type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")


def write_heads_gguf(
    path: str,
    meta: HeadsMeta,
    tensors: Iterable[tuple[str, np.ndarray]],
    head_type: str = "f16",
    progress=None,
) -> None:
    """Write ``tensors`` (schema names -> torch-layout arrays, consumed one at a time) to ``path``.

    The file is written to ``path + '.tmp'`` and renamed at the end, so a failure leaves nothing.
    """
    import gguf

    if head_type not in HEAD_TYPES:
        raise ValueError(f"heads type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, schema.ARCH)
    try:
        w.add_uint32(schema.KEY_SCHEMA_VERSION, schema.SCHEMA_VERSION)
        w.add_uint32(schema.KEY_HEAD_COUNT, meta.n_heads)
        w.add_uint32(schema.KEY_BLOCK_COUNT, meta.n_layers)
        w.add_uint32(schema.KEY_EMBEDDING_LENGTH, meta.n_embd)
        w.add_uint32(schema.KEY_VOCAB_SIZE, meta.n_vocab)
        w.add_bool(schema.KEY_SHARED_OUTPUT, meta.shared_output)
        if meta.tree is not None:
            w.add_string(schema.KEY_TREE, json.dumps([list(map(int, p)) for p in meta.tree]))
        w.add_uint32(schema.KEY_BASE_VOCAB_SIZE, meta.n_vocab)
        w.add_uint32(schema.KEY_BASE_EMBEDDING_LENGTH, meta.n_embd)
        w.add_string(schema.KEY_BASE_VOCAB_HASH, meta.base_vocab_hash)
        w.add_file_type(0 if head_type == "f32" else 1 if head_type == "f16" else 7)
        for name, arr in tensors:
            data, dtype = _encode(arr, head_type, name.endswith(".bias"))
            w.add_tensor(name, data, raw_dtype=dtype)
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


def heads_tensors(
    res: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], out: Optional[Sequence[np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    """Schema names for in-memory heads: res[i][j] = (W [H,H], b [H]); out[i] = W_out [V,H] or None."""
    for i, layers in enumerate(res):
        for j, (wt, b) in enumerate(layers):
            yield schema.res_weight(i, j), wt
            yield schema.res_bias(i, j), b
        if out is not None:
            yield schema.output_weight(i), out[i]
