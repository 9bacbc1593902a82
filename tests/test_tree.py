"""Tree and acceptance maths, checked by hand."""

import numpy as np
import pytest

from medusa_edge.core.tree import PRESETS, Tree, TreeError, accept, accept_typical, chain, typical_threshold

SMALL = [[0], [0, 0], [0, 1], [0, 2], [1], [1, 0], [1, 1], [1, 2]]  # the reference notebook's example


def test_node_order_and_arrays():
    t = Tree.from_paths(reversed(SMALL))  # input order must not matter
    # depth-first pre-order: every rank-0 chain occupies consecutive nodes (and KV cells)
    assert t.paths == ((0,), (0, 0), (0, 1), (0, 2), (1,), (1, 0), (1, 1), (1, 2))
    assert t.depth.tolist() == [0, 1, 2, 2, 2, 1, 2, 2, 2]
    assert t.parent.tolist() == [-1, 0, 1, 1, 1, 0, 5, 5, 5]
    assert t.leaves == (2, 3, 4, 6, 7, 8)
    assert t.seq_sets[0] == (0, 1, 2, 3, 4, 5)
    assert t.seq_sets[1] == (0, 1, 2) and t.seq_sets[5] == (3, 4, 5)
    assert t.seq_sets[7] == (4,)
    assert t.children[0] == (1, 5)
    assert t.prefix(4).paths == ((0,), (0, 0), (0, 1))  # any prefix is still a tree


def test_candidate_tokens_take_rank_of_head_at_depth():
    t = Tree.from_paths(SMALL)
    proposals = np.array([[10, 11, 12], [20, 21, 22]])  # head 0 and head 1 top-3
    toks = t.candidate_tokens(99, proposals)
    # the reference's tree_indices [0,1,2,11,12,13,11,12,13] into [root, head0 top10, head1 top10],
    # in depth-first node order
    assert toks.tolist() == [99, 10, 20, 21, 22, 11, 20, 21, 22]


@pytest.mark.parametrize("name,leaves,depths", [
    ("mc_sim_7b_63", 42, [10, 28, 23, 2]),
    ("vicuna_7b_stage2", 42, [10, 23, 23, 7]),
    ("vicuna_13b_stage2", 42, [10, 19, 25, 9]),
    ("vicuna_33b_stage2", 43, [10, 24, 24, 5]),
    ("zephyr_stage2", 44, [10, 27, 23, 3]),
])
def test_presets_match_reference_shapes(name, leaves, depths):
    t = Tree.resolve(name)
    assert t.n_nodes == 64 and t.n_leaves == leaves and t.max_rank == 9
    assert np.bincount(t.depth)[1:].tolist() == depths


def test_chain_and_truncation():
    t = Tree.resolve("chain:3")
    assert t.paths == ((0,), (0, 0), (0, 0, 0)) and t.n_leaves == 1 and t.seq_sets[0] == (0,)
    assert Tree.resolve("mc_sim_7b_63").truncated(2).n_nodes == 1 + 10 + 28
    assert Tree.resolve("chain:0").n_nodes == 1 and chain(0) == []


@pytest.mark.parametrize("paths,msg", [
    ([[0, 1]], "not prefix-closed"),
    ([[0], [0]], "duplicate"),
    ([[0], [-1]], "negative"),
    ([[]], "empty path"),
    ([["a"]], "integer ranks"),
])
def test_bad_trees_rejected(paths, msg):
    with pytest.raises(TreeError, match=msg):
        Tree.from_paths(paths)


def test_resolve_errors(tmp_path):
    with pytest.raises(TreeError, match="unknown tree"):
        Tree.resolve("nope")
    with pytest.raises(TreeError, match="chain:N"):
        Tree.resolve("chain:x")
    bad = tmp_path / "t.json"
    bad.write_text("[[0], [")
    with pytest.raises(TreeError, match="not valid JSON"):
        Tree.resolve(str(bad))


