"""The batch-invariant region of a model on this device, measured (docs/design.md section 5).

Medusa's output equals plain decoding's bit for bit when every row of a verify batch is computed
exactly as a one-token decode computes it. Whether llama.cpp does so depends on the backend, the
weight types and the batch size, and not monotonically on anything one can read from the file
(measured on this CPU with flash attention: Q4_0/Q4_1/Q5_0/Q8_0 exact up to 63 rows, where
ggml-cpu switches to its tiled flash-attention kernel; Q4_K_M up to 25, Q6_K and Q5_K_M from 4 to
32 depending on the model; F16, F32 and IQ4_NL at no batch size above 1). So it is measured: a
random chain of up to 63 tokens is decoded one token per ``llama_decode`` and then in one batch,
after a short prompt and after a long one,
for each candidate size from the largest down, and the largest size whose every row matches bit
for bit is the model's exact batch on this device. The answer is cached on disk per model file,
device, build and settings, so a model pays the probe (a 300-token prompt and 126 one-token
decodes) once.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from medusa_edge._loader import native
from medusa_edge.core.cache import cached, file_digest

CANDIDATES = (63, 48, 32, 24, 16, 8, 4, 2)
PROBE_PROMPTS = (16, 300)  # prompt lengths the probe decodes after: short, and past 256 KV cells

def cache_key(model_path: str, *, n_threads: int, flash_attn: int, f32_kv: bool, n_gpu_layers: int,
              type_k: int = -1, type_v: int = -1, rpc_servers=()) -> str:
    import llama_cpp

    from medusa_edge.guards.hw import use_extra_bufts

    size, digest = file_digest(model_path)
    parts = [
        "probe=3", f"{size}:{digest[:32]}", f"threads={n_threads}", f"fa={int(flash_attn)}", f"f32kv={int(f32_kv)}", f"ngl={n_gpu_layers}",
        f"kv={type_k},{type_v}",
        f"extra_bufts={int(use_extra_bufts())}", f"llama_cpp_python={llama_cpp.__version__}", native.system_info(),
    ]
    if rpc_servers:  # a model split over RPC servers is another device (keys without them unchanged)
        parts.append("rpc=" + ",".join(rpc_servers))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def probe(model, *, n_threads: int, flash_attn: int, f32_kv: bool, max_batch: int = CANDIDATES[0],
          seed: int = 0, type_k: int = -1, type_v: int = -1) -> tuple[int, bool]:
    """(the largest batch size from CANDIDATES, at most ``max_batch``, at which every row of one
    batched decode equals, bit for bit, the same tokens decoded one at a time, or 1 if none;
    whether flash attention was on). ``flash_attn``: 1 on, 0 off, -1 llama.cpp's auto.

    One-token decodes run on ``single_token_threads(n_threads, cells)`` threads and batches on
    ``n_threads``, as the engine's exact mode runs them. Measured after a short prompt (all threads)
    and after one long enough (PROBE_PROMPTS) that the KV cache spans 512 cells, where ggml-cpu's
    one-query attention would split the cells across threads (one thread)."""
    sizes = [b for b in CANDIDATES if b <= max_batch]
    n = sizes[0] if sizes else 1
    fa_on = False
    for n_prompt in PROBE_PROMPTS:
        ctx = native.Context(model, n_prompt + n + 8, max(n, 64), n_threads, 1, f32_kv, flash_attn, 0, n_threads,
                             type_k, type_v)
        split = kv_may_split(ctx.type_k, ctx.type_v)
        fa_on = bool(ctx.flash_attn)
        if not sizes:
            break
        rng = np.random.default_rng(seed)
        prompt = [int(t) for t in rng.integers(0, model.n_vocab, n_prompt)]
        chain = rng.integers(0, model.n_vocab, n).astype(np.int32)
        one = native.TreeShape([0], [[0]])
        ctx.truncate(0)
        ctx.prefill(prompt, 0, False)
        single = []
        for i in range(n):
            ctx.set_threads(single_token_threads(n_threads, n_prompt + i + 1, split), n_threads)
            ctx.decode_tree(one, chain[i : i + 1], n_prompt + i)
            single.append(ctx.logits(0))
        exact = next((b for b in sizes if _rows_equal(ctx, chain, single, b, n_prompt)), 0)  # the largest
        sizes = [b for b in sizes if b <= exact]
        del ctx
    return (sizes[0] if sizes else 1), fa_on


def _rows_equal(ctx, chain, single, b: int, n_prompt: int) -> bool:
    ctx.truncate(n_prompt)
    ctx.decode_tree(native.TreeShape(list(range(b)), [[0]] * b), chain[:b], n_prompt)
    return all(np.array_equal(ctx.logits(r), single[r]) for r in range(b))


#: KV cells a one-token decode may fill (its own included) and still have all threads: ggml-cpu
#: splits a single query's cells across threads once the attention view spans 512 cells
#: (ops.cpp ``use_split_kv_path``: one query row, F16/F32 K and V, ``nek1 >= 512``), and llama.cpp
#: pads that view to 256 cells (llama-kv-cache.cpp ``get_n_kv``: max(256, pad(used cells, 256))).
SPLIT_FREE_CELLS = 256


#: ggml type ids of F32 and F16 (ggml.h), the KV types whose one-query attention ggml-cpu splits
GGML_F32, GGML_F16 = 0, 1


def kv_may_split(type_k: int, type_v: int) -> bool:
    """Whether ggml-cpu's split-KV path can take a one-token decode with this KV cache: only F16
    or F32 K with V of the same type (ops.cpp ``use_split_kv_path``). A quantized cache never splits."""
    return type_k in (GGML_F32, GGML_F16) and type_k == type_v


def single_token_threads(n_threads: int, n_cells: int, split: bool = True) -> int:
    """Threads for a one-token decode in exact mode on the CPU after which the KV cache holds
    ``n_cells`` cells: all ``n_threads`` while the attention view stays below 512 cells, where the
    one-query kernel is the batched rows' kernel; one beyond, where on more threads it splits the
    cells and sums the partial results in another order than any batched row, and on one thread the
    split is a single chunk, computed as a batched row computes it (docs/design.md section 5).
    ``split``: ``kv_may_split`` for the cache; without it, all threads at any length. Batches,
    almost every step of Medusa, always get all ``n_threads``."""
    return n_threads if n_cells <= SPLIT_FREE_CELLS or not split else 1


def exact_batch(model, model_path: str, *, n_threads: int, flash_attn: int, f32_kv: bool, n_gpu_layers: int,
                use_cache: bool = True, type_k: int = -1, type_v: int = -1) -> tuple[int, bool]:
    """``probe`` for this model and device, through the on-disk cache."""
    def measure():
        return probe(model, n_threads=n_threads, flash_attn=flash_attn, f32_kv=f32_kv, type_k=type_k, type_v=type_v)

    if not use_cache:
        return measure()
    key = cache_key(model_path, n_threads=n_threads, flash_attn=flash_attn, f32_kv=f32_kv, n_gpu_layers=n_gpu_layers,
                    type_k=type_k, type_v=type_v)
    value, _ = cached("exact-batch", key, measure, encode=list,
                      decode=lambda e: (int(e[0]), bool(e[1])) if isinstance(e, list) and len(e) == 2 else None)
    return value


def first_divergence(a: list, b: list) -> Optional[int]:
    """Index of the first differing token of two sequences (or of the shorter's end), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def llama_cpp_baseline(engine, **kwargs):
    """llama-cpp-python's ``Llama`` on the engine's GGUF with the settings that decide its
    numerics (flash attention, micro-batch size, KV types, layers offloaded, AMX guard), so its greedy text is the plain
    decoding the engine promises to equal. Its one-token decodes run on ``n_threads_kv_split`` threads:
    past 256 KV cells that is what the engine runs, and below it one thread and all give the same
    bits (``single_token_threads``). ``kwargs`` go to ``Llama`` (n_ctx, seed, ...)."""
    from medusa_edge.guards.hw import llama_cpp_llama

    kw = dict(flash_attn=engine.flash_attn, n_batch=engine.ctx.n_batch, n_ubatch=engine.ctx.n_ubatch,
              n_gpu_layers=engine.n_gpu_layers,
              type_k=engine.ctx.type_k, type_v=engine.ctx.type_v,
              n_threads=engine.n_threads_kv_split, n_threads_batch=engine.n_threads_batch, verbose=False)
    kw.update(kwargs)
    return llama_cpp_llama(engine.model_path, **kw)
