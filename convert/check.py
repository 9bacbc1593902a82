"""``--check``: load the converted pair with the engine, decode a prompt greedily and measure how
often each head's top-1 equals the base's own token at its offset. Near 0 means a mismatch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import ConvertError

DEFAULT_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: Write a short story about a lighthouse keeper "
    "who finds a message in a bottle. ASSISTANT:"
)

#: head 0 below this top-1 agreement: the heads do not fit the base
NEAR_ZERO = 0.05


def head_agreement(engine, prompt_tokens: list[int], n_tokens: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Decode ``n_tokens`` greedily one by one; at every step ask the heads for their top-1.

    Returns (hits[n_heads], totals[n_heads], generated): head i at the step that produced token t
    predicts token t+1+i of the greedy continuation.
    """
    ctx, heads = engine.ctx, engine.heads
    ctx.truncate(0)
    ctx.prefill(list(prompt_tokens), 0)
    n_past = len(prompt_tokens)
    gen, preds = [], []
    for step in range(n_tokens):
        tok = int(np.asarray(ctx.argmax(1))[0])
        ids = heads.propose(ctx, 0, 1, -1, tok)[0][:, 0]  # [n_heads] top-1 (root-input heads read tok)
        gen.append(tok)
        preds.append(ids)
        if engine.model.is_eog(tok) or step == n_tokens - 1 or n_past + 1 >= engine.n_ctx:
            break
        ctx.prefill([tok], n_past)
        n_past += 1
    n_heads = heads.n_heads
    hits, totals = np.zeros(n_heads, int), np.zeros(n_heads, int)
    for t, ids in enumerate(preds):
        for i in range(n_heads):
            j = t + 1 + i
            if j < len(gen):
                totals[i] += 1
                hits[i] += int(ids[i] == gen[j])
    return hits, totals, gen


def run_check(base: Path, heads: Path, prompt: Optional[str] = None, n_tokens: int = 48, n_threads: Optional[int] = None) -> int:
    from medusa_edge.core.engine import Engine
    from medusa_edge.errors import MedusaError

    try:
        eng = Engine(str(base), str(heads), tree="chain:1", n_ctx=1024, n_threads=n_threads)
    except (MedusaError, ValueError) as e:
        raise ConvertError(f"--check: the engine cannot load {base} with {heads}: {e}") from None
    text = prompt or DEFAULT_PROMPT
    toks = list(eng.model.tokenize(text, True, False))
    hits, totals, gen = head_agreement(eng, toks, n_tokens)
    rates = [h / t if t else 0.0 for h, t in zip(hits, totals)]
    print(f"check: decoded {len(gen)} tokens greedily after a {len(toks)}-token prompt")
    print("check: heads' top-1 agreement with the base's greedy tokens: "
          + ", ".join(f"head {i} {100 * r:.1f}% ({h}/{t})" for i, (r, h, t) in enumerate(zip(rates, hits, totals))))
    if totals[0] == 0:
        print("check: too few tokens to measure agreement (the model stopped at once)")
        return 0
    if rates[0] < NEAR_ZERO:
        print(
            f"check: WARNING: head 0 agreement is near 0 ({100 * rates[0]:.1f}%): these heads do not fit this base "
            "(a different base model or fine-tune, a layout mismatch, or a tokenizer mismatch); expect no speedup",
            file=sys.stderr,
        )
        return 3
    print("check: ok")
    return 0
