"""Train Medusa-1 heads for any GGUF base model, on the user's own machine.

    medusa-edge train BASE.gguf --data PROMPTS.jsonl -o BASE.medusa.gguf

Medusa-1 (Cai et al. 2024): the base stays frozen; only the heads learn. Self-distillation:
the base itself, run through the engine (plain decoding, ``tree="chain:0"``), continues every
prompt; its post-final-norm hidden states and its own next tokens are the training data, so
nothing but the user's GGUF and a list of prompts is needed. Head i (0-based) at a position
learns the token 2+i places ahead (the base's own logits give +1), with cross-entropy weighted
``decay**i`` (the paper's lambda_k = 0.8^k); ``--soft-targets W`` moves weight W of each head's
loss onto the base's whole distribution at the target position (``W_out h`` of the cached hidden
state there). Each head is ``W_out_i (x + SiLU(W_i x + b_i))``
(``--layers`` ResBlocks), W_i zero-initialised and W_out_i initialised from the base's output
matrix read from the GGUF (``output.weight``, or ``token_embd.weight`` when tied).

Stages, each cached or checkpointed so a rerun continues where it stopped:

1. **Generate** (``training.data``): the base continues each prompt (``--parallel`` sequences in
   one multi-sequence batch); the hidden states and tokens go to the data cache (its format is in
   ``training.data``'s docstring).
2. **Train** (``training.model``; torch, cpu/cuda/mps) on the cached hidden states only: no base
   forward.
3. **Write** the heads GGUF with ``medusa_edge.heads.writer``, with a default tree grown from
   the held-out per-rank accuracies (``core.tune.grow_tree``, Medusa's greedy construction, as
   the reference's ``gen_results.py``) to ``--tree-nodes`` nodes, then (``--measure``) decode a
   few held-out prompts with the new heads and report the mean tokens per step.

Checkpoint: ``<output>.ckpt.pt`` every ``--save-every`` steps (heads, optimizer, schedule,
step, RNG); ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from medusa_edge.core.tree import TOP_K
from medusa_edge.core.tune import expected_tokens, grow_tree
from medusa_edge.heads import schema
from medusa_edge.training.data import (BaseModel, DataCache, data_identity, generate_data,
                                       read_output_matrix)
from medusa_edge.training.model import (OUT_OF_DRAFT, autocast, build_heads, evaluate, heads_loss,
                                        make_targets, torch_device)
from medusa_edge.training.prompts import load_prompts

EPILOG = """\
example:
  medusa-edge train models/tiny.gguf --data prompts.jsonl \\
      --heads 4 --gen-tokens 128 --steps 2000 -o models/tiny.medusa.gguf
  medusa-edge generate models/tiny.gguf --heads models/tiny.medusa.gguf -p "Hello"

