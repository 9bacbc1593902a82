"""The Medusa decoding loop on token ids: propose, build tree, verify, accept, commit.

Layering (after mlx-lm): this module works on token ids only; ``api.py`` turns them into text
chunks and llama-cpp-python-shaped dicts.

State between steps (the invariant every step keeps):
  * the KV cache holds ``n_past`` committed tokens, tagged with every seq id;
  * ``root`` is the next token, already chosen and emitted but not yet in the cache;
  * output row ``row`` of the last decode is the position that produced ``root``: its hidden
    state feeds the heads (head i predicts the token i+1 places after ``root``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from medusa_edge.core import exactness, rpc
from medusa_edge.guards.gguf_file import read_gguf
from medusa_edge.heads.check import heads_info
from medusa_edge._loader import native
from medusa_edge.guards.hw import load_model
from medusa_edge.errors import BusyError, ContextOverflowError, HeadsError, ModelLoadError
from medusa_edge.core import tune
from medusa_edge.core.autotree import AutoTree, delegate
from medusa_edge.core.params import Proposer, SamplingParams, Stats
from medusa_edge.core.tree import PRESETS, TOP_K, Tree, TreeError, accept, accept_typical, chain, step_budget, step_paths

@dataclass
class _Run:
    """What the steps of one generation share: its sampler chain and parameters, the proposer (None:
    the heads), its stats, the list that gets each token's raw logits (None: none kept), and the
    tokens generated so far, the current root last."""

    sampler: object
    params: SamplingParams
    proposer: Optional[Proposer]
    stats: Stats
    logits_out: Optional[list]
    generated: list


def read_heads_info(path: str) -> dict:
    """The heads GGUF's metadata (no tensor data), every value type- and range-checked: HeadsError
    naming the file and the fault for unreadable, damaged or inconsistent files. Read natively with
    ggml's size-bounded gguf reader (guards.gguf_file), never gguf-py, so a hostile header cannot make it
    allocate or loop beyond the file's size."""
    if not os.path.isfile(path):
        raise HeadsError(f"heads file {path}: no such file")
    try:
        return heads_info(read_gguf(path, "heads file"))
    except ValueError as e:
        raise HeadsError(str(e)) from None


