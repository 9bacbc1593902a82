"""The heads file's metadata, read from outside before the native loader or gguf-py touch it.

Contract: every value the engine uses is type- and range-checked; damage gives a ValueError naming the
file and the key (the engine turns it into HeadsError). The file is read with ggml's size-bounded gguf
reader (``guards.gguf_file.read_gguf``). Tensor shapes and types are checked by the native loader.
"""

from __future__ import annotations

import json

import numpy as np

from medusa_edge.guards.gguf_file import GgufMeta
from medusa_edge.heads import schema

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
    from medusa_edge.core.tree import Tree, TreeError

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