PROMPTS.jsonl: one JSON object per line with a "prompt" or "text" string, or "turns" (a list of
user turns, as in MT-Bench: the first turn is used), or "messages" ([{"role", "content"}...]);
a line may also be a bare JSON string. Use prompts from the domain the heads will serve: they
learn what the base writes after them.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="medusa-edge train",
        description="Train Medusa-1 heads for a GGUF base model (frozen base, self-distillation through "
        "llama.cpp, heads in torch) and write them as a heads GGUF the engine loads.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", help="the base model GGUF")
    p.add_argument("--data", required=True, help="prompts, JSONL (see below)")
    p.add_argument("-o", "--output", help="heads GGUF to write (default: BASE with .medusa.gguf)")
    g = p.add_argument_group("heads")
    g.add_argument("--heads", type=int, default=4, help="number of heads; head i predicts the token 2+i ahead (default 4: trees deeper than 4 rarely pay)")
    g.add_argument("--layers", type=int, default=1, help="ResBlocks per head (default 1)")
    g.add_argument("--shared-output", action=argparse.BooleanOptionalAction, default=True,
                   help="train only the ResBlocks and reuse the base's output matrix (default; a file of a few MB, "
                   "one product per step for all heads). --no-shared-output gives each head its own matrix, "
                   "initialised from the base's (the reference's layout; on SmolLM2 a 229 MB file)")
    g.add_argument("--root-input", action=argparse.BooleanOptionalAction, default=True,
                   help="each head also reads the embedding of the root token (the base's own next token, known when "
                   "the heads propose): on SmolLM2 first-head top-1 0.296 -> 0.370 at 300 steps (demo/README.md), "
                   "for a 2H x H first ResBlock. Default on; --no-root-input gives the reference's heads "
                   "(schema version 1, readable by older medusa-edge)")
    g.add_argument("--head-type", choices=("f32", "f16", "q8_0"), default="f16", help="tensor type in the GGUF (default f16)")
    g.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="heads score only the N most frequent target tokens of the training data (their output "
                        "product shrinks from n_vocab to N rows); targets outside them are left out of the loss "
                        "and count as misses in the held-out figures (default: the whole vocabulary)")
    g = p.add_argument_group("data (self-distillation)")
    g.add_argument("--gen-tokens", type=int, default=128, help="tokens the base generates per prompt (default 128)")
    g.add_argument("--temp", type=float, default=0.0, help="generation temperature; 0 = greedy (default)")
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="keep the last N tokens of long prompts (default 512)")
    g.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts as a user message in the chat format, as the API's apply_chat_template: "
                   "auto = when the GGUF has a chat template (default); on = also without one (Vicuna format)")
    g.add_argument("--cache", help="data cache directory (default: OUTPUT without .gguf, plus .data)")
    g.add_argument("--parallel", type=int, default=32,
                   help="sequences generated at once in one llama.cpp batch (default 32; 1 = one at a time)")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all)")
    g.add_argument("-ngl", "--n-gpu-layers", dest="gpu_layers", type=int, default=0,
                   help="layers of the base to offload during generation")
    g.add_argument("--gpu-layers", dest="gpu_layers", type=int, help=argparse.SUPPRESS)  # the old spelling
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the training rows)")
    g.add_argument("--epochs", type=float, default=2.0, help="passes over the data when --steps is not given (default 2)")
    g.add_argument("--batch", type=int, default=256, help="positions (hidden states) per step (default 256)")
    g.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate, AdamW (default 3e-3: beat the reference's 1e-3 on SmolLM2, demo/README.md)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps, then cosine (default 0.05)")
    g.add_argument("--decay", type=float, default=0.8, help="head i's loss weight is decay**i (paper: 0.8)")
    g.add_argument("--soft-targets", type=float, default=0.0, metavar="W",
                   help="weight of the distillation term: each head also learns the base's whole distribution at "
                        "its target position (computed from the cached hidden states), 1-W stays on the base's "
                        "token (default 0: the reference's hard labels)")
    g.add_argument("--val-frac", type=float, default=0.1, help="fraction of prompts held out (default 0.1)")
    g.add_argument("--train-frac", type=float, default=1.0,
                   help="train on this share of the training sequences (default 1: all; to see what more data buys)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="torch device (default auto)")
    g.add_argument("--max-eval-rows", type=int, default=20000, help="held-out positions evaluated at most (default 20000)")
    g.add_argument("--eval-every", type=int, default=500, help="held-out evaluation every N steps (default 500)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt.pt")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUTPUT.ckpt.pt after training (default: removed once the heads file is written)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="matrix products in training: auto = bf16 where the CPU (AMX, AVX512-BF16) or GPU has it")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--tree", default="auto",
                   help="default tree stored in the heads file: 'auto' grows one from the held-out accuracies to "
                   "--tree-nodes nodes; or a preset, chain:N or a JSON file of paths")
    g.add_argument("--tree-nodes", type=int, default=8,
                   help="node budget of the auto tree, root included (default 8; small trees suit CPUs)")
    g.add_argument("--measure", type=int, default=8,
                   help="after writing, decode N held-out prompts with the heads and report tokens per step (0: skip)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.heads < 1 or args.layers < 1:
        p.error("--heads and --layers must be >= 1")
    if args.output is None:
        args.output = schema.sidecar_path(args.base)
    return args


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    pr = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(pr, 1.0)))


