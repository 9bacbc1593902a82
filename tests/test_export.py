"""medusa-edge export: heads GGUF -> the FasterDecoding/Medusa layout (TGI, TensorRT-LLM) and vLLM's.

Round trips: the converter reads each exported layout back into a heads GGUF identical to the
source, tensor for tensor. The FasterDecoding layout loads into the reference's head module, and
the vLLM layout into a module with vLLM's parameter names; both give this engine's top-k.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
import gguf  # noqa: E402
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from convert.cli import main as convert_main  # noqa: E402
from medusa_edge.heads import schema  # noqa: E402
from medusa_edge._loader import native  # noqa: E402
from medusa_edge.cli import main as cli_main  # noqa: E402
from medusa_edge.errors import MedusaError  # noqa: E402
from medusa_edge.heads.export import (BaseRequiredError, RootInputHeadsError, export,  # noqa: E402
                                stored_as_float32)
from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf  # noqa: E402
from medusa_edge.testing import random_heads, write_llama_gguf, write_random_heads  # noqa: E402

TREE = [[0], [1], [0, 0], [0, 1], [2], [0, 0, 0]]  # not in sorted order: the round trip keeps it as written
RANK_ACC = [[0.5, 0.125, 0.0625], [0.25, 0.125, 0.03125], [0.125, 0.0625, 0.03125]]


# -- helpers ---------------------------------------------------------------------------------------

def write_heads(path, base, *, head_type="f32", shared=False, n_heads=3, n_layers=1, seed=11, rank=True):
    """Random heads for ``base`` with a stored tree and rank accuracies (what the trainer writes)."""
    res, out = random_heads(n_heads, n_layers, base.n_embd, base.n_vocab, seed, shared)
    meta = HeadsMeta(n_heads, n_layers, base.n_embd, base.n_vocab, shared, TREE, schema.vocab_hash(base.tokens),
                     RANK_ACC[:n_heads] if rank else None)
    write_heads_gguf(str(path), meta, heads_tensors(res, out), head_type)
    return res, out


def gguf_contents(path):
    """(medusa.* and file-type metadata, {name: (type, shape, raw bytes)}) of a GGUF."""
    r = gguf.GGUFReader(str(path))
    meta = {k: r.fields[k].contents() for k in r.fields if k.startswith("medusa.") or k in ("general.file_type", "general.architecture")}
    tensors = {t.name: (t.tensor_type, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes()) for t in r.tensors}
    return meta, tensors


def convert_back(tmp_path, base_path, layout_dir, head_type, tag):
    out = tmp_path / f"rt-{tag}"
    rc = convert_main([str(base_path), str(layout_dir), "-o", str(out), "--heads-type", head_type])
    assert rc == 0
    return out / (base_path.stem + ".medusa.gguf")


def assert_same_heads(a, b):
    ma, ta = gguf_contents(a)
    mb, tb = gguf_contents(b)
    assert ma == mb
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name][:2] == tb[name][:2], name
        assert ta[name][2] == tb[name][2], f"{name}: bytes differ"


def hidden_states(n, n_embd, seed=0):
    h = np.random.default_rng(seed).standard_normal((n, n_embd)).astype(np.float32)
    return h / np.sqrt((h**2).mean(axis=1, keepdims=True))


def base_output_matrix(path):
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "output.weight")
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0]))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("export-bases")
    return {"f32": write_llama_gguf(str(d / "base-f32.gguf"), seed=0),
            "q8_0": write_llama_gguf(str(d / "base-q8.gguf"), seed=2, n_embd=64, dtype="q8_0")}


# -- the reference's head module (FasterDecoding/Medusa, medusa/model/medusa_model.py) ------------------

class ResBlock(nn.Module):
    """x + SiLU(Linear(x)), the Linear with bias and zero-initialised, as the reference defines it."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def reference_medusa_head(n_heads, n_layers, hidden_size, vocab_size):
    """``MedusaModel.medusa_head``: per head, n_layers ResBlocks then a bias-free Linear to the vocabulary."""
    return nn.ModuleList([
        nn.Sequential(*([ResBlock(hidden_size)] * n_layers), nn.Linear(hidden_size, vocab_size, bias=False))
        for _ in range(n_heads)
    ])


