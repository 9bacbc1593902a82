"""``medusa-edge bench``: Medusa side by side with what a user would run instead.

    medusa-edge bench [MODEL] [--heads H] [--prompts FILE.jsonl] [-n N] [--max-tokens T]
                      [--tree T ...] [--replay PROFILE] [-o DIR]

In one process, on one GGUF, for each prompt in turn (greedy, the chat template applied), every
method decodes the same prompt, in an order that rotates from prompt to prompt (a warm-up run
first), so slow drift of the machine falls on all of them alike:

- ``plain``: the engine with no tree (one token per forward) in the Medusa engine's own context;
  the reference every other method is compared with;
- ``medusa``: the engine's default tree (``auto``: planned for this device), and ``medusa[T]``
  for every ``--tree T``;
- ``llama-cpp-python``: llama-cpp-python's ``Llama.generate``, same GGUF and numerics settings
  (in exact mode on a CPU that means one-token decodes on one thread, which past 256 KV cells
  is the engine's plain decoding and below gives the same bits as its all-thread decodes); and,
  where that differs, ``llama-cpp-python (N threads)``: one-token decodes on all threads, what a
  user runs without the exactness guarantee;
- ``prompt-lookup``: llama-cpp-python with ``LlamaPromptLookupDecoding`` (its default
  max_ngram_size 2, num_pred_tokens 10), speculation that needs no heads.

Per method: tokens/s (median and quartiles over prompts, prefill excluded), the speed-up over
plain (median of per-prompt ratios, and total tokens over total seconds), tokens per step,
per-head acceptance, time per step split into decode / heads / other, and whether every output
equals plain decoding's. Results go to DIR as bench.json, bench.md and bench.png (tokens/s per
method, and the verification cost curve t(B)/t(1) the tuner measured).

``--replay PROFILE`` (``vicuna-7b`` or a JSON file of per-head, per-rank accuracies) is for
models whose heads agree with nothing (random-weight models of a large model's shapes): plain
decoding runs first, and then Medusa's candidates are drawn from that known continuation,
head i's rank-r guess right with the profile's probability and a wrong token otherwise. The
heads, if given, still run every step, so their cost is paid. Speeds so measured are the
engine's real costs with the profile's acceptance, labelled "replayed". Every ``--tree T`` is
replayed too.

``--no-exact`` leaves exact mode. On a device with no exact batch (a GPU: a batch's rows are not
computed bit for bit as one-token decodes) exact mode keeps Medusa plain; with this flag the
tuner measures the cost curve up to 64 tokens and plans a tree, and "equals plain" says how often
the outputs still agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from medusa_edge.core import tune
from medusa_edge.cli.args import add_model_args, add_numerics_args, medusa_from_args, model_kwargs


@dataclass
class Run:
    tokens: list
    seconds: float  # generation time, prefill excluded
    steps: int = 0
    t_decode: float = 0.0
    t_heads: float = 0.0
    head_accepts: list = field(default_factory=list)


@dataclass
class Method:
    name: str
    run: Callable[[list, int], Run]  # (prompt ids, max tokens) -> Run
    kind: str = "engine"  # engine | llama-cpp-python
    replayed: bool = False


def engine_method(name: str, engine, max_depth: Optional[int] = None, proposer=None, replayed: bool = False) -> Method:
    from medusa_edge.core.engine import SamplingParams, Stats

    def run(ids: list, max_tokens: int) -> Run:
        st = Stats()
        out = []
        for new in engine.generate(ids, SamplingParams(temperature=0.0), max_tokens, stats=st, reuse_prefix=False,
                                   max_depth=max_depth, proposer=proposer):
            out.extend(new)
        return Run(out, st.t_total - st.t_prefill, st.steps, st.t_decode, st.t_heads, list(st.head_accepts))

    return Method(name, run, "engine", replayed)


def llama_cpp_method(name: str, engine, n_ctx: int, draft=None, **kwargs) -> Method:
    from medusa_edge.core.exactness import llama_cpp_baseline

    # logits_all with a draft model: llama-cpp-python 0.3.36 sizes its score buffer from the logits_all
    # argument (n_batch rows) although a draft model turns logits_all on, so a prompt longer than
    # n_batch overflows it (seen: a 551-token MT-Bench prompt)
    llm = llama_cpp_baseline(engine, n_ctx=n_ctx, draft_model=draft, logits_all=draft is not None, **kwargs)

    def run(ids: list, max_tokens: int) -> Run:
        out: list = []
        llm.reset()  # a generator left at max_tokens keeps its tokens; start each prompt from nothing
        t0 = time.perf_counter()
        t_first = None
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(int(tok))
            if engine.model.is_eog(int(tok)):
                break
            if len(out) >= max_tokens:
                break
        t1 = time.perf_counter()
        return Run(out, t1 - (t_first or t1))

    return Method(name, run, "llama-cpp-python")


class ReplayProposer:
    """Candidates drawn from a known continuation: head i's rank-r guess is the true token with
    probability ``profile[i][r]`` (independently per head and step), every other rank a wrong
    token. ``heads``/``ctx`` (optional): the real heads run too, so their cost is paid."""

    def __init__(self, continuation: list, profile, n_vocab: int, seed: int = 0, heads_cost: Optional[Callable] = None):
        self.cont = list(continuation)
        self.profile = np.asarray(profile, dtype=np.float64)
        self.n_vocab = n_vocab
        self.rng = np.random.default_rng(seed)
        self.heads_cost = heads_cost

    def __call__(self, generated: list, n_heads: int, k: int) -> np.ndarray:
        if self.heads_cost is not None:
            self.heads_cost(n_heads, k)
        j = len(generated) - 1  # the root's index in the continuation
        out = self.rng.integers(0, self.n_vocab, size=(n_heads, k)).astype(np.int32)
        for i in range(n_heads):
            t = j + 1 + i
            truth = self.cont[t] if 0 <= t < len(self.cont) and self.cont[:j + 1] == generated[: j + 1] else -1
            p = self.profile[i, :k] if i < len(self.profile) else np.zeros(k)
            u = self.rng.random()
            cum = np.cumsum(p)
            r = int(np.searchsorted(cum, u, side="right"))
            for c in range(k):  # no accidental hits: wrong ranks never carry the truth
                while out[i, c] == truth:
                    out[i, c] = self.rng.integers(0, self.n_vocab)
            if truth >= 0 and r < k:
                out[i, r] = truth
        return out


def cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_profile(spec: str) -> list:
    if spec in ("vicuna-7b", "vicuna7b"):
        return tune.VICUNA_7B_PROFILE
    with open(spec) as f:
        prof = json.load(f)
    if not (isinstance(prof, list) and prof and all(isinstance(r, list) and r for r in prof)):
        raise ValueError(f"{spec}: a profile is a JSON list of per-head lists of per-rank accuracies")
    if any(not 0 <= float(a) <= 1 for r in prof for a in r) or any(sum(map(float, r)) > 1 + 1e-6 for r in prof):
        raise ValueError(f"{spec}: accuracies must lie in [0, 1] and sum to at most 1 per head")
    return prof


def summarize(name: str, runs: list, plain_runs: list, replayed: bool) -> dict:
    tps = [len(r.tokens) / r.seconds for r in runs if r.seconds > 0 and r.tokens]
    plain_tps = [len(p.tokens) / p.seconds for p in plain_runs if p.seconds > 0 and p.tokens]
    ratios = [(len(r.tokens) / r.seconds) / (len(p.tokens) / p.seconds)
              for r, p in zip(runs, plain_runs) if r.seconds > 0 and p.seconds > 0 and r.tokens and p.tokens]
    tot_tok, tot_s = sum(len(r.tokens) for r in runs), sum(r.seconds for r in runs)
    p_tok, p_s = sum(len(p.tokens) for p in plain_runs), sum(p.seconds for p in plain_runs)
    steps = sum(r.steps for r in runs)
    # tokens made by steps: the first token of each answer comes from the prefill
    step_tokens = sum(max(len(r.tokens) - 1, 0) for r in runs)
    acc = None
    if steps and runs[0].head_accepts:
        acc = [round(sum(r.head_accepts[i] for r in runs) / steps, 4) for i in range(len(runs[0].head_accepts))]
    mismatch = [i for i, (r, p) in enumerate(zip(runs, plain_runs)) if r.tokens != p.tokens]
    q = statistics.quantiles(tps, n=4) if len(tps) >= 2 else [tps[0]] * 3 if tps else [0.0] * 3
    return {
        "method": name, "replayed": replayed, "prompts": len(runs), "tokens": tot_tok, "seconds": round(tot_s, 4),
        "tokens_per_s_median": round(statistics.median(tps), 2) if tps else 0.0,
        "tokens_per_s_p25": round(q[0], 2), "tokens_per_s_p75": round(q[2], 2),
        "tokens_per_s_total": round(tot_tok / tot_s, 2) if tot_s else 0.0,
        "speedup_median": round(statistics.median(ratios), 4) if ratios else None,
        "speedup_total": round((tot_tok / tot_s) / (p_tok / p_s), 4) if tot_s and p_s and p_tok else None,
        "plain_tokens_per_s_median": round(statistics.median(plain_tps), 2) if plain_tps else 0.0,
        "tokens_per_step": round(step_tokens / steps, 4) if steps else None,
        "head_acceptance": acc,
        "ms_per_step": {
            "decode": round(1e3 * sum(r.t_decode for r in runs) / steps, 4),
            "heads": round(1e3 * sum(r.t_heads for r in runs) / steps, 4),
            "other": round(1e3 * (tot_s - sum(r.t_decode + r.t_heads for r in runs)) / steps, 4),
        } if steps else None,
        "equal_to_plain": not mismatch, "mismatched_prompts": mismatch,
    }


def run_bench(methods: list, prompts: list, max_tokens: int, progress: bool = True, warmup: bool = True,
              on_plain: Optional[Callable] = None) -> dict:
    """Every method on every prompt, order rotating per prompt; methods[0] is the plain reference.
    ``on_plain(i, run)`` sees plain decoding's run of prompt i before the others run (replay)."""
    from tqdm import tqdm

    if warmup:
        for m in methods:
            m.run(prompts[0][: 32] or prompts[0], 8)
    runs = {m.name: [] for m in methods}
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run", dynamic_ncols=True, disable=not progress)
    for i, ids in enumerate(prompts):
        plain = methods[0].run(ids, max_tokens)
        bar.update(1)
        if on_plain is not None:
            on_plain(i, plain)
        rest = methods[1:]
        k = i % max(len(rest), 1)
        order = rest[k:] + rest[:k]
        got = {methods[0].name: plain}
        for m in order:
            got[m.name] = m.run(ids, max_tokens)
            bar.update(1)
        for m in methods:
            runs[m.name].append(got[m.name])
        bar.set_postfix({m.name[:12]: f"{len(got[m.name].tokens) / max(got[m.name].seconds, 1e-9):.0f}" for m in methods[:3]})
    bar.close()
    plain_runs = runs[methods[0].name]
    return {"methods": [summarize(m.name, runs[m.name], plain_runs, m.replayed) for m in methods]}


