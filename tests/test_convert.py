"""python -m convert: tiny synthetic checkpoints in the published Medusa layouts (reference
section 1), converted and checked against transformers and gguf-py (DESIGN section 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
import gguf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from convert.cli import main as convert_main  # noqa: E402
from medusa_edge import schema  # noqa: E402

H, N_LAYER, N_HEAD, N_KV, N_FF = 64, 2, 4, 2, 128
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a lighthouse keeper.",
    "1234 + 5678 = 6912",
    "  leading spaces and\ttabs",
    "What is the capital of France? Paris!",
    "medusa heads predict the next tokens",
    "Ünïcödé text: café, naïve, 東京",
]
CORPUS = "\n".join(
    [
        "The quick brown fox jumps over the lazy dog. Once upon a time there was a lighthouse keeper who lived alone.",
        "Medusa heads predict several tokens at once; the base model verifies them in one forward pass.",
        "What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany.",
        "Numbers like 1234 and 5678 appear in text, as do words such as hello, world, story, message and bottle.",
        "A chat between a curious user and an artificial intelligence assistant gives helpful answers.",
    ]
    * 20
)


# -- fixtures: tokenizer, base models, heads ------------------------------------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=384, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return d / "tok.model"


def _init_weights(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))


def write_hf_base(d: Path, sp_model: Path, arch: str = "llama", seed: int = 0, extra_cfg: dict | None = None):
    """A tiny random Llama/Mistral checkpoint in the HF layout with a SentencePiece tokenizer."""
    n_vocab = spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size()
    kw = dict(vocab_size=n_vocab, hidden_size=H, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
              num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(sliding_window=4096, **kw), transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float()
    _init_weights(model, seed)
    model.save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    }))
    if extra_cfg:
        c = json.loads((d / "config.json").read_text())
        c.update(extra_cfg)
        (d / "config.json").write_text(json.dumps(c))
    return model


def head_state_dict(n_heads=5, n_layers=1, h=H, v=384, dtype=torch.bfloat16, shared=False, seed=1, prefix=""):
    """Keys exactly as the published medusa_lm_head.pt: {i}.{j}.linear.weight/bias, {i}.{L}.weight."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for i in range(n_heads):
        for j in range(n_layers):
            sd[f"{prefix}{i}.{j}.linear.weight"] = (torch.randn(h, h, generator=g) / np.sqrt(h)).to(dtype)
            sd[f"{prefix}{i}.{j}.linear.bias"] = (0.1 * torch.randn(h, generator=g)).to(dtype)
        if not shared:
            sd[f"{prefix}{i}.{n_layers}.weight"] = (torch.randn(v, h, generator=g) / np.sqrt(h)).to(dtype)
    return sd


def write_medusa1(d: Path, sd, fmt="pt", config=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "medusa_num_heads": 2, "medusa_num_layers": 1,
           "transformers_version": "4.31.0"}
    (d / "config.json").write_text(json.dumps(config if config is not None else cfg))
    if fmt == "pt":
        torch.save(sd, d / "medusa_lm_head.pt")
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "medusa_lm_head.safetensors"))
    return d


def write_medusa2(d: Path, sp_model: Path, fmt="bin", n_heads=5, seed=3) -> dict:
    """A Medusa-2 full checkpoint: fp16 base keys + medusa_head.* keys, in two shards with an index."""
    src = d.parent / (d.name + "-src")
    model = write_hf_base(src, sp_model, seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    n_vocab = sd["model.embed_tokens.weight"].shape[0]
    sd.update({k: v.to(torch.float16) for k, v in head_state_dict(n_heads, 1, H, n_vocab, prefix="medusa_head.").items()})
    keys = list(sd)
    half = len(keys) // 2
    shards = [keys[:half], keys[half:]]
    weight_map = {}
    for s, ks in enumerate(shards):
        if fmt == "bin":
            fn = f"pytorch_model-{s + 1:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in ks}, d / fn)
        else:
            fn = f"model-{s + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in ks}, str(d / fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in ks})
    idx = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    total = sum(v.numel() * 2 for v in sd.values())
    (d / idx).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({"medusa_num_heads": n_heads, "medusa_num_layers": 1, "torch_dtype": "float16"})
    (d / "config.json").write_text(json.dumps(cfg))
    for fn in ("tokenizer.model", "tokenizer_config.json"):
        (d / fn).write_bytes((src / fn).read_bytes())
    return sd


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sp_model):
    d = tmp_path_factory.mktemp("vicuna-tiny")
    model = write_hf_base(d, sp_model, "llama", seed=0)
    return d, model


def run_cli(*args) -> int:
    return convert_main([str(a) for a in args])


def read_gguf(path: Path):
    return gguf.GGUFReader(str(path), "r")


def field(r, key):
    f = r.get_field(key)
    return None if f is None else f.contents()


def tensor(r, name) -> np.ndarray:
    t = next(t for t in r.tensors if t.name == name)
    data = np.asarray(t.data)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32).reshape(list(reversed([int(x) for x in t.shape])))
    return gguf.quants.dequantize(data, t.tensor_type).reshape(list(reversed([int(x) for x in t.shape])))


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                          n_threads=2, verbose=False, seed=0)
    try:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def llama_cpp_tokenize(path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


def assert_failed(rc: int, capsys, out: Path, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert err, "no message"
    last = err[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, (n, last)
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
    return last


# -- base: logits and tokenization equal transformers --------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_base_logits_match_transformers(tmp_path, sp_model, arch):
    base = tmp_path / f"tiny-{arch}"
    model = write_hf_base(base, sp_model, arch, seed=7)
    heads = write_medusa1(tmp_path / "heads", head_state_dict(v=model.config.vocab_size))
    out = tmp_path / "out"
    assert run_cli(base, heads, "-o", out, "--quant", "F32", "--heads-type", "f32") == 0
    gguf_path = out / f"tiny-{arch}-F32.gguf"
    assert gguf_path.is_file() and (out / f"tiny-{arch}-F32.medusa.gguf").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    model.eval()
    worst = 0.0
    for text in PROMPTS:
        toks = llama_cpp_tokenize(gguf_path, text)
        assert toks == [1] + sp.encode(text), text  # tokenization equal (BOS + SentencePiece)
        with torch.no_grad():
            ref = model(torch.tensor([toks])).logits[0].double().numpy()
        got = llama_cpp_logits(gguf_path, toks)
        worst = max(worst, float(np.abs(got - ref).max()))
    print("worst", worst)
    assert worst < 1e-4, worst

    # quantized: within the expected error of Q8_0
    assert run_cli(base, heads, "-o", out, "--quant", "Q8_0") == 0
    q8 = out / f"tiny-{arch}-Q8_0.gguf"
    r = read_gguf(q8)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in r.tensors)
    toks = llama_cpp_tokenize(q8, PROMPTS[1])
    with torch.no_grad():
        ref = model(torch.tensor([toks])).logits[0].double().numpy()
    got = llama_cpp_logits(q8, toks)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print("rel", rel)
    assert rel < 0.05, rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8
