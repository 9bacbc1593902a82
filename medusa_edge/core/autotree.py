"""tree="auto" inside the engine: the tuning state and the hook the decoding loop calls.

The step itself knows nothing of planning. Around each step the loop asks ``choose_depth`` for the
depth to verify (one tree step in ``LiveCosts.PROBE_EVERY`` is a plain probe) and reports the step
to ``observe`` (live acceptance; live costs for timed steps). Between generations, once
``replan_due``, the engine asks ``replan`` for the tree it uses next. The maths is tune.py's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from medusa_edge.core import tune
from medusa_edge.core.tree import TOP_K


class AutoTree:
    """The engine's tree="auto" state: the largest tree it may plan (``max_nodes`` with the root,
    ``max_leaves`` leaves), the measured ``costs``, the current ``plan`` (``plan_kv_split``: the one
    past the split, the same tree), and the live acceptance and live costs that refine them.
    ``costs`` and the live state stay None until ``start``; ``stop`` ends live planning."""

    #: Steps of live acceptance between two plans of the auto tree.
    REPLAN_EVERY = 64

    def __init__(self, max_nodes: int, max_leaves: int):
        self.max_nodes, self.max_leaves = max_nodes, max_leaves
        self.costs: Optional[tune.Costs] = None
        self.plan: Optional[tune.Plan] = None
        self.plan_kv_split: Optional[tune.Plan] = None
        self.live: Optional[tune.LiveAcceptance] = None
        self.live_costs: Optional[tune.LiveCosts] = None
        self._planned_at = 0
        self._timed = False  # whether the step choose_depth last chose is timed for live costs

    @classmethod
    def for_device(cls, n_batch: int, exact_batch: Optional[int], on_gpu: bool) -> "AutoTree":
        """The largest tree "auto" may pick: inside the exact region (``exact_batch``; None out of
        exact mode), the batch and 64 nodes; and its leaves, each a KV sequence: committing a step
        scans the KV cells once per sequence of the context (2 x 62 scans of 2,048 cells cost
        0.3 ms a step on the 2-core test machine, a sixth of a demo-model step), so CPUs, where
        small trees win anyway, get 8."""
        max_nodes = max(1, min(64, n_batch, 64 if exact_batch is None else exact_batch))
        return cls(max_nodes, max(1, min(max_nodes - 1, 8 if not on_gpu else 64)))

    @staticmethod
    def prior(rank_accuracy: Optional[Sequence], n_heads: int) -> np.ndarray:
        """[n_heads, MAX_RANK] per-head, per-rank accuracies: the heads file's (None: the Vicuna-7B
        prior), cut or padded with zeros."""
        acc = rank_accuracy or tune.VICUNA_7B_PROFILE
        out = np.zeros((n_heads, TOP_K))
        for i in range(min(n_heads, len(acc))):
            row = list(acc[i])[: TOP_K]
            out[i, : len(row)] = row
        return out

    def measure(self, ctx, native, model, heads, prior: np.ndarray, *, n_threads: int,
                n_threads_kv_split: int) -> tune.Costs:
        """This device's step costs (tune.measure_costs) for the trees this prior would plan, shaped
        with at most as many leaves as ``ctx`` has sequences (an engine's own context has
        ``max_leaves``). ``heads``: None times no heads pass; ``prior``'s rows are the heads."""
        n_heads = len(prior)
        leaves = min(self.max_leaves, ctx.n_seq_max)
        shape_of = tune.planned_shapes(native, prior, n_heads, leaves)
        gain = tune.tree_gain(prior, n_heads, leaves)
        return tune.measure_costs(ctx, native, model, heads, max_batch=self.max_nodes, n_threads=n_threads,
                                  n_threads_kv_split=n_threads_kv_split, shape_of=shape_of, gain=gain)

    def start_measured(self, key: str, ctx, native, model, heads, prior: np.ndarray, *, n_threads: int,
                       n_threads_kv_split: int) -> tune.Costs:
        """``start`` for ``prior`` with this device's step costs: cached under ``key``
        (tune.cache_key), else ``measure``d and cached. The engine's tree="auto" and ``medusa-edge
        bench --replay`` tune through here; ``replan`` then gives the tree."""
        costs, _ = tune.cached_costs(key, lambda: self.measure(ctx, native, model, heads, prior, n_threads=n_threads,
                                                               n_threads_kv_split=n_threads_kv_split))
        self.start(costs, prior)
        return costs

    def start(self, costs: tune.Costs, prior: np.ndarray) -> None:
        """Plan live from these costs, the heads' accuracies starting at ``prior``."""
        self.costs = costs
        self.live = tune.LiveAcceptance(prior)
        self.live_costs = tune.LiveCosts()

    def stop(self) -> None:
        """No more live planning (fixed trees from now on); the last costs and plan stay readable."""
        self.live = self.live_costs = None

    # -- the loop's hook ---------------------------------------------------------------------------
    def choose_depth(self, depth: int) -> int:
        """The depth of the next step, given the one the tree allows: 0 for a probe, so tree steps
        are timed against plain ones in the same work (tune.LiveCosts). Call once per step."""
        self._timed = self.live_costs is not None and depth > 0
        return 0 if self._timed and self.live_costs.probe_now() else depth

    def observe(self, tree, path: Sequence[int], seconds: float, long_context: bool) -> None:
        """One step done: ``tree`` verified, ``path`` accepted, in ``seconds`` from proposal to
        commit; ``long_context``: its KV cache past the split (tune.plain_step_s)."""
        if self.live is not None and tree.n_nodes > 1:
            self.live.update(tree, path)
        if self._timed:
            plain_s = tune.plain_step_s(self.costs, long_context)
            if tree.n_nodes > 1:
                self.live_costs.update_tree(seconds, tune.tree_step_s(self.costs, tree.n_nodes, tree.max_depth), plain_s)
            else:
                self.live_costs.update_plain(seconds, plain_s)

    def replan_due(self) -> bool:
        """Whether ``REPLAN_EVERY`` steps of live acceptance have passed since the last plan."""
        return self.live is not None and self.live.steps - self._planned_at >= self.REPLAN_EVERY

    def replan(self, max_depth: int) -> list:
        """The auto tree's paths from the live accuracies and live step costs, against plain
        decoding at llama.cpp's speed; the same tree before and past the split (``plan_kv_split``)."""
        self.plan = tune.plan(self.live.estimate(), self.costs, self.max_nodes, max_depth=max_depth,
                              max_leaves=self.max_leaves, tree_cost_factor=self.live_costs.factor())
        if max(self.costs.spread, default=0.0) > tune.NOISY_SPREAD:
            # costs too noisy to trust (a busy machine; not cached) plan no tree: plain decoding is
            # llama.cpp's speed, a tree planned from noise can be far slower (seen: 31 nodes)
            self.plan = tune.Plan([], 1.0, 1.0, self.plan.table)
        self.plan_kv_split = self.plan
        self._planned_at = self.live.steps
        return self.plan.paths


def delegate(name: str, doc: str) -> property:
    """An Engine attribute kept on its AutoTree (``engine.autotree``), read and written there."""
    return property(lambda self: getattr(self.autotree, name),
                    lambda self, value: setattr(self.autotree, name, value), doc=doc)