@contextmanager
def _progress(what: str, after: float = 1.0, cached: bool = True):
    """Say on stderr what is taking long, once it has taken ``after`` seconds, and then how long it
    took (measurements at a model's first load on a device; cached hits return before ``after``;
    ``cached``: whether the result is kept for the next load)."""
    t0 = time.perf_counter()
    said = threading.Event()

    def say():
        said.set()
        note = "first load with these settings; cached afterwards" if cached else "not cached over RPC"
        print(f"medusa-edge: {what} ({note}) ...", file=sys.stderr, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            print(f"medusa-edge: ... done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


class Engine:
    """A llama.cpp model, its context, optional Medusa heads and a tree: the decoding loop.

    ``heads_path=None`` with ``tree`` None decodes plainly (one token per forward): the same
    code path with a root-only tree, which is also the lossless baseline in benchmarks.
    ``type_k``/``type_v``: ggml types of the KV cache (None: F16, or F32 with ``f32_kv``); a
    quantized V cache needs flash attention (llama.cpp refuses it otherwise, a ModelLoadError).
    ``rpc_servers``: llama.cpp RPC servers ("host:port", a list or one comma-separated string)
    whose devices hold the offloaded layers (``n_gpu_layers``, -1: all) before the local GPUs;
    the heads run on the output layer's device (core/rpc.py; RpcError, a ModelLoadError, when
    the RPC backend is not built in or a server does not answer).
    """

    def __init__(
        self,
        model_path: str,
        heads_path: Optional[str] = None,
        *,
        tree: "str | list | Tree | None" = None,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        f32_kv: bool = False,
        flash_attn: Optional[bool] = None,
        type_k: Optional[int] = None,
        type_v: Optional[int] = None,
        exact: "bool | str" = "auto",
        top_k: int = TOP_K,
        verbose: bool = False,
        rpc_servers: "Sequence[str] | str | None" = None,
    ):
        native.set_verbose(verbose)
        self.verbose = verbose
        # One generation at a time owns the context (see _claim); others wait for it.
        self._cv = threading.Condition()
        self._holder: Optional[tuple] = None  # (generation token, thread id) of the owner
        if not os.path.isfile(model_path):
            raise ModelLoadError(f"model file {model_path}: no such file")
        n_threads = n_threads or max(1, (os.cpu_count() or 1))
        self.model_path = model_path
        self.n_gpu_layers = n_gpu_layers
        self.heads_path = heads_path
        self.rpc_servers = rpc.check_servers(rpc_servers, n_gpu_layers)
        self.model = self._load_model(model_path, n_gpu_layers, self.rpc_servers)
        self.heads = None
        self.heads_info = None
        if heads_path is not None:
            self.heads_info = read_heads_info(heads_path)
            self._check_heads_match(heads_path, self.heads_info)

        # RPC devices are run as a GPU is: the argmax on the output device (no logits cross the
        # network) and no local thread schedule for exact mode (the servers' threads are their own;
        # the exactness probe measures what they compute).
        on_gpu = n_gpu_layers != 0 and (native.supports_gpu_offload() or bool(self.rpc_servers))
        # "auto" (the default with heads): a tree planned from this device's measured costs (_tune)
        self.auto = self.heads_info is not None and (tree is None or tree == "auto")
        # "step:N": a tree of at most N candidates grown at each step from the heads' probabilities
        # (_propose_step); ``tree`` is then the chain that bounds a step's depth
        self.step_budget = step_budget(tree)
        if self.step_budget:
            self.tree = Tree.from_paths(chain(min(self.step_budget, self.heads_info["n_heads"] if self.heads_info else self.step_budget)))
        else:
            self.tree = Tree.from_paths([]) if self.auto else self._choose_tree(tree)
        self.top_k = top_k
        fa = -1 if flash_attn is None else int(bool(flash_attn))
        tk = -1 if type_k is None else int(type_k)
        tv = -1 if type_v is None else int(type_v)
        # Threads: batches get all; so do one-token decodes, except in exact mode on the CPU once
        # the KV view reaches 512 cells (exactness.single_token_threads), where they get n_threads_kv_split.
        self.n_threads = self.n_threads_batch = n_threads
        self._measure_exact(exact, n_threads, fa, f32_kv, tk, tv)
        # every prompt row computed as a one-token decode: chunking and prefix reuse change nothing
        self.exact_prefill = self.exact_batch >= self.MIN_EXACT_UBATCH
        n_ubatch = self.exact_batch if self.exact_prefill else 0
        n_heads = self.heads_info["n_heads"] if self.heads_info else self.tree.max_depth
        self.autotree = AutoTree.for_device(n_batch, self.exact_batch if self.exact else None, on_gpu)
        # the context gets one sequence per leaf; check before allocating anything
        self.tree.check(n_heads=n_heads, n_seq_max=native.max_parallel_sequences(), n_batch=n_batch, top_k=top_k)
        # a per-step tree gets as many leaves as candidates, within auto's (each one a sequence commits scan)
        n_seq = max(1, self.max_auto_leaves if self.auto else min(self.step_budget, self.max_auto_leaves)
                    if self.step_budget else self.tree.n_leaves)
        try:
            # a leaf's seq id is carried by its path's rows: depth + 1 outputs (device-side greedy)
            self.ctx = native.Context(self.model, n_ctx, n_batch, n_threads, n_seq, f32_kv, fa,
                                      n_ubatch, self.n_threads_batch, tk, tv, max(2, n_heads + 1))
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        self._on_gpu = on_gpu
        self._set_long_threads(self.tree.n_nodes > 1)  # auto: again once planned
        self._n_threads_single = n_threads  # what the context has now (see _threads_for)
        self.flash_attn = bool(self.ctx.flash_attn)
        self._say_guarantee()
        # Tokens whose K/V sit at positions 0..len-1 of every sequence: the prefix a next call may
        # reuse, valid while the context's epoch is the one recorded (nobody else edited the cache).
        self._kv_tokens: list[int] = []
        self._kv_epoch = -1
        if heads_path is not None:
            try:
                # over RPC on the output layer's device, where the hidden state is computed
                self.heads = native.Heads(heads_path, model_path, n_threads, n_gpu_layers != 0, top_k=top_k,
                                          output_of=self.model if self.rpc_servers else None)
            except (RuntimeError, ValueError) as e:
                raise HeadsError(str(e)) from None
        self._shapes: dict[tuple, tuple[Tree, object]] = {}
        self._step_shapes: dict[tuple, tuple[Tree, object]] = {}  # tree="step:N"'s, by paths (_propose_step)
        # the tree for a KV cache past the split (see _replan); a fixed tree serves both
        self.tree_kv_split = self.tree
        if self.auto and self.max_auto_nodes >= 2:
            self._tune(exactness.cache_key(model_path, n_threads=n_threads, flash_attn=fa, f32_kv=f32_kv, type_k=tk, type_v=tv,
                                           n_gpu_layers=n_gpu_layers, rpc_servers=self.rpc_servers))

    @staticmethod
    def _load_model(model_path: str, n_gpu_layers: int, rpc_servers: Sequence[str] = ()):
        """The model, after a vocabulary-only probe that pre-checks the file (guards.gguf_file) and refuses
        recurrent and hybrid architectures; ModelLoadError naming the fault."""
        try:
            probe = load_model(model_path, vocab_only=True)
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        if probe.is_recurrent:
            raise ModelLoadError(
                f"model {model_path} has a recurrent or hybrid architecture ({probe.meta('general.architecture')}), whose state "
                "cannot branch: Medusa tree verification needs a pure-attention model"
            )
        del probe
        try:
            return load_model(model_path, n_gpu_layers=n_gpu_layers, checked=True, rpc_servers=rpc_servers)
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(str(e)) from None

    def _measure_exact(self, exact: "bool | str", n_threads: int, fa: int, f32_kv: bool, tk: int, tv: int) -> None:
        """Exact mode: every decode stays inside the batch sizes measured bit-identical to one-token
        decodes on this device (exactness.py): trees, and prompt micro-batches too when the region
        is wide enough to prefill in (so a reused prefix equals a cold start). "auto" is exact mode
        where the device has an exact region of 2 rows or more, and otherwise (GPUs, F16/F32
        weights) Medusa with trees of any size (see ``guarantee``). Sets ``exact_setting``,
        ``exact``, ``exact_batch`` (0: not measured; 1: no exact region here) and cuts the tree."""
        if exact not in (True, False, "auto"):
            raise ValueError(f"exact must be True, False or 'auto', got {exact!r}")
        self.exact_setting = exact
        self.exact = exact is not False
        self.exact_batch = 0
        if not self.exact:
            return
        try:  # the probe makes the first contexts: bad settings (a KV type, ...) fail here
            with _progress("measuring which batches this device computes exactly as one-token decodes",
                           cached=not self.rpc_servers):
                # never cached over RPC: the answer depends on the servers' devices, builds and
                # threads, which their "host:port" does not identify
                self.exact_batch, _ = exactness.exact_batch(self.model, self.model_path, n_threads=n_threads, flash_attn=fa,
                                                            f32_kv=f32_kv, n_gpu_layers=self.n_gpu_layers, type_k=tk,
                                                            type_v=tv, use_cache=not self.rpc_servers)
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        if self.exact_batch >= 2:
            self.tree = self.tree.prefix(self.exact_batch)
        elif exact == "auto":
            self.exact = False  # no exact region: verified rows are the guarantee

    def _say_guarantee(self) -> None:
        """On stderr, when a tree may run but no batch is exact here, what the output promises."""
        medusa_on = self.auto or self.tree.n_nodes > 1
        if self.exact_setting is False or self.exact_batch >= 2 or not medusa_on:
            return
        if not self.exact:
            then = ("so Medusa verifies its trees with the guarantee of other speculative decoders: every token is the "
                    "base model's argmax (or seeded draw) at its verified row, and the text may differ from plain "
                    "decoding at near-ties (`medusa-edge verify --no-exact` measures how often; exact=True "
                    "(--exact strict) keeps the text bit-identical by decoding plainly).")
        elif self.auto:
            then = ("so exact mode decodes plainly, without a tree; exact='auto' (the default) lets Medusa run, with "
                    "output that may differ from plain decoding at near-ties.")
        else:
            then = "so Medusa's output may differ from plain decoding at near-ties; `medusa-edge verify` measures how often."
        print(f"medusa-edge: on this device no batch of {self.model.description()} computes its rows bit for bit as "
              "one-token decodes do (flash attention " + ("on" if self.flash_attn else "off") + "), " + then,
              file=sys.stderr)

    def _single_threads_kv_split(self) -> int:
        """Threads exact mode gives a one-token decode past the split among tree steps on a CPU."""
        split = exactness.kv_may_split(self.ctx.type_k, self.ctx.type_v)
        return exactness.single_token_threads(self.n_threads, exactness.SPLIT_FREE_CELLS + 1, split) \
            if self.exact and not self._on_gpu else self.n_threads

    def _set_long_threads(self, trees: bool) -> None:
        """Threads of one-token decodes once the KV cache is past the split. ``trees``: whether any
        tree may run. With one, in exact mode on a CPU, ``_single_threads_kv_split``, so they are
        computed as the tree's batched rows are (also a tree used only below the split: its last
        step may write rows past it, seen to change the text); without, all threads, as llama.cpp
        decodes plainly: then the text equals llama.cpp's on all threads, at its speed (a GGUF
        without heads, or heads whose auto tree does not pay)."""
        self.n_threads_kv_split = self._single_threads_kv_split() if trees else self.n_threads
        # A plain step there can instead decode its token with a scratch row after it (a 2-node
        # chain whose second cell is dropped at commit): row 0 is then a batched row, on all threads,
        # which the exact region makes bit-identical to the one-thread decode. Taken where the
        # measured t(2) beats the one-thread t(1) (tune.plain_step_s), or, unmeasured, on 2+ threads.
        # Measured on the 2-core test machine (bench/plain_vs_llama.py): slower for SmolLM2 Q4_1,
        # whose 2-row products cost 1.8 one-row ones, so unmeasured (fixed trees) it stays off.
        costs = self.costs
        self.pad_kv_split = self.n_threads_kv_split < self.n_threads and self.exact_batch >= 2 and (
            costs is not None and costs.t_single_kv_split > 0 and costs.decode(2) < costs.t_single_kv_split)

    #: Device-side greedy (the graph takes each row's argmax; no raw logits come back): None is on
    #: a GPU, where copying every tree row's logits (64 x 49,152 floats for SmolLM2) costs a transfer;
    #: off on a CPU, where the host's lazy argmax reads only the accepted path's rows. Tests force it.
    device_greedy: Optional[bool] = None

    def _device_greedy(self, params: "SamplingParams", logits_out) -> bool:
        """Whether this generation's rows are chosen on the device: greedy with no penalties and
        no raw logits wanted (``logits_out``), where ``device_greedy`` allows it."""
        on = self._on_gpu if self.device_greedy is None else self.device_greedy
        return bool(on and params.plain_argmax and logits_out is None)

    @property
    def guarantee(self) -> str:
        """What the output promises. "bitwise": the text equals plain decoding's with the same
        settings bit for bit (exact mode inside the device's exact region of 2 rows or more, or
        no tree at all).
        "verified": every committed token is the base model's argmax (or seeded draw) at its
        verified row, as in other speculative decoders; a batched row may round differently from a
        one-token decode, so the text can differ from plain decoding's at near-ties."""
        trees = (self.auto and self.max_auto_nodes >= 2) or self.tree.n_nodes > 1 or self.tree_kv_split.n_nodes > 1
        return "bitwise" if not trees or (self.exact and self.exact_batch >= 2) else "verified"

    # tree="auto"'s state lives on ``autotree``; these read and write it there
    costs = delegate("costs", "tune.Costs measured for tree=\"auto\" (None: not tuned).")
    plan = delegate("plan", "tune.Plan of the auto tree now in use (None: not tuned).")
    plan_kv_split = delegate("plan_kv_split", "tune.Plan past the split: the same tree as ``plan``.")
    live = delegate("live", "tune.LiveAcceptance refining the plan (None once trees are fixed).")
    live_costs = delegate("live_costs", "tune.LiveCosts refining the plan (None once trees are fixed).")
    max_auto_nodes = delegate("max_nodes", "Most nodes, root included, an auto tree may have here.")
    max_auto_leaves = delegate("max_leaves", "Most leaves (KV sequences) an auto tree may have here.")

    def _tune(self, device_key: str) -> None:
        """tree="auto": this device's step costs (measured once, cached per device, model, heads
        and settings), the heads' accuracies (from the heads file, else the Vicuna-7B prior), and
        the tree with the most expected tokens per second; none when plain decoding is faster."""
        at = self.autotree
        key = tune.cache_key(device_key, self.heads_path, at.max_nodes, self.ctx.n_ctx)
        prior = AutoTree.prior(self.heads_info.get("rank_accuracy"), self.heads.n_heads)
        with _progress("measuring what a verification step costs here, for tree=\"auto\""):
            at.start_measured(key, self.ctx, native, self.model, self.heads, prior, n_threads=self.n_threads,
                              n_threads_kv_split=self._single_threads_kv_split())
        self._n_threads_single = self.ctx.n_threads
        self._replan()

    def _replan(self) -> None:
        """The auto tree planned again (AutoTree.replan), before and past the split alike; the
        threads of one-token decodes follow it (``_set_long_threads``)."""
        paths = self.autotree.replan(self.heads.n_heads)
        if tuple(tuple(x) for x in paths) != self.tree.paths:
            self.tree = self.tree_kv_split = Tree.from_paths(paths)
            self._shapes.clear()
        self._set_long_threads(self.tree.n_nodes > 1)

    # -- setup ---------------------------------------------------------------------------------
    def _check_heads_match(self, path: str, info: dict) -> None:
        if info["n_embd"] != self.model.n_embd:
            raise HeadsError(
                f"heads file {path} was made for hidden size {info['n_embd']}, but model {self.model_path} has {self.model.n_embd}"
            )
        if info["n_vocab"] != self.model.n_vocab:
            raise HeadsError(
                f"heads file {path} was made for a vocabulary of {info['n_vocab']} tokens, but model {self.model_path} has {self.model.n_vocab}"
            )
        want = info["base_vocab_hash"]
        if want and want != f"{self.model.vocab_fingerprint():016x}":
            raise HeadsError(f"heads file {path} was made for a different tokenizer than model {self.model_path} (vocab hash differs)")

    #: Prompt micro-batches use the exact batch size only when it is at least this large: smaller
    #: micro-batches would slow the prefill several-fold (then a reused prefix may differ from a
    #: cold start at near-ties; Medusa still equals plain decoding, which prefills the same way).
    MIN_EXACT_UBATCH = 32

    def use_trees(self, tree, tree_kv_split=None) -> None:
        """Fixed trees from now on: ``tree`` while one-token decodes get all threads, ``tree_kv_split``
        past the split (None: the same). Each is cut to the exact batch in exact mode and must fit
        the context's sequences (TreeError otherwise). Ends ``tree="auto"``'s planning."""
        out = []
        for t in (tree, tree if tree_kv_split is None else tree_kv_split):
            t = self._choose_tree(t) if not isinstance(t, Tree) else t
            if self.exact and self.exact_batch >= 2:
                t = t.prefix(self.exact_batch)
            t.check(n_heads=self.heads.n_heads if self.heads else t.max_depth, n_seq_max=self.ctx.n_seq_max,
                    n_batch=self.ctx.n_batch)
            out.append(t)
        self.tree, self.tree_kv_split = out
        self.auto = False
        self.step_budget = None
        self.autotree.stop()
        self._shapes.clear()
        self._set_long_threads(self.tree.n_nodes > 1 or self.tree_kv_split.n_nodes > 1)

    def _choose_tree(self, tree) -> Tree:
        """A fixed tree: the caller's; "heads" for the one stored in the heads file (else the
        reference's default cut to the heads); root-only without heads."""
        if tree is None and self.heads_info is None:
            return Tree.from_paths([])
        if tree == "heads":
            if self.heads_info is None:
                raise TreeError('tree="heads" needs a heads file')
            if self.heads_info.get("tree"):
                import json

                return Tree.from_paths(json.loads(self.heads_info["tree"]))
            return Tree.from_paths(PRESETS["mc_sim_7b_63"]).truncated(self.heads_info["n_heads"])
        if tree == "auto":
            return Tree.from_paths([])  # without heads there is nothing to tune
        return Tree.resolve(tree)

    def _shape(self, kv_split: bool, max_depth: int, max_nodes: int) -> tuple[Tree, object]:
        """The tree (``tree_kv_split`` if ``kv_split``, else ``tree``) cut to ``max_depth`` and then to
        its first ``max_nodes`` nodes (node order is depth-first pre-order, so any prefix is still a
        tree), with its native shape. Called every step: the cache lookup comes first, trees are
        only built on a miss."""
        full = self.tree_kv_split if kv_split else self.tree
        depth = min(max(max_depth, 0), full.max_depth)
        n_nodes = min(max(max_nodes, 1), full.n_within_depth(depth))
        key = (kv_split and full is not self.tree, depth, n_nodes)
        if key not in self._shapes:
            t = full.truncated(depth).prefix(n_nodes)
            self._shapes[key] = (t, native.TreeShape(t.depth.tolist(), [list(s) for s in t.seq_sets]))
        return self._shapes[key]

    def _threads_for(self, n_cells: int) -> None:
        """Threads for a one-token decode after which the KV cache holds ``n_cells`` cells
        (exactness.single_token_threads); llama.cpp only stores the numbers, so this is cheap."""
        n = self.n_threads if n_cells <= exactness.SPLIT_FREE_CELLS else self.n_threads_kv_split
        if n != self._n_threads_single:
            self.ctx.set_threads(n, self.n_threads_batch)
            self._n_threads_single = n

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    # -- ownership -----------------------------------------------------------------------------
    def _claim(self, token: object) -> None:
        """Make generation ``token`` the owner of the context and KV cache. A generation of
        another thread is waited for (two threads get their answers one after the other); one of
        this thread that was left open (an unfinished stream) loses the context, and raises
        BusyError if it is resumed."""
        me = threading.get_ident()
        with self._cv:
            while self._holder is not None and self._holder[1] != me:
                self._cv.wait()
            self._holder = (token, me)

    def _release(self, token: object) -> None:
        with self._cv:
            if self._holder is not None and self._holder[0] is token:
                self._holder = None
                self._cv.notify_all()

    def _check_owner(self, token: object) -> None:
        holder = self._holder
        if holder is None or holder[0] is not token:
            raise BusyError("this generation was superseded: another call on the same instance started before it "
                            "finished, and the KV cache now belongs to that call. Finish or close a stream before "
                            "starting the next one.")

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """The raw logits plain decoding chooses the token after ``ids`` from (a cold prefill,
        chunked as llama-cpp-python chunks it). Takes the context as a generation does; the next
        generation decodes its prompt again."""
        token = object()
        self._claim(token)
        try:
            self._kv_tokens, self._kv_epoch = [], -1
            self.ctx.set_backend_greedy(False)
            self.ctx.truncate(0)
            self.ctx.prefill([int(t) for t in ids], 0, False)
            return self.ctx.logits(0)
        finally:
            self._release(token)

    def hidden_state(self, ids: list[int]) -> np.ndarray:
        """float32 [n_embd]: the base's post-final-norm hidden state at the last of ``ids`` (a
        cold prefill), the input the heads read there. Takes the context as ``next_logits`` does
        and leaves the KV cache empty."""
        token = object()
        self._claim(token)
        try:
            self._kv_tokens, self._kv_epoch = [], -1
            self.ctx.truncate(0)
            self.ctx.prefill([int(t) for t in ids], 0)
            h = np.array(self.ctx.hidden(0), dtype=np.float32)
            self.ctx.truncate(0)
            return h
        finally:
            self._release(token)

    # -- the loop ------------------------------------------------------------------------------
    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        *,
        proposer: Optional[Proposer] = None,
        stats: Optional[Stats] = None,
        reuse_prefix: bool = True,
        logits_out: Optional[list] = None,
        max_depth: Optional[int] = None,
    ) -> Iterator[list[int]]:
        """Yield the new tokens of each forward (prefill first, then one list per step).

        Stops after ``max_tokens`` tokens (clipped to what the context holds) or right after an
        end-of-generation token. The caller may stop iterating at any time. With ``reuse_prefix``
        the prompt's longest common prefix with the tokens already in the KV cache (the last
        call's prompt and committed output) is not decoded again, as llama-cpp-python does;
        ``stats.n_prompt_reused`` says how many tokens that saved. ``logits_out``, if given, gets
        the raw logits that chose each yielded token, in order (for logprobs; costs a copy per token).
        ``max_depth`` cuts the tree (0: plain decoding, one token per forward, in this same context).
        """
        stats = stats if stats is not None else Stats()
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: pass at least one token (e.g. BOS)")
        if n_prompt >= self.n_ctx:
            raise ContextOverflowError(f"prompt has {n_prompt} tokens but the context holds {self.n_ctx}: shorten it or raise n_ctx")
        def tree_depth(kv_split: bool) -> int:
            full = self.tree_kv_split if kv_split else self.tree
            return full.max_depth if max_depth is None else max(0, min(max_depth, full.max_depth))

        any_depth = max(tree_depth(False), tree_depth(True))
        if self.heads is None and proposer is None and any_depth > 0:
            raise TreeError("a tree needs candidates: load Medusa heads or pass a proposer")
        budget = min(max_tokens, self.n_ctx - n_prompt)
        stats.n_prompt = n_prompt
        stats.exact = self.guarantee
        n_heads = self.heads.n_heads if self.heads is not None else max(self.tree.max_depth, self.tree_kv_split.max_depth)
        stats.head_accepts = [0] * n_heads
        sampler = self._sampler(params)
        token = object()
        self._claim(token)
        t0 = time.perf_counter()
        try:
            # Prefill: the prompt after the reused prefix, in llama.cpp micro-batches of the
            # context's n_ubatch, then the first token from the last prompt position. When every
            # row is computed as a one-token decode (exact prefill), the last prompt token is
            # decoded on its own with embeddings on, which changes no logit and gives its hidden
            # state: the heads propose at the first step. Out of exact mode the same split serves
            # (the first token's row then is a one-token decode, verified like any other). In exact
            # mode without an exact prefill the first step verifies the root alone, and the
            # chunking stays llama-cpp-python's, so the first token equals its choice bit for bit.
            prompt = [int(t) for t in prompt]
            n_keep = self._reusable(prompt) if reuse_prefix else 0
            hidden = any_depth > 0 and (self.exact_prefill or not self.exact)
            self._kv_tokens = []  # unknown until the prefill has succeeded
            self.ctx.truncate(n_keep)
            self._threads_for(n_prompt)  # only the last micro-batch may be a single token
            self.ctx.set_backend_greedy(self._device_greedy(params, logits_out))
            self.ctx.prefill(prompt[n_keep:], n_keep, hidden)
            self._kv_tokens, self._kv_epoch = prompt, self.ctx.epoch
            stats.n_prompt_reused = n_keep
            stats.t_prefill = time.perf_counter() - t0
            root = self._pick(sampler, params, 0)
            if logits_out is not None:
                logits_out.append(self.ctx.logits(0))
            run = _Run(sampler, params, proposer, stats, logits_out, [root])
            generated = run.generated
            n_past, row = n_prompt, (0 if hidden else None)
            stats.n_generated = 1
            yield [root]
            self._check_owner(token)
            if self.model.is_eog(root) or budget <= 1:
                return
            while True:
                remaining = budget - len(generated)
                # the tree must fit both the tokens still wanted and the free KV cells; past the
                # split one-token decodes are slower, and a tree may pay where it did not before
                kv_split = n_past + 1 > exactness.SPLIT_FREE_CELLS
                depth = self.autotree.choose_depth(0 if row is None else tree_depth(kv_split))
                # near the end of the answer a CPU verifies only the depth still wanted (its cost
                # grows with the nodes); a GPU keeps the tree's shape, so llama.cpp reuses the
                # step's graph (and CUDA its captured graph) instead of rebuilding both
                want = depth if self._on_gpu else min(remaining - 1, depth)
                tree, shape = self._shape(kv_split, want, self.n_ctx - n_past)
                ts = time.perf_counter()
                committed, root, row, path = self.step(run, tree, shape, root, row, n_past)
                self.autotree.observe(tree, path, time.perf_counter() - ts, kv_split)
                self._kv_tokens.extend(committed)
                self._kv_epoch = self.ctx.epoch
                n_past += len(committed)
                stats.steps += 1
                stats.accepted_hist[len(path) - 1] += 1
                for d in range(len(path) - 1):
                    stats.head_accepts[d] += 1
                # an end-of-generation token can only be the new root (tree.accept stops there)
                new = (committed[1:] + [root])[:remaining]
                generated.extend(new)
                stats.n_generated = len(generated)
                stats.t_total = time.perf_counter() - t0
                yield new
                self._check_owner(token)
                if self.model.is_eog(root) or len(generated) >= budget:
                    return
        finally:
            stats.t_total = time.perf_counter() - t0
            if self.autotree.replan_due():
                self._replan()  # between generations: the next one uses the refined tree
            self._release(token)

    def step(self, run: "_Run", tree: Tree, shape, root: int, row: Optional[int], n_past: int):
        """One Medusa step from the state the module docstring describes (``n_past`` tokens cached,
        ``root`` chosen but not cached, output ``row`` the one that chose it; None: no hidden state,
        so ``tree`` must be root-only), verifying ``tree`` (native ``shape``; with tree="step:N" the
        tree grown from this step's proposals, no deeper than ``tree``). Returns the committed
        tokens (the root and the accepted candidates, now in the KV cache), the next root, the row
        that chose it, and the accepted node path."""
        stats = run.stats
        # propose: the heads' top-k at the position that produced the root
        t = time.perf_counter()
        if self.step_budget and tree.n_nodes > 1:  # "step:N": the tree grown from this step's proposals
            tree, shape, proposals = self._propose_step(tree.max_depth, row, run.generated, run.proposer, n_past)
        else:
            proposals = self._propose(tree, row, run.generated, run.proposer)
        stats.t_heads += time.perf_counter() - t
        # build tree: the root, then each node's token of its rank in its head's proposals
        tokens, shape = self._candidates(tree, shape, root, proposals, n_past, stats)
        # verify: one forward of every node, each attending to the cache and its ancestors
        t = time.perf_counter()
        self._threads_for(n_past + len(tokens))
        self.ctx.decode_tree(shape, tokens, n_past)
        self.ctx.synchronize()  # llama_decode may return before a GPU is done: time the forward
        stats.t_decode += time.perf_counter() - t
        # accept: the longest path of tokens plain decoding would choose, and the token after it
        path, root = self._accept(tree, tokens, run.sampler, run.params)
        if run.logits_out is not None:  # node path[j] chose the j-th new token
            run.logits_out.extend(self.ctx.logits(r) for r in path)
        # commit: keep the path's K/V; the row of its last node feeds the next step's heads
        row = self._commit(shape, tokens, path, n_past, stats)
        return [int(tokens[i]) for i in path], int(root), row, path

    def _candidates(self, tree: Tree, shape, root: int, proposals: np.ndarray, n_past: int, stats: Stats):
        """The tokens and native shape a step verifies: the tree's candidates below ``root``; a
        plain step past the split, with ``pad_kv_split``, the root and a scratch row after it (a 2-node
        chain whose second cell ``_commit`` drops), so row 0 is a batched row on all threads."""
        if tree.n_nodes > 1:
            return tree.candidate_tokens(root, proposals), shape
        if self.pad_kv_split and n_past + 1 > exactness.SPLIT_FREE_CELLS and self.n_ctx - n_past >= 2:
            stats.padded += 1
            return np.array([root, root], np.int32), self._chain_shape(2)
        return np.array([root], np.int32), shape

    def _commit(self, shape, tokens: np.ndarray, path: list[int], n_past: int, stats: Stats) -> int:
        """Keep the accepted path in the KV cache; return the output row that holds its last node.

        Node i of a tree sits in cell n_past + i, so an accepted path that leaves the tree's first
        chain (nodes 0, 1, 2, ...) keeps its cells with holes between them, which later tokens
        fill: cells out of position order. Attention sums over cells in cell order, so in exact
        mode the nodes after the first hole are decoded once more, right after the kept prefix
        (a chain of at most depth tokens), and the cache stays in the order plain decoding has."""
        keep = len(path)
        if self.exact:
            keep = 0
            while keep < len(path) and path[keep] == keep:
                keep += 1
        self.ctx.commit(shape, path[:keep], n_past)
        if keep == len(path):
            return path[-1]
        rest = np.ascontiguousarray(tokens[path[keep:]], dtype=np.int32)
        chain_shape = self._chain_shape(len(rest))
        t = time.perf_counter()
        self._threads_for(n_past + keep + len(rest))
        self.ctx.decode_tree(chain_shape, rest, n_past + keep)
        self.ctx.synchronize()
        self.ctx.commit(chain_shape, list(range(len(rest))), n_past + keep)
        stats.t_decode += time.perf_counter() - t
        stats.realigned += len(rest)
        return len(rest) - 1

    def _chain_shape(self, n: int):
        key = ("chain", n)
        if key not in self._shapes:
            self._shapes[key] = (None, native.TreeShape(list(range(n)), [[0]] * n))
        return self._shapes[key][1]

    def _reusable(self, prompt: list[int]) -> int:
        """Length of the common prefix of ``prompt`` and the cached tokens, leaving at least the
        last prompt token to decode (its logits pick the first new token)."""
        if self._kv_epoch != self.ctx.epoch:
            return 0
        n = 0
        for a, b in zip(self._kv_tokens, prompt[:-1]):
            if a != b:
                break
            n += 1
        return n

    # -- phases --------------------------------------------------------------------------------
    def _sampler(self, p: SamplingParams):
        """The sampler chain of one generation. With a grammar its state advances with every token
        the chain chooses, and the walk in ``_accept`` chooses only along the accepted path, in
        order: the state at each node is the one plain decoding has after the same tokens."""
        bias = list(p.logit_bias or ())
        if p.grammar is None:
            return native.Sampler(
                self.model.n_vocab, p.seed & 0xFFFFFFFF, p.temperature if p.acceptance == "exact" else 0.0,
                p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.penalty_last_n, p.frequency_penalty, p.presence_penalty,
                p.typical_p, logit_bias=bias,
            )
        return native.Sampler(
            self.model.n_vocab, p.seed & 0xFFFFFFFF, p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty,
            p.penalty_last_n, p.frequency_penalty, p.presence_penalty, p.typical_p,
            model=self.model, grammar=p.grammar, grammar_root=p.grammar_root, logit_bias=bias,
        )

    def check_grammar(self, grammar: str, root: str = "root") -> None:
        """ValueError naming the fault when llama.cpp cannot parse ``grammar`` for this model."""
        SamplingParams(temperature=0.0, grammar=grammar, grammar_root=root)
        native.Sampler(self.model.n_vocab, 0, 0.0, 40, 1.0, 0.0, 1.0, 64, model=self.model, grammar=grammar,
                       grammar_root=root)

    def _target(self, sampler, p: SamplingParams):
        """target_at(row) -> the token plain decoding chooses at output row ``row``: the row's
        argmax (greedy without penalties, grammar or bias; and typical acceptance, whose tokens
        past the root are judged by ``accept_typical``), else the sampler's draw, which records
        it: call it only along the accepted path, in order (``tree.accept`` does)."""
        if p.plain_argmax or p.acceptance == "typical":
            return self.ctx.argmax_row
        return lambda row: int(sampler.sample(self.ctx, row))

    def _pick(self, sampler, p: SamplingParams, row: int) -> int:
        """The token the base model chooses at output row ``row`` (the sampler draws and records it)."""
        return int(self._target(sampler, p)(row))

    def _propose(self, tree: Tree, row: int, generated: list, proposer: Optional[Proposer]) -> np.ndarray:
        if tree.n_nodes == 1:
            return np.zeros((0, 0), np.int32)
        k = tree.max_rank + 1
        if proposer is not None:
            out = np.asarray(proposer(generated, tree.max_depth, k), dtype=np.int32)
            if out.shape != (tree.max_depth, k):
                raise ValueError(f"proposer returned shape {out.shape}, expected {(tree.max_depth, k)}")
            return out
        # the root (the last generated token) is the base's choice at `row`; root-input heads read it
        ids, _ = self.heads.propose(self.ctx, row, k, tree.max_depth, generated[-1], logp=False)
        return ids

    #: Native shapes of per-step trees kept (the oldest dropped first): the trees vary from step
    #: to step, and the cache must not grow with them.
    MAX_STEP_SHAPES = 256

    def _propose_step(self, depth: int, row: int, generated: list, proposer: Optional[Proposer], n_past: int):
        """tree="step:N": the tree, native shape and proposals of one step: the heads' top-k and
        log-probabilities at ``row`` (a proposer returns both), the tree grown from them
        (tree.step_paths). It keeps the fixed trees' rules: at most N candidates, ``depth`` deep,
        within auto's node budget for this device (the exact region in exact mode, n_batch), the
        free KV cells and the context's sequences."""
        n_nodes = min(self.step_budget + 1, self.max_auto_nodes, self.n_ctx - n_past)
        if n_nodes <= 1:
            return (*self._shape(False, 0, 1), np.zeros((0, 0), np.int32))
        k = min(self.top_k, self.step_budget)
        if proposer is None:
            ids, logp = self.heads.propose(self.ctx, row, k, depth, generated[-1], logp=True)
        else:
            out = proposer(generated, depth, k)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TreeError('tree="step:N" grows its tree from log-probabilities: the proposer must return (ids, logp)')
            ids, logp = np.asarray(out[0], dtype=np.int32), np.asarray(out[1], dtype=np.float64)
            if ids.shape != (depth, k) or logp.shape != (depth, k):
                raise ValueError(f"proposer returned shapes {ids.shape} and {logp.shape}, expected {(depth, k)} each")
        paths = step_paths(logp, n_nodes, depth, self.ctx.n_seq_max)
        key = tuple(sorted(paths))
        if key not in self._step_shapes:
            while len(self._step_shapes) >= self.MAX_STEP_SHAPES:
                del self._step_shapes[next(iter(self._step_shapes))]
            t = Tree.from_paths(paths)
            self._step_shapes[key] = (t, native.TreeShape(t.depth.tolist(), [list(s) for s in t.seq_sets]))
        return (*self._step_shapes[key], ids)

    def _accept(self, tree: Tree, tokens: np.ndarray, sampler, p: SamplingParams) -> tuple[list[int], int]:
        """Accepted node path (root first) and the next root token: ``tree.accept``'s walk with
        plain decoding's choice at each node as the target (``_target``), which reads only the
        rows on the path. Typical acceptance with a temperature chooses its path by its own rule
        (the longest, then likeliest, of the candidates above its threshold: a search over the
        whole tree, which a walk that stops at the first mismatch would not reproduce), then stops
        it before any end-of-generation token as the walk does."""
        if p.acceptance == "typical" and p.temperature != 0:
            inv_t = 1.0 / abs(p.temperature)

            def probs_at(node: int) -> np.ndarray:
                z = self.ctx.logits(node).astype(np.float64) * inv_t
                z = np.exp(z - z.max())
                return z / z.sum()

            path = accept_typical(tree, tokens, probs_at, p.posterior_threshold, p.posterior_alpha)
            end = next((j for j in range(1, len(path)) if self.model.is_eog(int(tokens[path[j]]))), None)
            if end is not None:
                return path[:end], int(tokens[path[end]])
            return path, self.ctx.argmax_row(path[-1])
        return accept(tree, tokens, self._target(sampler, p), self.model.is_eog)