# -- vLLM's Medusa parameter names (vllm/model_executor/models/medusa.py) ------------------------------

class VllmResidualBlock(nn.Module):
    def __init__(self, hidden_size, num_layers, bias):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers)])
        self.act = nn.SiLU()

    def forward(self, x):
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class VllmMedusa(nn.Module):
    """Parameters named as vLLM's Medusa names them, built from an exported config.json; load()
    maps checkpoint names as its load_weights does (``lm_heads.0.weight`` -> ``lm_head.weight``
    with original_lm_head) and requires every parameter to be loaded."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([VllmResidualBlock(cfg["hidden_size"], cfg["num_hidden_layers"], cfg.get("medusa_fc_bias", False))
                                     for _ in range(cfg["num_heads"])])
        if cfg.get("original_lm_head", False):
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["truncated_vocab_size"], bias=False)
            self.lm_heads = [self.lm_head] * cfg["num_heads"]
        else:
            self.lm_heads = nn.ModuleList([nn.Linear(cfg["hidden_size"], cfg["truncated_vocab_size"], bias=False)
                                           for _ in range(cfg["num_heads"])])

    def load(self, sd):
        params = dict(self.named_parameters())
        mapped = {}
        for name, w in sd.items():
            name = name.replace("medusa_heads.", "")
            if name in params:
                mapped[name] = w
            elif self.cfg.get("original_lm_head", False) and name == "lm_heads.0.weight":
                mapped["lm_head.weight"] = w
        assert set(mapped) == set(params), sorted(set(params) ^ set(mapped))
        with torch.no_grad():
            for name, w in mapped.items():
                assert params[name].shape == w.shape, name
                params[name].copy_(w.to(params[name].dtype))

    def forward(self, h):
        return [lm(block(h)) for block, lm in zip(self.blocks, self.lm_heads)]


def assert_topk_matches(native_heads, logits_fn, hs, k=8):
    """The engine's top-k ids are a top-k of the torch module's logits (same values up to float
    rounding), and the top-1 ids are equal."""
    for h in hs:
        ids, _ = native_heads.propose_hidden(h, k)
        with torch.no_grad():
            logits = [lg.double().numpy() for lg in logits_fn(torch.from_numpy(h)[None])]
        for i, lg in enumerate(logits):
            lg = lg[0]
            ref = np.sort(lg)[::-1][:k]
            assert np.abs(lg[ids[i].astype(np.int64)] - ref).max() < 1e-3, (i, ids[i], np.argsort(-lg)[:k])
            assert ids[i, 0] == int(np.argmax(lg))


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("head_type", ["f32", "f16", "q8_0"])
def test_round_trip_own_output(tmp_path, bases, head_type):
    """Heads with their own W_out: every layout converts back to the same heads GGUF, bit for bit,
    metadata included (tree as written, rank accuracies, base fingerprint)."""
    base = bases["f32"]
    src = tmp_path / "h.medusa.gguf"
    write_heads(src, base, head_type=head_type, n_layers=2)
    results = export(str(src), str(tmp_path / "out"))
    assert [r.layout for r in results] == ["faster-medusa", "vllm"]
    for r in results:
        assert r.output_copies == 0
        back = convert_back(tmp_path, Path(base.path), r.directory, head_type, r.layout)
        assert_same_heads(src, back)


@pytest.mark.parametrize("base_kind", ["f32", "q8_0"])
def test_round_trip_shared_output(tmp_path, bases, base_kind):
    """Shared-output heads: the base's output matrix (dequantized from q8_0 for that base) is
    written once per head for faster-medusa and once for vLLM (original_lm_head); the converter
    recognises it as the base's own and gives back shared-output heads identical to the source."""
    base = bases[base_kind]
    src = tmp_path / "s.medusa.gguf"
    write_heads(src, base, head_type="f16", shared=True)
    results = {r.layout: r for r in export(str(src), str(tmp_path / "out"), base=base.path)}
    V, H = base.n_vocab, base.n_embd
    fm, vl = results["faster-medusa"], results["vllm"]
    assert (fm.output_copies, vl.output_copies) == (3, 1)
    assert fm.output_copy_bytes == V * H * 2  # auto dtype for f16 heads: float16
    sd = load_file(str(Path(fm.directory) / "medusa_lm_head.safetensors"))
    lm = stored_as_float32(base_output_matrix(base.path), "float16")
    for i in range(3):
        assert np.array_equal(sd[f"{i}.1.weight"].float().numpy(), lm)
    cfg = json.loads((Path(vl.directory) / "config.json").read_text())
    assert cfg["original_lm_head"] is True
    assert sorted(k for k in load_file(str(Path(vl.directory) / "model.safetensors")) if k.startswith("lm_heads")) == ["lm_heads.0.weight"]
    for r in results.values():
        back = convert_back(tmp_path, Path(base.path), r.directory, "f16", r.layout)
        assert_same_heads(src, back)


