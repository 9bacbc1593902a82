"""Medusa candidate trees: pure data and maths, no llama.cpp.

A tree is a prefix-closed list of *paths*; a path is a tuple of top-k ranks, one per depth.
Path ``(a, b)`` is the node reached by taking rank ``a`` of head 0's top-k, then rank ``b`` of
head 1's top-k, all computed at the same (last committed) position (Medusa paper, section 2.1.2).

Node numbering: paths sorted lexicographically (depth-first pre-order; the reference sorts by
depth first, which only renumbers nodes); node 0 is the root (the base model's own next token) and
path ``sorted_paths[j]`` is node ``j + 1``. This order is topological, which llama.cpp's batch
checks require, any prefix of it is a tree, and each rank-0 chain sits in consecutive nodes: node i
takes KV cell n_past + i, so the most likely accepted paths keep their cells contiguous and need no
realignment in exact mode (docs/design.md section 3).

Tree attention in llama.cpp (docs/design.md section 2): every leaf gets its own ``seq_id`` and a
node carries the seq ids of all leaves below it, so node i sees node j iff j is an ancestor
of i (or i itself).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Iterable, Optional, Sequence

import numpy as np

from medusa_edge.errors import MedusaError

#: Candidates each head proposes per step (its top-k): the ranks a tree may use are 0..TOP_K-1. The
#: reference's trees use ranks below 10 too; the trainer measures accuracy for these ranks.
TOP_K = 10

Path = tuple[int, ...]


class TreeError(MedusaError, ValueError):
    """A tree that cannot be used: malformed, or too big for the heads or the context."""


def _load_presets() -> dict[str, list[Path]]:
    raw = json.loads(resources.files(__package__).joinpath("tree_presets.json").read_text())
    return {name: [tuple(p) for p in paths] for name, paths in raw.items()}


#: The reference implementation's trees (FasterDecoding/Medusa, medusa_choices.py): 64 tokens,
#: depth 4, top-10 ranks. Tuned for A100s; on a CPU a chain or a small tree usually pays more.
PRESETS: dict[str, list[Path]] = _load_presets()


def chain(depth: int) -> list[Path]:
    """The top-1 chain ``[(0,), (0, 0), ...]`` of ``depth`` nodes below the root."""
    if depth < 0:
        raise TreeError(f"chain depth must be >= 0, got {depth}")
    return [(0,) * d for d in range(1, depth + 1)]


#: The per-step tree spec ``"step:N"``: no fixed shape; at each step the engine grows a tree of at
#: most N candidates below the root from that step's head probabilities (``step_paths``).
STEP = "step:"


def step_budget(spec) -> Optional[int]:
    """N of a per-step tree spec ``"step:N"`` (N >= 1 candidates below the root); None for any
    other spec. TreeError for a malformed one."""
    if not isinstance(spec, str) or not spec.startswith(STEP):
        return None
    try:
        n = int(spec[len(STEP):])
    except ValueError:
        n = 0
    if n < 1:
        raise TreeError(f"bad per-step tree spec {spec!r}: use step:N with N >= 1 candidates, e.g. step:8")
    return n


def step_paths(logp, n_nodes: int, max_depth: Optional[int] = None, max_leaves: Optional[int] = None) -> list[Path]:
    """A tree chosen for one step from the heads' own probabilities (EAGLE-2's dynamic tree, over
    Medusa heads): paths in the order they join, each time the frontier node with the largest path
    probability, the product over depths d of ``exp(logp[d][r_d])``. ``logp``: [n_heads, k]
    log-probabilities of this step's proposals, rank-sorted; Medusa heads all read the root's hidden
    state, so a node's probability at depth d does not depend on the tokens above it.

    At most ``n_nodes`` nodes with the root, ``max_depth`` deep, ranks below k; nodes that would
    make a tree of more than ``max_leaves`` leaves are passed over. Every prefix of the result is
    prefix-closed. The rule and its tie order are tune.grow_tree's with these probabilities as the
    accuracies (the same products, in the same order): ties go to the shallower, then the
    lexicographically smaller path, so equal inputs give equal trees."""
    lp = np.asarray(logp, dtype=np.float64)
    if lp.ndim != 2:
        raise TreeError(f"head log-probabilities must be [n_heads, k], got shape {lp.shape}")
    if np.isnan(lp).any():
        raise TreeError("head log-probabilities must not be NaN")
    n_heads, k = lp.shape
    depth_cap = n_heads if max_depth is None else min(max_depth, n_heads)
    if depth_cap <= 0 or k <= 0 or n_nodes <= 1:
        return []
    prob = np.exp(lp).tolist()  # Python floats: cheaper than numpy scalars one at a time
    value = {(): 1.0}  # path -> its probability
    has_child = {(): False}
    frontier = [(-prob[0][0], 1, (0,))]  # a min-heap on (-probability, depth, path)
    leaves, order = 1, []
    while frontier and len(order) < n_nodes - 1:
        neg, d, q = heapq.heappop(frontier)
        parent = q[:-1]
        adds = 1 if has_child[parent] else 0  # a first child replaces its parent as a leaf
        if max_leaves is not None and leaves + adds > max_leaves:
            continue  # for good: leaves never drop, and a parent with a child keeps it
        leaves += adds
        has_child[parent], has_child[q] = True, False
        value[q] = -neg
        order.append(q)
        if q[-1] + 1 < k:  # next sibling
            heapq.heappush(frontier, (-(value[parent] * prob[d - 1][q[-1] + 1]), d, parent + (q[-1] + 1,)))
        if d < depth_cap:  # first child
            heapq.heappush(frontier, (-(value[q] * prob[d][0]), d + 1, q + (0,)))
    return order


def step_tree(logp, n_nodes: int, max_depth: Optional[int] = None, max_leaves: Optional[int] = None) -> "Tree":
    """``step_paths``' tree, in depth-first numbering."""
    return Tree.from_paths(step_paths(logp, n_nodes, max_depth, max_leaves))


