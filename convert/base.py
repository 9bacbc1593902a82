"""The base model: a Hugging Face Llama/Mistral checkpoint to GGUF (gguf-py's name maps and vocab
helpers), then llama.cpp's own quantizer; or an existing GGUF, read for its fingerprint."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from medusa_edge.heads import schema
from medusa_edge.guards.hw import load_model
from medusa_edge.heads.writer import StreamTensor, write_gguf_streaming

from .checkpoint import Checkpoint, ConvertError, load_json, model_weight_files

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)

# quant types users may ask for; the IQ1/IQ2 family needs an importance matrix
_EXCLUDED = ("IQ1", "IQ2", "TQ", "MXFP4", "NVFP4", "Q1_0", "Q2_0")


def quant_types() -> dict[str, int]:
    """Quantization name (upper case) -> llama.cpp ftype, from the installed llama_cpp."""
    import llama_cpp

    out = {"F32": int(llama_cpp.LLAMA_FTYPE_ALL_F32)}
    for n in dir(llama_cpp):
        if n.startswith("LLAMA_FTYPE_MOSTLY_"):
            q = n[len("LLAMA_FTYPE_MOSTLY_"):]
            if not q.startswith(_EXCLUDED):
                out[q] = int(getattr(llama_cpp, n))
    return out


@dataclass
class BaseInfo:
    path: Path  # the GGUF the engine loads
    name: str
    n_embd: int
    n_vocab: int
    vocab_hash: str
    quant: str
    lm_head_shape: Optional[tuple] = None


# -- an existing GGUF -----------------------------------------------------------------------------

def read_gguf_base(path: Path) -> BaseInfo:
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file")
    try:
        r = gguf.GGUFReader(str(path), "r")
    except Exception as e:
        raise ConvertError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None

    def get(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    arch = get("general.architecture")
    if arch == schema.ARCH:
        raise ConvertError(f"{path}: this is a Medusa heads GGUF, not a base model")
    tokens = get("tokenizer.ggml.tokens")
    n_embd = get(f"{arch}.embedding_length")
    if not tokens or not n_embd:
        raise ConvertError(f"{path}: GGUF lacks tokenizer.ggml.tokens or {arch}.embedding_length")
    # the engine cannot branch recurrent/hybrid models; ask llama.cpp itself
    try:
        from medusa_edge._loader import native

        native.set_verbose(False)
        probe = load_model(str(path), vocab_only=True)
        recurrent = probe.is_recurrent
        del probe
    except (RuntimeError, ValueError) as e:
        raise ConvertError(f"{path}: llama.cpp cannot load it ({' '.join(str(e).split())[:160]})") from None
    if recurrent:
        raise ConvertError(
            f"{path}: unsupported architecture {arch!r}: recurrent and hybrid models cannot verify a Medusa tree"
        )
    ftype = get("general.file_type")
    quant = _ftype_name(ftype)
    return BaseInfo(path, path.stem, int(n_embd), len(tokens), schema.vocab_hash(tokens), quant)


def _ftype_name(ftype) -> str:
    if ftype is None:
        return "unknown"
    for k, v in quant_types().items():
        if v == ftype:
            return k
    return f"ftype{ftype}"


# -- Hugging Face Llama/Mistral ---------------------------------------------------------------------

def read_hf_config(d: Path) -> dict:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{d}: not a Hugging Face model dir (no config.json) and not a GGUF file")
    cfg = load_json(cfg_path)
    archs = cfg.get("architectures") or []
    if not archs:
        mt = cfg.get("model_type")
        archs = {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"]}.get(mt, [mt or "unknown"])
    if archs[0] not in SUPPORTED_ARCHS:
        raise ConvertError(f"{cfg_path}: unsupported architecture {archs[0]} (supported: {', '.join(SUPPORTED_ARCHS)})")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(cfg.get(k), int):
            raise ConvertError(f"{cfg_path}: missing or bad {k}")
    return cfg


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model
    pre: Optional[str]
    tokens: list
    scores: list
    types: list
    merges: bool


_LLAMA3_PAT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


def _bpe_pre(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (a few known ones)."""
    pt = tj.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt-2"
    pats = []
    for p in pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else []:
        if p.get("type") == "Split":
            pats.append((p.get("pattern") or {}).get("Regex"))
    if _LLAMA3_PAT in pats:
        return "llama-bpe"
    return "default"


