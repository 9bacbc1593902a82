"""``python -m convert BASE HEADS``: Medusa checkpoints to a quantized base GGUF plus a heads GGUF.

Exit codes: 0 done, 1 bad input or failed conversion (one line on stderr), 2 bad arguments,
3 ``--check`` found the heads' agreement with the base near zero, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .checkpoint import ConvertError

EPILOG = """\
examples:
  # Medusa-1 heads for Vicuna-7B (both from the local Hugging Face cache), Q4_K_M base, q8_0 heads
  python -m convert vicuna7b FasterDecoding/medusa-vicuna-7b-v1.3 -o models/

  # local dirs, an 8-bit base, f16 heads and a 4-node chain as the default tree
  python -m convert ~/hf/vicuna-7b-v1.3 ~/hf/medusa-vicuna-7b-v1.3 --quant Q8_0 --heads-type f16 --tree chain:4

  # a Medusa-2 full checkpoint: the fine-tuned base and the heads both come from it
  python -m convert ~/hf/medusa-v1.0-vicuna-7b-v1.5 --quant Q4_K_M

  # heads for a GGUF you already have; writes my-model.medusa.gguf next to it, then test them
  python -m convert my-model.gguf ~/hf/medusa-vicuna-7b-v1.3 --check

outputs:
  OUTDIR/<name>-<QUANT>.gguf           the base model (llama.cpp format)
  OUTDIR/<name>-<QUANT>.medusa.gguf    the heads; medusa_edge finds them next to the base
