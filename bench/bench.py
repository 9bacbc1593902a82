"""Baseline vs Medusa, side by side in one process on the same GGUF and prompts.

    python bench/bench.py MODEL.gguf [--heads H.medusa.gguf] --prompts FILE.jsonl [--trees default chain:2 chain:4]
                          [--max-tokens 128] [--limit N] [--chat] [--temp 0] [--json out.json]

Prompt files: JSON lines with "prompt" (used as is) or "turns" (MT-Bench: the first turn).
--chat wraps each prompt with the model's chat template, as Medusa.apply_chat_template does. For each tree: tokens/s, speed-up over plain decoding, mean tokens per
step, per-head acceptance, and whether the output equalled the baseline's (greedy: it must).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge.api import chat_prompt_tokens, prompt_tokens


def load_prompts(path: str, limit: int | None) -> list[str]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(d["prompt"] if "prompt" in d else d["turns"][0])
    return out[:limit] if limit else out


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, max_tokens: int):
    total = Stats()
    total.head_accepts = None
    outputs, gen_time = [], 0.0
    for p in prompts:
        st = Stats()
        ids = []
        for new in engine.generate(p, params, max_tokens, stats=st):
            ids.extend(new)
        outputs.append(ids)
        gen_time += st.t_total - st.t_prefill
        total.n_generated += st.n_generated - 1  # tokens made by steps (the prefill's token excluded)
        total.steps += st.steps
        total.accepted_hist.update(st.accepted_hist)
        total.t_decode += st.t_decode
        total.t_heads += st.t_heads
        total.head_accepts = st.head_accepts if total.head_accepts is None else [a + b for a, b in zip(total.head_accepts, st.head_accepts)]
    return outputs, total, gen_time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--heads")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--trees", nargs="+", default=["default", "auto"],
                    help="'default' (the heads file's tree), 'auto' (that tree, depth adapted per step), presets, chain:N")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()

    heads = args.heads
    if heads is None:
        from medusa_edge.schema import sidecar_path

        heads = sidecar_path(args.model)
    plain = Engine(args.model, tree="chain:0", n_ctx=args.n_ctx, n_threads=args.threads)
    texts = load_prompts(args.prompts, args.limit)
    if args.chat:
        prompts = [chat_prompt_tokens(plain.model, [{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [prompt_tokens(plain.model, t) for t in texts]
    params = SamplingParams(temperature=args.temp, seed=1234)
    base_out, base_st, base_t = run(plain, prompts, params, args.max_tokens)
    base_tps = base_st.n_generated / base_t
    print(f"{len(prompts)} prompts x {args.max_tokens} tokens, {args.threads} threads, temperature {args.temp}")
    print(f"{'tree':16s} {'nodes':>5s} {'tok/s':>7s} {'speed-up':>8s} {'tok/step':>8s} {'same':>5s}  head acceptance")
    print(f"{'plain':16s} {1:5d} {base_tps:7.1f} {1.0:8.2f} {1.0:8.2f} {'-':>5s}")
    rows = [{"tree": "plain", "tokens_per_s": base_tps}]
    for spec in args.trees:
        # "default": the heads file's tree, fixed; "auto": the same tree with its depth adapted per step
        e = Engine(args.model, heads, tree=None if spec in ("default", "auto") else spec, adaptive=spec == "auto",
                   n_ctx=args.n_ctx, n_threads=args.threads)
        out, st, t = run(e, prompts, params, args.max_tokens)
        tps = st.n_generated / t
        same = sum(a == b for a, b in zip(out, base_out))
        acc = [a / st.steps for a in st.head_accepts] if st.steps else []
        print(f"{spec:16s} {e.tree.n_nodes:5d} {tps:7.1f} {tps / base_tps:8.2f} {st.tokens_per_step:8.2f} {same:2d}/{len(out):<2d}  "
              + " ".join(f"{a:.2f}" for a in acc))
        rows.append({"tree": spec, "nodes": e.tree.n_nodes, "tokens_per_s": tps, "speedup": tps / base_tps,
                     "tokens_per_step": st.tokens_per_step, "same_as_baseline": same, "n": len(out), "head_acceptance": acc})
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
