"""One step's time locally against llama.cpp's RPC backend on loopback (docs/scaling.md, "RPC").

    python bench/rpc_step.py [MODEL.gguf ...] [--tokens 96] [--server-threads 1] [--json FILE]

Starts two ``medusa-edge rpc-server`` processes on 127.0.0.1 (free ports), then decodes the same
greedy prompts with each model (default: the bundled demo model, and the default SmolLM2-135M
Q4_1 where installed) and its heads:
  local t=N   every layer on this machine's CPU, N threads (N = --server-threads, and all cores)
  rpc x1      every layer on one server (n_gpu_layers=-1), the heads there too
  rpc x2      the layers split over two servers, the output layer and the heads on the second
each with plain decoding (one token per step) and the heads file's tree. It reports per step the
median wall time (between two yields of Engine.generate: decode, heads and the engine's own work),
the mean llama_decode and heads time, tokens per step, and whether the text equals the local
run's; the runs take turns for --rounds rounds, and each reports its best round. The servers' CPU threads equal the local ``t=--server-threads`` run's, so the difference
between that row and the rpc rows is what the network (serialisation, loopback TCP, the extra
round trips) adds to a step. Needs llama-cpp-python built with RPC (MEDUSA_RPC=1 scripts/setup.sh).
"""

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge.core import rpc

PROMPTS = ["Once upon a time", "Q: Tell me about a fox.\nA:", "The little bear went to the river and"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(n: int, threads: int) -> tuple[list, list[str]]:
    procs, eps = [], []
    for _ in range(n):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "medusa_edge.cli", "rpc-server", "--port", str(port),
                                       "-t", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        eps.append(f"127.0.0.1:{port}")
    for ep in eps:
        deadline = time.time() + 30
        while True:
            try:
                rpc.probe(ep, timeout=2)
                break
            except rpc.RpcError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
    return procs, eps


def measure(engine, prompts, n_tokens: int):
    walls, texts = [], []
    st = Stats()
    for p in prompts:
        ids = engine.model.tokenize(p, True, False)
        out, last = [], None
        for new in engine.generate(ids, SamplingParams(temperature=0.0), n_tokens, reuse_prefix=False, stats=st):
            now = time.perf_counter()
            if last is not None:  # the first yield is the prefill's
                walls.append(now - last)
            last = now
            out.extend(new)
        texts.append(out)
    steps = max(st.steps, 1)
    return {"step_ms": float(np.median(walls)) * 1e3, "decode_ms": st.t_decode / steps * 1e3,
            "heads_ms": st.t_heads / steps * 1e3, "tokens_per_step": st.tokens_per_step, "steps": st.steps}, texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the runs; each run's best round is reported")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not rpc.available():
        print(f"bench/rpc_step.py: {rpc.BUILD_HINT}", file=sys.stderr)
        return 1
    models = args.models
    if not models:
        from medusa_edge.default_model import default_model, demo_model_path

        models = [demo_model_path()]
        try:
            models.append(default_model()[0])
        except Exception:  # the default model's package is not installed: the demo model alone
            pass
    procs, eps = start_servers(2, args.server_threads)
    rows = []
    try:
        for model in models:
            heads = model[: -len(".gguf")] + ".medusa.gguf"
            if not os.path.isfile(heads):
                from medusa_edge.default_model import default_model

                heads = default_model()[1]
            for tree in ("chain:0", "heads"):
                runs = {}
                for name, kw in ((f"local t={args.server_threads}", dict(n_threads=args.server_threads)),
                                 (f"local t={os.cpu_count()}", dict(n_threads=os.cpu_count())),
                                 ("rpc x1", dict(n_gpu_layers=-1, rpc_servers=eps[:1])),
                                 ("rpc x2", dict(n_gpu_layers=-1, rpc_servers=eps))):
                    e = Engine(model, heads if tree != "chain:0" else None, tree=tree, n_ctx=1024, **kw)
                    measure(e, PROMPTS[:1], 8)  # warm-up: graphs, buffers, the connection
                    runs[name] = (e, [])
                # rounds interleave the runs, and each keeps its best round: on a shared machine
                # another process's load then slows every run alike, or none
                ref = None
                for _ in range(args.rounds):
                    for name, (e, got) in runs.items():
                        r, texts = measure(e, PROMPTS, args.tokens)
                        ref = texts if ref is None else ref
                        r["same_text"] = texts == ref
                        got.append(r)
                for name, (e, got) in runs.items():
                    r = dict(min(got, key=lambda x: x["step_ms"]))
                    r.update(model=os.path.basename(model), tree=tree, run=name,
                             same_text=all(x["same_text"] for x in got), rounds=len(got),
                             guarantee=e.guarantee, heads_on=e.heads.backend if e.heads else "-",
                             output_device=e.model.output_device or "CPU")
                    rows.append(r)
                    print(f"{r['model']:34s} {tree:8s} {name:10s} step {r['step_ms']:7.2f} ms (decode {r['decode_ms']:6.2f}, "
                          f"heads {r['heads_ms']:5.2f})  {r['tokens_per_step']:.2f} tok/step  same text: {r['same_text']}  "
                          f"{r['guarantee']}  heads on {r['heads_on']}", flush=True)
                runs.clear()
                del e  # every model and heads freed while their servers run: llama.cpp aborts on a dead one
    finally:
        gc.collect()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
