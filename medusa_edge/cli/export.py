"""``medusa-edge export HEADS.gguf OUT_DIR``: the command over ``medusa_edge.heads.export``.

    medusa-edge export HEADS.gguf OUT_DIR [--layout faster-medusa|vllm|all] [--base MODEL.gguf]
                       [--dtype auto|float16|bfloat16|float32] [--base-model-id ID]

The layouts, dtypes and refusals are the library's (medusa_edge/heads/export.py); this module only
parses the flags, prints what was written and maps the library's errors to exit codes.
"""

from __future__ import annotations

import argparse
import sys

from medusa_edge.errors import MedusaError
from medusa_edge.heads.export import DTYPES, LAYOUTS, ExportError, export, human_bytes

EPILOG = """\
layouts (each in its own subdirectory of OUT_DIR):
  faster-medusa  medusa_lm_head.safetensors + config.json: FasterDecoding/Medusa, TGI
                 (text-generation-launcher --model-id OUT_DIR/faster-medusa) and TensorRT-LLM
                 (examples/medusa/convert_checkpoint.py --medusa_model_dir OUT_DIR/faster-medusa
                  --num_medusa_heads N --num_medusa_layers L; older versions: --fixed_num_medusa_heads N)
  vllm           model.safetensors + config.json: vllm serve BASE --speculative-config
                 '{"method": "medusa", "model": "OUT_DIR/vllm", "num_speculative_tokens": N}'

Shared-output heads (the trainer's default) need --base: the engines read the output matrix from the
checkpoint, so it is written there (one copy per head for faster-medusa, one for vllm).
Root-input heads cannot be exported: train with `medusa-edge train ... --no-root-input`.
See docs/scaling.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write Medusa heads (a heads GGUF) in the Hugging Face layouts vLLM, TGI and TensorRT-LLM "
                     "load. Exit codes: 0 done, 1 unreadable or mismatched input, 2 heads that cannot be exported "
                     "as given (root input, or --base missing).")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("heads", metavar="HEADS.gguf", help="the heads GGUF (e.g. model.medusa.gguf)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write; each layout goes to OUT_DIR/<layout>/")
    p.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all", help="which layout to write (default all)")
    p.add_argument("--base", metavar="MODEL.gguf", help="the base model GGUF; required for shared-output heads, whose "
                   "output matrix is copied from it")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="matrix dtype (default auto: float16 for f16 "
                   "heads, float32 for f32 and q8_0 heads, both exact). Biases stay float32")
    p.add_argument("--base-model-id", metavar="ID", help="base_model_name_or_path for config.json (the base's Hugging "
                   "Face id or dir, which TGI loads); default: from the base GGUF's metadata if it names one")


def run(args) -> int:
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    try:
        results = export(args.heads, args.out_dir, layouts, args.base, args.dtype, args.base_model_id)
    except ExportError as e:
        print(f"medusa-edge export: error: {e}", file=sys.stderr)
        return e.exit_code
    except (MedusaError, OSError) as e:
        print(f"medusa-edge export: error: {e}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.layout:14s} {r.directory}  {human_bytes(r.total_bytes)}")
        for name, n in r.files.items():
            print(f"  {name:28s} {human_bytes(n)}")
        if r.output_copies:
            print(f"  includes {r.output_copies} cop{'y' if r.output_copies == 1 else 'ies'} of the base's output matrix "
                  f"({human_bytes(r.output_copy_bytes)} each, {human_bytes(r.output_copies * r.output_copy_bytes)} in all)")
    for n in dict.fromkeys(n for r in results for n in r.notes):
        print(f"note: {n}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medusa-edge export")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
