"""The heads GGUF ("medusa" sidecar) schema: the single source of its key and tensor names.

The converter writes it, the engine and the native loader read it. A heads file sits next to
its base model as ``<base stem>.medusa.gguf``.

Keys (all under ``medusa.`` unless noted):
  general.architecture      "medusa"
  schema_version            u32   SCHEMA_VERSION
  head_count                u32   number of heads (head i predicts the token at offset +2+i)
  block_count               u32   ResBlocks per head
  embedding_length          u32   hidden size H of the base
  vocab_size                u32   V
  shared_output             bool  true: heads have no W_out and reuse the base lm_head ("version 2")
  root_input                bool  optional (schema 2), default false: each head's first ResBlock also
                                  reads the root token's embedding, see below
  draft_vocab               arr[i32] optional (schema 3): the draft vocabulary, see below
  tree                      str   JSON list of paths, the default tree for this head set
  rank_accuracy             str   optional: JSON [n_heads][k] floats in [0, 1], the held-out probability
                                  that head i's rank-r guess is the base's token (top-k accuracies are
                                  the prefix sums); written by the trainer, read by the tree tuner
  base.vocab_size           u32   fingerprint of the base model the heads were trained on
  base.embedding_length     u32
  base.vocab_hash           str   16 hex digits, FNV-1a 64 over the base's token texts, each NUL-terminated

Tensors (ggml order [ne0, ne1]):
  medusa.{i}.res.{j}.weight   [H, H]   W_ij   (torch nn.Linear weight [out=H, in=H]);
                              [2H, H]  for j = 0 when root_input (torch [out=H, in=2H])
  medusa.{i}.res.{j}.bias     [H]      b_ij
  medusa.{i}.output.weight    [H, V]   W_out_i (torch [V, H]); absent when shared_output;
                              [H, N]   with a draft vocabulary of N tokens: row r is full id draft_vocab[r]

Root input (schema version 2, this project's extension of Medusa-1): when a step proposes, the
root token x (the base's own choice at the position whose hidden state h the heads read) is
already known. Heads with ``root_input`` read it: the first ResBlock is
``h + SiLU(W_i0 [h; e(x)] + b_i0)``, where e is the base's token embedding (``token_embd.weight``
of the model file, as llama.cpp's get_rows reads it). The rest is unchanged. Files without it
are schema version 1 and load in every version.

Draft vocabulary (schema version 3): the heads score only N tokens (the most frequent ones of
the training data), given as ``draft_vocab``, N full-vocabulary ids, strictly increasing (so
unique, and ties between two draft tokens break toward the lower full id, as they do without
one), 1 <= N <= V, each in [0, V). Own output matrices hold only those rows ([H, N]); shared-output
heads store nothing more, and the loader multiplies by those rows of the base's matrix, read as
stored. The heads pass returns full ids; its probabilities are a softmax over the N tokens; a
pass may ask for at most N candidates per head. ``vocab_size`` stays V (the base's). Files
without it are written as schema 1 or 2 and load in every version.
"""

from __future__ import annotations

from typing import Iterable

SCHEMA_VERSION = 3  # the newest this code reads (native HeadsMeta::kSchemaVersion, compared by a test); written: 3 with a draft
# vocabulary, else 2 with root_input, else 1
ARCH = "medusa"

KEY_SCHEMA_VERSION = "medusa.schema_version"
KEY_HEAD_COUNT = "medusa.head_count"
KEY_BLOCK_COUNT = "medusa.block_count"
KEY_EMBEDDING_LENGTH = "medusa.embedding_length"
KEY_VOCAB_SIZE = "medusa.vocab_size"
KEY_SHARED_OUTPUT = "medusa.shared_output"
KEY_ROOT_INPUT = "medusa.root_input"
KEY_TREE = "medusa.tree"
KEY_DRAFT_VOCAB = "medusa.draft_vocab"
KEY_RANK_ACCURACY = "medusa.rank_accuracy"
KEY_BASE_VOCAB_SIZE = "medusa.base.vocab_size"
KEY_BASE_EMBEDDING_LENGTH = "medusa.base.embedding_length"
KEY_BASE_VOCAB_HASH = "medusa.base.vocab_hash"

SIDECAR_SUFFIX = ".medusa.gguf"


def res_weight(head: int, layer: int) -> str:
    return f"medusa.{head}.res.{layer}.weight"


def res_bias(head: int, layer: int) -> str:
    return f"medusa.{head}.res.{layer}.bias"


def output_weight(head: int) -> str:
    return f"medusa.{head}.output.weight"


def vocab_hash(tokens: Iterable[bytes | str]) -> str:
    """FNV-1a 64 over each token's bytes plus a NUL; matches the native Model.vocab_fingerprint()."""
    h = 0xCBF29CE484222325
    prime = 0x100000001B3
    mask = 0xFFFFFFFFFFFFFFFF
    for t in tokens:
        b = t.encode("utf-8") if isinstance(t, str) else bytes(t)
        for c in b + b"\0":
            h = ((h ^ c) * prime) & mask
    return f"{h:016x}"


def sidecar_path(model_path: str) -> str:
    """``dir/name.gguf`` -> ``dir/name.medusa.gguf``."""
    stem = model_path[:-5] if model_path.endswith(".gguf") else model_path
    return stem + SIDECAR_SUFFIX
