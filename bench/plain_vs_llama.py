"""Plain decoding against llama-cpp-python after N cached tokens, interleaved in one process.

    python bench/plain_vs_llama.py MODEL.gguf [--heads HEADS.gguf] [--cached 64,300,1000] [-n 64] [--rounds 3]

Per cached length (the prompt: MT-Bench questions run together as text, cut to that many tokens;
random text tokens without --prompts), each method decodes ``-n`` greedy tokens after the prompt,
and the methods take turns within every round, so drift and load hit all alike:
  * llama-cpp-python: ``Llama`` on all threads, the same GGUF, flash attention and micro-batch;
  * no heads: this engine on the GGUF alone (every default);
  * with --heads, the engine's own plain steps in exact mode (``max_depth=0``), which past 256 KV
    cells run either as one-thread one-token decodes or padded to a 2-token batch on all threads
    (``Engine.pad_kv_split``): both are timed;
  * with --heads, Medusa with every default (tree="auto").
Prints tokens/s (after the first token) per method and length, and each one's ratio to
llama-cpp-python; -o writes the JSON.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge.core.exactness import llama_cpp_baseline

GREEDY = SamplingParams(temperature=0.0)


def engine_run(e: Engine, ids: list, n: int, max_depth=None) -> tuple[int, float]:
    st = Stats()
    for _ in e.generate(ids, GREEDY, n, stats=st, reuse_prefix=False, max_depth=max_depth):
        pass
    return st.n_generated - 1, st.t_total - st.t_prefill


def llama_run(llm, model, ids: list, n: int) -> tuple[int, float]:
    llm.reset()
    out, t_first = 0, None
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        out += 1
        if out >= n or model.is_eog(int(tok)):
            break
    return out - 1, time.perf_counter() - t_first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--heads", help="also time the engine's plain steps with heads loaded (exact mode), and Medusa")
    ap.add_argument("--prompts", help="MT-Bench-style JSONL (turns[0] per line) for the cached text")
    ap.add_argument("--cached", default="64,300,1000", help="cached tokens before decoding, comma-separated")
    ap.add_argument("-n", "--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.cached.split(",")]
    n_ctx = max(lengths) + args.tokens + 16
    bare = Engine(args.model, n_ctx=n_ctx, n_threads=args.threads)
    m = bare.model
    base = llama_cpp_baseline(bare, n_ctx=n_ctx)
    if args.prompts:
        text = " ".join(json.loads(line)["turns"][0] for line in open(args.prompts) if line.strip())
        pool = list(m.tokenize(text, True, False))
        while len(pool) < max(lengths):
            pool += pool[1:]
    else:
        rng = np.random.default_rng(0)
        pool = [m.bos] + [int(t) for t in rng.integers(100, m.n_vocab, max(lengths))]
    methods = {"llama-cpp-python": lambda ids: llama_run(base, m, ids, args.tokens),
               "no heads": lambda ids: engine_run(bare, ids, args.tokens)}
    if args.heads:
        med = Engine(args.model, args.heads, n_ctx=n_ctx, n_threads=args.threads)
        pad = med.pad_kv_split

        def plain_steps(padded: bool):
            def run(ids):
                med.pad_kv_split = padded
                try:
                    return engine_run(med, ids, args.tokens, max_depth=0)
                finally:
                    med.pad_kv_split = pad
            return run

        if med.n_threads_kv_split < med.n_threads:
            methods[f"heads, plain steps, {med.n_threads_kv_split} thread(s) past 256"] = plain_steps(False)
            methods["heads, plain steps, padded past 256"] = plain_steps(True)
        else:
            methods["heads, plain steps"] = plain_steps(pad)
        methods["medusa (auto tree)"] = lambda ids: engine_run(med, ids, args.tokens)
    for f in methods.values():  # warm-up
        f(pool[:32])
    res = {L: {k: [] for k in methods} for L in lengths}
    for _ in range(args.rounds):
        for L in lengths:
            for k, f in methods.items():
                res[L][k].append(f(pool[:L]))
    out = {"model": os.path.abspath(args.model), "heads": args.heads, "tokens": args.tokens, "rounds": args.rounds,
           "threads": bare.n_threads, "flash_attn": bare.flash_attn, "results": {}}
    for L in lengths:
        tps = {k: sum(n for n, _ in v) / sum(t for _, t in v) for k, v in res[L].items()}
        spread = {k: statistics.pstdev([n / t for n, t in v]) / tps[k] for k, v in res[L].items()}
        out["results"][L] = {k: {"tokens_per_s": round(tps[k], 2), "vs_llama_cpp": round(tps[k] / tps["llama-cpp-python"], 3),
                                 "round_spread": round(spread[k], 3)} for k in methods}
        print(f"after {L} cached tokens:")
        for k in methods:
            r = out["results"][L][k]
            print(f"  {k:45s} {r['tokens_per_s']:8.1f} tok/s  {r['vs_llama_cpp']:.3f}x llama-cpp-python  (+-{r['round_spread']:.0%})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
