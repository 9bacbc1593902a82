"""``medusa-edge tune``: measure this device and show the tree ``tree="auto"`` picks, and why.

    medusa-edge tune [MODEL] [--heads H] [-t THREADS] [--remeasure] [--json FILE]

Prints the verification cost curve t(B)/t(1) with its measured precision, the heads' cost, the
accuracies used, the expected tokens per step and speed-up of each tree size, and the choice.
The costs are cached per device, model, heads and settings (~/.cache/medusa-edge/tree-costs.json),
so the engine measures them once; --remeasure measures again and replaces the cached entry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from medusa_edge.core import tune
from medusa_edge.cli.args import add_model_args, add_numerics_args, medusa_from_args
from medusa_edge.core.exactness import SPLIT_FREE_CELLS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="medusa-edge tune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--remeasure", action="store_true", help="measure again instead of reading the cache")
    add_numerics_args(ap)
    ap.add_argument("--json", help="also write the costs and plan here")
    args = ap.parse_args(argv)

    from medusa_edge.errors import MedusaError

    if args.remeasure:
        os.environ["MEDUSA_EDGE_RETUNE"] = "1"
    try:
        llm = medusa_from_args(args, verbose=False)
    except (MedusaError, ValueError) as e:
        print(f"medusa-edge tune: error: {e}", file=sys.stderr)
        return 1
    e = llm.engine
    if e.costs is None:
        why = ("no heads file" if e.heads is None else
               f"no batch computes rows exactly as one-token decodes here (exact batch {e.exact_batch})")
        print(f"nothing to tune: {why}; decoding plainly")
        return 0
    c, p = e.costs, e.plan
    print(f"model   {e.model_path}\nheads   {e.heads_path}\ndevice  {e.n_threads_batch} threads, flash attention "
          f"{'on' if e.flash_attn else 'off'}, exact batch {e.exact_batch or '-'}, largest tree {e.max_auto_nodes} nodes")
    print(f"\nverification cost t(B)/t(1), t(1) = {c.t_decode[0] * 1e3:.2f} ms ({c.rounds} interleaved rounds; "
          "+- is the 95% interval of each median):")
    for b, r, s in zip(c.batch, c.ratio(), c.spread):
        print(f"  B={b:<3d} {r:6.2f}  +-{100 * s:.1f}%")
    if len(c.batch) and c.batch[-1] < e.max_auto_nodes:
        print(f"  (stopped at B={c.batch[-1]}: the cost grows linearly from there, so no larger tree can pay)")
    print("heads pass: " + ", ".join(f"{d} heads {t * 1e3:.2f} ms" for d, t in enumerate(c.t_heads) if d))
    src = "the heads file (measured at training)" if e.heads_info.get("rank_accuracy") else "a Vicuna-7B-like prior"
    acc = e.live.estimate()
    print(f"accuracies from {src}; top-1 per head: " + " ".join(f"{a:.2f}" for a in acc[:, 0]))
    def table(plan) -> None:
        for n, ex, s, sp in plan.table:
            mark = "  <- chosen" if n == plan.n_nodes else ""
            print(f"  {n:4d}  {ex:14.2f}  {s * 1e3:7.2f}  {sp:6.2f}x{mark}")

    print("\n nodes  E[tokens/step]  ms/step  expected speed-up")
    table(p)
    def chosen(p, where: str) -> None:
        if p.paths:
            print(f"\nchosen tree{where}: {p.n_nodes} nodes {p.paths}\nexpected {p.expected_tokens_per_step:.2f} tokens/step, "
                  f"{p.expected_speedup:.2f}x plain decoding (an estimate; `medusa-edge bench` measures)")
        else:
            print(f"\nchosen{where}: no tree (plain decoding): no tree is expected to beat it by 3% on this device")

    chosen(p, "")
    if p.paths and e.n_threads_kv_split != e.n_threads:
        print(f"past {SPLIT_FREE_CELLS} KV cells exact mode decodes the tree's occasional plain steps on "
              f"{e.n_threads_kv_split} thread(s), t(1) = {c.t_single_kv_split * 1e3:.2f} ms"
              + (", or as a 2-token batch on all threads where that is faster" if e.pad_kv_split else ""))
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump({"costs": asdict(c), "plan": asdict(p), "accuracy": acc.tolist(),
                       "accuracy_source": src}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
