"""Medusa heads evaluated by ggml equal a numpy reference of ResBlock + W_out."""

import numpy as np
import pytest

from medusa_edge import Engine
from medusa_edge._loader import native
from medusa_edge.testing import heads_reference, write_llama_gguf, write_random_heads


def hidden_states(n, n_embd, seed=0):
    """Random unit-RMS vectors, like the post-norm hidden state the heads read."""
    h = np.random.default_rng(seed).standard_normal((n, n_embd)).astype(np.float32)
    return h / np.sqrt((h**2).mean(axis=1, keepdims=True))


@pytest.mark.parametrize("n_layers", [1, 2])
def test_f32_heads_equal_numpy(models, tmp_path, n_layers):
    base = models["f32"]
    hw = write_random_heads(str(tmp_path / "h.medusa.gguf"), base, n_heads=3, n_layers=n_layers, seed=3, head_type="f32")
    heads = native.Heads(hw.path, base.path, 2)
    assert (heads.n_heads, heads.n_layers, heads.shared_output) == (3, n_layers, False)
    for h in hidden_states(20, base.n_embd):
        ids, logp = heads.propose_hidden(h, 10)
        ref_ids, ref_logits = heads_reference(h, hw.res, hw.out, 10)
        ref_logp = ref_logits - np.log(np.exp(ref_logits - ref_logits.max(1, keepdims=True)).sum(1, keepdims=True)) - ref_logits.max(1, keepdims=True)
        got_logp = np.take_along_axis(ref_logp, ids.astype(np.int64), 1)
        assert np.abs(logp - got_logp).max() < 1e-4  # returned log-probs are those of the returned ids
        assert np.abs(logp - np.take_along_axis(ref_logp, ref_ids, 1)).max() < 1e-4  # and the top-k values match
        assert (ids[:, 0] == ref_ids[:, 0]).all()


def test_q8_0_heads_top1_agreement(tmp_path):
    """Q8_0 heads agree with the f32 numpy reference on top-1 for at least 99% of inputs.

    Inputs lean towards one token's output row, as a trained model's hidden states do. (On
    isotropic random inputs a random 646-way head often has its top-2 logits within Q8_0 noise;
    there agreement is about 98%, which says nothing about real heads.)"""
    base = write_llama_gguf(str(tmp_path / "b.gguf"), n_embd=128, seed=4)
    hw = write_random_heads(str(tmp_path / "b.medusa.gguf"), base, n_heads=4, seed=5, head_type="q8_0")
    heads = native.Heads(hw.path, base.path, 2)
    rng = np.random.default_rng(6)
    agree = total = 0
    for k in range(400):
        head = k % 4  # the head whose prediction this input is about
        w = hw.out[head][rng.integers(base.n_vocab)]
        h = 0.5 * w / np.sqrt((w**2).mean()) + rng.standard_normal(128)
        h = (h / np.sqrt((h**2).mean())).astype(np.float32)
        ids, _ = heads.propose_hidden(h, 4)
        ref_ids, _ = heads_reference(h, hw.res, hw.out, 1)
        agree += int(ids[head, 0] == ref_ids[head, 0])
        total += 1
    assert agree / total >= 0.99, agree / total


def test_shared_output_heads_use_base_lm_head(models, tmp_path):
    """'version 2' heads have no W_out and reuse the base's output.weight, read from the model GGUF."""
    import gguf

    base = models["f32"]
    hw = write_random_heads(str(tmp_path / "v2.medusa.gguf"), base, n_heads=2, seed=8, shared_output=True)
    r = gguf.GGUFReader(base.path)
    t = next(t for t in r.tensors if t.name == "output.weight")
    lm_head = np.asarray(t.data, np.float32).reshape(base.n_vocab, base.n_embd)
    heads = native.Heads(hw.path, base.path, 2)
    assert heads.shared_output
    for h in hidden_states(5, base.n_embd, seed=9):
        ids, _ = heads.propose_hidden(h, 5)
        ref_ids, _ = heads_reference(h, hw.res, [lm_head, lm_head], 5)
        assert (ids[:, 0] == ref_ids[:, 0]).all()


