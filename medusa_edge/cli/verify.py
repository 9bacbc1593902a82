"""``medusa-edge verify``: check on your own model and device that Medusa's output equals plain
decoding's, token for token.

Each prompt is decoded twice in one engine (one context, the same settings): plainly, one token per
forward, and with Medusa. The first divergence, if any, is printed with the top-2 logit gap of plain
decoding at that position: a divergence at a small gap is a rounding difference of the batched
verify (a near-tie), a large gap would be a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import numpy as np

from medusa_edge.cli.args import add_model_args, add_numerics_args, medusa_from_args

DEFAULT_PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about the sea.", "List three tips for learning a language.",
    "What is the difference between a virus and a bacterium?", "Summarise the plot of Romeo and Juliet.",
    "How do I make a cup of tea?", "Write a Python function that reverses a string.", "What is 17 times 23?",
    "Give me advice for a job interview.", "Compare cats and dogs as pets.",
]


def load_prompts(path: Optional[str], limit: Optional[int]) -> list:
    """The first ``limit`` prompts (all when None) of a JSONL file in any format the trainer reads
    (``medusa_edge.training.prompts.load_prompts``), or of ``DEFAULT_PROMPTS`` without a file."""
    from medusa_edge.training.prompts import load_prompts as load

    out = load(path) if path else list(DEFAULT_PROMPTS)
    return out[:limit] if limit else out


def top2_gap(engine, ids: list[int]) -> float:
    """Plain decoding's top-2 logit gap after ``ids`` (the position where a divergence happened)."""
    z = np.sort(engine.next_logits(ids))
    return float(z[-1] - z[-2])


def compare(engine, prompts_ids: list[list[int]], params, max_tokens: int, progress=None) -> list[dict]:
    """Per prompt: plain and Medusa token ids, the first divergence and its top-2 gap."""
    from medusa_edge.core.engine import Stats
    from medusa_edge.core.exactness import first_divergence

    rows = []
    for k, ids in enumerate(prompts_ids):
        ref, got, st = [], [], Stats()
        for new in engine.generate(ids, params, max_tokens, max_depth=0, reuse_prefix=False):
            ref += new
        for new in engine.generate(ids, params, max_tokens, stats=st, reuse_prefix=False):
            got += new
        i = first_divergence(got, ref)
        row = {"prompt": k, "identical": i is None, "tokens": len(ref), "tokens_per_step": round(st.tokens_per_step, 3)}
        if i is not None:
            row.update(first_divergence=i, plain_token=ref[i] if i < len(ref) else None,
                       medusa_token=got[i] if i < len(got) else None, top2_gap=top2_gap(engine, ids + ref[:i]))
        rows.append(row)
        if progress:
            progress(k, row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="medusa-edge verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--tree", help="tree (default: the engine's choice for this device)")
    ap.add_argument("--prompts", help="JSONL prompts, one a line: a string, {\"prompt\"}, {\"text\"}, MT-Bench's "
                    "{\"turns\": [...]} or {\"messages\": [...]} (default: 10 built-in questions)")
    ap.add_argument("-n", "--limit", type=int, help="use the first N prompts")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default 128)")
    ap.add_argument("--no-chat", action="store_true", help="complete the raw text instead of a chat turn")
    ap.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default); > 0 compares seeded sampling")
    ap.add_argument("--seed", type=int, default=1234)
    add_numerics_args(ap)  # --no-exact: leave the exact region (the fastest tree); measures the flip rate
    ap.add_argument("--json", help="write the per-prompt results here")
    args = ap.parse_args(argv)

    from medusa_edge import MedusaError, SamplingParams, TreeError
    from medusa_edge.api import chat_prompt_tokens, prompt_tokens
    from medusa_edge.training.prompts import prompt_messages, prompt_text

    try:
        llm = medusa_from_args(args, tree=args.tree)
        texts = load_prompts(args.prompts, args.limit)
    except (MedusaError, TreeError, ValueError, OSError) as e:
        print(f"medusa-edge verify: error: {e}", file=sys.stderr)
        return 2
    e = llm.engine
    if e.heads is None:
        print("medusa-edge verify: error: no heads file, nothing to compare (pass --heads)", file=sys.stderr)
        return 2
    m = e.model
    ids = [prompt_tokens(m, prompt_text(t)) if args.no_chat else chat_prompt_tokens(m, prompt_messages(t), llm.chat_template)
           for t in texts]
    params = SamplingParams(temperature=args.temp, seed=args.seed)
    print(f"model {e.model_path} ({m.description()}), heads {e.heads_path}\n"
          f"tree {e.tree.n_nodes} nodes, depth {e.tree.max_depth}; exact batch on this device: "
          f"{e.exact_batch or 'not measured (--no-exact)'} (output {e.guarantee}); flash attention {'on' if e.flash_attn else 'off'}; "
          f"{len(ids)} prompts x {args.max_tokens} tokens, " + ("greedy" if args.temp == 0 else f"T={args.temp} seed {args.seed}"),
          flush=True)

    def progress(k, row):
        what = "identical" if row["identical"] else (
            f"DIVERGES at token {row['first_divergence']} (plain {row['plain_token']}, medusa {row['medusa_token']}, "
            f"top-2 gap {row['top2_gap']:.4f})")
        print(f"[{k + 1:3d}/{len(ids)}] {what}  ({row['tokens']} tokens, {row['tokens_per_step']:.2f} tokens/step)", flush=True)

    t0 = time.perf_counter()
    rows = compare(e, ids, params, args.max_tokens, progress)
    same = sum(r["identical"] for r in rows)
    tps = np.mean([r["tokens_per_step"] for r in rows]) if rows else 0.0
    print(f"\n{same}/{len(rows)} answers identical to plain decoding; mean {tps:.2f} tokens/step; "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": e.model_path, "heads": e.heads_path, "tree_nodes": e.tree.n_nodes,
                       "exact": e.exact, "exact_batch": e.exact_batch, "flash_attn": e.flash_attn,
                       "max_tokens": args.max_tokens, "temperature": args.temp, "results": rows}, f, indent=1)
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
