"""tree="auto": the tree planner's maths by hand, on synthetic cost curves, and the engine's use of it."""

import numpy as np
import pytest

from medusa_edge.core import tune
from medusa_edge.core.engine import Engine, SamplingParams, Stats
from medusa_edge.core.tree import Tree

T1 = 0.010  # seconds of a one-token forward in the synthetic cost models
# the tiny random models have no exact batch region; their rows are compared as test_engine.py does
F32 = dict(flash_attn=False, exact=False)


def costs(fn, t_heads=0.0005, host=0.0002):
    b = list(tune.BATCHES)
    return tune.Costs(batch=b, t_decode=[fn(x) for x in b], spread=[0.0] * len(b), t_heads=[0.0] + [t_heads] * 5,
                      t_host=host, t_host_plain=host / 2)


GOOD = np.array([[0.6, 0.15, 0.05, 0.03], [0.45, 0.12, 0.05, 0.03], [0.35, 0.1, 0.05, 0.02], [0.3, 0.08, 0.04, 0.02]])


def test_grow_tree_by_hand():
    acc = [[0.5, 0.3], [0.4, 0.1]]
    # values: (0,)=.5 (1,)=.3 (0,0)=.2 (1,0)=.12 (0,1)=.05 (1,1)=.03
    assert tune.grow_tree(acc, 7) == [[0], [1], [0, 0], [1, 0], [0, 1], [1, 1]]
    assert tune.grow_tree(acc, 3) == [[0], [1]]
    assert tune.grow_tree(acc, 7, max_depth=1) == [[0], [1]]
    assert tune.expected_tokens(acc, [[0], [1], [0, 0]]) == pytest.approx(1 + 0.5 + 0.3 + 0.2)
    for n in range(1, 8):  # every prefix is a valid (prefix-closed) tree
        Tree.from_paths(tune.grow_tree(acc, n))


def test_linear_cost_gives_a_chain_or_nothing():
    exact_linear = tune.plan(GOOD, costs(lambda b: T1 * b), 64)
    assert exact_linear.paths == [] and exact_linear.expected_speedup == 1.0
    nearly = tune.plan(GOOD, costs(lambda b: T1 * (1 + 0.8 * (b - 1))), 64)
    assert all(set(p) == {0} for p in nearly.paths)  # a chain (or nothing)


def test_flat_cost_gives_a_wide_tree():
    p = tune.plan(GOOD, costs(lambda b: T1), 64)
    assert p.n_nodes == 64 and max(max(q) for q in p.paths) > 0 and max(len(q) for q in p.paths) == 4
    assert p.expected_speedup > 2.0
    assert p.expected_tokens_per_step == pytest.approx(tune.expected_tokens(GOOD, p.paths), abs=1e-3)


def test_heads_that_never_agree_give_no_tree():
    p = tune.plan(np.zeros((4, 10)), costs(lambda b: T1), 64)
    assert p.paths == [] and p.n_nodes == 1


def test_a_kernel_step_in_the_curve_is_respected():
    """Cost flat to 4 tokens, then a jump: the planner stays at 4 nodes."""
    p = tune.plan(GOOD, costs(lambda b: T1 if b <= 4 else 3 * T1), 64)
    assert p.n_nodes == 4


def test_costs_interpolate_and_extrapolate():
    c = tune.Costs(batch=[1, 2, 4], t_decode=[1.0, 2.0, 3.0], spread=[0, 0, 0], t_heads=[0.0, 0.5])
    assert c.decode(3) == pytest.approx(2.5) and c.decode(6) == pytest.approx(4.0) and c.decode(1) == 1.0
    assert c.heads(0) == 0.0 and c.heads(3) == 0.5


def test_live_acceptance_counts_tried_and_hit():
    tree = Tree.from_paths([[0], [1], [0, 0]])  # nodes: 0 root, 1=(0,), 2=(0,0), 3=(1,)
    live = tune.LiveAcceptance(np.zeros((2, 3)), prior_weight=0.0)
    live.update(tree, [0, 1, 2])  # accepted (0,) then (0,0)
    live.update(tree, [0, 3])  # accepted (1,)
    live.update(tree, [0])  # nothing
    assert live.tried[0, 0] == 3 and live.hit[0, 0] == 1 and live.tried[0, 1] == 3 and live.hit[0, 1] == 1
    assert live.tried[1, 0] == 1 and live.hit[1, 0] == 1
    np.testing.assert_allclose(live.estimate()[0, :2], [1 / 3, 1 / 3])


def test_spread_shrinks_with_samples():
    rng = np.random.default_rng(0)
    few = tune._spread(list(1 + 0.05 * rng.standard_normal(5)))
    many = tune._spread(list(1 + 0.05 * rng.standard_normal(200)))
    assert many < few and many < 0.02