def load_vocab(d: Path, n_vocab: int) -> _Vocab:
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    try:
        if (d / "tokenizer.model").is_file():
            v, model, pre, merges = SentencePieceVocab(d), "llama", None, False
        elif (d / "tokenizer.json").is_file():
            tj = load_json(d / "tokenizer.json")
            m = tj.get("model") or {}
            if m.get("type") == "BPE" and m.get("byte_fallback"):
                v, model, pre, merges = LlamaHfVocab(d), "llama", None, False
            elif m.get("type") == "BPE":
                v, model, pre, merges = BpeVocab(d), "gpt2", _bpe_pre(tj), True
            else:
                raise ConvertError(f"{d / 'tokenizer.json'}: unsupported tokenizer model {m.get('type')!r} (SentencePiece or BPE only)")
        else:
            raise ConvertError(f"{d}: no tokenizer (tokenizer.model or tokenizer.json)")
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(f"{d}: cannot read the tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    tokens, scores, types = [], [], []
    for text, score, typ in v.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(typ))
    if len(tokens) > n_vocab:
        raise ConvertError(f"{d}: the tokenizer has {len(tokens)} tokens but config.json's vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):  # embeddings padded past the tokenizer (as llama.cpp does)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return _Vocab(model, pre, tokens, scores, types, merges)


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows per head as [first halves | second halves] (rotate_half); llama.cpp's
    rope pairs adjacent dims, so interleave the two halves of every head."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_hf_base(
    d: Path,
    out_path: Path,
    quant: str,
    name: str,
    progress_factory: Callable[[str, int], Callable[[int], None]],
    n_threads: Optional[int] = None,
) -> BaseInfo:
    """HF dir ``d`` -> quantized GGUF at ``out_path`` (through an intermediate GGUF next to it)."""
    import gguf

    qtypes = quant_types()
    if quant not in qtypes:
        raise ConvertError(f"unknown --quant {quant!r}: use one of {', '.join(sorted(qtypes))}")
    cfg = read_hf_config(d)
    weights = model_weight_files(d)
    if weights is None:
        raise ConvertError(f"{d}: no weights (model.safetensors, pytorch_model.bin or their .index.json)")
    ckpt = Checkpoint(weights)

    H = cfg["hidden_size"]
    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or H // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    cfg_path = d / "config.json"

    emb_name = "model.embed_tokens.weight"
    if emb_name not in ckpt.entries:
        raise ConvertError(f"{d}: the checkpoint has no {emb_name}")
    n_vocab = int(ckpt.shape(emb_name)[0])
    if cfg.get("vocab_size") and cfg["vocab_size"] != n_vocab:
        raise ConvertError(f"{cfg_path}: vocab_size {cfg['vocab_size']} but {emb_name} has {n_vocab} rows")
    vocab = load_vocab(d, n_vocab)

    # tensors: HF names -> GGUF names, permuted where rope needs it
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    T = gguf.GGMLQuantizationType
    inter = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16}.get(quant)
    plans = []
    src_bytes = 0
    lm_head_shape = None
    for hf in ckpt.names():
        if hf.startswith("medusa_head.") or hf.endswith(_SKIP_SUFFIXES):
            continue
        new = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConvertError(f"{ckpt.file(hf)}: unknown tensor {hf!r} for {cfg.get('architectures', ['llama'])[0]}")
        shape = tuple(int(s) for s in ckpt.shape(hf))
        if hf == "lm_head.weight":
            lm_head_shape = shape
        perm = None
        if hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            perm = n_head
        elif hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            perm = n_head_kv
        if len(shape) == 1:
            qt = T.F32
        elif inter is not None:
            qt = inter
        else:
            dt = ckpt.dtype(hf)
            qt = T.F32 if dt == "float32" else T.BF16 if dt == "bfloat16" else T.F16
        plans.append(StreamTensor(new, shape, qt, _reader(ckpt, hf, perm)))
        src_bytes += int(np.prod(shape)) * 4
    if lm_head_shape is None and not cfg.get("tie_word_embeddings", False):
        raise ConvertError(f"{d}: the checkpoint has no lm_head.weight and tie_word_embeddings is false")

    def add_meta(w):
        w.add_name(name)
        w.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
        w.add_embedding_length(H)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != H // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(float(rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
        w.add_vocab_size(n_vocab)
        if scaling:
            typ = scaling.get("rope_type") or scaling.get("type")
            if typ == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(scaling["factor"]))
            else:
                raise ConvertError(f"{cfg_path}: rope scaling {typ!r} is not supported (only linear)")
        ftype = {T.F32: 0, T.F16: 1, T.BF16: 32}
        types = {p.qtype for p in plans if len(p.shape) > 1}
        w.add_file_type(ftype[types.pop()] if len(types) == 1 else 1)
        w.add_tokenizer_model(vocab.model)
        if vocab.pre is not None:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        sv = gguf.SpecialVocab(d, load_merges=vocab.merges, n_vocab=n_vocab)
        sv.add_to_gguf(w, quiet=True)

    direct = inter is not None  # F32/F16/BF16: written directly, no quantizer pass
    inter_path = out_path if direct else out_path.with_name(out_path.name + ".intermediate")
    try:
        cb = progress_factory(out_path.name if direct else f"{out_path.name} (unquantized pass)", sum(p.nbytes for p in plans))
        write_gguf_streaming(str(inter_path), "llama", add_meta, plans, cb)
        if not direct:
            quantize_gguf(inter_path, out_path, quant, n_threads)
    finally:
        if not direct and inter_path.exists():
            inter_path.unlink()
    return BaseInfo(out_path, name, H, n_vocab, schema.vocab_hash(vocab.tokens), quant, lm_head_shape)


def _reader(ckpt: Checkpoint, name: str, n_perm: Optional[int]):
    if n_perm is None:
        if len(ckpt.shape(name)) == 1:
            return lambda r0, r1: ckpt.rows(name)
        return lambda r0, r1: ckpt.rows(name, r0, r1)
    cache = {}

    def rows(r0, r1):
        if "w" not in cache:
            cache["w"] = _permute_rows(ckpt.rows(name), n_perm)
        w = cache["w"]
        out = w if w.ndim == 1 else w[r0:r1]
        if w.ndim == 1 or r1 >= w.shape[0]:
            cache.clear()
        return out

    return rows


def quantize_gguf(src: Path, dst: Path, quant: str, n_threads: Optional[int] = None) -> None:
    """llama.cpp's quantizer, ``src`` -> ``dst`` (via ``dst.tmp``; nothing left on failure)."""
    import llama_cpp

    qtypes = quant_types()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtypes[quant]
    params.nthread = int(n_threads or os.cpu_count() or 1)
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ConvertError(f"{src}: llama.cpp's quantizer failed to make {quant} (code {rc})")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
