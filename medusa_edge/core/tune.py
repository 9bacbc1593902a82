"""The tree that pays best on this device: ``tree="auto"``.

A Medusa step costs one verification forward of the tree's B nodes, one heads pass and some
host work; it commits 1 + the accepted candidates. Whether that beats plain decoding depends on
how t(B) grows with B on the device (nearly linear on a small CPU model, nearly flat on a GPU,
with kernel switches in between) and on how often the heads are right. So:

1. ``measure_costs`` times verification forwards of B = 1..64 tokens in the loaded context, each
   size back to back (so llama.cpp reuses its graph, as across steps), in rounds over the sizes
   until every median is known within a tolerance (or a time budget ends), plus the heads pass
   and the host work of a step.
2. ``grow_tree`` is Medusa's accuracy-driven construction: the node with the largest expected
   acceptance (the product of the per-depth, per-rank accuracies along its path, assuming heads
   are independent) joins the tree next, so every prefix of its order is the best tree of that
   size under that model.
3. ``plan`` scores each prefix as expected tokens per second, E(n) / (t(n) + heads + host), in
   the spirit of Sequoia's hardware-aware trees, against plain decoding's 1 / (t(1) + host); it
   returns no tree when none is ahead by ``margin``.

Accuracies come from the heads file (``medusa.rank_accuracy``, written by the trainer) or a
prior; the engine refines them from live acceptance (``LiveAcceptance``) and plans again.
``measure_costs`` runs the model and ``cached_costs`` reads and writes the on-disk cache; the
rest are pure functions.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from medusa_edge.core.cache import cached
from medusa_edge.core.tree import TOP_K

#: Batch sizes measured (capped by the context); dense where kernels switch on CPUs and GPUs.
BATCHES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
#: The prior for heads files that carry no measured accuracies, per head the probability that rank
#: r is right: top-1 0.60 / 0.45 / 0.35 / 0.30 per head, the Vicuna-7B Medusa-1 figures
#: (first head about 0.6, as the paper reports); the lower ranks and the fifth head are
#: assumed, not taken from a publication. Live acceptance replaces the prior within a few
#: hundred steps.
VICUNA_7B_PROFILE = [
    [0.60, 0.10, 0.04, 0.025, 0.015, 0.01, 0.008, 0.006, 0.005, 0.004],
    [0.45, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008, 0.006, 0.005],
    [0.35, 0.09, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008, 0.006, 0.005],
    [0.30, 0.08, 0.045, 0.03, 0.02, 0.015, 0.01, 0.008, 0.006, 0.005],
    [0.25, 0.07, 0.04, 0.025, 0.02, 0.015, 0.01, 0.008, 0.006, 0.005],
]


@dataclass
class Costs:
    """What a step costs on this device, in seconds."""

    batch: list  # B measured, ascending, starting at 1
    t_decode: list  # median seconds of one verification forward of B tokens
    spread: list  # per B, relative half-width of the 95% interval of the median (0.02 = +-2%)
    t_heads: list  # per number of heads used (index 0 = none): one heads pass, top-k TOP_K
    t_host: float = 0.0  # host work of a tree step beside decode and heads (accept, commit, bookkeeping)
    t_host_plain: float = 0.0  # the same for a plain step
    rounds: int = 0
    # a one-token decode past the split (more than SPLIT_FREE_CELLS cached), on the threads exact mode gives it there
    # (exactness.single_token_threads); 0: as t(1)
    t_single_kv_split: float = 0.0
    # share of the timed decodes for which llama.cpp reused its compute graph (as steps of one tree do)
    graph_reuse: float = 0.0

    def decode(self, n: int) -> float:
        """t(n): measured, interpolated linearly between measured sizes, extrapolated from the last two."""
        b, t = self.batch, self.t_decode
        if n <= b[0]:
            return t[0]
        for i in range(1, len(b)):
            if n <= b[i]:
                return t[i - 1] + (t[i] - t[i - 1]) * (n - b[i - 1]) / (b[i] - b[i - 1])
        if len(b) == 1:
            return t[0] * n
        return t[-1] + (t[-1] - t[-2]) / (b[-1] - b[-2]) * (n - b[-1])

    def heads(self, depth: int) -> float:
        if depth <= 0 or not self.t_heads:
            return 0.0
        return self.t_heads[min(depth, len(self.t_heads) - 1)]

    def ratio(self) -> list:
        """t(B)/t(1) per measured B."""
        return [round(x / self.t_decode[0], 3) for x in self.t_decode]


@dataclass
class Plan:
    paths: list  # the chosen tree (no paths: plain decoding)
    expected_tokens_per_step: float
    expected_speedup: float  # expected tokens/s over plain decoding's
    table: list = field(default_factory=list)  # per size n: (n, E(n), seconds per step, speedup)

    @property
    def n_nodes(self) -> int:
        return len(self.paths) + 1


def grow_tree(rank_acc, n_nodes: int, max_depth: Optional[int] = None, max_rank: int = TOP_K,
              max_leaves: Optional[int] = None) -> list:
    """Medusa's greedy construction: paths in the order they join the tree (the root excluded),
    each time the frontier node with the largest expected acceptance, the product of
    ``rank_acc[d][r]`` along its path. Every prefix of the result is prefix-closed. Ties go to the
    shallower, lower-ranked path, so the order is deterministic. ``max_leaves``: nodes that would
    make a tree of more leaves are passed over (each leaf is a KV sequence of the context)."""
    acc = np.asarray(rank_acc, dtype=np.float64)
    depth_cap = acc.shape[0] if max_depth is None else min(max_depth, acc.shape[0])
    rank_cap = min(max_rank, acc.shape[1])
    if depth_cap <= 0 or rank_cap <= 0 or n_nodes <= 1:
        return []
    order: list = []
    frontier = {(0,): float(acc[0, 0])}
    has_child = {(): False}
    leaves = 1  # the root alone
    while frontier and len(order) < n_nodes - 1:
        def adds_leaf(q):  # a first child of a leaf replaces it; anything else is a new leaf
            return 0 if not has_child.get(q[:-1], True) else 1
        ok = [q for q in frontier if max_leaves is None or leaves + adds_leaf(q) <= max_leaves]
        if not ok:
            break
        p = max(ok, key=lambda q: (frontier[q], -len(q), tuple(-r for r in q)))
        leaves += adds_leaf(p)
        has_child[p[:-1]] = True
        has_child[p] = False
        v = frontier.pop(p)
        order.append(p)
        if p[-1] + 1 < rank_cap:  # next sibling
            s = p[:-1] + (p[-1] + 1,)
            frontier[s] = float(np.prod([acc[d, r] for d, r in enumerate(s)]))
        if len(p) < depth_cap:  # first child
            frontier[p + (0,)] = v * float(acc[len(p), 0])
    return [list(p) for p in order]


def expected_tokens(rank_acc, paths: Sequence[Sequence[int]]) -> float:
    """1 + the sum over the tree's nodes of the product of accuracies along each one's path."""
    acc = np.asarray(rank_acc, dtype=np.float64)
    return 1.0 + sum(float(np.prod([acc[d, r] for d, r in enumerate(p)])) for p in paths)


def plan(rank_acc, costs: Costs, max_nodes: int, max_depth: Optional[int] = None, margin: float = 0.03,
         max_leaves: Optional[int] = None, tree_cost_factor: float = 1.0) -> Plan:
    """The prefix of ``grow_tree``'s order (at most ``max_nodes`` nodes with the root and
    ``max_leaves`` leaves) with the most expected tokens per second, or no tree when none beats
    plain decoding by ``margin``. Plain decoding is llama.cpp's: a one-token decode on all threads,
    at any context length (where no tree pays, the engine decodes exactly so, threads included).
    ``tree_cost_factor`` scales what a tree step costs beyond a plain step (``LiveCosts``)."""
    plain_s = plain_step_s(costs)
    order = grow_tree(rank_acc, max(1, max_nodes), max_depth, max_leaves=max_leaves)
    table = [(1, 1.0, plain_s, 1.0)]
    best = (1.0, 0, 1.0)  # (speedup, n paths, E)
    for n in range(1, len(order) + 1):
        paths = order[:n]
        e = expected_tokens(rank_acc, paths)
        # a tree step does a plain step's work and more; the factor scales the more
        step_s = plain_s + tree_cost_factor * max(0.0, tree_step_s(costs, n + 1, max(len(p) for p in paths)) - plain_s)
        speedup = (e / step_s) * plain_s
        table.append((n + 1, round(e, 4), step_s, round(speedup, 4)))
        if speedup > best[0]:
            best = (speedup, n, e)
    if best[1] == 0 or best[0] < 1.0 + margin:
        return Plan([], 1.0, 1.0, table)
    return Plan(order[: best[1]], round(best[2], 4), round(best[0], 4), table)


def tree_step_s(costs: Costs, n_nodes: int, depth: int) -> float:
    """Predicted seconds of a tree step: verify ``n_nodes`` tokens, a heads pass of ``depth``
    heads, and the host's work."""
    return costs.decode(n_nodes) + costs.heads(depth) + costs.t_host