def test_bfloat16_export_still_recognises_the_base_matrix(tmp_path, bases):
    base = bases["f32"]
    src = tmp_path / "s.medusa.gguf"
    res, _ = write_heads(src, base, head_type="f32", shared=True)
    (r,) = export(str(src), str(tmp_path / "out"), layouts=["vllm"], base=base.path, dtype="bfloat16")
    back = convert_back(tmp_path, Path(base.path), r.directory, "f32", "bf16")
    meta, tensors = gguf_contents(back)
    assert meta[schema.KEY_SHARED_OUTPUT] is True and schema.output_weight(0) not in tensors
    w = gguf.GGUFReader(str(back)).get_tensor(0)
    assert w.name == schema.res_weight(0, 0)
    assert np.array_equal(np.asarray(w.data), stored_as_float32(res[0][0][0], "bfloat16"))


def test_converter_reads_vllm_checkpoint_without_biases(tmp_path, bases):
    """vLLM's own default (medusa_fc_bias false) has no ResBlock biases: read as zeros."""
    base = bases["f32"]
    res, out = random_heads(2, 1, base.n_embd, base.n_vocab, seed=5)
    d = tmp_path / "vllm-nobias"
    d.mkdir()
    sd = {f"blocks.{i}.layers.0.weight": res[i][0][0] for i in range(2)}
    sd.update({f"lm_heads.{i}.weight": out[i] for i in range(2)})
    save_numpy(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "medusa", "num_heads": 2, "num_hidden_layers": 1,
                                               "hidden_size": base.n_embd, "vocab_size": base.n_vocab}))
    back = convert_back(tmp_path, Path(base.path), d, "f32", "nobias")
    r = gguf.GGUFReader(str(back))
    t = {t.name: np.asarray(t.data) for t in r.tensors}
    assert np.array_equal(t[schema.res_bias(1, 0)], np.zeros(base.n_embd, np.float32))
    assert np.array_equal(t[schema.res_weight(1, 0)], res[1][0][0])
    assert np.array_equal(t[schema.output_weight(0)], out[0])


# -- the engines' modules --------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_faster_medusa_layout_loads_in_the_reference_module(tmp_path, bases, shared):
    """The exported FasterDecoding layout loads (strict) into the reference's medusa_head and its
    top-k on hidden states equals this engine's heads on the same states."""
    base = bases["f32"]
    src = tmp_path / "h.medusa.gguf"
    # one ResBlock: the published definition repeats a single ResBlock object ([ResBlock] * layers),
    # so it can hold distinct layers only at one layer per head, the layout its checkpoints have
    write_heads(src, base, head_type="f32", shared=shared, n_layers=1, seed=21)
    (r,) = export(str(src), str(tmp_path / "out"), layouts=["faster-medusa"], base=base.path if shared else None)
    cfg = json.loads((Path(r.directory) / "config.json").read_text())
    assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"]) == (3, 1) and "base_model_name_or_path" in cfg
    assert "architectures" not in cfg  # TGI reads a config with architectures as an MLP speculator
    head = reference_medusa_head(cfg["medusa_num_heads"], cfg["medusa_num_layers"], base.n_embd, base.n_vocab)
    head.load_state_dict(load_file(str(Path(r.directory) / "medusa_lm_head.safetensors")), strict=True)
    nh = native.Heads(str(src), base.path, 1)
    assert_topk_matches(nh, lambda x: [m(x) for m in head], hidden_states(12, base.n_embd, seed=3))


