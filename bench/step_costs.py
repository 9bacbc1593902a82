"""What a Medusa step costs besides the forward, on this machine (docs/design.md section 9).

    python bench/step_costs.py rows MODEL.gguf [MODEL.gguf ...]
    python bench/step_costs.py heads MODEL.gguf HEADS.medusa.gguf [HEADS.medusa.gguf ...]

rows: host time to read a tree's rows after one decode: every row's argmax (what greedy acceptance
read before it went lazy) against the 3 rows of a 2-token accepted path, for star trees of 4 to 64
nodes; and what llama_synchronize costs when nothing is pending.
heads: one heads pass (top-10) for 1..n heads used, median of 9 calls after a warm-up, from a
fixed random hidden state.
"""

import sys
import time

import numpy as np

from medusa_edge._loader import native
from medusa_edge.guards.hw import load_model


def median_us(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6


def rows(paths) -> None:
    for path in paths:
        m = load_model(path)
        ctx = native.Context(m, 512, 64, 2, 64, False, 1, 0, 2)
        ctx.prefill([max(m.bos, 0)] * 20, 0, False)
        for n in (4, 8, 16, 64):
            shape = native.TreeShape([0] + [1] * (n - 1), [list(range(n - 1))] + [[i] for i in range(n - 1)])
            ctx.truncate(20)
            ctx.decode_tree(shape, np.full(n, 5, np.int32), 20)
            every = median_us(lambda: ctx.argmax(n), 200)
            path3 = median_us(lambda: [ctx.argmax_row(r) for r in range(min(n, 3))], 200)
            sync = median_us(ctx.synchronize, 200)
            print(f"{path.split('/')[-1]}: vocab {m.n_vocab}, {n:2d}-node tree: every row {every:7.1f} us, "
                  f"a 3-row path {path3:6.1f} us; llama_synchronize {sync:.1f} us")


def heads(model_path: str, heads_paths) -> None:
    for hp in heads_paths:
        h = native.Heads(hp, model_path, 2)
        x = np.random.default_rng(1).standard_normal(h.n_embd).astype(np.float32)
        row = []
        for d in range(1, h.n_heads + 1):
            h.propose_hidden(x, 10, d, 0)
            row.append(median_us(lambda: h.propose_hidden(x, 10, d, 0), 9) / 1e3)
        kind = ("shared output" if h.shared_output else "own output matrices") + (", root input" if h.root_input else "")
        print(f"{hp.split('/')[-1]} ({kind}, {h.n_heads} heads, n_embd {h.n_embd}, vocab {h.n_vocab}): "
              "ms per pass for 1.." + f"{h.n_heads} heads used: " + " ".join(f"{t:.1f}" for t in row))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("rows", "heads"):
        sys.exit(__doc__)
    if sys.argv[1] == "rows":
        rows(sys.argv[2:])
    else:
        heads(sys.argv[2], sys.argv[3:])