"""


def build_parser() -> argparse.ArgumentParser:
    from .presets import BASE_PRESETS, HEADS_PRESETS

    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert Medusa checkpoints (Hugging Face layout) into a quantized base GGUF and a "
        "Medusa heads GGUF beside it, offline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "base",
        metavar="BASE",
        help="the base model: a Hugging Face model dir (LlamaForCausalLM or MistralForCausalLM), an existing "
        f".gguf, or a preset resolved from the local Hugging Face cache ({', '.join(BASE_PRESETS)}). "
        "For a Medusa-2 full checkpoint give that checkpoint (or '-') and omit HEADS or repeat it.",
    )
    p.add_argument(
        "heads",
        metavar="HEADS",
        nargs="?",
        help="the Medusa heads: a Medusa-1 heads dir (config.json + medusa_lm_head.pt or .safetensors), "
        "a vLLM Medusa dir (config.json with model_type medusa + model.safetensors), "
        "a Medusa-2 full checkpoint dir (medusa_head.* tensors), or a Hugging Face repo id / preset in the "
        f"local cache, e.g. FasterDecoding/medusa-vicuna-7b-v1.3 ({', '.join(HEADS_PRESETS)})",
    )
    p.add_argument("-o", "--outdir", metavar="OUTDIR", help="where to write the two files (default: the current "
                   "dir; for a GGUF BASE without --quant, the GGUF's own dir)")
    p.add_argument("--quant", metavar="TYPE", help="base model type: Q4_K_M (default for a Hugging Face BASE), "
                   "Q5_K_M, Q6_K, Q8_0, Q4_0, F16, BF16, F32, ... Made by llama.cpp's own quantizer. "
                   "For a GGUF BASE the default keeps it as it is.")
    p.add_argument("--heads-type", default="q8_0", choices=("f32", "f16", "q8_0"),
                   help="how the heads are stored (default q8_0; f16 and f32 are exact copies of f16/bf16 sources)")
    p.add_argument("--tree", metavar="NAME|FILE", help="default tree stored in the heads file: a preset "
                   "(mc_sim_7b_63, vicuna_7b_stage2, vicuna_13b_stage2, vicuna_33b_stage2, zephyr_stage2), "
                   "chain:N, or a .json file of paths. Default: the reference's choice for the base model, cut to the head count.")
    p.add_argument("--check", action="store_true", help="after converting, load both files, decode a short "
                   "prompt greedily and print each head's top-1 agreement with the base's tokens")
    p.add_argument("--check-prompt", metavar="TEXT", default=None, help="the prompt --check decodes")
    p.add_argument("--threads", type=int, default=None, help="threads for quantizing and --check (default: all cores)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _progress_factory():
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return lambda label, total: (lambda n: None)
    bars = []

    def make(label: str, total: int):
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=True, disable=None,
                   file=sys.stderr)
        bars.append(bar)

        def update(n: int):
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return update

    make.bars = bars
    return make


def _run(args) -> int:
    from medusa_edge.heads import schema
    from medusa_edge.heads.writer import HeadsMeta, write_heads_gguf_streaming
    from medusa_edge.core.tree import PRESETS, Tree, TreeError

    from . import base as basemod
    from .heads import open_heads, warn
    from .presets import BASE_PRESETS, HEADS_PRESETS, repo_name, resolve

    t0 = time.perf_counter()
    # -- inputs -------------------------------------------------------------------------------
    base_spec, heads_spec = args.base, args.heads
    if heads_spec is None:
        if base_spec == "-":
            raise ConvertError("give HEADS, or a Medusa-2 checkpoint as BASE")
        heads_spec = base_spec
    heads_path, heads_repo = resolve(heads_spec, HEADS_PRESETS, "heads")
    heads = open_heads(heads_path)
    for n in heads.notes:
        warn(n)

    if heads.medusa2_dir is not None:
        if base_spec in ("-", heads_spec):
            base_path, base_repo = heads.medusa2_dir, heads_repo
        else:
            base_path, base_repo = resolve(base_spec, BASE_PRESETS, "base")
            if base_path.resolve() != heads.medusa2_dir.resolve() and base_path.suffix != ".gguf":
                raise ConvertError(
                    f"{heads.medusa2_dir}: a Medusa-2 checkpoint carries its own fine-tuned base; pass it as BASE "
                    f"(or '-'), not {base_spec}"
                )
    else:
        if base_spec == "-":
            raise ConvertError(f"{heads_path}: Medusa-1 heads need a BASE model")
        base_path, base_repo = resolve(base_spec, BASE_PRESETS, "base")

    is_gguf = base_path.is_file()
    quant = args.quant.upper() if args.quant else None
    qtypes = basemod.quant_types()
    if quant is not None and quant not in qtypes:
        raise ConvertError(f"unknown --quant {args.quant!r}: use one of {', '.join(sorted(qtypes))}")
    if args.threads is not None and args.threads < 1:
        raise ConvertError("--threads must be at least 1")

    # -- base facts, checked against the heads before anything is written ---------------------
    if is_gguf:
        src_info = basemod.read_gguf_base(base_path)
        b_embd, b_vocab, name = src_info.n_embd, src_info.n_vocab, repo_name(base_path, base_repo)
        lm_head_vocab = b_vocab
    else:
        cfg = basemod.read_hf_config(base_path)
        from .checkpoint import Checkpoint, model_weight_files

        w = model_weight_files(base_path)
        if w is None:
            raise ConvertError(f"{base_path}: no weights (model.safetensors, pytorch_model.bin or their .index.json)")
        probe = heads.ckpt if heads.medusa2_dir is not None else Checkpoint(w)
        emb = "model.embed_tokens.weight"
        if emb not in probe.entries:
            raise ConvertError(f"{base_path}: the checkpoint has no {emb}")
        b_embd, b_vocab = int(cfg["hidden_size"]), int(probe.shape(emb)[0])
        name = repo_name(base_path, base_repo)
        lm_head_vocab = b_vocab
    if heads.n_embd != b_embd:
        raise ConvertError(f"{heads.label}: the heads have hidden size {heads.n_embd} but the base {base_path} has {b_embd}")
    if heads.n_vocab is not None and heads.n_vocab != b_vocab:
        raise ConvertError(
            f"{heads.label}: the heads predict a vocabulary of {heads.n_vocab} tokens but the base {base_path} has {b_vocab}"
        )

    # -- tree ---------------------------------------------------------------------------------
    hint = " ".join(x for x in (heads.base_name_hint, name, str(heads_repo or ""), str(heads_path.name)) if x).lower()
    stored_tree = _exported_tree(heads, Tree, TreeError)  # paths as medusa-edge export stored them, or None
    if args.tree:
        try:
            tree = Tree.resolve(args.tree)
        except TreeError as e:
            raise ConvertError(f"--tree: {e}") from None
        if tree.max_depth > heads.n_heads:
            raise ConvertError(f"--tree {args.tree}: depth {tree.max_depth} needs {tree.max_depth} heads, {heads.label} has {heads.n_heads}")
        tree_name = args.tree
    elif stored_tree is not None:
        tree = Tree.from_paths(stored_tree)
        tree_name = "the tree stored by medusa-edge export"
    else:
        tree_name = "mc_sim_7b_63"
        if "zephyr" in hint:
            tree_name = "zephyr_stage2"
        elif "vicuna" in hint:
            for size in ("13b", "33b", "7b"):
                if size in hint:
                    tree_name = f"vicuna_{size}_stage2"
                    break
        tree = Tree.from_paths(PRESETS[tree_name]).truncated(heads.n_heads)
        if tree.max_depth < Tree.from_paths(PRESETS[tree_name]).max_depth:
            tree_name += f" (cut to depth {heads.n_heads})"

    # -- outputs ------------------------------------------------------------------------------
    if is_gguf and quant is None:
        outdir = Path(args.outdir) if args.outdir else base_path.parent
        base_out = outdir / base_path.name
        tag = src_info.quant
    else:
        quant = quant or "Q4_K_M"
        outdir = Path(args.outdir) if args.outdir else Path.cwd()
        base_out = outdir / f"{name}-{quant}.gguf"
        tag = quant
    heads_out = Path(schema.sidecar_path(str(base_out)))
    outdir.mkdir(parents=True, exist_ok=True)
    if not os.access(outdir, os.W_OK):
        raise ConvertError(f"{outdir}: not writable")

    created: list[Path] = []
    progress = _progress_factory()
    try:
        # base
        if is_gguf:
            if quant is None:
                if base_out.resolve() != base_path.resolve():
                    _link_or_copy(base_path, base_out)
                    created.append(base_out)
                base_info = src_info
                base_info.path = base_out
            else:
                basemod.quantize_gguf(base_path, base_out, quant, args.threads)
                created.append(base_out)
                base_info = basemod.read_gguf_base(base_out)
        else:
            base_info = basemod.convert_hf_base(base_path, base_out, quant, name, progress, args.threads)
            created.append(base_out)
        if heads.shared_output and lm_head_vocab != base_info.n_vocab:  # pragma: no cover - defensive
            raise ConvertError(f"{base_out}: lm_head size does not match the vocabulary")
        if heads.shared_hint is not None:
            # copies of the base's own output matrix become shared-output heads again (a few MB, not V x H per head)
            if heads.match_base_output(base_out):
                heads.use_shared_output()
            else:
                warn(f"{heads.shared_hint}, but the output matrices differ from {base_out.name}'s: keeping them per head")

        # heads
        head_tensors = heads.stream_tensors(args.heads_type)
        paths = stored_tree if stored_tree is not None and not args.tree else [list(p) for p in tree.paths]
        meta = HeadsMeta(heads.n_heads, heads.n_layers, heads.n_embd, base_info.n_vocab, heads.shared_output,
                         paths, base_info.vocab_hash, _exported_rank_accuracy(heads))
        cb = progress(heads_out.name, sum(t.nbytes for t in head_tensors))
        write_heads_gguf_streaming(str(heads_out), meta, head_tensors, args.heads_type, cb)
        created.append(heads_out)
    except BaseException:
        for pth in created:
            if pth.exists():
                pth.unlink()
        raise

    dt = time.perf_counter() - t0
    # -- summary ------------------------------------------------------------------------------
    out_kind = "own W_out" if not heads.shared_output else "shared lm_head (version 2)"
    print(f"converted in {dt:.1f} s")
    print(f"  base   {base_out}  {_human(base_out.stat().st_size)}  {tag}  (from {base_path})")
    print(f"  heads  {heads_out}  {_human(heads_out.stat().st_size)}  {args.heads_type}  "
          f"{heads.n_heads} heads x {heads.n_layers} ResBlock(s), H {heads.n_embd}, V {base_info.n_vocab}, {out_kind}"
          f"  (from {heads.label})")
    print(f"  tree   {tree_name}: {tree.n_nodes} tokens, depth {tree.max_depth}, {tree.n_leaves} leaves")
    sys.stdout.flush()

    if args.check:
        from .check import run_check

        return run_check(base_out, heads_out, prompt=args.check_prompt, n_threads=args.threads)
    return 0


def _exported_tree(heads, Tree, TreeError) -> Optional[list]:
    """The tree in the ``medusa_edge`` section of an exported config.json, as stored (its order
    kept), when it is a valid tree for these heads; else None (the preset choice applies)."""
    paths = heads.exported.get("tree")
    if paths is None:
        return None
    from .heads import warn

    try:
        t = Tree.from_paths(paths)
    except (TreeError, TypeError) as e:
        warn(f"{heads.label}: ignoring the stored tree ({e})")
        return None
    if t.max_depth > heads.n_heads:
        warn(f"{heads.label}: ignoring the stored tree: depth {t.max_depth} needs more than {heads.n_heads} heads")
        return None
    return [[int(r) for r in p] for p in paths]


def _exported_rank_accuracy(heads) -> Optional[list]:
    """Per-head rank accuracies from an exported config.json, when they fit these heads."""
    acc = heads.exported.get("rank_accuracy")
    if acc is None:
        return None
    ok = (isinstance(acc, list) and len(acc) == heads.n_heads
          and all(isinstance(r, list) and r and all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in r) for r in acc))
    if not ok:
        from .heads import warn

        warn(f"{heads.label}: ignoring the stored rank accuracies (not [{heads.n_heads}][k] values in [0, 1])")
        return None
    return acc


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(dst.name + ".tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
