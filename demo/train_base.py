"""Train the demo base model: a SentencePiece tokenizer and a small Llama, saved in Hugging Face layout.

    python demo/train_base.py --data build/demo-data --out build/demo-hf [--steps 1500] [--seed 0]

The output directory is a normal HF Llama checkpoint (config.json, model.safetensors,
tokenizer.model, tokenizer_config.json with the chat template) for `python -m convert`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np


def train_tokenizer(data_dir: str, out_dir: str, vocab_size: int, seed: int) -> str:
    import sentencepiece as spm

    text = os.path.join(out_dir, "corpus-unescaped.txt")
    with open(os.path.join(data_dir, "train.txt")) as f, open(text, "w") as g:
        for line in f:
            g.write(line.rstrip("\n").replace("\\n", "\n") + "\n")
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        input_sentence_size=200000, shuffle_input_sentence=True, seed_sentencepiece_size=200000,
        num_threads=os.cpu_count(), minloglevel=2,
    )
    os.remove(text)
    return prefix + ".model"


def encode_corpus(sp, path: str) -> list[list[int]]:
    out = []
    with open(path) as f:
        for line in f:
            conv = line.rstrip("\n").replace("\\n", "\n")
            out.append([sp.bos_id()] + sp.encode(conv) + [sp.eos_id()])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import sentencepiece as spm
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import corpus  # demo/corpus.py: the chat template

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    tok_path = train_tokenizer(args.data, args.out, args.vocab, args.seed)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    seqs = encode_corpus(sp, os.path.join(args.data, "train.txt"))
    stream = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
    n_blocks = len(stream) // args.seq
    blocks = torch.from_numpy(stream[: n_blocks * args.seq].reshape(n_blocks, args.seq))
    print(f"tokenizer: {sp.get_piece_size()} pieces; corpus: {len(stream)} tokens in {n_blocks} blocks of {args.seq}")

    cfg = LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(args.steps), desc="base", unit="step")
    for step in bar:
        idx = torch.randint(0, n_blocks, (args.batch,), generator=g)
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    held = encode_corpus(sp, os.path.join(args.data, "heldout.txt"))
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item() for s in held[:100]]
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": corpus.CHAT_TEMPLATE,
            "model_max_length": 2048,
        }, f, indent=1)
    with open(os.path.join(args.out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    summary = {"params": n_params, "steps": args.steps, "final_train_loss": loss.item(),
               "heldout_loss": float(np.mean(losses)), "minutes": (time.time() - t0) / 60, "seed": args.seed,
               "torch": torch.__version__}
    json.dump(summary, open(os.path.join(args.out, "train_summary.json"), "w"), indent=1)
    print("summary:", summary)


if __name__ == "__main__":
    main()
