"""How good are Medusa heads on prompts they never saw? Per-head top-k and tokens per step.

    python demo/smollm2/eval_heads.py BASE.gguf HEADS.medusa.gguf [--prompts FILE.jsonl] [-n 80]
                                      [--max-tokens 128] [--json out.json]

The base continues each prompt greedily (chat template applied, as the API does), 16 prompts at a
time through the trainer's batched generator, which also gives the hidden state of every
position. The heads (native, as the engine runs them) propose their top-10 at every position.
From these:

- per-head top-1 and top-5: how often head i's guesses contain the base's token i+2 ahead;
- tokens per step for chain:1..4 and for the heads file's stored tree, by replaying greedy
  acceptance along the base's own continuation: a step at row j commits the root plus the
  longest tree path whose candidates equal the next tokens, then moves to the row of the last
  accepted token. This is what the engine does in greedy mode, step for step; the one
  difference is that batched rows may differ from one-token decodes in the last float bits,
  which can flip a near-tied top-k entry (`medusa-edge bench` measures the real figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from medusa_edge.training import train as th  # noqa: E402
from medusa_edge.training.data import BatchedGenerator  # noqa: E402
from medusa_edge.core.tree import Tree  # noqa: E402

DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "bench", "mt_bench_questions.jsonl")


def continuations(base_path: str, prompts: list, max_tokens: int, threads: int, parallel: int = 16):
    base = th.BaseModel(base_path, 512 + max_tokens + 8, threads)
    gen = BatchedGenerator(base_path, parallel, 512 + max_tokens + 2, threads)
    jobs = [(i, base.prompt_tokens(p, 512)) for i, p in enumerate(prompts)]
    got = {k: (o, h) for k, o, h in gen.run(jobs, max_tokens)}
    gen.close()
    return [got[i] for i in range(len(prompts))]


def ranks_of(heads, hidden: np.ndarray, tokens: list, n_heads: int, k: int = 10) -> np.ndarray:
    """[rows, n_heads] rank of the true token in head i's top-k at each row (-1: absent, -2: no target)."""
    n = len(tokens)
    out = np.full((n, n_heads), -2, np.int32)
    for j in range(n):
        ids, _ = heads.propose_hidden(np.ascontiguousarray(hidden[j], np.float32), k, n_heads, int(tokens[j]))
        ids = np.asarray(ids)
        for i in range(n_heads):
            t = j + 1 + i
            if t < n:
                hit = np.nonzero(ids[i] == tokens[t])[0]
                out[j, i] = int(hit[0]) if len(hit) else -1
    return out


def accepted(tree: Tree, ranks_row: np.ndarray) -> int:
    """Greedy acceptance: the depth of the longest path whose candidates are the true tokens."""
    node, depth = 0, 0
    while True:
        want = ranks_row[depth] if depth < len(ranks_row) else -1
        child = next((c for c in tree.children[node] if want >= 0 and tree.rank[c] == want), None)
        if child is None:
            return depth
        node, depth = child, depth + 1


def tokens_per_step(tree: Tree, ranks: np.ndarray) -> tuple[int, int]:
    """(tokens, steps) replaying greedy Medusa along one continuation (first step from the prefill)."""
    n = len(ranks)
    j = steps = 0
    while j < n:
        a = min(accepted(tree, ranks[j]), n - 1 - j)
        steps += 1
        j += 1 + a
    return n, steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("heads")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS)
    ap.add_argument("-n", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tree", action="append", default=[], help="also replay this tree (JSON paths or a name)")
    ap.add_argument("--json")
    ap.add_argument("--cache", help="npz of the continuations: reused when present (they depend only on the base and prompts)")
    args = ap.parse_args(argv)

    from medusa_edge._loader import native
    from medusa_edge.core.engine import read_heads_info

    prompts = th.load_prompts(args.prompts)[: args.n]
    t0 = time.perf_counter()
    if args.cache and os.path.exists(args.cache):
        z = np.load(args.cache)
        conts = [(z[f"o{i}"].tolist(), z[f"h{i}"]) for i in range(len(prompts))]
    else:
        conts = continuations(args.base, prompts, args.max_tokens, args.threads)
        if args.cache:
            np.savez(args.cache, **{f"o{i}": np.array(o, np.int32) for i, (o, _) in enumerate(conts)},
                     **{f"h{i}": h for i, (_, h) in enumerate(conts)})
    t_gen = time.perf_counter() - t0
    info = read_heads_info(args.heads)
    K = info["n_heads"]
    heads = native.Heads(args.heads, args.base, args.threads, False)
    all_ranks = [ranks_of(heads, h, o, K) for o, h in conts]
    R = np.concatenate(all_ranks)
    top1, top5 = [], []
    for i in range(K):
        valid = R[:, i] != -2
        top1.append(round(float(np.mean(R[valid, i] == 0)), 4))
        top5.append(round(float(np.mean((R[valid, i] >= 0) & (R[valid, i] < 5))), 4))
    trees = {f"chain:{d}": Tree.resolve(f"chain:{d}") for d in range(1, K + 1)}
    if info.get("tree"):
        trees["stored"] = Tree.from_paths(json.loads(info["tree"]))
    for t in args.tree:
        trees[t] = Tree.resolve(json.loads(t) if t.startswith("[") else t)
    tps = {}
    for name, tree in trees.items():
        tok = steps = 0
        for r in all_ranks:
            a, b = tokens_per_step(tree, r)
            tok, steps = tok + a, steps + b
        tps[name] = {"nodes": tree.n_nodes, "tokens_per_step": round(tok / steps, 4)}
    res = {"base": args.base, "heads": args.heads, "prompts": len(prompts), "max_tokens": args.max_tokens,
           "positions": int(len(R)), "top1": top1, "top5": top5, "tokens_per_step": tps,
           "generation_s": round(t_gen, 1)}
    print(f"{len(prompts)} prompts, {len(R)} positions (greedy continuations, {t_gen:.0f} s)")
    print("per-head top-1 " + " ".join(f"{a:.3f}" for a in top1))
    print("per-head top-5 " + " ".join(f"{a:.3f}" for a in top5))
    for name, v in tps.items():
        print(f"  {name:10s} {v['nodes']:3d} nodes  {v['tokens_per_step']:.3f} tokens/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