def plain_step_s(costs: Costs, long_context: bool = False) -> float:
    """Predicted seconds of a plain step (one token). ``long_context``: a plain step among tree
    steps past 256 KV cells, which exact mode decodes on fewer threads (``t_single_kv_split``) or,
    where that is faster, as the first row of a 2-token batch on all threads (``decode(2)``; the
    engine's ``pad_kv_split``)."""
    if long_context and costs.t_single_kv_split > 0:
        t1 = min(costs.t_single_kv_split, costs.decode(2)) if len(costs.batch) > 1 else costs.t_single_kv_split
    else:
        t1 = costs.decode(1)
    return t1 + costs.t_host_plain


class LiveCosts:
    """How much more a tree step's extra work (beyond a plain step's) costs in this engine's real
    work than the measured cost model says. The engine decodes one step in ``PROBE_EVERY``
    plainly while a tree is on and times both kinds. Plain steps give q, the median of observed
    over predicted seconds: what context length, prompt mix and machine load do to every step
    alike. A tree step's observed seconds over q, less the predicted plain step, over the
    predicted extra, is one reading; the factor is their median, within ``bounds``.

    Why: a one-off measurement of chain batches after 256 cached tokens misses costs that real
    steps pay (seen: t(2)/t(1) 1.25 measured, 1.5 live after 40 tokens on the 11M demo model on a
    CPU; on an H200 a 63-node tree cost 6.7 one-token decodes of SmolLM2-135M where the tuner,
    out of exact mode, planned a tree that ran at 0.46x of plain). Scaling the extra, not the
    whole step, makes big trees pay more than small ones, so the plan shrinks before it stops.
    The factor never goes below 1: a noisy low reading must not grow a tree that does not pay.
    Only the last ``keep`` readings of each kind count."""

    PROBE_EVERY = 16

    def __init__(self, min_tree: int = 8, min_plain: int = 3, keep: int = 128, bounds: tuple = (1.0, 50.0)):
        self.tree: list = []  # (observed s, predicted tree step s, predicted plain step s)
        self.plain: list = []  # observed / predicted
        self.min_tree, self.min_plain, self.keep, self.bounds = min_tree, min_plain, keep, bounds
        self.clock = 0

    def probe_now(self) -> bool:
        """Called once per step that would use a tree: whether this one should be plain."""
        self.clock += 1
        return self.clock % self.PROBE_EVERY == 0

    def update_tree(self, observed_s: float, predicted_s: float, predicted_plain_s: float) -> None:
        self.tree.append((observed_s, predicted_s, predicted_plain_s))
        del self.tree[: -self.keep]

    def update_plain(self, observed_s: float, predicted_s: float) -> None:
        self.plain.append(observed_s / predicted_s)
        del self.plain[: -self.keep]

    def factor(self) -> float:
        """The scale of a tree step's extra cost; 1.0 until enough of both kinds were seen."""
        if len(self.tree) < self.min_tree or len(self.plain) < self.min_plain:
            return 1.0
        q = statistics.median(self.plain)
        readings = [(obs / q - plain) / (pred - plain) for obs, pred, plain in self.tree if pred > plain]
        if not readings:
            return 1.0
        return float(min(max(statistics.median(readings), self.bounds[0]), self.bounds[1]))


