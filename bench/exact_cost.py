"""Exact mode's speed cost, interleaved in one process: Medusa exact vs exact=False (fastest tree),
and plain decoding in exact mode (one-token decodes on one thread) vs plain at all threads.

    .venv/bin/python bench/exact_cost.py MODEL.gguf HEADS.gguf [TREE|""] [N_PROMPTS]
(prompts: ../shared/bench/mt_bench_questions.jsonl, or MEDUSA_BENCH_PROMPTS)"""
import os, sys, statistics, json
from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge.api import chat_prompt_tokens
model, heads, tree = sys.argv[1], sys.argv[2], (sys.argv[3] or None if len(sys.argv) > 3 else None)
qs = [json.loads(l)["turns"][0] for l in open(os.environ.get("MEDUSA_BENCH_PROMPTS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "mt_bench_questions.jsonl")))][:int(sys.argv[4]) if len(sys.argv) > 4 else 10]
E = {
 "medusa exact": Engine(model, heads, tree=tree, n_ctx=2048, n_threads=2),
 "medusa exact=False": Engine(model, heads, tree=tree, n_ctx=2048, n_threads=2, exact=False),
 "plain exact (1-thread single decodes)": Engine(model, tree="chain:0", n_ctx=2048, n_threads=2),
 "plain exact=False (2 threads)": Engine(model, tree="chain:0", n_ctx=2048, n_threads=2, exact=False),
}
ids = [chat_prompt_tokens(E["medusa exact"].model, [{"role": "user", "content": q}]) for q in qs]
g = SamplingParams(temperature=0)
res = {k: [] for k in E}
for p in ids[:1]:
    for e in E.values():
        for _ in e.generate(p, g, 16): pass
for p in ids:
    for k, e in E.items():
        st = Stats()
        for _ in e.generate(p, g, 128, stats=st, reuse_prefix=False): pass
        res[k].append((st.n_generated, st.t_total - st.t_prefill, st.t_prefill, st.tokens_per_step))
base = sum(r[0] for r in res["plain exact=False (2 threads)"]) / sum(r[1] for r in res["plain exact=False (2 threads)"])
for k, rows in res.items():
    tps = sum(r[0] for r in rows) / sum(r[1] for r in rows)
    print(f"{k:40s} {tps:7.1f} tok/s  x{tps / base:.2f} of plain(2 threads)  prefill {sum(r[2] for r in rows):.2f} s  "
          f"tokens/step {statistics.mean(r[3] for r in rows):.2f}")