def test_auto_engine_measures_plans_and_stays_lossless(models, tmp_path, monkeypatch):
    """The engine measures its costs once (then reads them from the cache), plans a tree no
    larger than allowed, and greedy output equals plain decoding's whatever it picked."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    e = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, **F32)
    assert e.auto and e.costs is not None and e.costs.batch[0] == 1 and e.costs.rounds >= 5
    assert len(e.costs.t_heads) == e.heads.n_heads + 1 and all(t > 0 for t in e.costs.t_heads[1:])
    assert e.tree.n_nodes == e.plan.n_nodes <= e.max_auto_nodes
    assert (tmp_path / "medusa-edge" / "tree-costs.json").exists()
    again = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, **F32)
    assert again.costs == e.costs  # from the cache
    plain = Engine(models["f32"].path, tree="chain:0", n_ctx=512, n_threads=1, **F32)
    ids = e.model.tokenize("the world", True, False)
    a = [t for ts in e.generate(ids, SamplingParams(), 64) for t in ts]
    b = [t for ts in plain.generate(ids, SamplingParams(), 64) for t in ts]
    assert a == b


def test_auto_switches_off_when_the_heads_never_agree(models, tmp_path, monkeypatch):
    """Random heads on a model: live acceptance drives the plan to no tree within a few replans."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    e = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, **F32)
    e.costs = costs(lambda b: T1 * (1 + 0.05 * (b - 1)))  # a flat device: the prior alone plans a tree
    e._replan()
    assert e.tree.n_nodes > 1
    ids = e.model.tokenize("the world", True, False)
    for _ in range(12):
        for _ in e.generate(ids, SamplingParams(), 64):
            pass
        if e.tree.n_nodes == 1:
            break
    assert e.tree.n_nodes == 1 and e.plan.paths == []


def test_leaf_budget_is_respected():
    """Each leaf is a KV sequence; a budget of 3 leaves stops siblings, not depth."""
    order = tune.grow_tree(GOOD, 20, max_leaves=3)
    t = Tree.from_paths(order)
    assert t.n_leaves <= 3 and t.max_depth == 4
    p = tune.plan(GOOD, costs(lambda b: T1), 64, max_leaves=3)
    assert Tree.from_paths(p.paths).n_leaves <= 3


def test_live_costs_by_hand():
    """The factor: tree steps' extra cost over plain steps, observed against predicted, with the
    plain probes' observed/predicted ratio taken out; 1.0 until enough of both; within bounds,
    over the last ``keep`` readings. Every PROBE_EVERY-th tree step is a probe."""
    lc = tune.LiveCosts(min_tree=4, min_plain=2, keep=8)
    for _ in range(4):  # predicted 15 ms (10 plain + 5 extra); observed 30 ms
        lc.update_tree(0.030, 0.015, 0.010)
    assert lc.factor() == 1.0  # no plain step seen yet
    lc.update_plain(0.015, 0.010)
    lc.update_plain(0.015, 0.010)  # plain steps take 1.5x their prediction: so does everything
    assert lc.factor() == pytest.approx(2.0)  # 30 / 1.5 = 20 ms: 10 ms extra where 5 was predicted
    for _ in range(8):
        lc.update_tree(0.012, 0.015, 0.010)  # cheaper than predicted: never below 1
    assert len(lc.tree) == 8 and lc.factor() == 1.0
    for _ in range(8):
        lc.update_tree(10.0, 0.015, 0.010)
    assert lc.factor() == 50.0  # the window forgot the rest; clamped at the bound
    assert sum(lc.probe_now() for _ in range(2 * tune.LiveCosts.PROBE_EVERY)) == 2


def test_tree_cost_factor_shrinks_the_plan():
    """Trees whose extra cost is larger than measured get smaller, then none."""
    sloped = costs(lambda b: T1 * (1 + 0.005 * (b - 1)))
    sizes = [tune.plan(GOOD, sloped, 64, tree_cost_factor=f).n_nodes for f in (1.0, 2.0, 4.0, 16.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[1] > sizes[2] > 1 and sizes[-1] == 1
    assert tune.plan(GOOD, sloped, 64, tree_cost_factor=1.0).paths == tune.plan(GOOD, sloped, 64).paths


def test_auto_corrects_costs_the_measurement_got_wrong(models, tmp_path, monkeypatch):
    """A cost model that calls big trees nearly free: the engine times its tree steps against
    plain probe steps, the live factor shows the error, and the next plan is smaller. Greedy
    output, probes and all, still equals plain decoding's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    e = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, **F32)
    t1 = e.costs.decode(1)
    # a GPU-like curve: 64 tokens for 1.1 of one, heads and host work nearly free
    e.costs = tune.Costs(batch=[1, 64], t_decode=[t1, 1.1 * t1], spread=[0.0] * 2, t_heads=[0.0] + [1e-6] * 4,
                         t_host=e.costs.t_host_plain + 1e-6, t_host_plain=e.costs.t_host_plain)
    e.live.prior_weight = 1e9  # hold the acceptance at its prior: this test is about costs
    e._replan()
    before = e.plan.n_nodes
    assert before > 4
    plain = Engine(models["f32"].path, tree="chain:0", n_ctx=512, n_threads=1, **F32)
    ids = e.model.tokenize("the world", True, False)
    ref = [t for ts in plain.generate(ids, SamplingParams(), 100, reuse_prefix=False) for t in ts]
    for _ in range(3):
        got = [t for ts in e.generate(ids, SamplingParams(), 100, reuse_prefix=False) for t in ts]
        assert got == ref
    assert len(e.live_costs.plain) >= 3 and e.live_costs.factor() > 2.0
    assert e.plan.n_nodes < before


def test_exact_mode_without_an_exact_batch_says_it_decodes_plainly(models, tmp_path, monkeypatch, capsys):
    """f32 weights have no exact batch on the CPU (as a GPU has none): strict exact mode then plans
    no tree and says so, naming the way out; exact="auto" (the default) plans one with per-row
    verification and says that; exact=False plans one and says nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    e = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, flash_attn=False, exact=True)
    assert e.exact_batch == 1 and e.tree.n_nodes == 1 and e.max_auto_nodes == 1 and e.guarantee == "bitwise"
    assert "decodes plainly" in capsys.readouterr().err
    auto = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, flash_attn=False)
    err = capsys.readouterr().err
    assert auto.exact_batch == 1 and not auto.exact and auto.max_auto_nodes == 64 and auto.guarantee == "verified"
    assert "verified row" in err and "decodes plainly" not in err and err.count("on this device no batch") == 1
    free = Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, n_threads=1, flash_attn=False, exact=False)
    assert free.max_auto_nodes == 64 and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="exact must be"):
        Engine(models["f32"].path, models["f32_heads"].path, n_ctx=512, exact="yes")


