"""The heads file's metadata, read before the native loader or gguf-py touch the tensors.

Contract: every value the engine uses is type- and range-checked; damage gives a ValueError naming the
file and the key (the engine turns it into HeadsError). The keys native Heads reads (counts, sizes,
flags, the draft vocabulary) are validated by native ``heads_metadata``, the loader's own validator;
this module adds the keys only Python reads (the stored tree, rank accuracies, the base vocabulary's
hash). The file is read with ggml's size-bounded gguf reader (``guards.gguf_file.read_gguf``).
Tensor shapes and types are checked by the native loader.
"""

from __future__ import annotations

import json

import numpy as np

from medusa_edge._loader import native
from medusa_edge.guards.gguf_file import GgufMeta
from medusa_edge.heads import schema

#: Bounds on the base model's sizes a heads file records, as native HeadsMeta bounds its own.
MAX_DIM = (1 << 24) - 1
#: A stored tree larger than this is damage (the context holds at most 256 leaves anyway).
MAX_TREE_PATHS = 1024
MAX_TREE_RANK = 1 << 15


def heads_info(meta: GgufMeta) -> dict:
    """The heads metadata the engine uses, every value type- and range-checked (ValueError naming
    the file and the key otherwise): native ``heads_metadata`` for the keys the loader reads, and the
    keys only Python reads."""
    info = dict(native.heads_metadata(meta.path))
    info["tree"] = meta.get_str(schema.KEY_TREE)
    info["rank_accuracy"] = meta.get_str(schema.KEY_RANK_ACCURACY)
    info["base_vocab_hash"] = meta.get_str(schema.KEY_BASE_VOCAB_HASH)
    meta.get_int(schema.KEY_BASE_VOCAB_SIZE, 0, MAX_DIM, required=False)
    meta.get_int(schema.KEY_BASE_EMBEDDING_LENGTH, 0, MAX_DIM, required=False)
    h = info["base_vocab_hash"]
    if h is not None and (len(h) != 16 or any(c not in "0123456789abcdef" for c in h)):
        raise meta.fail(f"{schema.KEY_BASE_VOCAB_HASH} is {h!r}, not 16 lowercase hex digits")
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
