"""Heads with a draft vocabulary (schema 3): they score only N tokens and return full ids.

A draft head's top-k must equal the full-vocabulary head's ranking restricted to the draft
vocabulary (the restricted rows are the original rows, byte for byte, so the logits are the same
numbers); older files load unchanged; damaged draft fields are one clear error in both validators.
"""

import json

import numpy as np
import pytest

from medusa_edge import Engine
from medusa_edge.heads import schema
from medusa_edge._loader import native
from medusa_edge.core.engine import HeadsError, SamplingParams
from medusa_edge.guards.gguf_file import read_gguf
from medusa_edge.heads.check import heads_info
from medusa_edge.heads.writer import (HeadsMeta, check_draft_vocab, draft_vocab_from_counts, heads_tensors,
                                    restrict_heads_file, write_heads_gguf)
from medusa_edge.testing import random_heads, write_llama_gguf, write_random_heads


def hidden_states(n, n_embd, seed=0):
    h = np.random.default_rng(seed).standard_normal((n, n_embd)).astype(np.float32)
    return h / np.sqrt((h**2).mean(axis=1, keepdims=True))


def draft_ids(n_vocab, n, seed=0):
    return np.sort(np.random.default_rng(seed).choice(n_vocab, n, replace=False)).astype(np.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # q8_0 matrices: the restricted rows are copied as quantized bytes, the case that matters for
    # the default model's shared Q4_1 matrix; 64 wide (a multiple of 32)
    return write_llama_gguf(str(tmp_path_factory.mktemp("dv") / "b.gguf"), n_embd=64, seed=2, dtype="q8_0")


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("root_input", [False, True], ids=["plain", "root"])
def test_draft_topk_is_full_topk_restricted(base, tmp_path, shared, root_input):
    full = str(tmp_path / "full.medusa.gguf")
    write_random_heads(full, base, n_heads=3, n_layers=1, seed=4, head_type="q8_0", shared_output=shared,
                       root_input=root_input)
    ids = draft_ids(base.n_vocab, 300, seed=5)
    small = str(tmp_path / "draft.medusa.gguf")
    info = restrict_heads_file(full, small, ids)
    assert info["schema_version"] == 3 and info["n_draft"] == 300 and (info["draft_vocab"] == ids).all()
    hf = native.Heads(full, base.path, 2)
    hd = native.Heads(small, base.path, 2)
    assert (hd.n_draft, hf.n_draft) == (300, base.n_vocab)
    assert (np.asarray(hd.draft_vocab) == ids).all() and len(hf.draft_vocab) == 0
    in_draft = np.zeros(base.n_vocab, bool)
    in_draft[ids] = True
    rng = np.random.default_rng(7)
    for n, h in enumerate(hidden_states(200, base.n_embd, seed=8)):
        root = int(rng.integers(base.n_vocab))
        # the full heads' whole ranking (by logit, ties to the lower id), restricted to the draft vocabulary
        ranking, _ = hf.propose_hidden(h, base.n_vocab, root=root, logp=False)
        for k in (1, 10):
            got, _ = hd.propose_hidden(h, k, root=root, logp=False)
            want = np.stack([r[in_draft[r]][:k] for r in ranking])
            assert (got == want).all(), (n, k, got, want)
        if n < 20:  # the full-output pass ranks the same way (its probabilities are over the draft tokens)
            got, logp = hd.propose_hidden(h, 10, root=root, logp=True)
            assert (got == np.stack([r[in_draft[r]][:10] for r in ranking])).all()
            assert np.isfinite(logp).all() and (logp <= 0).all()


def test_k_beyond_the_draft_vocabulary_is_refused(base, tmp_path):
    full = str(tmp_path / "full.medusa.gguf")
    write_random_heads(full, base, n_heads=2, seed=4, shared_output=True)
    small = str(tmp_path / "draft.medusa.gguf")
    restrict_heads_file(full, small, draft_ids(base.n_vocab, 12))
    heads = native.Heads(small, base.path, 1)
    h = hidden_states(1, base.n_embd)[0]
    assert heads.propose_hidden(h, 12, logp=False)[0].shape == (2, 12)
    with pytest.raises(ValueError, match="draft vocabulary"):
        heads.propose_hidden(h, 13)


def test_old_files_load_unchanged(base, tmp_path):
    """Schema 1 and 2 files (no draft vocabulary) are written as before and score every token."""
    for root_input, version in ((False, 1), (True, 2)):
        p = str(tmp_path / f"v{version}.medusa.gguf")
        write_random_heads(p, base, n_heads=2, seed=3, root_input=root_input)
        info = heads_info(read_gguf(p, "heads file"))
        assert info["schema_version"] == version and info["draft_vocab"] is None and info["n_draft"] == base.n_vocab
        heads = native.Heads(p, base.path, 1)
        assert heads.n_draft == base.n_vocab
        ids, _ = heads.propose_hidden(hidden_states(1, base.n_embd)[0], 10, root=5)
        assert ids.shape == (2, 10)


def test_draft_vocab_from_counts():
    counts = np.array([5, 0, 9, 9, 1, 0])
    assert draft_vocab_from_counts(counts, 3).tolist() == [0, 2, 3]
    assert draft_vocab_from_counts(counts, 5).tolist() == [0, 1, 2, 3, 4]  # unseen: lower id first
    with pytest.raises(ValueError):
        draft_vocab_from_counts(counts, 7)
    with pytest.raises(ValueError):
        check_draft_vocab([3, 3], 6)


def _write_raw(path, base, *, n_heads=2, shared=True, version=3, draft=None, draft_type=None, out_rows=None):
    """A heads file with a draft field exactly as given (bypassing the writer's checks). gguf-py cannot
    write an empty array; the count check it would meet is the one "too many" meets."""
    import gguf

    res, out = random_heads(n_heads, 1, base.n_embd, out_rows or base.n_vocab, 1, shared)
    w = gguf.GGUFWriter(path, schema.ARCH)
    w.add_uint32(schema.KEY_SCHEMA_VERSION, version)
    w.add_uint32(schema.KEY_HEAD_COUNT, n_heads)
    w.add_uint32(schema.KEY_BLOCK_COUNT, 1)
    w.add_uint32(schema.KEY_EMBEDDING_LENGTH, base.n_embd)
    w.add_uint32(schema.KEY_VOCAB_SIZE, base.n_vocab)
    w.add_bool(schema.KEY_SHARED_OUTPUT, shared)
    if draft is not None:
        if draft_type is None:
            w.add_key_value(schema.KEY_DRAFT_VOCAB, list(draft), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            w.add_key_value(schema.KEY_DRAFT_VOCAB, draft, *draft_type)
    w.add_string(schema.KEY_BASE_VOCAB_HASH, schema.vocab_hash(base.tokens))
    for name, arr in heads_tensors(res, out):
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hostile_cases(base):
    import gguf

    V = base.n_vocab
    T = gguf.GGUFValueType
    return {
        "out of range": dict(draft=[0, 5, V], match="outside"),
        "negative": dict(draft=[-1, 5, 7], match="outside"),
        "duplicate": dict(draft=[3, 3, 9], match="strictly increasing"),
        "unsorted": dict(draft=[9, 3, 11], match="strictly increasing"),
        "too many": dict(draft=list(range(V + 1)), match="ids, not 1 to"),
        "float array": dict(draft=[1.0, 2.0], draft_type=(T.ARRAY, T.FLOAT32), match="not an array of i32"),
        "u32 scalar": dict(draft=7, draft_type=(T.UINT32,), match="not an array of i32"),
        "string array": dict(draft=["a", "b"], draft_type=(T.ARRAY, T.STRING), match="not an array of i32"),
        "old version": dict(draft=[1, 2, 3], version=2, match="needs schema version 3"),
        "own rows mismatch": dict(draft=[1, 2, 3], shared=False, out_rows=V, match="shape"),
    }


@pytest.mark.parametrize("case", ["out of range", "negative", "duplicate", "unsorted", "too many", "float array",
                                  "u32 scalar", "string array", "old version", "own rows mismatch"])
def test_hostile_draft_fields_are_refused_by_both_validators(base, tmp_path, case):
    c = dict(_hostile_cases(base)[case])
    match = c.pop("match")
    p = _write_raw(str(tmp_path / "bad.medusa.gguf"), base, **c)
    with pytest.raises(ValueError, match=match):  # native loader
        native.Heads(p, base.path, 1)
    if case != "own rows mismatch":  # tensor shapes are the native loader's to check
        with pytest.raises(ValueError, match=match):
            heads_info(read_gguf(p, "heads file"))
    with pytest.raises(HeadsError):  # the engine: one clear error, before anything is allocated
        Engine(base.path, p, tree="chain:2", exact=False, n_ctx=128)


def test_stored_tree_beyond_the_draft_vocabulary_is_refused(base, tmp_path):
    p = str(tmp_path / "t.medusa.gguf")
    meta = HeadsMeta(2, 1, base.n_embd, base.n_vocab, True, [[0], [4]], schema.vocab_hash(base.tokens),
                     draft_vocab=[1, 2, 3, 4])
    res, _ = random_heads(2, 1, base.n_embd, base.n_vocab, 1, True)
    write_heads_gguf(p, meta, heads_tensors(res, None), "f32")
    with pytest.raises(ValueError, match="draft vocabulary has 4 tokens"):
        heads_info(read_gguf(p, "heads file"))


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_greedy_with_draft_heads_equals_plain_decoding(tmp_path, shared):
    """Lossless regardless of what the heads score: the tree is verified by the base."""
    base = write_llama_gguf(str(tmp_path / "m.gguf"), seed=3, residual_scale=0.1)
    full = str(tmp_path / "full.medusa.gguf")
    write_random_heads(full, base, n_heads=3, seed=2, shared_output=shared, tree=[[0], [1], [0, 0], [0, 0, 0]])
    small = str(tmp_path / "m.medusa.gguf")
    restrict_heads_file(full, small, draft_ids(base.n_vocab, 64, seed=1))
    prompt = [1, 300, 301, 302]
    plain = Engine(base.path, None, exact=False, n_ctx=256)
    want = [t for c in plain.generate(prompt, SamplingParams(temperature=0.0), 48) for t in c]
    med = Engine(base.path, small, tree="chain:3", exact=False, n_ctx=256)
    got = [t for c in med.generate(prompt, SamplingParams(temperature=0.0), 48) for t in c]
    assert got == want
    assert json.loads(json.dumps(med.heads_info["n_draft"])) == 64


# -- the trainer ---------------------------------------------------------------------------------

def _train_args(base, data, out, *extra):
    from medusa_edge.training import train as th

    return th.parse_args([base, "--data", data, "-o", out, "--heads", "3", "--gen-tokens", "48", "--batch", "256",
                          "--lr", "1e-3", "--threads", "1", "--device", "cpu", "--quiet", "--measure", "0",
                          "--val-frac", "0.2", *extra])


@pytest.fixture(scope="module")
def loopy(tmp_path_factory):
    import random

    from medusa_edge.testing import _WORDS

    d = tmp_path_factory.mktemp("dv_train")
    base = write_llama_gguf(str(d / "loopy.gguf"), seed=0, n_layer=2, residual_scale=0.1)
    r = random.Random(0)
    data = str(d / "prompts.jsonl")
    with open(data, "w") as f:
        for _ in range(36):
            f.write(json.dumps({"prompt": " ".join(r.choice(_WORDS) for _ in range(r.randint(3, 8)))}) + "\n")
    return {"dir": d, "base": base, "data": data, "cache": str(d / "data")}


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_trainer_learns_heads_over_the_most_frequent_tokens(loopy, shared):
    from medusa_edge.training import train as th

    base = loopy["base"]
    out = str(loopy["dir"] / f"dv-{shared}.medusa.gguf")
    s = th.train(_train_args(base.path, loopy["data"], out, "--steps", "60", "--cache", loopy["cache"], "--draft-vocab", "40",
                             "--shared-output" if shared else "--no-shared-output"), log=lambda *a: None)
    info = heads_info(read_gguf(out, "heads file"))
    assert (info["n_draft"], info["schema_version"], info["shared_output"]) == (40, 3, shared)
    assert s["draft_vocab"] == 40 and 0.0 < s["draft_coverage"] <= 1.0
    assert s["heldout_loss_after"] < s["heldout_loss_before"]
    heads = native.Heads(out, base.path, 1)
    assert heads.n_draft == 40 and set(np.asarray(heads.draft_vocab)) == set(info["draft_vocab"].tolist())
    prompt = [1, 300, 301, 302]
    chunks = list(Engine(base.path, out, tree="chain:3", exact=False, n_ctx=256).generate(prompt, SamplingParams(temperature=0.0), 40))
    want = [t for c in Engine(base.path, None, exact=False, n_ctx=256).generate(prompt, SamplingParams(temperature=0.0), 40) for t in c]
    assert [t for c in chunks for t in c] == want
    assert len(chunks) < len(want)  # the draft heads' guesses were accepted: steps committed several tokens


def test_draft_targets_and_coverage_by_hand():
    from medusa_edge.training import train as th

    tokens = np.array([5, 5, 5, 7, 7, 9, 3, 5, 7, 1], np.int32)
    train_mask = np.array([True] * 6 + [False] * 4)
    targets = th.make_targets(tokens, np.array([6, 4]), 2)
    val_rows = np.array([6, 7])
    draft, mapped, cov = th.apply_draft_vocab(tokens, train_mask, targets, val_rows, 10, 12)
    # counts over the training rows: 5 x3, 7 x2, 9 x1; then unseen ids, lowest first, to make 10
    assert draft.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    draft, mapped, cov = th.apply_draft_vocab(tokens, train_mask, targets, val_rows, 10, 20)
    assert draft.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    lut = {int(t): i for i, t in enumerate(draft)}
    for t, m in zip(targets.ravel(), mapped.ravel()):
        assert m == (lut.get(int(t), th.OUT_OF_DRAFT) if t >= 0 else t)
    with pytest.raises(ValueError, match="at least 10"):
        th.apply_draft_vocab(tokens, train_mask, targets, val_rows, 9, 20)


def test_restrict_command_keeps_heads_and_reuses_the_cache(loopy, capsys):
    """`medusa-edge train restrict`: frequencies from the base's answers (the training cache, reused), the
    file restricted without retraining, and its top-k is the original's restricted."""
    from medusa_edge.training import train as th

    base = loopy["base"]
    full = str(loopy["dir"] / "full.medusa.gguf")
    th.train(_train_args(base.path, loopy["data"], full, "--steps", "20", "--cache", loopy["cache"], "--shared-output"),
             log=lambda *a: None)
    out = str(loopy["dir"] / "restricted.medusa.gguf")
    assert th.main(["restrict", full, base.path, "--draft-vocab", "50", "--data", loopy["data"], "--cache", loopy["cache"],
                    "-o", out, "--gen-tokens", "48", "--threads", "1", "--quiet"]) == 0
    assert "50 of" in capsys.readouterr().out
    _, tokens, _, _ = th.DataCache(loopy["cache"], json.load(open(loopy["cache"] + "/meta.json"))["identity"]).load()
    want = draft_vocab_from_counts(np.bincount(tokens, minlength=base.n_vocab), 50)
    info = heads_info(read_gguf(out, "heads file"))
    assert (info["draft_vocab"] == want).all()
    hf, hd = native.Heads(full, base.path, 1), native.Heads(out, base.path, 1)
    in_draft = np.zeros(base.n_vocab, bool)
    in_draft[want] = True
    for h in hidden_states(20, base.n_embd, seed=3):
        ranking, _ = hf.propose_hidden(h, base.n_vocab, root=7, logp=False)
        got, _ = hd.propose_hidden(h, 10, root=7, logp=False)
        assert (got == np.stack([r[in_draft[r]][:10] for r in ranking])).all()
    assert th.main(["restrict", full, base.path, "--draft-vocab", str(base.n_vocab + 1), "--data", loopy["data"],
                    "--cache", loopy["cache"], "-o", out, "--gen-tokens", "48", "--threads", "1", "--quiet"]) == 1


def test_export_refuses_draft_heads(base, tmp_path):
    from medusa_edge.heads.export import ExportError, read_heads

    full = str(tmp_path / "full.medusa.gguf")
    write_random_heads(full, base, n_heads=2, seed=4)
    small = str(tmp_path / "draft.medusa.gguf")
    restrict_heads_file(full, small, draft_ids(base.n_vocab, 20))
    read_heads(full)
    with pytest.raises(ExportError, match="draft vocabulary"):
        read_heads(small)
