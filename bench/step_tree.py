"""Tokens per step of fixed trees against per-step trees (tree="step:N"), counts only (no clock):
greedy, chat template, each prompt decoded plainly first and then by every tree, in one process.

    python bench/step_tree.py [--prompts ../shared/bench/mt_bench_questions.jsonl] [-n 20] [--max-tokens 128]
                              [--tree chain:1 ...] [MODEL [HEADS]]

Default model: SmolLM2-135M-Instruct Q4_1 with its shipped heads. Per tree: tokens per step (tokens
committed per verification forward), nodes verified per step, tokens realigned (exact mode), and
how many outputs equal plain decoding's (all must)."""

import argparse
import json
import sys

from medusa_edge.api import chat_prompt_tokens
from medusa_edge.core.engine import Engine
from medusa_edge.core.params import SamplingParams, Stats
from medusa_edge.default_model import default_model
from medusa_edge.training.prompts import load_prompts, prompt_messages

TREES = ["chain:1", "chain:2", "chain:3", "chain:4", "heads", "step:4", "step:8", "step:16"]


def count_nodes(engine: Engine, total: list) -> None:
    """Make the engine add each step's verified nodes to ``total[0]``: the tree cut for the step
    (``_shape``), or for tree="step:N" the tree grown from the step's proposals (``_propose_step``)
    where one is grown."""
    shape, grow = engine._shape, getattr(engine, "_propose_step", None)

    def counted_shape(*a):
        out = shape(*a)
        if not (engine.step_budget and out[0].n_nodes > 1):  # else the step grows its own tree
            total[0] += out[0].n_nodes
        return out

    def counted_grow(*a):
        out = grow(*a)
        if out[0].n_nodes > 1:  # a root-only step came from _shape, counted there
            total[0] += out[0].n_nodes
        return out

    engine._shape, engine._propose_step = counted_shape, counted_grow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("heads", nargs="?")
    ap.add_argument("--prompts", default="../shared/bench/mt_bench_questions.jsonl")
    ap.add_argument("-n", type=int, default=20, help="prompts (default 20)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tree", action="append", help=f"trees to run (default: {' '.join(TREES)})")
    ap.add_argument("-o", "--output", help="JSON file for the results")
    args = ap.parse_args()
    model, heads = (args.model, args.heads) if args.model else default_model()
    trees = args.tree or TREES
    # the reference: plain decoding as exact mode defines it (docs/design.md section 5), one token per
    # forward in an engine that runs trees, so one thread past 256 cells; an engine without a tree
    # keeps all threads there, as llama.cpp does, and rounds differently from every batched row
    plain = Engine(model, heads, tree="chain:1")
    engines, nodes = {}, {}
    for t in trees:
        engines[t] = Engine(model, heads, tree=t)
        nodes[t] = [0]
        count_nodes(engines[t], nodes[t])
    greedy = SamplingParams(temperature=0.0)
    totals = {t: {"tokens": 0, "steps": 0, "realigned": 0, "equal": 0} for t in trees}
    prompts = load_prompts(args.prompts)[: args.n]
    for i, p in enumerate(prompts):
        ids = chat_prompt_tokens(plain.model, prompt_messages(p))
        ref = [x for new in plain.generate(ids, greedy, args.max_tokens, reuse_prefix=False, max_depth=0) for x in new]
        for t in trees:
            st = Stats()
            got = [x for new in engines[t].generate(ids, greedy, args.max_tokens, reuse_prefix=False, stats=st) for x in new]
            tot = totals[t]
            tot["tokens"] += sum((k + 1) * c for k, c in st.accepted_hist.items())
            tot["steps"] += st.steps
            tot["realigned"] += st.realigned
            tot["equal"] += got == ref
        print(f"{i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    rows = []
    print(f"{len(prompts)} prompts, {args.max_tokens} tokens, greedy, chat template; {model}")
    print("| tree | tokens/step | nodes/step | realigned | equal to plain |")
    print("|---|---|---|---|---|")
    for t in trees:
        tot = totals[t]
        tps = tot["tokens"] / tot["steps"] if tot["steps"] else 0.0
        nps = nodes[t][0] / tot["steps"] if tot["steps"] else 0.0
        rows.append(dict(tree=t, tokens_per_step=round(tps, 3), nodes_per_step=round(nps, 2), **tot))
        print(f"| {t} | {tps:.3f} | {nps:.2f} | {tot['realigned']} | {tot['equal']}/{len(prompts)} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": model, "heads": heads, "prompts": len(prompts), "max_tokens": args.max_tokens,
                       "rows": rows}, f, indent=1)
    return 0 if all(r["equal"] == len(prompts) for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