@dataclass(frozen=True)
class Tree:
    """A validated candidate tree with the index arrays a step needs.

    Arrays (n = n_nodes, including the root at index 0):
      depth[n]      int32   root 0; node at depth d sits at position n_past + d
      parent[n]     int32   parent node index; -1 for the root
      rank[n]       int32   top-k rank taken from head depth-1; 0 for the root
      leaves        list    node indices of the leaves; leaf i owns seq_id i
      seq_sets      list    per node, the sorted seq ids of the leaves below it
      children      list    per node, child node indices in node order
    """

    paths: tuple[Path, ...]  # sorted, without the root
    depth: np.ndarray = field(repr=False)
    parent: np.ndarray = field(repr=False)
    rank: np.ndarray = field(repr=False)
    leaves: tuple[int, ...] = field(repr=False)
    seq_sets: tuple[tuple[int, ...], ...] = field(repr=False)
    children: tuple[tuple[int, ...], ...] = field(repr=False)

    @staticmethod
    def from_paths(paths: Iterable[Sequence[int]]) -> "Tree":
        """Validate ``paths`` (any order, duplicates rejected) and build the index arrays."""
        norm: list[Path] = []
        for p in paths:
            try:
                t = tuple(int(r) for r in p)
            except (TypeError, ValueError):
                raise TreeError(f"a tree path must be a sequence of integer ranks, got {p!r}") from None
            if not t:
                raise TreeError("empty path in tree: the root is implicit, do not list it")
            if any(r < 0 for r in t):
                raise TreeError(f"negative rank in tree path {t}")
            norm.append(t)
        if len(set(norm)) != len(norm):
            raise TreeError("tree has duplicate paths")
        known = set(norm)
        for t in norm:
            if len(t) > 1 and t[:-1] not in known:
                raise TreeError(f"tree is not prefix-closed: {t} is listed but its parent {t[:-1]} is not")
        ordered = tuple(sorted(norm))  # depth-first pre-order: each rank-0 chain sits in consecutive nodes
        index = {t: j + 1 for j, t in enumerate(ordered)}
        n = len(ordered) + 1
        depth = np.zeros(n, np.int32)
        parent = np.full(n, -1, np.int32)
        rank = np.zeros(n, np.int32)
        children: list[list[int]] = [[] for _ in range(n)]
        for t, j in index.items():
            depth[j] = len(t)
            parent[j] = index[t[:-1]] if len(t) > 1 else 0
            rank[j] = t[-1]
            children[parent[j]].append(j)
        children = [sorted(c) for c in children]
        leaves = tuple(j for j in range(n) if not children[j])
        sets: list[set[int]] = [set() for _ in range(n)]
        for seq_id, leaf in enumerate(leaves):
            j = leaf
            while j >= 0:
                sets[j].add(seq_id)
                j = int(parent[j])
        return Tree(
            paths=ordered,
            depth=depth,
            parent=parent,
            rank=rank,
            leaves=leaves,
            seq_sets=tuple(tuple(sorted(s)) for s in sets),
            children=tuple(tuple(c) for c in children),
        )

    @staticmethod
    def resolve(spec: "str | Sequence[Sequence[int]] | Tree") -> "Tree":
        """A Tree from a preset name, ``"chain:N"``, a JSON file of paths, or a list of paths.
        ``"step:N"`` has no fixed shape (the engine grows one per step): TreeError here."""
        if isinstance(spec, Tree):
            return spec
        if isinstance(spec, str):
            if spec in PRESETS:
                return Tree.from_paths(PRESETS[spec])
            if spec.startswith("chain:"):
                try:
                    return Tree.from_paths(chain(int(spec.split(":", 1)[1])))
                except ValueError:
                    raise TreeError(f"bad chain spec {spec!r}: use chain:N, e.g. chain:4") from None
            if spec.endswith(".json"):
                try:
                    with open(spec) as f:
                        return Tree.from_paths(json.load(f))
                except OSError as e:
                    raise TreeError(f"cannot read tree file {spec}: {e.strerror}") from None
                except json.JSONDecodeError as e:
                    raise TreeError(f"tree file {spec} is not valid JSON: {e}") from None
            if step_budget(spec) is not None:
                raise TreeError(f"{spec!r} is a per-step tree, grown by the engine at each step from the heads' "
                                f"probabilities (Engine(tree={spec!r})): it has no fixed shape")
            names = ", ".join(sorted(PRESETS))
            raise TreeError(f"unknown tree {spec!r}: use one of {names}, chain:N, step:N (chosen per step), "
                            "or a .json file of paths")
        return Tree.from_paths(spec)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        """Tokens in one verification batch, root included."""
        return len(self.paths) + 1

    @cached_property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @cached_property
    def _count_by_depth(self) -> tuple:
        return tuple(int(np.count_nonzero(self.depth <= d)) for d in range(self.max_depth + 1))

    def n_within_depth(self, depth: int) -> int:
        """Nodes at depth ``depth`` or less (the root's depth is 0); read per step, so cached."""
        c = self._count_by_depth
        return c[min(max(depth, 0), len(c) - 1)]

    @property
    def n_leaves(self) -> int:
        return len(self.leaves)

    @property
    def max_rank(self) -> int:
        return int(self.rank.max()) if len(self.paths) else -1

    @cached_property
    def topk_index(self) -> np.ndarray:
        """[n_nodes - 1] int64: where node j+1's token sits in a flattened [n_heads, top_k] array
        of head proposals, for ``top_k = max_rank + 1``. Equal to the reference's tree_indices - 1."""
        k = self.max_rank + 1
        return ((self.depth[1:] - 1) * k + self.rank[1:]).astype(np.int64)

    def truncated(self, max_depth: int) -> "Tree":
        """This tree without the nodes deeper than ``max_depth`` (still prefix-closed)."""
        if max_depth >= self.max_depth:
            return self
        return Tree.from_paths([p for p in self.paths if len(p) <= max_depth])

    def prefix(self, n_nodes: int) -> "Tree":
        """The first ``n_nodes`` nodes (root included). Node order is depth-first pre-order, so
        any prefix is still a prefix-closed tree."""
        if n_nodes >= self.n_nodes:
            return self
        return Tree.from_paths(self.paths[: max(n_nodes, 1) - 1])

    def check(self, *, n_heads: int, n_seq_max: int, n_batch: int, top_k: int = TOP_K) -> None:
        """Raise TreeError if this tree cannot run with these heads and this context."""
        if self.max_rank >= top_k:
            raise TreeError(f"tree uses rank {self.max_rank} but the heads propose top_k = {top_k} tokens (ranks 0..{top_k - 1})")
        if self.max_depth > n_heads:
            raise TreeError(f"tree depth {self.max_depth} needs {self.max_depth} Medusa heads, the heads file has {n_heads}")
        if self.n_leaves > n_seq_max:
            raise TreeError(
                f"tree has {self.n_leaves} leaves but the context holds {n_seq_max} sequences "
                f"(llama.cpp allows at most 256): use a smaller tree"
            )
        if self.n_nodes > n_batch:
            raise TreeError(f"tree has {self.n_nodes} nodes but n_batch is {n_batch}: use a smaller tree or a larger n_batch")

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node``, both included."""
        out = []
        while node >= 0:
            out.append(node)
            node = int(self.parent[node])
        return out[::-1]

    def candidate_tokens(self, root: int, proposals: np.ndarray) -> np.ndarray:
        """[n_nodes] int32 tokens of the tree: the root, then for each node the token of its rank
        in its head's proposals. ``proposals`` is [n_heads, top_k] token ids, rank-sorted."""
        k = self.max_rank + 1
        flat = np.ascontiguousarray(proposals[: self.max_depth, :k]).reshape(-1)
        out = np.empty(self.n_nodes, np.int32)
        out[0] = root
        out[1:] = flat[self.topk_index]
        return out


