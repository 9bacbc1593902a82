"""A random-weight Llama GGUF with a large model's shapes, written tensor by tensor.

    python bench/make_random_gguf.py OUT.gguf [--shape vicuna-7b] [--type q4_0|q4_k_m] [--seed 0]

For measuring what a step costs at that scale (``medusa-edge bench --replay``): the forward of a
random model costs what the real one does, since llama.cpp's kernels do not look at values.
Quantized blocks are drawn directly as random bytes with small fixed scales (never as f32
weights), and each tensor is written as soon as it is drawn, so a 7B model needs a few hundred MB
of memory, not 28 GB. q4_k_m follows llama.cpp's Q4_K_M mix: Q6_K for the output matrix and for
attn_v / ffn_down in half the layers, Q4_K elsewhere.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

SHAPES = {
    # name: n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab
    "vicuna-7b": (4096, 32, 32, 32, 11008, 32000),
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "openllama-3b": (3200, 26, 32, 32, 8640, 32000),
    "tiny": (256, 2, 4, 4, 512, 1024),  # for the tests
}


def _f16(x: float) -> np.ndarray:
    return np.array([x], np.float16).view(np.uint8)


def random_blocks(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """uint8 [rows, bytes per row] of valid random blocks whose weights have std about 1/sqrt(cols)."""
    if qtype == "q4_0":  # 32 weights: f16 d, 16 bytes of nibbles; w = d * (q - 8)
        nb, size = cols // 32, 18
        out = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
        out[:, :, 0:2] = _f16(1.0 / (4.6 * np.sqrt(cols)))
    elif qtype == "q4_k":  # 256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        nb, size = cols // 256, 144
        out = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
        out[:, :, 0:2] = _f16(1.0 / (32 * 4.6 * np.sqrt(cols)))
        out[:, :, 2:4] = _f16(1.0 / (32 * 8 * np.sqrt(cols)))
    elif qtype == "q6_k":  # 256 weights: ql[128], qh[64], int8 scales[16], f16 d
        nb, size = cols // 256, 210
        out = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
        out[:, :, 192:208] = rng.integers(1, 32, size=(rows, nb, 16), dtype=np.uint8)
        out[:, :, 208:210] = _f16(1.0 / (16 * 18.5 * np.sqrt(cols)))
    else:
        raise ValueError(qtype)
    return out.reshape(rows, nb * size)


def write(path: str, shape: str, qtype: str, seed: int = 0, log=print) -> None:
    import gguf

    from medusa_edge.testing import add_llama_metadata, make_vocab

    n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab = SHAPES[shape]
    head_dim = n_embd // n_head
    tokens, scores, types = make_vocab(240, 0)
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581tok{len(tokens)}")
        scores.append(-2000.0)
        types.append(1)
    T = gguf.GGMLQuantizationType
    base_q = {"q4_0": "q4_0", "q4_k_m": "q4_k"}[qtype]
    qenum = {"q4_0": T.Q4_0, "q4_k": T.Q4_K, "q6_k": T.Q6_K}

    plan = [("token_embd.weight", n_vocab, n_embd, base_q)]
    for i in range(n_layer):
        big = "q6_k" if qtype == "q4_k_m" and i % 2 == 0 else base_q
        plan += [
            (f"blk.{i}.attn_norm.weight", 0, n_embd, "f32"),
            (f"blk.{i}.attn_q.weight", n_embd, n_embd, base_q),
            (f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd, base_q),
            (f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd, big),
            (f"blk.{i}.attn_output.weight", n_embd, n_embd, base_q),
            (f"blk.{i}.ffn_norm.weight", 0, n_embd, "f32"),
            (f"blk.{i}.ffn_gate.weight", n_ff, n_embd, base_q),
            (f"blk.{i}.ffn_up.weight", n_ff, n_embd, base_q),
            (f"blk.{i}.ffn_down.weight", n_embd, n_ff, big),
        ]
    plan += [("output_norm.weight", 0, n_embd, "f32"), ("output.weight", n_vocab, n_embd, "q6_k" if qtype == "q4_k_m" else base_q)]

    w = gguf.GGUFWriter(path, "llama")
    add_llama_metadata(w, f"random-{shape}-{qtype}", n_ctx_train=4096, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                       n_head=n_head, n_head_kv=n_head_kv, file_type={"q4_0": 2, "q4_k_m": 15}[qtype],
                       vocab=(tokens, scores, types))
    nbytes_of = {"q4_0": (32, 18), "q4_k": (256, 144), "q6_k": (256, 210)}
    for name, rows, cols, q in plan:
        if q == "f32":
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            per, size = nbytes_of[q]
            nb = rows * (cols // per) * size
            w.add_tensor_info(name, (rows, nb // rows), np.dtype(np.uint8), nb, raw_dtype=qenum[q])
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = len(plan)
    for k, (name, rows, cols, q) in enumerate(plan):
        if q == "f32":
            w.write_tensor_data(np.ones(cols, np.float32))
        else:
            parts = [random_blocks(min(1024, rows - r), cols, q, rng) for r in range(0, rows, 1024)]
            w.write_tensor_data(np.concatenate(parts))
        if log and (k % 20 == 0 or k == total - 1):
            log(f"  {k + 1}/{total} tensors written ({name})")
    w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="vicuna-7b")
    ap.add_argument("--type", choices=("q4_0", "q4_k_m"), default="q4_0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    write(args.output, args.shape, args.type, args.seed)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