def test_check_limits():
    t = Tree.resolve("mc_sim_7b_63")
    with pytest.raises(TreeError, match="needs 4 Medusa heads"):
        t.check(n_heads=3, n_seq_max=64, n_batch=512)
    with pytest.raises(TreeError, match="42 leaves"):
        t.check(n_heads=4, n_seq_max=16, n_batch=512)
    with pytest.raises(TreeError, match="64 nodes"):
        t.check(n_heads=4, n_seq_max=64, n_batch=32)
    t.check(n_heads=5, n_seq_max=64, n_batch=64)


def test_accept_by_hand():
    t = Tree.from_paths(SMALL)
    toks = np.array([5, 7, 1, 2, 3, 8, 1, 2, 3])
    # argmax at the root is 8 -> node 5 (path (1,), token 8); argmax at node 5 is 3 -> node 8 (token 3)
    argmax = np.zeros(9, int)
    argmax[0], argmax[5], argmax[8] = 8, 3, 4
    assert accept(t, toks, argmax.__getitem__) == ([0, 5, 8], 4)
    argmax[0] = 6  # no child carries 6
    assert accept(t, toks, argmax.__getitem__) == ([0], 6)


def test_accept_stops_at_end_of_generation():
    """An end-of-generation target is the next token even where a child carries it: no draft token
    is accepted after it, and its node's row is never read."""
    t = Tree.from_paths(SMALL)
    toks = np.array([5, 7, 1, 2, 3, 8, 1, 2, 3])
    argmax = np.zeros(9, int)
    argmax[0], argmax[5], argmax[8] = 8, 3, 4
    asked = []
    at = lambda n: asked.append(n) or argmax[n]  # noqa: E731
    assert accept(t, toks, at, is_eog=lambda x: x == 3) == ([0, 5], 3)
    assert asked == [0, 5]
    assert accept(t, toks, argmax.__getitem__, is_eog=lambda x: x == 8) == ([0], 8)
    assert accept(t, toks, argmax.__getitem__, is_eog=lambda x: x == 99) == ([0, 5, 8], 4)


def test_accept_lazy_reads_only_the_path():
    """Acceptance asks for the target at the rows on the accepted path and no other, once each,
    in path order, and finds the path every row's argmax gives, on random trees and tokens."""
    rng = np.random.default_rng(0)
    tree = Tree.from_paths(PRESETS["mc_sim_7b_63"])
    for _ in range(200):
        toks = rng.integers(0, 4, tree.n_nodes)
        full = rng.integers(0, 4, tree.n_nodes)
        asked = []
        path, nxt = accept(tree, toks, lambda n: asked.append(n) or full[n])
        assert asked == path and nxt == full[path[-1]]
        assert all(toks[c] == full[p] for p, c in zip(path, path[1:]))
        assert not any(toks[c] == full[path[-1]] for c in tree.children[path[-1]])


def test_accept_typical_by_hand():
    t = Tree.from_paths([[0], [1], [1, 0]])
    toks = np.array([0, 1, 2, 3])
    v = 4
    flat = np.full(v, 1.0 / v)  # entropy ln 4: threshold min(0.09, 0.3/4) = 0.075 < 0.25, all pass
    assert typical_threshold(flat, 0.09, 0.3) == pytest.approx(0.3 * np.exp(-(-(flat * np.log(flat + 1e-5)).sum())))
    peaked = np.array([0.0, 0.05, 0.95, 0.0])  # threshold ~ min(0.09, 0.3*e^-0.2) = 0.09: token 1 fails, 2 passes

    probs = {0: peaked, 2: flat, 1: flat}
    # root -> node 1 (token 1, p 0.05: rejected), node 2 (token 2, p 0.95: accepted) -> node 3 (token 3, p 0.25: accepted)
    assert accept_typical(t, toks, lambda n: probs[n]) == [0, 2, 3]
    # tie on length: the larger sum of log p wins
    t2 = Tree.from_paths([[0], [1]])
    both = np.array([0.0, 0.4, 0.6, 0.0])
    assert accept_typical(t2, np.array([0, 1, 2]), lambda n: both) == [0, 2]
