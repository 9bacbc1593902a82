"""Random-weight Llama GGUFs and matching heads, built in seconds: fixtures for tests and benchmarks.

The models are real llama.cpp GGUFs (architecture "llama", SentencePiece-style vocabulary with
byte fallback) written with gguf-py; only the weights are random.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from medusa_edge.heads import schema
from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf

_WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know get through back "
    "much before go good new write our used me man too any day same right look think also around another came come work "
    "three word must because does part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should home big give air line set own "
    "under read last never us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form food keep children feet "
    "land side without boy once animals life enough took sometimes four head above kind began almost live page got earth "
    "need far hand high year mother light parts country father let night following picture being study second eyes soon"
).split()


def make_vocab(n_words: int = 240, salt: int = 0) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types: <unk> <s> </s>, 256 byte tokens, characters, words.

    ``salt`` permutes the word list, giving a vocabulary of the same size but different tokens.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    pieces = ["\u2581"] + chars + ["\u2581" + c for c in string.ascii_letters]
    words = list(_WORDS)
    if salt:
        rng = np.random.default_rng(salt)
        words = [words[i] for i in rng.permutation(len(words))]
        words = [w + ("s" if i % 2 else "") for i, w in enumerate(words)]
    pieces += ["\u2581" + w for w in words[:n_words]]
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(1)
    scores = [0.0] * 3 + [0.0] * 256 + [-1000.0 + 10.0 * len(t) for t in tokens[259:]]
    return tokens, scores, types


def add_llama_metadata(w, name: str, *, n_ctx_train: int, n_embd: int, n_layer: int, n_ff: int, n_head: int,
                       n_head_kv: int, file_type: int, vocab: tuple) -> None:
    """The hyperparameters and SentencePiece-style vocabulary (tokens, scores, types from
    ``make_vocab``; BOS 1, EOS 2, UNK 0) of a Llama GGUF, on a gguf-py writer."""
    tokens, scores, types = vocab
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


@dataclass
class TinyLlama:
    path: str
    n_embd: int
    n_vocab: int
    tokens: list


def write_llama_gguf(
    path: str,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    seed: int = 0,
    vocab_salt: int = 0,
    n_words: int = 240,
    vocab_size: int | None = None,
    dtype: str = "f32",
    arch: str = "llama",
    chat_template: str | None = None,
    residual_scale: float = 1.0,
    pooling_type: int | None = None,
) -> TinyLlama:
    """Write a random-weight Llama GGUF. ``vocab_size`` pads the vocabulary with filler tokens
    (for benchmark-sized models); ``dtype`` is f32, f16 or q8_0 for the matrices.
    ``residual_scale`` scales what each block adds to the residual stream (attn_output and
    ffn_down); a small value gives a nearly bigram model whose greedy text falls into short
    loops, which Medusa heads can learn (heads training tests). ``pooling_type`` writes
    ``{arch}.pooling_type`` (llama.cpp's enum: 1 mean, 2 cls, 3 last), as embedding GGUFs carry."""
    import gguf

    tokens, scores, types = make_vocab(n_words, vocab_salt)
    if vocab_size is not None:
        while len(tokens) < vocab_size:
            tokens.append(f"\u2581tok{len(tokens)}")
            scores.append(-2000.0)
            types.append(1)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (scale / np.sqrt(cols))).astype(np.float32)

    w = gguf.GGUFWriter(path, arch)
    add_llama_metadata(w, "tiny-random-llama", n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                       n_head=n_head, n_head_kv=n_head_kv, file_type={"f32": 0, "f16": 1, "q8_0": 7}[dtype],
                       vocab=(tokens, scores, types))
    if chat_template:
        w.add_chat_template(chat_template)
    if pooling_type is not None:
        w.add_pooling_type(gguf.PoolingType(pooling_type))

    def put(name, arr):
        if arr.ndim == 2 and dtype == "f16":
            w.add_tensor(name, arr.astype(np.float16))
        elif arr.ndim == 2 and dtype == "q8_0" and arr.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", mat(n_vocab, n_embd, 1.0 * np.sqrt(n_embd)))
    for i in range(n_layer):
        put(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        put(f"blk.{i}.attn_q.weight", mat(n_embd, n_embd))
        put(f"blk.{i}.attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        put(f"blk.{i}.attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        put(f"blk.{i}.attn_output.weight", mat(n_embd, n_embd, residual_scale))
        put(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        put(f"blk.{i}.ffn_gate.weight", mat(n_ff, n_embd))
        put(f"blk.{i}.ffn_up.weight", mat(n_ff, n_embd))
        put(f"blk.{i}.ffn_down.weight", mat(n_embd, n_ff, residual_scale))
    put("output_norm.weight", np.ones(n_embd, np.float32))
    put("output.weight", mat(n_vocab, n_embd, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyLlama(path, n_embd, n_vocab, tokens)


@dataclass
class RandomHeads:
    path: str
    res: list  # [head][layer] -> (W [H,H], b [H])
    out: list | None  # [head] -> W_out [V,H]


def random_heads(n_heads: int, n_layers: int, n_embd: int, n_vocab: int, seed: int = 1, shared_output: bool = False,
                 root_input: bool = False):
    """Random head weights in torch layout (res[i][j] = (W, b), out[i] = W_out); with
    ``root_input`` the first ResBlock's W is [H, 2H]."""
    rng = np.random.default_rng(seed)

    def n_in(j):
        return 2 * n_embd if root_input and j == 0 else n_embd

    res = [
        [
            ((rng.standard_normal((n_embd, n_in(j))) / np.sqrt(n_in(j))).astype(np.float32),
             (rng.standard_normal(n_embd) * 0.1).astype(np.float32))
            for j in range(n_layers)
        ]
        for _ in range(n_heads)
    ]
    out = None if shared_output else [
        (rng.standard_normal((n_vocab, n_embd)) * (4.0 / np.sqrt(n_embd))).astype(np.float32) for _ in range(n_heads)
    ]
    return res, out


def write_random_heads(
    path: str, base: TinyLlama, *, n_heads: int = 4, n_layers: int = 1, seed: int = 1, head_type: str = "f32",
    tree=None, shared_output: bool = False, n_embd: int | None = None, n_vocab: int | None = None,
    root_input: bool = False,
) -> RandomHeads:
    """Random heads for ``base``; ``n_embd``/``n_vocab`` override the sizes (to build mismatches)."""
    e = n_embd or base.n_embd
    v = n_vocab or base.n_vocab
    res, out = random_heads(n_heads, n_layers, e, v, seed, shared_output, root_input)
    meta = HeadsMeta(n_heads, n_layers, e, v, shared_output, tree, schema.vocab_hash(base.tokens), root_input=root_input)
    write_heads_gguf(path, meta, heads_tensors(res, out), head_type)
    return RandomHeads(path, res, out)


def heads_reference(h: np.ndarray, res, out, top_k: int, root_embd: np.ndarray | None = None):
    """Numpy reference of the heads: ids [n_heads, k] (best first) and logits [n_heads, V].
    ``root_embd``: the root token's embedding, for root-input heads (first ResBlock reads [h; e])."""
    logits = []
    for i, layers in enumerate(res):
        x = h.astype(np.float64)
        for j, (wt, b) in enumerate(layers):
            inp = np.concatenate([x, root_embd]) if root_embd is not None and j == 0 else x
            y = wt.astype(np.float64) @ inp + b
            x = x + y / (1.0 + np.exp(-y))
        logits.append(out[i].astype(np.float64) @ x)
    logits = np.stack(logits)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    return ids, logits


def quantized_test_model(directory: str, quant: str = "Q8_0") -> str:
    """The tests' random-weight Llama (128 wide, 2 layers), quantized by llama.cpp's own quantizer
    (so the engine measures a bit-exact region), with random f32 heads beside it; its path."""
    from pathlib import Path

    from convert.base import quantize_gguf

    d = Path(directory)
    src = write_llama_gguf(str(d / "base-f32.gguf"), n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    p = d / f"base-{quant}.gguf"
    quantize_gguf(Path(src.path), p, quant)
    write_random_heads(str(d / f"base-{quant}.medusa.gguf"), src, n_heads=4, seed=5, head_type="f32")
    return str(p)


def truth_proposer(truth, rng, p_right: float = 0.9, max_rank: int = 2):
    """A proposer for tests: head d's guess at a rank drawn from 0..max_rank is the true future
    token with probability p_right; other ranks hold wrong tokens. Trees then accept, and accepted
    nodes sit off the tree's first chain."""

    def propose(generated, n_heads, k):
        out = (np.arange(n_heads * k).reshape(n_heads, k) * 7 + len(generated) * 13) % 500 + 3
        for d in range(n_heads):
            i = len(generated) + d
            if i < len(truth) and rng.random() < p_right:
                out[d, int(rng.integers(0, min(k, max_rank + 1)))] = truth[i]
        return out.astype(np.int32)

    return propose
