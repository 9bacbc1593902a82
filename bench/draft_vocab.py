"""Draft-vocabulary figures for the default model: coverage on MT-Bench first turns (measured, never trained on)
and the heads pass time, full vocabulary against N = 8192.  python bench/draft_vocab.py WORKDIR"""
import argparse, json, os, sys, time
import numpy as np
from medusa_edge.training import train as th
from medusa_edge.default_model import default_model
from medusa_edge.heads.writer import draft_vocab_from_counts, restrict_heads_file
from medusa_edge._loader import native

W = sys.argv[1] if len(sys.argv) > 1 else "/tmp/dv"  # holds prompts.jsonl (medusa-edge prompts -n 240 --seed 0)
BASE, HEADS = default_model()
# 1. frequencies: greedy answers to medusa-edge prompts (the shipped heads' training cache is not here)
a = th.parse_restrict_args([HEADS, BASE, "--draft-vocab", "8192", "--data", f"{W}/prompts.jsonl", "--cache", f"{W}/freq.data",
                            "-o", f"{W}/heads-8k.medusa.gguf", "--threads", "2", "--quiet"])
t0 = time.time()
counts = th.token_counts(a)
print(f"frequency data: {int(counts.sum())} tokens, {int((counts > 0).sum())} distinct, {time.time() - t0:.0f} s", flush=True)
# 2. MT-Bench first turns: the base's greedy answers (128 tokens, chat template), coverage only
m = th.parse_restrict_args([HEADS, BASE, "--draft-vocab", "8192", "--data", "../shared/bench/mt_bench_questions.jsonl",
                            "--cache", f"{W}/mtbench.data", "-o", f"{W}/unused.gguf", "--threads", "2", "--quiet"])
mt_counts = th.token_counts(m)
hidden, mt_tokens, lengths, _ = th.DataCache(f"{W}/mtbench.data", json.load(open(f"{W}/mtbench.data/meta.json"))["identity"]).load()
print(f"MT-Bench answers: {len(lengths)} answers, {len(mt_tokens)} tokens", flush=True)
res = {"freq_tokens": int(counts.sum()), "freq_distinct": int((counts > 0).sum()), "mt_tokens": int(len(mt_tokens)), "coverage": {}}
for n in (4096, 8192, 16384):
    d = draft_vocab_from_counts(counts, n)
    ind = np.zeros(len(counts), bool); ind[d] = True
    res["coverage"][n] = round(float(ind[mt_tokens].mean()), 4)
    print(f"N = {n}: coverage of MT-Bench greedy tokens {res['coverage'][n]:.4f}", flush=True)
restrict_heads_file(HEADS, f"{W}/heads-8k.medusa.gguf", draft_vocab_from_counts(counts, 8192))
# 3. heads pass time, native propose_hidden, logp=False, 40 alternated calls each, real hidden states
full = native.Heads(HEADS, BASE, 2)
draft = native.Heads(f"{W}/heads-8k.medusa.gguf", BASE, 2)
rows = np.random.default_rng(0).choice(len(mt_tokens), 40, replace=False)
hs = [np.ascontiguousarray(hidden.take(np.array([r]))[0], dtype=np.float32) for r in rows]
roots = [int(mt_tokens[r]) for r in rows]
res["pass_ms"] = {}
for k in (1, 10):
    for nh in (1, 4):
        for hd in (full, draft):
            hd.propose_hidden(hs[0], k, nh, roots[0], logp=False)  # build the graph
        t = {"full": [], "draft": []}
        for i in range(40):
            for name, hd in (("full", full), ("draft", draft)) if i % 2 == 0 else (("draft", draft), ("full", full)):
                t0 = time.perf_counter(); hd.propose_hidden(hs[i], k, nh, roots[i], logp=False); t[name].append(time.perf_counter() - t0)
        r = {nm: round(1e3 * float(np.median(v)), 3) for nm, v in t.items()}
        res["pass_ms"][f"k={k},heads={nh}"] = r
        print(f"k = {k}, {nh} heads: full vocabulary {r['full']} ms, draft 8k {r['draft']} ms", flush=True)
json.dump(res, open(f"{W}/results.json", "w"), indent=1)