def train(args: argparse.Namespace, log=print) -> dict:
    """Run the three stages; returns the summary dict."""
    import torch
    from tqdm import tqdm

    if not 0.0 <= args.soft_targets <= 1.0:
        raise ValueError(f"--soft-targets must be between 0 and 1, not {args.soft_targets}")
    t_start = time.perf_counter()
    out_stem = args.output[:-5] if args.output.endswith(".gguf") else args.output
    cache_dir = args.cache or out_stem + ".data"
    ckpt_path = out_stem + ".ckpt.pt"
    prompts = load_prompts(args.data)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    n_threads = args.threads or os.cpu_count() or 1
    n_ctx = args.max_prompt_tokens + args.gen_tokens + 8

    # 1. data
    base = BaseModel(args.base, n_ctx, n_threads, args.gpu_layers, args.chat)
    identity = data_identity(args, base)
    cache = DataCache(cache_dir, identity)
    if cache.use_prompts(prompts) and cache.n_done:
        log(f"data: {cache.n_done} prompts cached in {cache_dir}, {len(prompts) - cache.n_done} more to generate")
    cache.meta.setdefault("base_path", os.path.abspath(args.base))
    t0 = time.perf_counter()
    generate_data(base, prompts, cache, gen_tokens=args.gen_tokens, temperature=args.temp, seed=args.seed,
                  max_prompt_tokens=args.max_prompt_tokens, n_parallel=args.parallel, log=log, progress=not args.quiet)
    t_data = time.perf_counter() - t0
    hidden, tokens, lengths, prompt_index = cache.load()
    log(f"data: {len(lengths)} sequences, {len(tokens)} positions, cache {cache_dir}"
        f" (hidden check vs engine: max rel. diff {cache.meta.get('max_hidden_check_diff', 0):.2g})")

    # split by prompt
    K = args.heads
    targets = make_targets(tokens, lengths, K)
    rng = np.random.default_rng(args.seed)
    S = len(lengths)
    n_val = int(round(args.val_frac * S)) if S >= 2 else 0
    n_val = min(max(n_val, 1 if S >= 2 and args.val_frac > 0 else 0), S - 1) if S >= 2 else 0
    val_seq = np.sort(rng.permutation(S)[:n_val])
    seq_of_row = np.repeat(np.arange(S), lengths)
    val_mask = np.isin(seq_of_row, val_seq)
    train_mask = ~val_mask
    if args.train_frac < 1.0:  # a random share of the training sequences (how results grow with data)
        train_seq = np.setdiff1d(np.arange(S), val_seq)
        keep = rng.permutation(train_seq)[: max(1, int(round(args.train_frac * len(train_seq))))]
        train_mask &= np.isin(seq_of_row, keep)
    train_rows = np.nonzero(train_mask & (targets[:, 0] >= 0))[0]
    val_rows = np.nonzero(val_mask & (targets[:, 0] >= 0))[0]
    if len(train_rows) == 0:
        raise ValueError("no training positions: use more prompts or a larger --gen-tokens")
    if len(val_rows) == 0:
        log("warning: no held-out positions (too few prompts): accuracies are on the training data")
        val_rows = train_rows
    val_prompts = sorted(set(int(prompt_index[s]) for s in val_seq))
    draft, coverage = None, None
    if args.draft_vocab is not None:
        draft, targets, coverage = apply_draft_vocab(tokens, train_mask, targets, val_rows, args.draft_vocab, base.n_vocab)
        log(f"draft vocabulary: the {len(draft)} most frequent training tokens; they hold {coverage:.4f} of the held-out"
            " head targets")

    # 2. train
    device = torch_device(args.device)
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    w_out = read_output_matrix(args.base)
    if w_out.shape != (base.n_vocab, base.n_embd):
        raise ValueError(f"{args.base}: output matrix is {w_out.shape}, expected {(base.n_vocab, base.n_embd)}")
    if draft is not None:
        w_out = np.ascontiguousarray(w_out[draft])  # the heads' logits are over the draft tokens only
    w_embd = read_output_matrix(args.base, embedding=True) if args.root_input else None
    model = build_heads(K, args.layers, w_out, args.shared_output, args.seed, w_embd).to(device)
    # the base's output matrix, for the soft targets' teacher logits (the heads' own copy when shared)
    w_teacher = None
    if args.soft_targets > 0:
        w_teacher = model.w_shared if args.shared_output else torch.tensor(w_out).to(device)
    del w_out, w_embd
    weights = [args.decay ** i for i in range(K)]
    steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * len(train_rows) / args.batch))
    warmup = int(args.warmup * steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))
    config = {"heads": K, "layers": args.layers, "shared_output": args.shared_output, "root_input": args.root_input, "steps": steps,
              "batch": args.batch, "lr": args.lr, "decay": args.decay, "seed": args.seed, "data": identity,
              "n_prompts": len(prompts),
              "train_frac": args.train_frac}
    if args.soft_targets:  # only then, so checkpoints from before the option still resume
        config["soft_targets"] = args.soft_targets
    if draft is not None:
        config["draft_vocab"] = len(draft)
    step = 0
    perm_rng = np.random.default_rng(args.seed + 1)
    resume_order = None
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["config"] != config:
            raise ValueError(f"checkpoint {ckpt_path} was made with other settings; remove it or rerun without --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step = ck["step"]
        perm_rng.bit_generator.state = ck["rng"]
        resume_order = (ck["order"], ck["pos"])
        log(f"resumed from {ckpt_path} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint {ckpt_path}, starting fresh")

    def save_ckpt():
        tmp = ckpt_path + ".tmp"
        torch.save({"config": config, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "rng": perm_rng.bit_generator.state, "order": order, "pos": pos}, tmp)
        os.replace(tmp, ckpt_path)

    if len(val_rows) > args.max_eval_rows:
        val_rows = np.sort(np.random.default_rng(args.seed + 2).choice(val_rows, args.max_eval_rows, replace=False))
    amp = autocast(device, args.precision)
    first = evaluate(model, hidden, val_rows, targets, weights, device, amp=amp, roots=tokens)
    history = [{"step": step, "top1": [round(a, 4) for a in first.top1]}]
    log(f"held-out before training: loss {first.loss:.4f}, top-1 " + " ".join(f"{a:.3f}" for a in first.top1))
    t1 = time.perf_counter()
    if resume_order is not None:
        order, pos = resume_order
    else:
        order, pos = perm_rng.permutation(train_rows), 0
    losses = []
    bar = tqdm(total=steps, initial=step, desc="training", unit="step", dynamic_ncols=True, disable=args.quiet)
    model.train()
    last_eval = first
    while step < steps:
        if pos + args.batch > len(order):
            order = perm_rng.permutation(train_rows)
            pos = 0
        rows = np.sort(order[pos : pos + args.batch])
        pos += args.batch
        h = torch.from_numpy(hidden.take(rows)).to(device)
        t = torch.from_numpy(targets[rows]).to(device)
        teacher = None
        if w_teacher is not None:  # the base's logits at each head's target position: W_out h[row + 1 + i]
            with torch.no_grad(), amp:
                teacher = [torch.from_numpy(hidden.take(np.where(targets[rows, i] >= 0, rows + 1 + i, rows))).to(device)
                           @ w_teacher.t() for i in range(K)]
        with amp:
            logits = model(h, torch.from_numpy(tokens[rows].astype(np.int64)).to(device))
        loss, per = heads_loss(logits, t, weights, teacher, args.soft_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if step % args.eval_every == 0 and step < steps:
            last_eval = evaluate(model, hidden, val_rows, targets, weights, device, amp=amp, roots=tokens)
            history.append({"step": step, "top1": [round(a, 4) for a in last_eval.top1]})
            bar.write(f"step {step}: held-out loss {last_eval.loss:.4f}, top-1 " + " ".join(f"{a:.3f}" for a in last_eval.top1))
        if step % args.save_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    t_train = time.perf_counter() - t1
    final = evaluate(model, hidden, val_rows, targets, weights, device, amp=amp, roots=tokens)
    history.append({"step": step, "top1": [round(a, 4) for a in final.top1]})
    if not args.keep_checkpoint and os.path.exists(ckpt_path):
        ckpt_note = f"removed ({os.path.getsize(ckpt_path) / 1e6:.0f} MB; --keep-checkpoint keeps it for --resume)"
        os.remove(ckpt_path)
    else:
        ckpt_note = f"{ckpt_path} ({os.path.getsize(ckpt_path) / 1e6:.0f} MB)" if os.path.exists(ckpt_path) else "none"

    # 3. tree + write
    if args.tree == "auto":
        # stored by depth, then ranks, as before (the engine takes paths in any order)
        paths = sorted(grow_tree(final.rank_acc, args.tree_nodes), key=lambda p: (len(p), p))
    else:
        from medusa_edge.core.tree import Tree

        paths = [list(p) for p in Tree.resolve(args.tree).paths]
        if paths and max(len(p) for p in paths) > K:
            raise ValueError(f"--tree {args.tree} is deeper than --heads {K}")
    write_model(model, args.output, base, args.layers, args.shared_output, paths, args.head_type, final.rank_acc, draft)
    exp_tps = expected_tokens(final.rank_acc, paths)

    measured = None
    if args.measure > 0:
        measured = measure_tokens_per_step(base, args.output, [prompts[i] for i in val_prompts[: args.measure]]
                                           or prompts[: args.measure], args, n_threads)
    summary = {
        "output": args.output, "checkpoint": ckpt_note, "cache": cache_dir,
        "cache_mb": round(sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir)) / 1e6, 1),
        "generation_tok_s": cache.meta.get("generation_tok_s"), "precision": args.precision,
        "heads": K, "layers": args.layers, "shared_output": args.shared_output, "root_input": args.root_input,
        "soft_targets": args.soft_targets, "history": history,
        "draft_vocab": None if draft is None else len(draft),
        "draft_coverage": None if coverage is None else round(coverage, 4),
        "sequences": int(S), "positions": int(len(tokens)), "train_positions": int(len(train_rows)),
        "heldout_positions": int(len(val_rows)), "steps": step, "device": device,
        "time_data_s": round(t_data, 2), "time_train_s": round(t_train, 2),
        "time_total_s": round(time.perf_counter() - t_start, 2),
        "loss_first": round(losses[0], 4) if losses else None, "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "heldout_loss_before": round(first.loss, 4), "heldout_loss_after": round(final.loss, 4),
        "heldout_top1": [round(a, 4) for a in final.top1], "heldout_top5": [round(a, 4) for a in final.top5],
        "tree": [list(p) for p in paths], "expected_tokens_per_step": round(exp_tps, 3),
        "measured_tokens_per_step": measured,
    }
    log(format_summary(summary))
    return summary