@pytest.mark.parametrize("shared", [False, True])
def test_vllm_layout_loads_under_vllms_names(tmp_path, bases, shared):
    base = bases["f32"]
    src = tmp_path / "h.medusa.gguf"
    write_heads(src, base, head_type="f32", shared=shared, seed=31)
    (r,) = export(str(src), str(tmp_path / "out"), layouts=["vllm"], base=base.path if shared else None)
    cfg = json.loads((Path(r.directory) / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"] and cfg["medusa_fc_bias"] is True
    assert (cfg["num_heads"], cfg["num_hidden_layers"], cfg["original_lm_head"]) == (3, 1, shared)
    m = VllmMedusa(cfg)
    m.load(load_file(str(Path(r.directory) / "model.safetensors")))
    nh = native.Heads(str(src), base.path, 1)
    assert_topk_matches(nh, m, hidden_states(12, base.n_embd, seed=4))


# -- refusals and the command line -----------------------------------------------------------------

def test_root_input_heads_are_refused(tmp_path, bases, capsys):
    base = bases["f32"]
    src = tmp_path / "root.medusa.gguf"
    write_random_heads(str(src), base, n_heads=2, shared_output=True, root_input=True)
    with pytest.raises(RootInputHeadsError) as ei:
        export(str(src), str(tmp_path / "out"), base=base.path)
    assert isinstance(ei.value, MedusaError) and "--no-root-input" in str(ei.value)
    assert not (tmp_path / "out").exists()
    rc = cli_main(["export", str(src), str(tmp_path / "out2"), "--base", base.path])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "root input" in err and "medusa-edge train" in err and "--no-root-input" in err


def test_no_root_input_is_a_real_trainer_option():
    from medusa_edge.training.train import parse_args

    assert parse_args([__file__, "--data", "x.jsonl", "--no-root-input"]).root_input is False
    assert parse_args([__file__, "--data", "x.jsonl"]).root_input is True


def test_shared_heads_need_the_base(tmp_path, bases, capsys):
    base = bases["f32"]
    src = tmp_path / "s.medusa.gguf"
    write_heads(src, base, shared=True)
    with pytest.raises(BaseRequiredError):
        export(str(src), str(tmp_path / "out"))
    rc = cli_main(["export", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--base MODEL.gguf" in err and len(err.strip().splitlines()) == 1
    # a base with another vocabulary is refused, naming the mismatch
    other = write_llama_gguf(str(tmp_path / "other.gguf"), seed=0, vocab_salt=3, vocab_size=base.n_vocab)
    rc = cli_main(["export", str(src), str(tmp_path / "out"), "--base", other.path])
    assert rc == 1 and "another vocabulary" in capsys.readouterr().err


def test_cli_writes_one_layout_and_reports_sizes(tmp_path, bases, capsys):
    base = bases["f32"]
    src = tmp_path / "s.medusa.gguf"
    write_heads(src, base, shared=True, head_type="f16")
    rc = cli_main(["export", str(src), str(tmp_path / "out"), "--layout", "faster-medusa", "--base", base.path,
                   "--base-model-id", "org/base-model"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "out" / "faster-medusa" / "medusa_lm_head.safetensors").is_file()
    assert not (tmp_path / "out" / "vllm").exists()
    assert "3 copies of the base's output matrix" in out
    cfg = json.loads((tmp_path / "out" / "faster-medusa" / "config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base-model"
    rc = cli_main(["export", str(tmp_path / "missing.gguf"), str(tmp_path / "o")])
    assert rc == 1 and "no such file" in capsys.readouterr().err
