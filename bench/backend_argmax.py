"""Does llama.cpp's backend sampling give each tree row the token the host's argmax gives?

    python bench/backend_argmax.py MODEL.gguf [-ngl N] [--reps N]

The experiment behind docs/design.md section 9 ("device argmax"), on the llama.cpp that
llama-cpp-python 0.3.36 vendors, through its low-level API (not the engine):

1. a 20-token prompt on seq ids 0-3, then a 7-row tree (root on 0-3; two depth-1 nodes on {0,1}
   and {2,3}; four leaves on one seq id each), every row an output: the host argmax of each row;
2. the tree removed, a greedy sampler chain attached to every seq id (``llama_set_sampler``),
   the host logits poisoned with NaN, the same tree decoded: ``llama_get_sampled_token_ith``
   per row, and whether raw logits still came to the host;
3. the median time of decoding the tree and getting 3 rows' tokens, with and without samplers.

Prints one JSON object. Exit status 1 when a row's backend token differs from the host argmax.
``n_outputs_max_per_seq`` defaults to 1 in this version, and a tree decode with samplers then
fails (a seq id carried by several output rows); the script sets it to 16 (a context parameter
llama-cpp-python's ``Llama`` does not expose; the engine's native context could).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

N_SEQ = 4
PROMPT = list(range(100, 120))
# (token, depth, seq ids): parents before children
TREE = [(500, 0, [0, 1, 2, 3]), (501, 1, [0, 1]), (502, 1, [2, 3]), (503, 2, [0]), (504, 2, [1]), (505, 2, [2]), (506, 2, [3])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import llama_cpp as L

    from medusa_edge.guards.hw import use_extra_bufts

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = args.n_gpu_layers
    mp.use_extra_bufts = use_extra_bufts()  # the AMX guard
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        print(f"cannot load {args.model}", file=sys.stderr)
        return 2
    cp = L.llama_context_default_params()
    default_per_seq = int(cp.n_outputs_max_per_seq)
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 256
    cp.n_seq_max = N_SEQ
    cp.kv_unified = True
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.n_outputs_max_per_seq = 16
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    mem = L.llama_get_memory(ctx)
    n = len(PROMPT)

    def decode(rows) -> None:
        b = L.llama_batch_init(len(rows), 0, N_SEQ)
        try:
            for i, (tok, pos, seqs, out) in enumerate(rows):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seqs), out
                for j, s in enumerate(seqs):
                    b.seq_id[i][j] = s
            b.n_tokens = len(rows)
            rc = L.llama_decode(ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            L.llama_batch_free(b)

    def row(i) -> np.ndarray:
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), (n_vocab,))

    tree = [(tok % n_vocab, n + d, seqs, True) for tok, d, seqs in TREE]  # any vocabulary size

    def drop_tree() -> None:
        for s in range(N_SEQ):
            L.llama_memory_seq_rm(mem, s, n, -1)

    def timed(read) -> float:
        ts = []
        for _ in range(args.reps):
            drop_tree()
            t = time.perf_counter()
            decode(tree)
            read()
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    decode([(t % n_vocab, p, list(range(N_SEQ)), p == n - 1) for p, t in enumerate(PROMPT)])
    decode(tree)
    logits = [row(i).copy() for i in range(len(tree))]
    host = [int(np.argmax(r)) for r in logits]
    ms_host = timed(lambda: [int(np.argmax(row(i))) for i in range(3)])

    drop_tree()
    chains = []
    t0 = time.perf_counter()
    for s in range(N_SEQ):
        ch = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(ch, L.llama_sampler_init_greedy())
        if not L.llama_set_sampler(ctx, s, ch):
            print(f"llama_set_sampler refused seq {s}", file=sys.stderr)
            return 2
        chains.append(ch)
    ms_attach = 1e3 * (time.perf_counter() - t0)
    for i in range(len(tree)):
        row(i)[:] = np.nan
    decode(tree)
    backend = [int(L.llama_get_sampled_token_ith(ctx, i)) for i in range(len(tree))]
    after = [row(i) for i in range(len(tree))]
    if all(np.isnan(r).all() for r in after):
        raw = "not copied"
    elif all(np.array_equal(a, b) for a, b in zip(after, logits)):
        raw = "copied"
    else:
        raw = "other values"
    ms_backend = timed(lambda: [L.llama_get_sampled_token_ith(ctx, i) for i in range(3)])
    for s in range(N_SEQ):
        L.llama_set_sampler(ctx, s, None)
    for ch in chains:
        L.llama_sampler_free(ch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    res = {
        "model": args.model, "n_gpu_layers": args.n_gpu_layers, "rows": len(tree),
        "host_argmax": host, "backend_greedy": backend, "equal": host == backend,
        "raw_logits_with_samplers": raw, "default_n_outputs_max_per_seq": default_per_seq,
        "attach_samplers_ms": round(ms_attach, 3),
        "tree_decode_and_3_tokens_ms": {"host_argmax": round(ms_host, 3), "backend_greedy": round(ms_backend, 3)},
    }
    print(json.dumps(res))
    return 0 if res["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