def test_costs_are_measured_with_graph_reuse(models):
    """measure_costs times each size back to back after warm-up decodes, so every timed decode
    reuses llama.cpp's compute graph as steps of one tree do (graph_reuse 1.0); the per-sample
    interleaving it replaced (one decode per size in turn, no warm-up) reuses none, which the count
    tells apart."""
    from medusa_edge._loader import native

    e = Engine(models["f32"].path, tree="chain:0", n_ctx=512, flash_attn=False, exact=False)
    c = tune.measure_costs(e.ctx, native, e.model, None, max_batch=8, time_budget=0.3, sizes=[1, 2, 4, 8],
                           linear_cutoff=False)
    assert c.batch == [1, 2, 4, 8] and c.graph_reuse == 1.0 and all(t > 0 for t in c.t_decode)
    c = tune.measure_costs(e.ctx, native, e.model, None, max_batch=8, time_budget=0.3, sizes=[1, 2, 4, 8],
                           linear_cutoff=False, burst=1, warmup=0)
    assert c.graph_reuse < 0.05  # at most the first, after the size-1 decodes that measure t(1)
    # planned shapes: the B-node prefix of the planner's order, with its leaves as sequences
    shape_of = tune.planned_shapes(native, tune.VICUNA_7B_PROFILE, 4, max_leaves=4)
    s = shape_of(8)
    assert s.n_nodes == 8 and 1 < s.n_leaves <= 4
    order = tune.grow_tree(tune.VICUNA_7B_PROFILE, 8, 4, max_leaves=4)
    assert s.n_leaves == Tree.from_paths(order).n_leaves


def test_noisy_costs_serve_the_run_but_are_not_cached(tmp_path, monkeypatch, capsys):
    """A measurement whose medians vary by more than NOISY_SPREAD (a busy machine) is used for this
    run and says so, but is not stored: the next load measures again; a quiet one is stored."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def measure(spread):
        def run():
            calls.append(spread)
            return tune.Costs(batch=[1, 2], t_decode=[0.01, 0.012], spread=[0.01, spread], t_heads=[0.0])
        return run

    c, hit = tune.cached_costs("k", measure(0.5))
    assert not hit and c.spread == [0.01, 0.5] and "not cached" in capsys.readouterr().err
    c, hit = tune.cached_costs("k", measure(0.02))
    assert not hit and len(calls) == 2  # measured again
    c, hit = tune.cached_costs("k", measure(0.02))
    assert hit and len(calls) == 2 and c.spread == [0.01, 0.02]


def test_cost_measurement_stops_where_no_tree_can_pay_and_at_its_deadline(models):
    """Sizes past the last one whose cost the best tree's expected tokens could cover are not
    measured (gain); the deadline ends the measurement early (two sizes at least)."""
    import time

    from medusa_edge._loader import native

    e = Engine(models["f32"].path, tree="chain:0", n_ctx=512, flash_attn=False, exact=False)
    c = tune.measure_costs(e.ctx, native, e.model, None, max_batch=16, time_budget=0.3, gain=lambda b: 0.0)
    assert c.batch == [1, 2, 3]  # nothing pays: the cut-off after two sizes past t(1)
    t0 = time.perf_counter()
    c = tune.measure_costs(e.ctx, native, e.model, None, max_batch=64, time_budget=5.0, tolerance=0.0, deadline=0.0)
    assert time.perf_counter() - t0 < 2.0 and c.batch[:2] == [1, 2] and c.rounds == 1