def apply_draft_vocab(tokens: np.ndarray, train_mask: np.ndarray, targets: np.ndarray, val_rows: np.ndarray, n: int,
                      n_vocab: int):
    """The draft vocabulary (the ``n`` most frequent tokens of the training sequences, ids sorted),
    the targets as draft indices (OUT_OF_DRAFT outside it, -100 kept), and the share of held-out
    targets inside it."""
    from medusa_edge.heads.writer import draft_vocab_from_counts

    if not 1 <= n <= n_vocab:
        raise ValueError(f"--draft-vocab {n}: needs 1 to n_vocab = {n_vocab}")
    if n < TOP_K:
        raise ValueError(f"--draft-vocab {n}: needs at least {TOP_K} tokens (each head proposes up to {TOP_K})")
    draft = draft_vocab_from_counts(np.bincount(tokens[train_mask], minlength=n_vocab), n)
    lut = np.full(n_vocab, OUT_OF_DRAFT, np.int64)
    lut[draft] = np.arange(len(draft))
    mapped = np.where(targets >= 0, lut[np.maximum(targets, 0)], targets)
    held = targets[val_rows]
    coverage = float((mapped[val_rows] >= 0).sum() / max(1, (held >= 0).sum()))
    return draft, mapped, coverage


def write_model(model, path: str, base: BaseModel, n_layers: int, shared_output: bool, paths, head_type: str,
                rank_acc=None, draft=None) -> None:
    from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf

    res = [[(blk.linear.weight.detach().float().cpu().numpy(), blk.linear.bias.detach().float().cpu().numpy()) for blk in r]
           for r in model.res]
    out = None if shared_output else [o.weight.detach().float().cpu().numpy() for o in model.out]
    meta = HeadsMeta(len(res), n_layers, base.n_embd, base.n_vocab, shared_output, [list(p) for p in paths] or None,
                     base.vocab_hash, None if rank_acc is None else np.asarray(rank_acc).tolist(), model.root_input,
                     None if draft is None else [int(t) for t in draft])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_heads_gguf(path, meta, heads_tensors(res, out), head_type)