class LiveAcceptance:
    """Per depth and rank, how often a candidate was tried (its parent was on the accepted path)
    and accepted, blended with a prior (``prior_weight`` pseudo-observations per entry)."""

    def __init__(self, prior, prior_weight: float = 50.0):
        self.prior = np.asarray(prior, dtype=np.float64)
        self.tried = np.zeros_like(self.prior)
        self.hit = np.zeros_like(self.prior)
        self.prior_weight = prior_weight
        self.steps = 0

    def update(self, tree, path: Sequence[int]) -> None:
        """Record one step: ``path`` the accepted node indices of ``tree``, root first."""
        K, R = self.prior.shape
        for d, node in enumerate(path):
            if d >= K:
                break
            nxt = path[d + 1] if d + 1 < len(path) else -1
            for c in tree.children[node]:
                r = int(tree.rank[c])
                if r < R:
                    self.tried[d, r] += 1
                    if c == nxt:
                        self.hit[d, r] += 1
        self.steps += 1

    def estimate(self) -> np.ndarray:
        w = self.prior_weight
        n = w + self.tried
        return np.where(n > 0, (self.prior * w + self.hit) / np.maximum(n, 1e-12), self.prior)


# -- measurement --------------------------------------------------------------------------------
def measure_costs(ctx, native, model, heads=None, *, max_batch: int = 64, n_past: int = 256, time_budget: float = 2.5,
                  tolerance: float = 0.03, min_rounds: int = 3, max_rounds: int = 20, burst: int = 3, warmup: int = 2,
                  n_threads: Optional[int] = None, n_threads_kv_split: Optional[int] = None,
                  shape_of: Optional[Callable] = None, sizes: Optional[Sequence[int]] = None,
                  linear_cutoff: bool = True, gain: Optional[Callable] = None, deadline: float = 10.0) -> Costs:
    """Time verification forwards of B tokens after ``n_past`` cached tokens, as steps run them:
    each size back to back, ``warmup`` untimed decodes then ``burst`` timed ones, so llama.cpp
    reuses its compute graph (and a CUDA backend its captured CUDA graph) for the timed ones as it
    does across steps of one tree; ``graph_reuse`` in the result is the share of timed decodes that
    llama.cpp reports as reused. Rounds visit the sizes in turn (drift hits all alike) until the
    95% interval of every median is within ``tolerance`` of it, or ``time_budget`` seconds.
    ``shape_of(B)``: the native TreeShape of B nodes the planner would use (default: a chain; the
    cost depends on B much more than on the mask). Sizes stop growing once no larger tree can pay
    (``linear_cutoff``): once t(B) >= 0.95 B t(1), or, with ``gain(B)`` (the expected tokens per
    step of the best B-node tree), once t(B) >= 1.25 gain(B) t(1), twice in a row (the slack
    leaves room for live accuracies above the expected ones). ``deadline``: seconds for the whole
    measurement; where it ends the rounds early, the spreads say how far to trust the medians. ``sizes``: the B
    to measure (default ``BATCHES``), capped by the context. Every size runs on ``n_threads``; when
    ``n_threads_kv_split`` differs, a one-token decode on that many threads is timed in the same
    rounds (``t_single_kv_split``). Leaves the context empty, its threads at ``n_threads``."""
    t_begin = time.perf_counter()
    late = lambda: time.perf_counter() - t_begin > deadline  # noqa: E731
    threads = n_threads or ctx.n_threads_batch
    kv_split_threads = n_threads_kv_split if n_threads_kv_split and n_threads_kv_split != threads else None
    ctx.set_threads(threads, threads)
    tok = model.bos if model.bos >= 0 else 0
    n_past = max(0, min(n_past, ctx.n_ctx - max_batch - 1))
    sizes = sorted({1, *[b for b in (sizes or BATCHES) if 1 <= b <= min(max_batch, ctx.n_batch, ctx.n_ctx - n_past - 1)]})
    ctx.truncate(0)
    if n_past:
        ctx.prefill([tok] * n_past, 0, False)
    chain = lambda b: native.TreeShape(list(range(b)), [[0]] * b)  # noqa: E731
    shapes = {b: (shape_of(b) if shape_of is not None and b > 1 else chain(b)) for b in sizes}
    toks = {b: np.full(b, tok, np.int32) for b in sizes}
    reused = [0, 0]  # timed decodes that reused the previous graph, timed decodes

    def once(b: int) -> float:
        ctx.truncate(n_past)
        t0 = time.perf_counter()
        ctx.decode_tree(shapes[b], toks[b], n_past)
        ctx.synchronize()
        return time.perf_counter() - t0

    def run_burst(b: int, n: int, count: bool = True) -> list:
        for _ in range(warmup):
            once(b)
        r0 = ctx.perf()["n_reused"]
        out = [once(b) for _ in range(n)]
        if count:
            reused[0] += ctx.perf()["n_reused"] - r0
            reused[1] += n
        return out

    def burst_kv_split() -> list:
        ctx.set_threads(kv_split_threads, threads)
        try:
            return run_burst(1, burst)
        finally:
            ctx.set_threads(threads, threads)

    bound = (lambda b: 0.95 * b) if gain is None else (lambda b: min(0.95 * b, 1.25 * gain(b)))  # noqa: E731
    t1 = min(run_burst(1, 3, count=False))
    kept, linear = [], 0
    for b in sizes:  # the cut-off: sizes past the last one that could pay are not measured
        if late() and len(kept) >= 2:
            break
        kept.append(b)
        if linear_cutoff and b > 1 and min(run_burst(b, 2, count=False)) >= bound(b) * t1:
            linear += 1
            if linear >= 2:
                break
        else:
            linear = 0
    sizes = kept
    samples = {b: [] for b in sizes}
    keys = list(sizes) + (["kv_split"] if kv_split_threads else [])
    samples["kv_split"] = []
    t_start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds:
        for b in keys:
            if rounds and late():  # a busy machine: keep what the first round measured
                break
            samples[b].extend(burst_kv_split() if b == "kv_split" else run_burst(b, burst))
        rounds += 1
        if late() or rounds >= min_rounds and (all(_spread(samples[b]) <= tolerance for b in keys)
                                               or time.perf_counter() - t_start > time_budget):
            break
    t_heads = [0.0]
    if heads is not None:
        ctx.truncate(n_past)
        ctx.decode_tree(shapes[1], toks[1], n_past)
        ctx.truncate(0)
        ctx.prefill([tok] * 8, 0, True)  # a row with a hidden state
        for d in range(1, heads.n_heads + 1):
            heads.propose(ctx, 0, TOP_K, d, tok, logp=False)
            reps = 1 if late() else 7
            t_heads.append(statistics.median(_timed(lambda: heads.propose(ctx, 0, TOP_K, d, tok, logp=False))
                                             for _ in range(reps)))
    ctx.truncate(0)
    return Costs(batch=sizes, t_decode=[statistics.median(samples[b]) for b in sizes],
                 spread=[round(_spread(samples[b]), 4) for b in sizes], t_heads=t_heads,
                 t_host=HOST_TREE_S, t_host_plain=HOST_PLAIN_S, rounds=rounds,
                 t_single_kv_split=statistics.median(samples["kv_split"]) if kv_split_threads else 0.0,
                 graph_reuse=round(reused[0] / reused[1], 4) if reused[1] else 0.0)


