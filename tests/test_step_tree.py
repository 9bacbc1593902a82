"""Per-step trees (tree="step:N"): grown each step from the heads' own probabilities, checked by
hand and against tune.grow_tree; in the engine, greedy and seeded output identical to plain
decoding, inside every limit the fixed trees keep."""

import numpy as np
import pytest

from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge.core import exactness
from medusa_edge.core.tree import Tree, TreeError, step_budget, step_paths, step_tree
from medusa_edge.core.tune import grow_tree
from medusa_edge.default_model import demo_model_path
from medusa_edge.testing import _WORDS, quantized_test_model, truth_proposer

GREEDY = SamplingParams(temperature=0.0)


# -- the pure function ----------------------------------------------------------------------------


def test_grows_by_path_probability_by_hand():
    logp = np.log([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05]])
    # (0,) 0.6 > (0, 0) 0.54 > (1,) 0.3 > (1, 0) 0.27 > (2,) 0.1 > (0, 1) 0.03 = (0, 2) ...
    assert step_paths(logp, 5) == [(0,), (0, 0), (1,), (1, 0)]
    t = step_tree(logp, 5)
    assert t.paths == ((0,), (0, 0), (1,), (1, 0))  # depth-first numbering: node j + 1 is paths[j]
    assert t.parent.tolist() == [-1, 0, 1, 0, 3]
    assert step_paths(logp, 5, max_depth=1) == [(0,), (1,), (2,)]
    assert step_paths(logp, 5, max_leaves=1) == [(0,), (0, 0)]  # a chain: every sibling adds a leaf
    assert step_paths(logp, 1) == [] and step_paths(logp, 5, max_depth=0) == []


def test_ties_broken_deterministically():
    """Equal probabilities: the shallower path first, then the lexicographically smaller one."""
    logp = np.log(np.full((3, 3), 0.5))
    # 0.5: (0,) (1,) (2,); 0.25: (0, 0) (0, 1) (0, 2) (1, 0) ...
    assert step_paths(logp, 8) == [(0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0)]
    assert step_paths(logp, 8) == step_paths(logp.copy(), 8)


@pytest.mark.parametrize("seed", range(6))
def test_valid_tree_within_budget_and_equal_to_grow_tree(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        n_heads, k = int(rng.integers(1, 6)), int(rng.integers(1, 11))
        probs = -np.sort(-rng.dirichlet(np.full(40, 0.3), size=n_heads)[:, :k], axis=1)
        if rng.random() < 0.3:
            probs = np.round(probs, 1) + 0.05  # many equal products: the tie order decides
        logp = np.log(probs)
        n_nodes, max_depth = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        max_leaves = [None, 1, 2, 5, 8][int(rng.integers(0, 5))]
        paths = step_paths(logp, n_nodes, max_depth, max_leaves)
        t = step_tree(logp, n_nodes, max_depth, max_leaves)
        assert len(paths) <= n_nodes - 1 and t.n_nodes == len(paths) + 1
        assert all(len(p) <= min(max_depth, n_heads) and max(p) < k for p in paths)
        assert max_leaves is None or t.n_leaves <= max_leaves
        for n in range(len(paths) + 1):  # every prefix of the growth order is prefix-closed
            Tree.from_paths(paths[:n])
        assert list(t.paths) == sorted(paths)  # depth-first numbering
        # the same rule as Medusa's accuracy-driven growth, fed the same numbers, to the join order
        grown = grow_tree(np.exp(logp), n_nodes, max_depth, max_rank=k, max_leaves=max_leaves)
        assert [tuple(p) for p in grown] == paths


def test_spec_and_bad_inputs():
    assert step_budget("step:8") == 8 and step_budget("chain:3") is None and step_budget(None) is None
    assert step_budget([[0]]) is None
    for bad in ("step:0", "step:x", "step:", "step:-2"):
        with pytest.raises(TreeError, match="step:N"):
            step_budget(bad)
    with pytest.raises(TreeError, match="per-step tree"):
        Tree.resolve("step:8")  # no fixed shape
    with pytest.raises(TreeError, match=r"\[n_heads, k\]"):
        step_paths(np.zeros(4), 4)
    with pytest.raises(TreeError, match="NaN"):
        step_paths(np.array([[0.0, np.nan]]), 4)
    assert step_paths(np.array([[0.0, -np.inf]]), 4) == [(0,), (1,)]  # probability 0 still ranks


# -- in the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    return quantized_test_model(str(tmp_path_factory.mktemp("step")))


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 14)))) for _ in range(n)]


def run(engine, ids, params, n, proposer=None, stats=None, **kw):
    return [t for new in engine.generate(ids, params, n, proposer=proposer, stats=stats, reuse_prefix=False, **kw)
            for t in new]


def logp_proposer(truth, rng, informative=True):
    """truth_proposer's ids with log-probabilities: ``informative``, the heads put 0.8 on the rank
    that holds the true token (the heads agree with the base, at ranks 0-2, so accepted paths
    leave the first chain); otherwise random rank-sorted ones."""
    ids_of = truth_proposer(truth, rng, 0.9, 2)

    def propose(generated, n_heads, k):
        ids = ids_of(generated, n_heads, k)
        if informative:
            p = np.full((n_heads, k), 0.2 / max(k - 1, 1))
            for d in range(n_heads):
                i = len(generated) + d
                hit = np.flatnonzero(ids[d] == truth[i]) if i < len(truth) else []
                p[d, hit[0] if len(hit) else 0] = 0.8
        else:
            p = -np.sort(-rng.dirichlet(np.ones(k), size=n_heads), axis=1)
        return ids, np.log(p)

    return propose