def measure_tokens_per_step(base: BaseModel, heads_path: str, prompts: list, args, n_threads: int) -> dict:
    """Greedy decoding of ``prompts`` with the new heads and their default tree: mean tokens per step."""
    from medusa_edge.core.engine import Engine, SamplingParams, Stats

    eng = Engine(args.base, heads_path, n_ctx=base.n_ctx, n_threads=n_threads, n_gpu_layers=args.gpu_layers)
    tok = steps = 0
    for p in prompts:
        st = Stats()
        for _ in eng.generate(base.prompt_tokens(p, args.max_prompt_tokens), SamplingParams(temperature=0.0),
                              args.gen_tokens, stats=st):
            pass
        tok += sum((k + 1) * c for k, c in st.accepted_hist.items())
        steps += st.steps
    return {"prompts": len(prompts), "tree_nodes": eng.tree.n_nodes, "tokens_per_step": round(tok / steps, 3) if steps else 0.0}


def format_summary(s: dict) -> str:
    lines = [
        "",
        "== Medusa heads training: summary ==",
        f"heads file       {s['output']}",
        f"data             {s['sequences']} sequences, {s['positions']} positions "
        f"({s['train_positions']} train / {s['heldout_positions']} held-out)",
        f"data cache       {s['cache']} ({s['cache_mb']} MB; delete it when done, keep it to train again)"
        + (f", generated at {s['generation_tok_s']} tokens/s" if s.get("generation_tok_s") else ""),
        f"steps            {s['steps']} on {s['device']} (data {s['time_data_s']:.1f} s, training {s['time_train_s']:.1f} s, "
        f"total {s['time_total_s']:.1f} s)",
        f"train loss       {s['loss_first']} -> {s['loss_last']}",
        f"held-out loss    {s['heldout_loss_before']} -> {s['heldout_loss_after']}",
        "held-out top-1   " + "  ".join(f"h{i}:{a:.3f}" for i, a in enumerate(s["heldout_top1"])),
        "held-out top-5   " + "  ".join(f"h{i}:{a:.3f}" for i, a in enumerate(s["heldout_top5"])),
        f"default tree     {len(s['tree']) + 1} nodes {s['tree']}",
        f"expected tokens/step (from accuracies) {s['expected_tokens_per_step']}",
    ]
    if s.get("draft_vocab"):
        lines.insert(-3, f"draft vocabulary {s['draft_vocab']} tokens, {s['draft_coverage']} of the held-out targets")
    if s.get("measured_tokens_per_step"):
        m = s["measured_tokens_per_step"]
        lines.append(f"measured tokens/step {m['tokens_per_step']} (greedy, {m['prompts']} held-out prompts, default tree)")
    lines.append(f"checkpoint       {s['checkpoint']}")
    return "\n".join(lines)


