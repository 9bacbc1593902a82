"""Engine overhead per step, and the heads' cost, on this machine.

    python bench/engine_overhead.py [--workdir DIR] [--tokens 128] [--vicuna-heads]

Builds a random-weight ~100M-parameter Llama (Q8_0, vocab 32000) and random Q8_0 heads, then
for a 64-node tree and a 4-node chain reports per step: time in llama_decode, in the heads,
and everything else (the engine's own overhead), with the plain-decoding baseline beside it.
--vicuna-heads also times one heads call for a Vicuna-7B-shaped head set (5 heads, H 4096,
V 32000, Q8_0; writes ~0.8 GB to the workdir).
"""

import argparse
import os
import tempfile
import time

import numpy as np

from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge._loader import native
from medusa_edge.guards.hw import load_model
from medusa_edge.testing import write_llama_gguf, write_random_heads


def run(engine, prompt, n):
    st = Stats()
    for _ in engine.generate(prompt, SamplingParams(temperature=0.0), n, stats=st):
        pass
    return st


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vicuna-heads", action="store_true")
    args = ap.parse_args()
    wd = args.workdir or tempfile.mkdtemp(prefix="medusa-bench-")
    os.makedirs(wd, exist_ok=True)
    model = os.path.join(wd, "bench-100m-q8_0.gguf")
    heads = os.path.join(wd, "bench-100m-q8_0.medusa.gguf")
    if not os.path.exists(model):
        t = time.time()
        m = write_llama_gguf(model, n_embd=768, n_layer=8, n_head=12, n_head_kv=12, n_ff=2048, vocab_size=32000, dtype="q8_0", seed=0)
        write_random_heads(heads, m, n_heads=4, head_type="q8_0")
        print(f"built model and heads in {time.time() - t:.1f} s")
    probe = load_model(model)
    print(f"model: {probe.n_params / 1e6:.0f}M params, {probe.size_bytes / 2**20:.0f} MiB, threads {args.threads}")
    prompt = probe.tokenize("the old house was along the water and the children", True, False)
    del probe
    rows = []
    for name, tree, hp in [("plain", "chain:0", None), ("chain:3 (4 nodes)", "chain:3", heads), ("mc_sim_7b_63 (64 nodes)", "mc_sim_7b_63", heads)]:
        e = Engine(model, hp, tree=tree, n_ctx=1024, n_threads=args.threads)
        run(e, prompt, 8)  # warm-up
        st = run(e, prompt, args.tokens)
        loop = st.t_total - st.t_prefill
        steps = max(st.steps, 1)
        rows.append((name, st.steps, loop / steps * 1e3, st.t_decode / steps * 1e3, st.t_heads / steps * 1e3,
                     st.t_other / steps * 1e3, 100 * st.t_other / loop, st.n_generated / loop))
    print(f"\n{'tree':26s} {'steps':>5s} {'step ms':>8s} {'decode':>8s} {'heads':>8s} {'other':>8s} {'other %':>8s} {'tok/s':>7s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:5d} {r[2]:8.2f} {r[3]:8.2f} {r[4]:8.2f} {r[5]:8.3f} {r[6]:7.2f}% {r[7]:7.1f}")
    print("(random heads: nothing is accepted, so tokens/step is 1 and this measures cost, not speed-up)")

    if args.vicuna_heads:
        from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf

        hp = os.path.join(wd, "vicuna7b-shaped.medusa.gguf")
        if not os.path.exists(hp):
            H, V, n = 4096, 32000, 5
            rng = np.random.default_rng(0)

            def tensors():
                for i in range(n):
                    yield f"medusa.{i}.res.0.weight", (rng.standard_normal((H, H), np.float32) / 64).astype(np.float32)
                    yield f"medusa.{i}.res.0.bias", np.zeros(H, np.float32)
                    yield f"medusa.{i}.output.weight", (rng.standard_normal((V, H), np.float32) / 64).astype(np.float32)

            t = time.time()
            write_heads_gguf(hp, HeadsMeta(n, 1, H, V, False, None, "0" * 16), tensors(), "q8_0")
            print(f"\nwrote {hp} ({os.path.getsize(hp) / 2**20:.0f} MiB) in {time.time() - t:.0f} s")
        heads_v = native.Heads(hp, "", args.threads)
        h = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
        heads_v.propose_hidden(h, 10)
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            heads_v.propose_hidden(h, 10)
            ts.append(time.perf_counter() - t)
        print(f"Vicuna-7B-shaped heads (5 x [4096 + 4096x32000], Q8_0, top-10): median {np.median(ts) * 1e3:.1f} ms, min {min(ts) * 1e3:.1f} ms per call on {heads_v.backend}")


if __name__ == "__main__":
    main()
