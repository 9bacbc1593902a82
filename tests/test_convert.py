"""python -m convert: tiny synthetic checkpoints in the published Medusa layouts, converted and
checked against transformers and gguf-py."""

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
from medusa_edge.heads import schema  # noqa: E402
from medusa_edge.guards.hw import llama_cpp_llama  # noqa: E402

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

    llm = llama_cpp_llama(str(path), n_ctx=256, n_batch=256, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                          n_threads=1, verbose=False, seed=0)
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


# -- heads: round trip through gguf-py, every published layout ----------------------------------

def _check_heads(path: Path, sd, prefix: str, n_heads: int, n_layers: int, head_type: str, shared=False, v=384):
    r = read_gguf(path)
    assert field(r, "general.architecture") == schema.ARCH
    assert field(r, schema.KEY_HEAD_COUNT) == n_heads
    assert field(r, schema.KEY_BLOCK_COUNT) == n_layers
    assert field(r, schema.KEY_EMBEDDING_LENGTH) == H
    assert field(r, schema.KEY_VOCAB_SIZE) == v
    assert bool(field(r, schema.KEY_SHARED_OUTPUT)) == shared
    tree = json.loads(field(r, schema.KEY_TREE))
    assert tree and max(len(p) for p in tree) <= n_heads
    names = {t.name for t in r.tensors}
    want = {schema.res_weight(i, j) for i in range(n_heads) for j in range(n_layers)}
    want |= {schema.res_bias(i, j) for i in range(n_heads) for j in range(n_layers)}
    if not shared:
        want |= {schema.output_weight(i) for i in range(n_heads)}
    assert names == want
    for i in range(n_heads):
        pairs = [(schema.res_weight(i, j), f"{prefix}{i}.{j}.linear.weight") for j in range(n_layers)]
        pairs += [(schema.res_bias(i, j), f"{prefix}{i}.{j}.linear.bias") for j in range(n_layers)]
        if not shared:
            pairs.append((schema.output_weight(i), f"{prefix}{i}.{n_layers}.weight"))
        for gname, sname in pairs:
            src = sd[sname].float().numpy()
            got = tensor(r, gname)
            assert got.shape == src.shape, gname
            if head_type == "f32" or src.ndim == 1:
                np.testing.assert_array_equal(got, src, err_msg=gname)
            elif head_type == "f16":
                np.testing.assert_array_equal(got, src.astype(np.float16).astype(np.float32), err_msg=gname)
            else:  # q8_0: within one quantization step of each 32-block (plus the f16 scale's rounding)
                blocks = src.reshape(-1, 32)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
                err = np.abs(got.reshape(-1, 32) - blocks)
                assert np.all(err <= 0.5 * step * 1.01 + np.abs(blocks) * 1e-3 + 1e-12), gname


@pytest.mark.parametrize(
    "fmt,dtype,head_type",
    [("pt", torch.bfloat16, "f32"), ("pt", torch.bfloat16, "q8_0"), ("safetensors", torch.bfloat16, "f16"),
     ("safetensors", torch.float16, "f16"), ("pt", torch.float32, "f32"), ("safetensors", torch.float32, "q8_0")],
)
def test_medusa1_heads_roundtrip(tmp_path, llama_dir, fmt, dtype, head_type):
    base, _ = llama_dir
    sd = head_state_dict(dtype=dtype)
    heads = write_medusa1(tmp_path / "medusa-heads", sd, fmt)  # config.json says 2 heads, the file holds 5
    out = tmp_path / "out"
    assert run_cli(base, heads, "-o", out, "--quant", "F16", "--heads-type", head_type) == 0
    stem = f"{base.name}-F16"
    _check_heads(out / f"{stem}.medusa.gguf", sd, "", 5, 1, head_type)
    # the fingerprint is the one llama.cpp computes from the converted base
    from medusa_edge.guards.hw import load_model

    m = load_model(str(out / f"{stem}.gguf"), vocab_only=True)
    assert field(read_gguf(out / f"{stem}.medusa.gguf"), schema.KEY_BASE_VOCAB_HASH) == f"{m.vocab_fingerprint():016x}"