def parse_restrict_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="medusa-edge train restrict",
        description="Restrict an existing heads file to a draft vocabulary: the N most frequent tokens of the base's "
                    "answers to PROMPTS (generated as the trainer generates its data, and cached: the cache the heads "
                    "were trained from, with the same prompts and settings, is reused without generating). No "
                    "retraining: the kept rows are the original ones.")
    p.add_argument("heads", help="heads GGUF to restrict")
    p.add_argument("base", help="the base model GGUF")
    p.add_argument("--draft-vocab", type=int, required=True, metavar="N", help="tokens to keep")
    p.add_argument("--data", required=True, help="prompts, JSONL (as for training; never a benchmark's questions)")
    p.add_argument("-o", "--output", required=True, help="heads GGUF to write")
    p.add_argument("--cache", help="data cache directory (default: OUTPUT without .gguf, plus .data)")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--parallel", type=int, default=32)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-ngl", "--n-gpu-layers", dest="gpu_layers", type=int, default=0)
    p.add_argument("--gpu-layers", dest="gpu_layers", type=int, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def token_counts(args, log=print) -> np.ndarray:
    """[n_vocab] occurrences of each token in the base's answers to ``args.data`` (cached)."""
    prompts = load_prompts(args.data)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    n_threads = args.threads or os.cpu_count() or 1
    base = BaseModel(args.base, args.max_prompt_tokens + args.gen_tokens + 8, n_threads, args.gpu_layers, args.chat)
    out_stem = args.output[:-5] if args.output.endswith(".gguf") else args.output
    cache = DataCache(args.cache or out_stem + ".data", data_identity(args, base))
    cache.use_prompts(prompts)
    generate_data(base, prompts, cache, gen_tokens=args.gen_tokens, temperature=args.temp, seed=args.seed,
                  max_prompt_tokens=args.max_prompt_tokens, n_parallel=args.parallel, log=log, progress=not args.quiet)
    _, tokens, _, _ = cache.load()
    return np.bincount(tokens, minlength=base.n_vocab)


def restrict(args, log=print) -> dict:
    from medusa_edge.heads.writer import draft_vocab_from_counts, restrict_heads_file

    counts = token_counts(args, log)
    draft = draft_vocab_from_counts(counts, args.draft_vocab)
    info = restrict_heads_file(args.heads, args.output, draft)
    share = float(counts[draft].sum() / max(1, counts.sum()))
    log(f"wrote {args.output}: {info['n_draft']} of {info['n_vocab']} tokens, holding {share:.4f} of the "
        f"{int(counts.sum())} tokens of the base's answers")
    return {"output": args.output, "n_draft": info["n_draft"], "coverage": share}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["restrict"]:
            restrict(parse_restrict_args(argv[1:]))
            return 0
        args = parse_args(argv)
        train(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun with --resume to continue (the data cache is kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