def test_heads_read_the_hidden_state_of_the_context(models):
    """propose(ctx, row) = propose_hidden(hidden of that row): heads see llama.cpp's post-norm state."""
    e = Engine(models["f32"].path, models["f32_heads"].path, tree="chain:4", n_ctx=256)
    e.ctx.truncate(0)
    e.ctx.prefill(e.model.tokenize("the water", True, False), 0)
    h = e.ctx.hidden(0)
    assert abs(float(np.sqrt((h**2).mean())) - 1.0) < 1e-3  # RMS-normed with unit norm weights
    a = e.heads.propose(e.ctx, 0, 10)
    b = e.heads.propose_hidden(h, 10)
    assert (a[0] == b[0]).all() and np.allclose(a[1], b[1])


def test_shared_output_single_product_equals_per_head_products(models, tmp_path):
    """Shared-output heads multiply all heads' vectors by the output matrix in one product; heads
    with their own copies of the same matrix multiply one vector at a time. Ids and log-probs are
    identical, bit for bit."""
    import gguf

    from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf
    from medusa_edge.heads.schema import vocab_hash

    base = models["f32"]
    shared = write_random_heads(str(tmp_path / "shared.medusa.gguf"), base, n_heads=3, seed=4, shared_output=True)
    r = gguf.GGUFReader(base.path)
    lm_head = np.asarray(next(t for t in r.tensors if t.name == "output.weight").data, np.float32).reshape(base.n_vocab, base.n_embd)
    own = str(tmp_path / "own.medusa.gguf")
    meta = HeadsMeta(3, 1, base.n_embd, base.n_vocab, False, None, vocab_hash(base.tokens))
    write_heads_gguf(own, meta, heads_tensors(shared.res, [lm_head] * 3), "f32")
    a, b = native.Heads(shared.path, base.path, 2), native.Heads(own, base.path, 2)
    for h in hidden_states(6, base.n_embd, seed=21):
        for n_used in (1, 2, 3):
            ia, la = a.propose_hidden(h, 10, n_used)
            ib, lb = b.propose_hidden(h, 10, n_used)
            assert np.array_equal(ia, ib) and np.array_equal(la, lb)


def test_heads_graph_built_once_per_shape(models):
    """A tree cut short (fewer heads, smaller top-k) and grown again reuses the graphs it built."""
    h = native.Heads(models["f32_heads"].path, models["f32"].path, 1)
    x = hidden_states(1, models["f32"].n_embd, seed=2)[0]
    first = {}
    for k, n in [(10, 4), (10, 1), (10, 4), (5, 4), (10, 1), (5, 4), (10, 4)]:
        ids, _ = h.propose_hidden(x, k, n)
        first.setdefault((k, n), ids.copy())
        assert np.array_equal(ids, first[(k, n)])
    assert h.n_graph_builds == 3


def _tensor(path, name, shape):
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return np.asarray(t.data, np.float32).reshape(shape)