# -- acceptance: pure functions over one verified tree --------------------------------------------


def accept(tree: Tree, tokens: np.ndarray, target_at, is_eog=None) -> tuple[list[int], int]:
    """The accepted node path (root first) and the token after it: from the root, take the target
    at the node, descend to the child that carries it, and stop at the first node with none.

    tokens[n]: the tree's tokens; target_at(node): the token the base model chooses at that node's
    row (its argmax, a seeded draw, ...). It is called exactly once for each node on the accepted
    path, in path order, and for no other node: rows off the path are never read, and a sampler
    that records its draws (penalties, grammar) sees the tokens plain decoding would have chosen,
    in order. The last call's target is returned as the next token. ``is_eog(token)``: a target
    that ends generation ends the walk there, as the next token, even where a child carries it
    (llama.cpp's rule: no draft token is accepted after an end-of-generation token). Siblings that
    carry the same token: the first in node order wins.
    """
    path = [0]
    node = 0
    while True:
        want = target_at(node)
        if is_eog is not None and is_eog(want):
            return path, want
        nxt = next((c for c in tree.children[node] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def typical_threshold(probs: np.ndarray, posterior_threshold: float, posterior_alpha: float) -> float:
    """The reference's typical-acceptance threshold min(eps, delta * exp(-H(p))), H with +1e-5."""
    entropy = float(-(probs * np.log(probs + 1e-5)).sum())
    return min(posterior_threshold, posterior_alpha * float(np.exp(-entropy)))


def accept_typical(
    tree: Tree,
    tokens: np.ndarray,
    probs_at: "callable",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> list[int]:
    """Typical acceptance (lossy, Medusa paper section 2.3.1).

    A node x is accepted iff p(x | its parent) > min(eps, delta * exp(-H)), with p the base
    model's tempered distribution at the parent (``probs_at(node) -> [n_vocab]``). Among the
    longest accepted paths, the one with the largest sum of log p wins.
    """
    ok = np.zeros(tree.n_nodes, bool)
    logp = np.zeros(tree.n_nodes)
    ok[0] = True
    cache: dict[int, tuple[np.ndarray, float]] = {}
    for j in range(1, tree.n_nodes):
        par = int(tree.parent[j])
        if not ok[par]:
            continue
        if par not in cache:
            p = probs_at(par)
            cache[par] = (p, typical_threshold(p, posterior_threshold, posterior_alpha))
        p, thr = cache[par]
        q = float(p[tokens[j]])
        if q > thr:
            ok[j] = True
            logp[j] = logp[par] + np.log(q)
    best, best_key = 0, (0, 0.0)
    for j in range(tree.n_nodes):
        if ok[j]:
            key = (int(tree.depth[j]), float(logp[j]))
            if key > best_key:
                best, best_key = j, key
    return tree.path_to(best)