def planned_shapes(native, rank_acc, max_depth: Optional[int] = None, max_leaves: Optional[int] = None) -> Callable:
    """``shape_of`` for ``measure_costs``: B -> the native shape of the B-node tree ``plan`` would
    pick among (a prefix of ``grow_tree``'s order for these accuracies), a chain where that order
    has fewer nodes."""
    from medusa_edge.core.tree import Tree

    order = grow_tree(rank_acc, max(BATCHES), max_depth, max_leaves=max_leaves)

    def shape_of(b: int):
        if b - 1 > len(order):
            return native.TreeShape(list(range(b)), [[0]] * b)
        t = Tree.from_paths(order[: b - 1])
        return native.TreeShape(t.depth.tolist(), [list(x) for x in t.seq_sets])

    return shape_of


def tree_gain(rank_acc, max_depth: Optional[int] = None, max_leaves: Optional[int] = None) -> Callable:
    """``gain`` for ``measure_costs``: B -> the expected tokens per step of the best B-node tree
    under these accuracies (the B-node prefix of ``grow_tree``'s order)."""
    order = grow_tree(rank_acc, max(BATCHES), max_depth, max_leaves=max_leaves)
    return lambda b: expected_tokens(rank_acc, order[: max(0, b - 1)])


#: Host seconds per step beside decode and heads ("other" in `medusa-edge bench`: 0.16 to 0.57 ms
#: per step on the 2-core test machine, plain and tree steps alike).
HOST_TREE_S = 3e-4
HOST_PLAIN_S = 1e-4


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _spread(xs: list) -> float:
    """Relative half-width of a distribution-free 95% interval of the median (order statistics)."""
    n = len(xs)
    if n < 3:
        return float("inf")
    s = sorted(xs)
    k = max(0, int(n / 2 - 1.96 * np.sqrt(n) / 2))
    lo, hi = s[k], s[min(n - 1, n - 1 - k)]
    med = statistics.median(s)
    return (hi - lo) / 2 / med if med > 0 else float("inf")


