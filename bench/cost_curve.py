"""The verification cost curve t(B)/t(1) as the tuner measures it, for chains and planned trees.

    python bench/cost_curve.py MODEL.gguf [-ngl 99] [--sizes 1,2,4,8,9,16,32,64] [-o costs.json]

Runs ``tune.measure_costs`` (each size back to back after warm-up decodes, so llama.cpp reuses its
compute graph and a CUDA backend its captured CUDA graph) twice on one context, out of exact
mode: once with chains of B tokens and once with the B-node trees the planner grows from the
Vicuna-7B Medusa-1 accuracies (``tune.planned_shapes``). Prints and writes, per shape, t(B) in ms,
t(B)/t(1), the spread of each median and the share of timed decodes that reused the graph
(llama_perf_context's n_reused). Set GGML_CUDA_DISABLE_GRAPHS=1 to measure without CUDA graphs.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

from medusa_edge.core import tune
from medusa_edge._loader import native
from medusa_edge.core.engine import Engine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--sizes", default="1,2,4,8,9,16,32,64", help="batch sizes, comma-separated")
    ap.add_argument("--n-past", type=int, default=256, help="cached tokens before each verification (default 256)")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timed rounds per shape (default 6)")
    ap.add_argument("-o", "--output", help="write the JSON here")
    args = ap.parse_args(argv)
    sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    if not sizes or sizes[0] < 1 or sizes[-1] > 64:
        ap.error("--sizes: batch sizes between 1 and 64")
    # out of exact mode: a context of 64 sequences, so every planned tree fits
    eng = Engine(args.model, tree="mc_sim_7b_63", n_ctx=args.n_past + 128, n_batch=64, n_threads=args.threads,
                 n_gpu_layers=args.n_gpu_layers, exact=False)
    prof = tune.VICUNA_7B_PROFILE
    out = {"model": os.path.abspath(args.model), "n_gpu_layers": args.n_gpu_layers, "n_past": args.n_past,
           "cuda_graphs_disabled": os.environ.get("GGML_CUDA_DISABLE_GRAPHS") is not None, "shapes": {}}
    for name, shape_of in (("chain", None),
                           ("tree", tune.planned_shapes(native, prof, len(prof), eng.ctx.n_seq_max))):
        c = tune.measure_costs(eng.ctx, native, eng.model, None, max_batch=max(sizes), n_past=args.n_past,
                               time_budget=args.budget, tolerance=0.02, shape_of=shape_of, sizes=sizes,
                               linear_cutoff=False, n_threads=eng.n_threads)
        out["shapes"][name] = dict(asdict(c), ratio=c.ratio())
        print(f"{name:5s} graph reuse {c.graph_reuse:.2f}, {c.rounds} rounds")
        for b, t, r, sp in zip(c.batch, c.t_decode, c.ratio(), c.spread):
            print(f"  B={b:3d}  {t * 1e3:8.3f} ms  t(B)/t(1) {r:6.3f}  +-{sp:.1%}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
