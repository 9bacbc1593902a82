"""A backend that lacks an op of the heads graph makes the heads run on
the CPU (never a GGML abort inside the graph compute), with the same ids; and heads of any depth
within the file's bounds build a graph that fits."""

import numpy as np
import pytest

from medusa_edge.core.tree import TOP_K
from medusa_edge import Engine, SamplingParams
from medusa_edge._loader import native
from medusa_edge.testing import heads_reference, write_random_heads

HOOK = "MEDUSA_EDGE_TEST_UNSUPPORTED_OP"  # read by the native loader: pretend the first backend lacks this op


def hidden_states(n, n_embd, seed=0):
    h = np.random.default_rng(seed).standard_normal((n, n_embd)).astype(np.float32)
    return h / np.sqrt((h**2).mean(axis=1, keepdims=True))


@pytest.mark.parametrize("shared", [False, True])
def test_fallback_to_cpu_when_the_device_lacks_an_op(models, tmp_path, monkeypatch, capfd, shared):
    base = models["f32"]
    hw = write_random_heads(str(tmp_path / "h.medusa.gguf"), base, n_heads=3, seed=11, shared_output=shared)
    monkeypatch.delenv(HOOK, raising=False)
    normal = native.Heads(hw.path, base.path, 1, top_k=TOP_K)
    assert not normal.on_fallback and "fallback" not in normal.backend
    monkeypatch.setenv(HOOK, "TOP_K")  # e.g. ggml_top_k over a large vocabulary on CUDA without CUB
    fb = native.Heads(hw.path, base.path, 1, top_k=TOP_K)  # builds the first graph at load: falls back here
    assert fb.on_fallback and "fallback" in fb.backend and "lacks TOP_K" in fb.backend, fb.backend
    assert capfd.readouterr().err.count("the Medusa heads run on the CPU") == 1  # said once
    for k in (10, 3, 40):  # new graphs (other k, fewer heads) stay on the fallback, silently
        for h in hidden_states(4, base.n_embd, seed=k):
            for n_used in (3, 1):
                a_ids, a_lp = normal.propose_hidden(h, k, n_used)
                b_ids, b_lp = fb.propose_hidden(h, k, n_used)
                assert (a_ids == b_ids).all() and np.array_equal(a_lp, b_lp)
    assert "run on the CPU" not in capfd.readouterr().err
    # and the engine decodes with them exactly as plain decoding
    monkeypatch.setenv(HOOK, "MUL_MAT")
    e = Engine(base.path, hw.path, tree="chain:3", n_ctx=128, n_threads=1)
    assert e.heads.on_fallback and "lacks MUL_MAT" in e.heads.backend
    plain = Engine(base.path, tree=None, n_ctx=128, n_threads=1)
    prompt = plain.model.tokenize("the water", True, False)
    run = lambda eng: [t for new in eng.generate(prompt, SamplingParams(), 24) for t in new]  # noqa: E731
    assert run(e) == run(plain)


def test_unknown_op_name_in_the_hook_changes_nothing(models, monkeypatch):
    monkeypatch.setenv(HOOK, "NO_SUCH_OP")
    h = native.Heads(models["f32_heads"].path, models["f32"].path, 1)
    assert not h.on_fallback


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the numpy reference's SiLU on large negatives
def test_deep_heads_graph_fits(models, tmp_path):
    """5 graph nodes per ResBlock: a 24-layer head overflowed the graph sized for 4 (a GGML_ASSERT abort)."""
    base = models["f32"]
    hw = write_random_heads(str(tmp_path / "deep.medusa.gguf"), base, n_heads=2, n_layers=24, seed=12)
    heads = native.Heads(hw.path, base.path, 1)
    for h in hidden_states(3, base.n_embd, seed=13):
        ids, _ = heads.propose_hidden(h, 5)
        ref_ids, _ = heads_reference(h, hw.res, hw.out, 5)
        assert (ids[:, 0] == ref_ids[:, 0]).all()


@pytest.mark.parametrize("layout", ["shared", "own", "root"])
def test_lean_heads_pass_gives_the_same_ids(models, tmp_path, layout):
    """The pass the engine runs (no log-probs read): one upload, one launch, one read-back and one
    wait per pass; no top-k node and no softmax at k = 1 (an argmax), no softmax at k > 1; and the
    same ids, rank for rank, as the pass that reads log-probs, on 200 hidden states."""
    m = models["f32"]
    kw = dict(shared_output=layout == "shared", root_input=layout == "root")
    path = write_random_heads(str(tmp_path / f"lean-{layout}.medusa.gguf"), m, n_heads=3, seed=4, head_type="f32", **kw).path
    heads = native.Heads(path, m.path, 2)
    ops1 = heads.graph_ops(1, 3, False)
    assert "ARGMAX" in ops1 and "TOP_K" not in ops1 and "SOFT_MAX" not in ops1
    ops10 = heads.graph_ops(10, 3, False)
    assert "TOP_K" in ops10 and "SOFT_MAX" not in ops10
    assert "SOFT_MAX" in heads.graph_ops(10, 3, True)
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = rng.standard_normal(m.n_embd).astype(np.float32) * 3
        root = int(rng.integers(0, m.n_vocab))
        for k in (1, 4, 10):
            full, logp = heads.propose_hidden(h, k, 3, root)
            before = (heads.n_uploads, heads.n_reads, heads.n_syncs)
            lean, none = heads.propose_hidden(h, k, 3, root, logp=False)
            assert none is None and logp.shape == (3, k)
            assert (heads.n_uploads, heads.n_reads, heads.n_syncs) == tuple(x + 1 for x in before)
            np.testing.assert_array_equal(lean, full)