def test_two_resblocks_and_shared_output(tmp_path, llama_dir):
    base, _ = llama_dir
    sd = head_state_dict(n_heads=3, n_layers=2)
    out = tmp_path / "out"
    assert run_cli(base, write_medusa1(tmp_path / "h2", sd, "safetensors"), "-o", out, "--quant", "F32",
                   "--heads-type", "f32") == 0
    _check_heads(out / f"{base.name}-F32.medusa.gguf", sd, "", 3, 2, "f32")
    # "version 2": ResBlocks only, logits through the base lm_head
    sd2 = head_state_dict(n_heads=4, shared=True)
    out2 = tmp_path / "out2"
    heads2 = write_medusa1(tmp_path / "hv2", sd2, "safetensors", config={"medusa_num_heads": 4, "version": "2"})
    assert run_cli(base, heads2, "-o", out2, "--quant", "F32", "--heads-type", "f16", "--tree", "chain:3") == 0
    path = out2 / f"{base.name}-F32.medusa.gguf"
    _check_heads(path, sd2, "", 4, 1, "f16", shared=True)
    assert json.loads(field(read_gguf(path), schema.KEY_TREE)) == [[0], [0, 0], [0, 0, 0]]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_medusa2_full_checkpoint(tmp_path, sp_model, fmt):
    ck = tmp_path / "medusa-1.0-tiny-7b"
    sd = write_medusa2(ck, sp_model, fmt)
    out = tmp_path / "out"
    assert run_cli(ck, "-o", out, "--quant", "F16", "--heads-type", "f16") == 0  # base and heads from one dir
    base_gguf = out / f"{ck.name}-F16.gguf"
    _check_heads(out / f"{ck.name}-F16.medusa.gguf", sd, "medusa_head.", 5, 1, "f16")
    # the base is the checkpoint's own (fine-tuned) backbone, without the head tensors
    r = read_gguf(base_gguf)
    assert not any("medusa" in t.name for t in r.tensors)
    np.testing.assert_array_equal(tensor(r, "token_embd.weight"), sd["model.embed_tokens.weight"].float().numpy())
    # a different base for a Medusa-2 checkpoint is refused
    other = tmp_path / "other-base"
    write_hf_base(other, sp_model, seed=11)
    out3 = tmp_path / "out3"
    rc = run_cli(other, ck, "-o", out3)
    assert rc == 1 and not out3.exists()


# -- bad inputs: exit code 1, one line naming the file and the problem, nothing left behind -----

