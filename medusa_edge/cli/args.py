"""Flags shared by every command that loads a model: numerics named as llama.cpp's CLI names them.

One table (as llama.cpp's ``common/arg.h``): ``medusa-edge generate``, ``bench``, ``tune`` and
``serve`` take the same spellings, so a plan made by ``tune`` is for the numerics that ``bench``
and ``serve`` run.
"""

from __future__ import annotations


#: KV cache types llama.cpp's own CLI accepts (--cache-type-k/-v), as ggml type ids (ggml.h)
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}


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