def markdown(result: dict) -> str:
    lines = [f"model `{os.path.basename(result['model'])}`, {result['prompts']} prompts x {result['max_tokens']} tokens, "
             f"greedy, {result['device']}", "",
             "| method | tok/s (median) | p25-p75 | speed-up (median) | speed-up (total) | tokens/step | ms/step decode/heads/other | equals plain |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        split = m["ms_per_step"]
        lines.append(
            f"| {m['method']}{' (replayed)' if m['replayed'] else ''} | {m['tokens_per_s_median']:.1f} | "
            f"{m['tokens_per_s_p25']:.0f}-{m['tokens_per_s_p75']:.0f} | {m['speedup_median'] or 0:.2f}x | "
            f"{m['speedup_total'] or 0:.2f}x | {m['tokens_per_step'] or '-'} | "
            + (f"{split['decode']:.2f} / {split['heads']:.2f} / {split['other']:.2f}" if split else "-")
            + f" | {'yes' if m['equal_to_plain'] else 'NO (' + str(len(m['mismatched_prompts'])) + ' prompts)'} |")
    c = result.get("costs")
    if c:
        lines += ["", "verification cost t(B)/t(1): " + ", ".join(f"B={b} {r:.2f}" for b, r in zip(c["batch"], c["ratio"]))]
    if result.get("tree") is not None:
        lines += [f"medusa tree: {len(result['tree']) + 1} nodes {result['tree']} at the start"
                  + (f", {len(result['tree_final']) + 1} nodes {result['tree_final']} at the end (planned again from "
                     "live acceptance and step costs)" if result.get("tree_final") != result["tree"] else "")
                  + (f"; live tree-step cost factor {result['live_tree_cost_factor']:.2f}"
                     if result.get("live_tree_cost_factor") else "")
                  + (f"; past 256 KV cells (one-token decodes on one thread): {len(result['tree_long_final']) + 1} nodes "
                     f"{result['tree_long_final']}" if result.get("tree_long_final", result.get("tree_final")) != result.get("tree_final") else "")]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ms = result["methods"]
    axes[0].barh([m["method"] + (" (replayed)" if m["replayed"] else "") for m in ms], [m["tokens_per_s_median"] for m in ms],
                 xerr=[[m["tokens_per_s_median"] - m["tokens_per_s_p25"] for m in ms],
                       [m["tokens_per_s_p75"] - m["tokens_per_s_median"] for m in ms]], color="tab:blue")
    axes[0].set_xlabel("tokens/s (median over prompts, quartiles)")
    axes[0].invert_yaxis()
    c = result.get("costs")
    if c:
        axes[1].plot(c["batch"], c["ratio"], "o-", label="measured t(B)/t(1)")
        axes[1].plot(c["batch"], c["batch"], ":", color="gray", label="linear")
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log", base=2)
        axes[1].set_xlabel("tokens verified in one forward (B)")
        axes[1].set_ylabel("cost relative to one token")
        axes[1].legend()
    fig.suptitle(f"{os.path.basename(result['model'])}: {result['prompts']} prompts x {result['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="medusa-edge bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompts", help="JSONL prompts: prompt/text/turns/messages per line (default: the 10 built-in "
                    "questions of 'medusa-edge verify'; for figures comparable with published ones pass MT-Bench's)")
    ap.add_argument("-n", "--num-prompts", type=int, default=20, help="prompts to run (default 20, or all if fewer)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default 128)")
    ap.add_argument("--tree", action="append", default=[], help="also run Medusa with this tree (repeatable)")
    ap.add_argument("--replay", help="vicuna-7b or a JSON profile: candidates from plain decoding's continuation (see above)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python's plain and prompt-lookup runs")
    ap.add_argument("--no-chat", action="store_true", help="use prompts as raw text, without the chat template")
    add_numerics_args(ap)
    ap.add_argument("-o", "--output", default="bench-results", help="directory for bench.json, bench.md, bench.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from medusa_edge._loader import native
    from medusa_edge.api import Medusa, chat_prompt_tokens, prompt_tokens
    from medusa_edge.cli.verify import load_prompts  # its built-in questions without --prompts
    from medusa_edge.core.autotree import AutoTree
    from medusa_edge.core.engine import Engine
    from medusa_edge.errors import MedusaError
    from medusa_edge.training.prompts import prompt_messages, prompt_text

    try:
        prompts = load_prompts(args.prompts, None)[: args.num_prompts]
        profile = load_profile(args.replay) if args.replay else None
        # replay: a fixed tree (never run: plain decoding is max_depth=0), so this engine's one-token
        # decodes keep the threads exact mode gives them beside trees, as the replayed engines' do
        llm = medusa_from_args(args, tree=None if not args.replay else "chain:1")
    except (MedusaError, ValueError, TypeError, OSError) as e:
        print(f"medusa-edge bench: error: {e}", file=sys.stderr)
        return 1
    eng = llm.engine
    m = eng.model

    def ids_of(p):
        if args.no_chat:
            return prompt_tokens(m, prompt_text(p))
        return chat_prompt_tokens(m, prompt_messages(p), llm.chat_template)

    ids = [ids_of(p) for p in prompts]
    kw = model_kwargs(args)
    methods = [engine_method("plain", eng, max_depth=0)]
    on_plain = None
    costs, tree = eng.costs, (eng.plan.paths if eng.plan else [list(p) for p in eng.tree.paths])
    tree_kv_split = eng.plan_kv_split.paths if eng.plan_kv_split else [list(p) for p in eng.tree_kv_split.paths]
    if profile is not None:
        # the tree the engine's tree="auto" plans (AutoTree, as Engine tunes) from this device's costs
        # and the profile's accuracies in place of the heads'; candidates replayed through the proposer
        at = AutoTree(eng.max_auto_nodes, eng.max_auto_leaves)
        prof = AutoTree.prior(profile, len(profile))
        key = tune.cache_key(f"replay|{eng.model_path}|{eng.n_threads_batch}|{eng.flash_attn}|{eng.ctx.type_k}|{eng.ctx.type_v}",
                             None, at.max_nodes, eng.ctx.n_ctx)
        costs = at.start_measured(key, eng.ctx, native, m, eng.heads, prof, n_threads=eng.n_threads,
                                  n_threads_kv_split=eng.n_threads_kv_split)
        tree = tree_kv_split = at.replan(len(profile))
        replay_eng = Engine(eng.model_path, None, tree=tree, **kw) if tree else None
        # one proposer per replayed method, each seeded by the prompt: every tree sees its own draws,
        # whatever ran before it; the warm-up knows no continuation
        proposers: dict = {}

        def replayed(name):
            proposers[name] = ReplayProposer([], prof, m.n_vocab)
            return lambda g, n, k: proposers[name](g, n, k)

        def on_plain(i, run):
            heads_cost = None
            if eng.heads is not None:
                heads_cost = lambda n, k: eng.heads.propose_hidden(np.zeros(m.n_embd, np.float32), k, n, 0)  # noqa: E731
            for name in proposers:
                proposers[name] = ReplayProposer(run.tokens, prof, m.n_vocab, seed=i, heads_cost=heads_cost)

        if replay_eng is not None:
            methods.append(engine_method("medusa", replay_eng, proposer=replayed("medusa"), replayed=True))
        for t in args.tree:
            name = f"medusa[{t}]"
            methods.append(engine_method(name, Engine(eng.model_path, None, tree=t, **kw), proposer=replayed(name), replayed=True))
    else:
        methods.append(engine_method("medusa", eng))
        for t in args.tree:
            methods.append(engine_method(f"medusa[{t}]", Medusa(eng.model_path, eng.heads_path, tree=t, **kw).engine))
    if not args.no_llama_cpp:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        methods.append(llama_cpp_method("llama-cpp-python", eng, args.ctx_size))
        if eng.n_threads_kv_split != eng.n_threads_batch:
            # what a user runs without exactness: one-token decodes on all threads too (faster on a
            # CPU; its text may differ from plain decoding's at near-ties, docs/design.md section 5)
            methods.append(llama_cpp_method(f"llama-cpp-python ({eng.n_threads_batch} threads)", eng, args.ctx_size,
                                            n_threads=eng.n_threads_batch))
        methods.append(llama_cpp_method("prompt-lookup", eng, args.ctx_size, LlamaPromptLookupDecoding()))
    result = run_bench(methods, ids, args.max_tokens, progress=not args.quiet, on_plain=on_plain)
    result.update({
        "model": eng.model_path, "heads": eng.heads_path, "prompts": len(ids), "max_tokens": args.max_tokens,
        "prompt_file": os.path.abspath(args.prompts) if args.prompts else None, "replay_profile": profile,
        "device": f"{eng.n_threads_batch} threads, flash attention {'on' if eng.flash_attn else 'off'}, "
                  f"KV {args.cache_type_k}/{args.cache_type_v}, "
                  f"exact batch {eng.exact_batch or '-'}, {cpu_name()}" + (f", {args.n_gpu_layers} layers on GPU" if args.n_gpu_layers else ""),
        "tree": tree, "costs": dict(asdict(costs), ratio=costs.ratio()) if costs else None,
        # the auto tree is planned again from live acceptance every 64 steps: where it ended
        "tree_final": eng.plan.paths if eng.plan and not profile else tree,
        "expected_speedup": eng.plan.expected_speedup if eng.plan and not profile else None,
        # past 256 KV cells exact mode decodes single tokens on one thread on a CPU, and plans a tree for that
        "tree_long_final": eng.plan_kv_split.paths if eng.plan_kv_split and not profile else tree_kv_split,
        # tune.LiveCosts: how much more a tree step's extra work cost live than measured (1.0: as measured)
        "live_tree_cost_factor": round(eng.live_costs.factor(), 3) if eng.live_costs and not profile else None,
    })
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.output, "bench.md"), "w") as f:
        f.write(md)
    try:
        plot(result, os.path.join(args.output, "bench.png"))
    except ImportError:
        print("medusa-edge bench: matplotlib is not installed, no plot", file=sys.stderr)
    print(md)
    print(f"results: {os.path.abspath(args.output)}/bench.json, bench.md, bench.png")
    return 0 if all(x["equal_to_plain"] for x in result["methods"] if x["method"].startswith("medusa")) else 2


if __name__ == "__main__":
    sys.exit(main())