def _truncate(p: Path, keep: float = 0.5) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def test_bad_heads_hidden_size(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    heads = write_medusa1(tmp_path / "h", head_state_dict(h=32))
    out = tmp_path / "out"
    assert_failed(run_cli(base, heads, "-o", out), capsys, out, "medusa_lm_head.pt", "hidden size 32", "has 64")


def test_bad_heads_vocab(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    heads = write_medusa1(tmp_path / "h", head_state_dict(v=500), "safetensors")
    out = tmp_path / "out"
    assert_failed(run_cli(base, heads, "-o", out), capsys, out, "medusa_lm_head.safetensors", "500 tokens", "384")


def test_bad_unknown_key_layout(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    sd = head_state_dict()
    sd["0.0.fc.weight"] = sd.pop("0.0.linear.weight")
    out = tmp_path / "out"
    assert_failed(run_cli(base, write_medusa1(tmp_path / "h", sd), "-o", out), capsys, out,
                  "medusa_lm_head.pt", "unknown key layout", "0.0.fc.weight")


def test_bad_missing_tensor(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    sd = head_state_dict()
    del sd["1.0.linear.bias"]
    out = tmp_path / "out"
    assert_failed(run_cli(base, write_medusa1(tmp_path / "h", sd), "-o", out), capsys, out, "'1.0.linear.bias' is missing")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_bad_truncated_heads(tmp_path, llama_dir, capsys, fmt):
    base, _ = llama_dir
    heads = write_medusa1(tmp_path / "h", head_state_dict(), fmt)
    f = heads / f"medusa_lm_head.{fmt}"
    _truncate(f, 0.6)
    out = tmp_path / "out"
    assert_failed(run_cli(base, heads, "-o", out), capsys, out, str(f), "truncated")


def test_bad_corrupt_safetensors_header(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    heads = write_medusa1(tmp_path / "h", head_state_dict(), "safetensors")
    f = heads / "medusa_lm_head.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_failed(run_cli(base, heads, "-o", out), capsys, out, str(f), "corrupt")


def test_bad_nan_values_leave_nothing(tmp_path, llama_dir, capsys):
    """Found while streaming the last head, after the base was written: both files go."""
    base, _ = llama_dir
    sd = head_state_dict()
    sd["4.1.weight"][7, 3] = float("nan")
    out = tmp_path / "out"
    assert_failed(run_cli(base, write_medusa1(tmp_path / "h", sd), "-o", out, "--quant", "Q8_0"), capsys, out,
                  "medusa_lm_head.pt", "4.1.weight", "NaN")


def test_bad_unsupported_architecture(tmp_path, sp_model, capsys):
    base = tmp_path / "qwen-ish"
    write_hf_base(base, sp_model, extra_cfg={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    heads = write_medusa1(tmp_path / "h", head_state_dict())
    out = tmp_path / "out"
    assert_failed(run_cli(base, heads, "-o", out), capsys, out, "config.json", "unsupported architecture Qwen2ForCausalLM")


def test_bad_corrupt_config_and_no_heads(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    heads = write_medusa1(tmp_path / "h", head_state_dict())
    (heads / "config.json").write_text('{"medusa_num_heads": 5,')
    out = tmp_path / "out"
    assert_failed(run_cli(base, heads, "-o", out), capsys, out, str(heads / "config.json"), "not valid JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_failed(run_cli(base, empty, "-o", out), capsys, out, str(empty), "no Medusa heads found")
    # a plain base model given as HEADS has no medusa_head.* tensors
    assert_failed(run_cli(base, base, "-o", out), capsys, out, str(base), "no Medusa heads found")


def test_bad_gguf_base_and_options(tmp_path, llama_dir, capsys):
    base, _ = llama_dir
    heads = write_medusa1(tmp_path / "h", head_state_dict())
    out = tmp_path / "out"
    assert run_cli(base, heads, "-o", tmp_path / "good", "--quant", "F16") == 0
    capsys.readouterr()
    g = tmp_path / "good" / f"{base.name}-F16.gguf"
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(g.read_bytes()[:3000])
    assert_failed(run_cli(bad, heads, "-o", out), capsys, out, str(bad), "corrupt or truncated GGUF")
    assert_failed(run_cli(base, heads, "-o", out, "--quant", "Q9_X"), capsys, out, "unknown --quant")
    assert_failed(run_cli(base, heads, "-o", out, "--tree", "chain:6"), capsys, out, "needs 6 heads", "has 5")


def test_bad_preset_not_in_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    assert_failed(run_cli("vicuna7b", "FasterDecoding/medusa-vicuna-7b-v1.3", "-o", out), capsys, out,
                  "FasterDecoding/medusa-vicuna-7b-v1.3", str(cache / "models--FasterDecoding--medusa-vicuna-7b-v1.3"),
                  "download")


# -- the CLI as users run it ----------------------------------------------------------------------

def _cli_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_presets_from_hf_cache_and_gguf_base(tmp_path, llama_dir):
    """`python -m convert vicuna7b heads/` with lmsys/vicuna-7b-v1.3 in HF_HOME's cache."""
    src, _ = llama_dir
    home = tmp_path / "hfhome"
    repo = home / "hub" / "models--lmsys--vicuna-7b-v1.3"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    heads = write_medusa1(tmp_path / "heads", head_state_dict())
    out = tmp_path / "out"
    env = _cli_env(HF_HOME=str(home))
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-m", "convert", "vicuna7b", str(heads), "-o", str(out), "--quant", "Q8_0"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (out / "vicuna-7b-v1.3-Q8_0.gguf").is_file() and (out / "vicuna-7b-v1.3-Q8_0.medusa.gguf").is_file()
    assert "vicuna_7b_stage2" in p.stdout and "5 heads" in p.stdout
    assert "medusa_num_heads=2" in p.stderr  # the wrong config is reported, the tensors win

    # an existing GGUF as BASE: heads land next to it; with --quant it is requantized
    gdir = tmp_path / "g"
    gdir.mkdir()
    g = gdir / "mine.gguf"
    g.write_bytes((out / "vicuna-7b-v1.3-Q8_0.gguf").read_bytes())
    assert run_cli(g, heads) == 0
    assert (gdir / "mine.medusa.gguf").is_file()
    assert run_cli(g, heads, "-o", gdir, "--quant", "Q4_0") == 0
    assert (gdir / "mine-Q4_0.gguf").is_file() and (gdir / "mine-Q4_0.medusa.gguf").is_file()


def test_help_and_check(tmp_path, llama_dir):
    p = subprocess.run([sys.executable, "-m", "convert", "--help"], env=_cli_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0
    for s in ("BASE", "HEADS", "--quant", "--heads-type", "--tree", "--check", "examples:", "vicuna7b"):
        assert s in p.stdout
    # --check with random heads: agreement near zero is reported and fails the run
    base, _ = llama_dir
    out = tmp_path / "out"
    heads = write_medusa1(tmp_path / "heads", head_state_dict())
    p = subprocess.run([sys.executable, "-m", "convert", str(base), str(heads), "-o", str(out), "--quant", "F32", "--check", "--threads", "1"],
                       env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert "heads' top-1 agreement" in p.stdout, p.stdout + p.stderr
    assert p.returncode == 3 and "near 0" in p.stderr


def test_bpe_tokenizer_and_tied_embeddings(tmp_path):
    """A byte-level BPE tokenizer.json (GPT-2 style pre-tokenizer) and tie_word_embeddings."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS.split("\n"), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n = tok.get_vocab_size()
    cfg = transformers.LlamaConfig(vocab_size=n, hidden_size=H, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                                   num_attention_heads=N_HEAD, num_key_value_heads=N_KV, rms_norm_eps=1e-5,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    _init_weights(model, 5)
    base = tmp_path / "bpe-model"
    model.save_pretrained(base)
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "<|endoftext|>"}))
    out = tmp_path / "out"
    assert run_cli(base, write_medusa1(tmp_path / "h", head_state_dict(v=n)), "-o", out, "--quant", "F32") == 0
    g = out / "bpe-model-F32.gguf"
    r = read_gguf(g)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert not any(t.name == "output.weight" for t in r.tensors)
    model.eval()
    for text in PROMPTS:
        toks = tok.encode(text).ids
        assert llama_cpp_tokenize(g, text)[-len(toks):] == toks, text
    toks = tok.encode(PROMPTS[2]).ids
    with torch.no_grad():
        ref = model(torch.tensor([toks])).logits[0].double().numpy()
    assert np.abs(llama_cpp_logits(g, toks) - ref).max() < 1e-4
