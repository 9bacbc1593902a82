"""Batch invariance of llama.cpp on this device: is row i of one batched decode bit-identical to
decoding the same tokens one at a time (plain decoding)?

For each quant type, thread count, flash-attention setting and batch size B, a chain of B tokens is
decoded (a) one token per llama_decode and (b) in one llama_decode, after the same prompt; the
table gives the largest absolute logit difference over all rows, and how many rows' argmax differ.
Exact Medusa needs 0.0 for every tree size it uses (docs/design.md section 5).

    .venv/bin/python bench/invariance.py [--model F16.gguf] [--quants F16,Q8_0,...] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.base import quantize_gguf  # noqa: E402
from medusa_edge._loader import native  # noqa: E402
from medusa_edge.guards.hw import load_model  # noqa: E402
from medusa_edge.testing import write_llama_gguf  # noqa: E402

SIZES = [2, 3, 4, 5, 8, 16, 24, 32, 48, 63, 64]


def chain_shape(n: int):
    return native.TreeShape(list(range(n)), [[0]] * n)


def measure(model_path: str, threads: int, flash_attn: bool, sizes, n_prompt: int = 100, seed: int = 0):
    m = load_model(model_path)
    ctx = native.Context(m, 1024, 512, threads, 1, False, 1 if flash_attn else 0)
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(3, m.n_vocab, n_prompt)]
    toks = rng.integers(3, m.n_vocab, max(sizes)).astype(np.int32)
    one = chain_shape(1)
    # plain decoding: one token per decode
    ctx.truncate(0)
    ctx.prefill(prompt, 0, False)
    seq = []
    for i, t in enumerate(toks):
        ctx.decode_tree(one, np.array([t], np.int32), n_prompt + i)
        seq.append(ctx.logits(0))
    out = {}
    for b in sizes:
        ctx.truncate(n_prompt)
        ctx.decode_tree(chain_shape(b), toks[:b], n_prompt)
        diffs = [float(np.abs(ctx.logits(r) - seq[r]).max()) for r in range(b)]
        flips = sum(int(np.argmax(ctx.logits(r)) != np.argmax(seq[r])) for r in range(b))
        out[b] = {"max_abs_diff": max(diffs), "argmax_flips": flips, "exact": max(diffs) == 0.0}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an F16/F32 GGUF to quantize (default: a random-weight 6-layer Llama, 576 wide, 32k vocab)")
    ap.add_argument("--quants", default="F16,Q8_0,Q4_0,Q4_1,Q4_K_M,Q6_K")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--fa", default="on,off", help="flash attention settings to try")
    ap.add_argument("--prompt-tokens", type=int, default=100,
                    help="tokens before the chain (past 256, one-token decodes split attention across threads)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    native.set_verbose(False)
    sizes = [int(x) for x in args.sizes.split(",")]
    wd = Path(tempfile.mkdtemp(prefix="invariance-"))
    src = args.model
    if not src:
        src = str(wd / "base-f16.gguf")
        write_llama_gguf(src, n_embd=576, n_layer=6, n_head=9, n_head_kv=3, n_ff=1536, vocab_size=32000, dtype="f16", seed=0)
    results = []
    for q in args.quants.split(","):
        path = src if q == "F16" and not args.model else str(wd / f"m-{q}.gguf")
        if path != src:
            quantize_gguf(Path(src), Path(path), q)
        for th in [int(x) for x in args.threads.split(",")]:
            for fa in args.fa.split(","):
                r = measure(path, th, fa == "on", sizes, n_prompt=args.prompt_tokens)
                results.append({"quant": q, "threads": th, "flash_attn": fa, "by_batch": r})
                cells = " ".join(f"{b}:" + ("=" if v["exact"] else f"{v['max_abs_diff']:.2g}") for b, v in r.items())
                print(f"{q:7s} t={th} fa={fa:3s} {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for f in wd.iterdir():
        f.unlink()
    os.rmdir(wd)


if __name__ == "__main__":
    main()