@pytest.mark.parametrize("shared_output", [False, True])
def test_root_input_heads_equal_numpy(models, tmp_path, shared_output):
    """Root-input heads (schema 2): the first ResBlock reads [h; token_embd[root]] from the model
    file; ids and log-probs match the numpy reference, and another root changes the proposals."""
    base = models["f32"]
    hw = write_random_heads(str(tmp_path / "r.medusa.gguf"), base, n_heads=3, n_layers=2, seed=11,
                            shared_output=shared_output, root_input=True)
    embd = _tensor(base.path, "token_embd.weight", (base.n_vocab, base.n_embd))
    out = [_tensor(base.path, "output.weight", (base.n_vocab, base.n_embd))] * 3 if shared_output else hw.out
    heads = native.Heads(hw.path, base.path, 2)
    assert heads.root_input and heads.shared_output == shared_output
    changed = 0
    for i, h in enumerate(hidden_states(8, base.n_embd, seed=12)):
        seen = []
        for root in (3 + i, 40 + 7 * i):
            ids, logp = heads.propose_hidden(h, 10, -1, root)
            ref_ids, ref_logits = heads_reference(h, hw.res, out, 10, root_embd=embd[root])
            m = ref_logits.max(1, keepdims=True)
            ref_logp = ref_logits - m - np.log(np.exp(ref_logits - m).sum(1, keepdims=True))
            assert np.abs(logp - np.take_along_axis(ref_logp, ids.astype(np.int64), 1)).max() < 1e-4
            assert (ids[:, 0] == ref_ids[:, 0]).all()
            seen.append(ids)
        changed += int(not np.array_equal(*seen))
    assert changed >= 6  # the root token is really read
    with pytest.raises(ValueError, match="read the root token"):
        heads.propose_hidden(hidden_states(1, base.n_embd)[0], 10)
    with pytest.raises(ValueError, match="out of range"):
        heads.propose_hidden(hidden_states(1, base.n_embd)[0], 10, -1, base.n_vocab)


def test_root_input_heads_lossless_in_the_engine(models, tmp_path):
    """The engine passes the root to root-input heads: greedy output equals plain decoding."""
    from medusa_edge import SamplingParams

    base = models["f32"]
    hw = write_random_heads(str(tmp_path / "r.medusa.gguf"), base, n_heads=3, seed=13, root_input=True)
    plain = Engine(base.path, tree="chain:0", n_ctx=256, n_threads=1)
    med = Engine(base.path, hw.path, tree="chain:3", n_ctx=256, n_threads=1)
    ids = plain.model.tokenize("the water and the world", True, False)
    ref = [t for ts in plain.generate(ids, SamplingParams(temperature=0.0), 40) for t in ts]
    got = [t for ts in med.generate(ids, SamplingParams(temperature=0.0), 40) for t in ts]
    assert got == ref


@pytest.mark.parametrize("shared_output", [False, True])
@pytest.mark.parametrize("head_type", ["f32", "q8_0"])
def test_one_pass_equals_heads_one_at_a_time(models, tmp_path, shared_output, head_type):
    """All heads in one pass (one batched product: the shared matrix times every head's vector, or
    the stacked own matrices; one top-k; one read-back) give the ids and log-probs that each head
    computed alone gives (a one-head file per head), bit for bit."""
    from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf
    from medusa_edge.heads.schema import vocab_hash
    from medusa_edge.testing import random_heads

    base = write_llama_gguf(str(tmp_path / "b.gguf"), n_embd=128, seed=4)  # 128: q8_0 rows need a multiple of 32
    res, out = random_heads(3, 1, base.n_embd, base.n_vocab, seed=21, shared_output=shared_output, root_input=True)

    def write(path, idx):
        meta = HeadsMeta(len(idx), 1, base.n_embd, base.n_vocab, shared_output, None, vocab_hash(base.tokens), root_input=True)
        write_heads_gguf(path, meta, heads_tensors([res[i] for i in idx], None if out is None else [out[i] for i in idx]), head_type)
        return native.Heads(path, base.path, 2)

    together = write(str(tmp_path / "all.medusa.gguf"), [0, 1, 2])
    assert together.stacked_output == (not shared_output)
    alone = [write(str(tmp_path / f"h{i}.medusa.gguf"), [i]) for i in range(3)]
    for j, h in enumerate(hidden_states(6, base.n_embd, seed=22)):
        ids, logp = together.propose_hidden(h, 10, 3, 5 + j)
        for i in range(3):
            ia, la = alone[i].propose_hidden(h, 10, 1, 5 + j)
            assert np.array_equal(ids[i], ia[0]) and np.array_equal(logp[i], la[0]), (i, j)


def test_one_heads_schema_version():
    """The writer's newest schema is the one the native validator reads."""
    from medusa_edge._loader import native
    from medusa_edge.heads import schema

    assert native.heads_schema_version() == schema.SCHEMA_VERSION