# -- cache ----------------------------------------------------------------------------------------
#: A measurement whose 95% interval of some median is wider than +-20% (a busy machine, or rounds cut
#: short by the deadline) serves this run but is not cached: the next load measures again.
NOISY_SPREAD = 0.2


def cache_key(exactness_key: str, heads_path: Optional[str], max_batch: int, n_ctx: int) -> str:
    """The device, model, threads and settings (exactness.cache_key), the heads file, the sizes."""
    hid = ""
    if heads_path:
        st = os.stat(heads_path)
        hid = f"{os.path.abspath(heads_path)}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(f"costs=4|{exactness_key}|{hid}|{max_batch}|{n_ctx}".encode()).hexdigest()


def cached_costs(key: str, measure) -> tuple[Costs, bool]:
    """(costs, whether they came from the cache); ``measure()`` runs on a miss (or always with
    MEDUSA_EDGE_RETUNE=1) and is stored unless noisy (``NOISY_SPREAD``)."""
    def quiet(costs: Costs) -> bool:
        if max(costs.spread, default=0.0) <= NOISY_SPREAD:
            return True
        print("medusa-edge: the verification costs measured now vary by more than "
              f"{NOISY_SPREAD:.0%} (is the machine busy?): used for this run, not cached; the next load "
              "measures them again", file=sys.stderr)
        return False

    return cached("tree-costs", key, measure, encode=asdict, store=quiet,
                  decode=lambda e: Costs(**e) if isinstance(e, dict) else None,
                  read=os.environ.get("MEDUSA_EDGE_RETUNE") != "1")
