"""Train Medusa heads on the demo base, Medusa-1 (frozen base) or Medusa-2 (joint), in torch.

    python demo/train_medusa.py --base build/demo-hf --data build/demo-data --out build/demo-m1 --mode medusa1
    python demo/train_medusa.py --base build/demo-hf --data build/demo-data --out build/demo-m2 --mode medusa2

Heads follow the reference: head i (0-based) reads the post-norm hidden state at t and predicts the
token at t+2+i; ResBlock = x + SiLU(W x + b) with W zero-initialised; W_out starts as the base lm_head.
Loss: sum_i 0.8^i CE_i (the paper's decay). Medusa-2 adds the base's own LM loss and trains the
backbone too (lower learning rate), as in the paper's joint recipe.

The output is a Medusa-2-layout full checkpoint (the base weights plus ``medusa_head.{i}.{j}.linear.*``
and ``medusa_head.{i}.{L}.weight``, config with medusa_num_heads/medusa_num_layers), which
``python -m convert OUT`` turns into a base GGUF and a heads GGUF.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="HF base checkpoint dir (from train_base.py)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["medusa1", "medusa2"], default="medusa1")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base-lr", type=float, default=1e-4, help="medusa2: backbone learning rate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file
    from torch import nn
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    t0 = time.time()
    base = LlamaForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
    H, V = base.config.hidden_size, base.config.vocab_size
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.base, "tokenizer.model"))

    def encode(path):
        out = []
        with open(path) as f:
            for line in f:
                out += [sp.bos_id()] + sp.encode(line.rstrip("\n").replace("\\n", "\n")) + [sp.eos_id()]
        return np.array(out, np.int64)

    stream = encode(os.path.join(args.data, "train.txt"))
    n_blocks = len(stream) // args.seq
    blocks = torch.from_numpy(stream[: n_blocks * args.seq].reshape(n_blocks, args.seq))
    held = encode(os.path.join(args.data, "heldout.txt"))
    held = torch.from_numpy(held[: (len(held) // args.seq) * args.seq].reshape(-1, args.seq))

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(H, H)
            nn.init.zeros_(self.linear.weight)

        def forward(self, x):
            return x + nn.functional.silu(self.linear(x))

    heads = nn.ModuleList()
    for _ in range(args.heads):
        out = nn.Linear(H, V, bias=False)
        out.weight.data.copy_(base.lm_head.weight.data)
        heads.append(nn.Sequential(*[ResBlock() for _ in range(args.layers)], out))

    joint = args.mode == "medusa2"
    for p in base.parameters():
        p.requires_grad_(joint)
    groups = [{"params": list(heads.parameters()), "lr": args.lr}]
    if joint:
        groups.append({"params": list(base.parameters()), "lr": args.base_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    weights = [0.8**i for i in range(args.heads)]

    def losses(x, train: bool):
        with torch.set_grad_enabled(train and joint):
            o = base.model(input_ids=x)
            h = o.last_hidden_state  # post final norm, what llama.cpp exports as the embedding
            lm = nn.functional.cross_entropy(base.lm_head(h)[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)) if joint else None
        if not joint:
            h = h.detach()
        per_head, acc = [], []
        for i, head in enumerate(heads):
            s = 2 + i
            logits = head(h[:, :-s])
            tgt = x[:, s:]
            per_head.append(nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1)))
            acc.append((logits.argmax(-1) == tgt).float().mean().item())
        return lm, per_head, acc

    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.steps), desc=args.mode, unit="step")
    heads.train()
    base.train(joint)
    for step in bar:
        x = blocks[torch.randint(0, n_blocks, (args.batch,), generator=g)]
        lm, per_head, _ = losses(x, True)
        loss = sum(w * l for w, l in zip(weights, per_head))
        if joint:
            loss = loss + lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(heads.parameters()) + (list(base.parameters()) if joint else []), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", h0=f"{per_head[0].item():.3f}")
    heads.eval()
    base.eval()
    with torch.no_grad():
        accs = np.mean([losses(held[i : i + 8], False)[2] for i in range(0, min(len(held), 64), 8)], axis=0)
    print("held-out top-1 accuracy per head:", [round(float(a), 3) for a in accs])

    os.makedirs(args.out, exist_ok=True)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    for i, head in enumerate(heads):
        for j in range(args.layers):
            state[f"medusa_head.{i}.{j}.linear.weight"] = head[j].linear.weight.data.contiguous()
            state[f"medusa_head.{i}.{j}.linear.bias"] = head[j].linear.bias.data.contiguous()
        state[f"medusa_head.{i}.{args.layers}.weight"] = head[args.layers].weight.data.contiguous()
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    cfg = base.config.to_dict()
    cfg.update(medusa_num_heads=args.heads, medusa_num_layers=args.layers, architectures=["LlamaForCausalLM"])
    json.dump(cfg, open(os.path.join(args.out, "config.json"), "w"), indent=1)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(args.base, f), os.path.join(args.out, f))
    summary = {"mode": args.mode, "steps": args.steps, "heads": args.heads, "heldout_top1": [float(a) for a in accs],
               "minutes": (time.time() - t0) / 60}
    json.dump(summary, open(os.path.join(args.out, "train_summary.json"), "w"), indent=1)
    print("summary:", summary)


if __name__ == "__main__":
    main()