def spy_trees(engine):
    """Record (tree, depth allowed, n_past) of every per-step tree the engine verifies."""
    seen = []
    grow = engine._propose_step

    def spy(depth, row, generated, proposer, n_past):
        tree, shape, ids = grow(depth, row, generated, proposer, n_past)
        seen.append((tree, depth, n_past))
        return tree, shape, ids

    engine._propose_step = spy
    return seen


def test_greedy_and_seeded_identical_to_plain_decoding(quant):
    """Heads that agree (accepted paths off the first chain), heads that do not, seeded sampling,
    the test model's own random heads, and a tree cut to the tokens still wanted."""
    plain = Engine(quant, tree="chain:0", n_ctx=512)
    med = Engine(quant, quant.replace(".gguf", ".medusa.gguf"), tree="step:8", n_ctx=512)
    assert med.exact_batch == 63 and med.ctx.n_seq_max == 8
    seen = spy_trees(med)
    rng = np.random.default_rng(0)
    agree, noise = Stats(), Stats()
    for i, text in enumerate(prompts(8)):
        ids = plain.model.tokenize(text, True, False)
        ref = run(plain, ids, GREEDY, 96)
        assert run(med, ids, GREEDY, 96, proposer=logp_proposer(ref, rng), stats=agree) == ref
        assert run(med, ids, GREEDY, 96, proposer=logp_proposer(ref, rng, False), stats=noise) == ref
        seeded = SamplingParams(temperature=0.8, seed=100 + i)
        ref = run(plain, ids, seeded, 48)
        assert run(med, ids, seeded, 48, proposer=logp_proposer(ref, rng)) == ref
        assert run(med, ids, GREEDY, 32) == run(plain, ids, GREEDY, 32)  # the random heads themselves
        n_seen, few = len(seen), run(plain, ids, GREEDY, 3)
        assert run(med, ids, GREEDY, 3, proposer=logp_proposer(few, rng)) == few
        assert len(seen) > n_seen and all(t.max_depth <= 1 for t, _, _ in seen[n_seen:])  # the root and one more
    assert agree.tokens_per_step > 2.0 and agree.realigned > 0  # accepted paths off the first chain
    shapes = {t.paths for t, _, _ in seen}
    assert len(shapes) > 10  # the trees change with the probabilities
    for t, depth, _ in seen:
        assert t.n_nodes <= 9 and t.max_depth <= depth and t.n_leaves <= med.ctx.n_seq_max


def test_limits_of_fixed_trees_kept(quant, monkeypatch):
    """Cut to the exact region (here a measured region of 6 rows, stubbed) and to the free KV
    cells; the cache of native shapes stays bounded."""
    real = exactness.exact_batch
    monkeypatch.setattr(exactness, "exact_batch", lambda *a, **k: (6, real(*a, **k)[1]))
    med = Engine(quant, quant.replace(".gguf", ".medusa.gguf"), tree="step:16", n_ctx=64)
    plain = Engine(quant, tree="chain:0", n_ctx=64)  # prefills as med does (no exact prefill in 6 rows)
    monkeypatch.undo()
    assert med.exact_batch == 6 and med.max_auto_nodes == 6
    med.MAX_STEP_SHAPES = 3
    seen = spy_trees(med)
    rng = np.random.default_rng(1)
    for text in prompts(4, seed=1):
        ids = plain.model.tokenize(text, True, False)
        ref = run(plain, ids, GREEDY, 1000)  # up to the context's end
        assert run(med, ids, GREEDY, 1000, proposer=logp_proposer(ref, rng, False)) == ref
    assert seen and all(t.n_nodes <= 6 and t.n_nodes <= med.n_ctx - n_past for t, _, n_past in seen)
    assert any(med.n_ctx - n_past < 6 for _, _, n_past in seen)  # the free cells did bind
    assert len(med._step_shapes) == 3 and len({t.paths for t, _, _ in seen}) > 3


def test_proposer_needs_probabilities_and_fixed_trees_end_it(quant):
    med = Engine(quant, quant.replace(".gguf", ".medusa.gguf"), tree="step:4", n_ctx=256)
    ids = med.model.tokenize("the water", True, False)
    with pytest.raises(TreeError, match=r"\(ids, logp\)"):
        run(med, ids, GREEDY, 8, proposer=truth_proposer([], np.random.default_rng(0)))
    with pytest.raises(TreeError, match="per-step tree"):
        med.use_trees("step:8")
    med.use_trees("chain:2")
    assert med.step_budget is None and med.tree.n_nodes == 3


def test_demo_model_greedy_identical_with_its_heads(capsys):
    path = demo_model_path()
    plain = Engine(path, tree="chain:0", n_ctx=512)
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="step:8", n_ctx=512)
    st = Stats()
    for q in ["What colour is the sky?", "Tell me a story about a fox.", "What is 3 plus 4?", "Name three animals."]:
        ids = plain.model.tokenize(f"USER: {q}\nASSISTANT:", True, True)
        assert run(med, ids, GREEDY, 128, stats=st) == run(plain, ids, GREEDY, 128)
    with capsys.disabled():
        print(f"\n[step:8 demo] tokens/step {st.tokens_per_step:.2f}, realigned {st.realigned}")
    assert st.tokens_per_step > 1.5
