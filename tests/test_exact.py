"""Bit-exact Medusa on quantized models. Greedy and seeded output identical to plain
decoding, token for token; the verify batch computes every row bit for bit as a one-token decode."""

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from convert.base import quantize_gguf
from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge.default_model import demo_model_path
from medusa_edge.core.exactness import first_divergence, llama_cpp_baseline, probe
from medusa_edge.testing import _WORDS, truth_proposer, write_llama_gguf, write_random_heads

N_PROMPTS, N_TOKENS = 20, 128
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def quant_models(tmp_path_factory):
    """A random-weight Llama quantized by llama.cpp's own quantizer, with random heads."""
    d = tmp_path_factory.mktemp("quant")
    src = write_llama_gguf(str(d / "base-f32.gguf"), n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    out = {}
    for q in ("Q4_0", "Q8_0"):
        p = d / f"base-{q}.gguf"
        quantize_gguf(Path(src.path), p, q)
        write_random_heads(str(d / f"base-{q}.medusa.gguf"), src, n_heads=4, seed=5, head_type="f32")
        out[q] = str(p)
    return out


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 14)))) for _ in range(n)]


def run(engine, ids, params, n, proposer=None, stats=None):
    out = []
    for new in engine.generate(ids, params, n, proposer=proposer, stats=stats, reuse_prefix=False):
        out.extend(new)
    return out


def run_plain(engine, ids, n, stats=None):
    """The engine's own plain decoding (no tree), as its exact mode decodes single tokens."""
    return [t for new in engine.generate(ids, GREEDY, n, reuse_prefix=False, max_depth=0, stats=stats) for t in new]


def llama_cpp_greedy(base, model, ids, n):
    """llama-cpp-python's greedy continuation of ``ids``: at most ``n`` tokens, up to end of generation."""
    out = []
    for t in base.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == n or model.is_eog(t):
            break
    return out


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_exact_region_is_measured(quant_models, quant):
    e = Engine(quant_models[quant], n_ctx=256, tree="chain:0")
    assert e.flash_attn and e.exact_batch == 63  # ggm-cpu's tiled flash attention starts at 64 rows
    assert e.ctx.n_ubatch == 63


@pytest.mark.parametrize("quant,tree", [("Q4_0", "chain:4"), ("Q8_0", "mc_sim_7b_63"), ("Q4_0", "mc_sim_7b_63")])
def test_greedy_identical_to_plain_decoding(quant_models, quant, tree, capsys):
    """20 prompts x 128 tokens, with a proposer that is often right (at ranks 0-2, so accepted
    paths leave the first chain and the cache gets holes) and one that is rarely right."""
    path = quant_models[quant]
    plain = Engine(path, tree="chain:0", n_ctx=512)
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree=tree, n_ctx=512)
    assert med.tree.n_nodes <= med.exact_batch
    base = llama_cpp_baseline(plain, n_ctx=512)
    rng = np.random.default_rng(0)
    often, rarely = Stats(), Stats()
    for text in prompts(N_PROMPTS):
        ids = plain.model.tokenize(text, True, False)
        ref = run(plain, ids, GREEDY, N_TOKENS)
        lcp = llama_cpp_greedy(base, plain.model, ids, N_TOKENS)
        assert lcp == ref, f"plain decoding differs from llama-cpp-python at {first_divergence(lcp, ref)}"
        for p_right, st in ((0.9, often), (0.1, rarely)):
            got = run(med, ids, GREEDY, N_TOKENS, proposer=truth_proposer(ref, rng, p_right, 2), stats=st)
            assert got == ref, f"{quant} {tree}: diverged at token {first_divergence(got, ref)} of {text!r}"
    with capsys.disabled():
        print(f"\n[exact {quant} {tree}] {N_PROMPTS}x{N_TOKENS} identical; tokens/step often {often.tokens_per_step:.2f}, "
              f"rarely {rarely.tokens_per_step:.2f}")
    assert often.tokens_per_step > 2.0 and rarely.tokens_per_step < 1.5


def test_seeded_sampling_identical_to_plain_decoding(quant_models):
    path = quant_models["Q8_0"]
    plain = Engine(path, tree="chain:0", n_ctx=512)
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="chain:4", n_ctx=512)
    rng = np.random.default_rng(1)
    st = Stats()
    for i, text in enumerate(prompts(10, seed=1)):
        params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=100 + i)
        ids = plain.model.tokenize(text, True, False)
        ref = run(plain, ids, params, N_TOKENS)
        got = run(med, ids, params, N_TOKENS, proposer=truth_proposer(ref, rng, 0.9, 0), stats=st)
        assert got == ref, f"diverged at token {first_divergence(got, ref)}"
    assert st.tokens_per_step > 2.0


def test_demo_model_greedy_identical(capsys):
    path = demo_model_path()
    plain = Engine(path, tree="chain:0", n_ctx=512)
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="heads", n_ctx=512)  # its stored 7-node tree
    st = Stats()
    for q in ["What colour is the sky?", "Tell me a story about a fox.", "What is 3 plus 4?", "Name three animals."]:
        ids = plain.model.tokenize(f"USER: {q}\nASSISTANT:", True, True)
        ref = run(plain, ids, GREEDY, N_TOKENS)
        assert run(med, ids, GREEDY, N_TOKENS, stats=st) == ref
    assert st.tokens_per_step > 1.5


def _tree_rows_vs_paths(path, flash_attn, exact, n_nodes=63):
    """Max |logit difference| between each node of one tree decode (``n_nodes`` nodes) and the same
    node's path decoded one token at a time."""
    e = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=256, flash_attn=flash_attn, exact=exact)
    seq = Engine(path, tree="chain:0", n_ctx=256, flash_attn=flash_attn, exact=exact)
    rng = np.random.default_rng(2)
    prompt = e.model.tokenize("the water is very old and", True, False)
    tree, shape = e._shape(False, e.tree.max_depth, n_nodes)
    tokens = rng.integers(3, e.model.n_vocab, size=tree.n_nodes).astype(np.int32)
    e.ctx.truncate(0)
    e.ctx.prefill(prompt, 0, False)
    e.ctx.decode_tree(shape, tokens, len(prompt))
    worst = 0.0
    for node in range(tree.n_nodes):
        seq.ctx.truncate(0)
        seq.ctx.prefill(prompt, 0, False)
        for i, j in enumerate(tree.path_to(node)):
            seq.ctx.decode_tree(seq._shape(False, 0, 1)[1], tokens[j : j + 1], len(prompt) + i)
        worst = max(worst, float(np.abs(e.ctx.logits(node) - seq.ctx.logits(0)).max()))
    return worst


def test_tree_rows_bit_identical_and_the_check_can_tell(quant_models):
    """In the exact region (63 nodes, flash attention) every node's logits equal its path's
    one-token decodes exactly; one node more (ggml-cpu's tiled flash attention), outside the
    region, and the same check sees differences: the tests can tell."""
    assert _tree_rows_vs_paths(quant_models["Q8_0"], flash_attn=True, exact=True) == 0.0
    assert _tree_rows_vs_paths(quant_models["Q8_0"], flash_attn=True, exact=False, n_nodes=64) > 0.0


def test_probe_cache_and_f32(quant_models, models, tmp_path, monkeypatch):
    """The probe's answer is cached per model file and settings; f32 weights have no exact region
    on the CPU (their batched matmul rounds differently), which the engine says once at load."""
    from medusa_edge.core import exactness
    from medusa_edge.guards.hw import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    m = load_model(quant_models["Q4_0"])
    kw = dict(n_threads=2, flash_attn=1, f32_kv=False, n_gpu_layers=0)
    assert exactness.exact_batch(m, quant_models["Q4_0"], **kw) == (63, True)
    assert (tmp_path / "medusa-edge" / "exact-batch.json").is_file()
    calls = []
    monkeypatch.setattr(exactness, "probe", lambda *a, **k: calls.append(1) or (1, True))
    assert exactness.exact_batch(m, quant_models["Q4_0"], **kw) == (63, True) and not calls
    f32 = load_model(models["f32"].path)
    assert probe(f32, n_threads=2, flash_attn=1, f32_kv=False)[0] == 1


def test_long_context_identical_and_single_thread_split_matters(quant_models, monkeypatch):
    """Past 256 KV cells ggml-cpu splits a one-token decode's attention across threads; exact mode
    with a tree runs one-token decodes on one thread. A 300-token prompt plus 128 tokens stays
    identical to the same engine's plain decoding, and the probe sees the difference when
    one-token decodes get two threads (the check can tell)."""
    from medusa_edge.core import exactness
    from medusa_edge.guards.hw import load_model

    path = quant_models["Q8_0"]
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=1024, n_threads=2)
    assert med.n_threads_kv_split == 1 and med.n_threads == med.n_threads_batch == 2
    rng = np.random.default_rng(7)
    ids = [1] + [int(t) for t in rng.integers(3, med.model.n_vocab, 300)]
    ref = run_plain(med, ids, N_TOKENS)
    st = Stats()
    assert run(med, ids, GREEDY, N_TOKENS, proposer=truth_proposer(ref, rng, 0.9, 2), stats=st) == ref
    assert st.tokens_per_step > 2.0
    m = load_model(path)
    assert probe(m, n_threads=2, flash_attn=1, f32_kv=False)[0] == 63
    monkeypatch.setattr(exactness, "single_token_threads", lambda n, cells, split=True: n)
    assert probe(m, n_threads=2, flash_attn=1, f32_kv=False)[0] < 63


def test_split_boundary_all_threads_up_to_256_cells(quant_models):
    """Where exactness.single_token_threads draws its line: a two-thread one-token decode equals its row
    of a batch bit for bit while the KV cache holds at most 256 cells; at 257 cells it differs
    (ggml-cpu's split-KV attention), and a one-thread decode there still equals the row."""
    from medusa_edge._loader import native
    from medusa_edge.core.exactness import SPLIT_FREE_CELLS, single_token_threads
    from medusa_edge.guards.hw import load_model

    assert single_token_threads(2, SPLIT_FREE_CELLS) == 2 and single_token_threads(2, SPLIT_FREE_CELLS + 1) == 1
    m = load_model(quant_models["Q8_0"])
    ctx = native.Context(m, 1024, 64, 2, 1, False, 1, 0, 2)
    rng = np.random.default_rng(4)
    n0 = SPLIT_FREE_CELLS - 2
    ctx.prefill([int(t) for t in rng.integers(3, m.n_vocab, n0)], 0, False)
    chain = rng.integers(3, m.n_vocab, 3).astype(np.int32)  # cells after each: 255, 256, 257
    ctx.decode_tree(native.TreeShape([0, 1, 2], [[0]] * 3), chain, n0)
    rows = [ctx.logits(r) for r in range(3)]
    one = native.TreeShape([0], [[0]])
    ctx.truncate(n0)
    ctx.set_threads(2, 2)
    single = []
    for i in range(3):
        ctx.decode_tree(one, chain[i : i + 1], n0 + i)
        single.append(ctx.logits(0))
    assert np.array_equal(single[0], rows[0]) and np.array_equal(single[1], rows[1])
    assert not np.array_equal(single[2], rows[2])
    ctx.truncate(n0 + 2)
    ctx.set_threads(1, 2)
    ctx.decode_tree(one, chain[2:3], n0 + 2)
    assert np.array_equal(ctx.logits(0), rows[2])


def test_generation_across_the_split_identical(quant_models):
    """An answer that starts below 256 KV cells (one-token decodes on both threads) and ends past
    them equals llama-cpp-python's with one-token decodes on one thread there, plainly and with a
    branching tree. Plain steps past 256 cells padded to a 2-token batch on both threads (a scratch
    row after the token; what measured costs choose where it is faster) are still bit-identical to
    those one-thread decodes."""
    path = quant_models["Q8_0"]
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=1024, n_threads=2)
    assert not med.pad_kv_split and med.n_threads_kv_split == 1  # unmeasured (a fixed tree): one thread
    med.pad_kv_split = True
    base = llama_cpp_baseline(med, n_ctx=1024)
    rng = np.random.default_rng(11)
    ids = [1] + [int(t) for t in rng.integers(3, med.model.n_vocab, 40)]
    st = Stats()
    run_plain(med, ids, 8, st)
    assert med.ctx.n_threads == 2 and st.padded == 0
    ids = [1] + [int(t) for t in rng.integers(3, med.model.n_vocab, 200)]
    st = Stats()
    ref = run_plain(med, ids, N_TOKENS, st)
    assert st.padded == len(ids) + N_TOKENS - 1 - 256  # every step whose KV cache passes 256 cells
    lcp = llama_cpp_greedy(base, med.model, ids, N_TOKENS)
    assert lcp == ref, f"plain decoding differs from llama-cpp-python at {first_divergence(lcp, ref)}"
    st = Stats()
    assert run(med, ids, GREEDY, N_TOKENS, proposer=truth_proposer(ref, rng, 0.9, 2), stats=st) == ref
    assert st.tokens_per_step > 2.0


def test_plain_decoding_without_heads_keeps_all_threads_past_the_split(quant_models):
    """A GGUF without heads has no tree whose rows its one-token decodes must match: past 256 KV
    cells they keep all threads, as llama.cpp's, and the text equals llama-cpp-python's on all
    threads bit for bit (300-token prompt, 128 tokens). With a tree the split rule returns."""
    path = quant_models["Q8_0"]
    bare = Engine(path, n_ctx=1024, n_threads=2)
    assert bare.heads is None and bare.n_threads_kv_split == 2 and bare.guarantee == "bitwise"
    rng = np.random.default_rng(14)
    ids = [1] + [int(t) for t in rng.integers(3, bare.model.n_vocab, 300)]
    ref = run(bare, ids, GREEDY, N_TOKENS)
    assert bare.ctx.n_threads == 2
    base = llama_cpp_baseline(bare, n_ctx=1024)
    assert base.context_params.n_threads == 2
    lcp = llama_cpp_greedy(base, bare.model, ids, N_TOKENS)
    assert lcp == ref, f"plain decoding differs from llama-cpp-python on 2 threads at {first_divergence(lcp, ref)}"
    bare.use_trees("chain:2")  # a tree (fed by a proposer) brings the one-thread rule back
    assert bare.n_threads_kv_split == 1


def test_quantized_kv_cache_all_threads_and_identical(quant_models):
    """A Q8_0 KV cache (type_k/type_v, as llama-cpp-python takes them) never takes ggml-cpu's
    split-KV path, so one-token decodes keep all threads past 256 cells; the answer still equals
    llama-cpp-python's with the same cache types, plainly and with a branching tree. A quantized V
    cache without flash attention, or a type that is no ggml type, is one clear error."""
    from medusa_edge import ModelLoadError

    path, q8 = quant_models["Q8_0"], 8
    plain = Engine(path, tree="chain:0", n_ctx=1024, n_threads=2, type_k=q8, type_v=q8)
    med = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=1024, n_threads=2,
                 type_k=q8, type_v=q8)
    assert plain.ctx.type_k == plain.ctx.type_v == q8 and plain.n_threads_kv_split == 2 and med.exact_batch >= 32
    rng = np.random.default_rng(12)
    ids = [1] + [int(t) for t in rng.integers(3, plain.model.n_vocab, 200)]
    ref = run(plain, ids, GREEDY, N_TOKENS)
    assert plain.ctx.n_threads == 2
    base = llama_cpp_baseline(plain, n_ctx=1024)
    lcp = llama_cpp_greedy(base, plain.model, ids, N_TOKENS)
    assert lcp == ref, f"plain decoding differs from llama-cpp-python at {first_divergence(lcp, ref)}"
    assert run(med, ids, GREEDY, N_TOKENS, proposer=truth_proposer(ref, rng, 0.9, 2)) == ref
    with pytest.raises(ModelLoadError, match="flash_attn"):
        Engine(path, tree="chain:0", n_ctx=256, n_threads=2, type_k=q8, type_v=q8, flash_attn=False)
    with pytest.raises(ModelLoadError, match="not a ggml type"):
        Engine(path, tree="chain:0", n_ctx=256, n_threads=2, type_k=99)


def test_tree_per_regime_follows_the_cache(quant_models):
    """use_trees(short, long): steps while the KV cache is short use the first tree (here none),
    steps past 256 cells the second; the answer still equals plain decoding's. A tree with more
    leaves than the context has sequences is refused."""
    from medusa_edge import TreeError

    path = quant_models["Q8_0"]
    e = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="chain:3", n_ctx=1024, n_threads=2)
    e.use_trees("chain:0", "chain:3")
    assert e.n_threads_kv_split == 1
    rng = np.random.default_rng(13)
    ids = [1] + [int(t) for t in rng.integers(3, e.model.n_vocab, 200)]
    ref = run_plain(e, ids, N_TOKENS)
    st = Stats()
    assert run(e, ids, GREEDY, N_TOKENS, proposer=truth_proposer(ref, rng, 1.0, 0), stats=st) == ref
    short_steps = 256 - len(ids)  # one token each until the cache holds 256 cells
    assert st.accepted_hist[0] >= short_steps and st.accepted_hist[3] > 10
    with pytest.raises(TreeError):
        e.use_trees("mc_sim_7b_63")


def test_first_token_logits_bit_identical_with_heads_at_step_one(quant_models):
    """Exact prefill decodes the last prompt token alone with embeddings on, so the heads propose
    at the very first step; the logits that chose the first token are still bit for bit
    llama-cpp-python's after its own prompt evaluation."""
    path = quant_models["Q8_0"]
    e = Engine(path, path.replace(".gguf", ".medusa.gguf"), tree="chain:3", n_ctx=512, n_threads=2)
    base = llama_cpp_baseline(e, n_ctx=512)
    rng = np.random.default_rng(14)
    for n in (5, 70, 130):
        ids = [1] + [int(t) for t in rng.integers(3, e.model.n_vocab, n)]
        calls, logits = [], []

        def propose(generated, n_heads, k):
            calls.append(len(generated))
            return np.full((n_heads, k), 3, np.int32)

        for _ in e.generate(ids, GREEDY, 4, proposer=propose, logits_out=logits, reuse_prefix=False):
            pass
        base.reset()
        base.eval(ids)  # its prompt evaluation keeps only the last row's logits, in llama.cpp
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(base.ctx, -1), shape=(e.model.n_vocab,))
        assert np.array_equal(logits[0], last)
        assert calls and calls[0] == 1  # a tree at the first step, proposed from the prefill's hidden state


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_float_models_verify_trees_by_default(tmp_path, monkeypatch, dtype):
    """F16/F32 weights (like any GPU) may have no exact region: with exact="auto" (the default)
    Medusa still verifies its tree there, and ``medusa["exact"]`` says which guarantee holds;
    exact=True keeps the output bit-identical, decoding plainly where no batch of 2 is exact."""
    from medusa_edge import Medusa

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = write_llama_gguf(str(tmp_path / f"b-{dtype}.gguf"), dtype=dtype, seed=4)
    write_random_heads(str(tmp_path / f"b-{dtype}.medusa.gguf"), base, n_heads=3, seed=2, head_type="f32")
    rng = np.random.default_rng(3)
    ids = [1] + [int(t) for t in rng.integers(3, base.n_vocab, 12)]
    for exact, tree in (("auto", "chain:3"), (True, None)):
        llm = Medusa(base.path, tree=tree, n_ctx=512, exact=exact)  # heads found beside the model
        e = llm.engine
        ref = [t for new in e.generate(ids, GREEDY, 64, reuse_prefix=False, max_depth=0) for t in new]
        st = Stats()
        got = run(e, ids, GREEDY, 64, proposer=truth_proposer(ref, rng, 1.0, 0), stats=st)
        out = llm.create_completion(ids, max_tokens=8, temperature=0)
        assert out["medusa"]["exact"] == e.guarantee == st.exact
        if e.exact_batch >= 2:  # an exact region (seen: F16 with 2 rows on the test machine)
            assert e.guarantee == "bitwise" and e.tree.n_nodes <= e.exact_batch and got == ref
            if exact == "auto":
                assert e.tree.n_nodes == min(4, e.exact_batch) and st.tokens_per_step > 1.5
        elif exact == "auto":  # no exact region: the whole tree runs, verified per row
            assert e.guarantee == "verified" and e.tree.n_nodes == 4 and not e.exact and st.tokens_per_step > 2.5
        else:  # strict: no tree at all
            assert e.guarantee == "bitwise" and e.max_auto_nodes == 1 and st.tokens_per_step == 1.0 and got == ref


def test_llama_cpp_baseline_gets_the_engine_settings(quant_models):
    """The llama-cpp-python baseline runs with the engine's offload, threads, micro-batch, KV types
    and flash attention: on a GPU a baseline without n_gpu_layers ran on the CPU (and its text
    differed from plain decoding on 20 of 20 prompts)."""
    path = quant_models["Q4_0"]
    e = Engine(path, n_ctx=256, n_threads=2, n_gpu_layers=99, type_k=8, type_v=8)
    base = llama_cpp_baseline(e, n_ctx=256)
    assert base.model_params.n_gpu_layers == e.n_gpu_layers == 99
    cp = base.context_params
    assert (cp.n_threads, cp.n_threads_batch) == (e.n_threads_kv_split, e.n_threads_batch)
    assert (cp.n_batch, cp.n_ubatch) == (e.ctx.n_batch, e.ctx.n_ubatch)
    assert (cp.type_k, cp.type_v) == (e.ctx.type_k, e.ctx.type_v) == (8, 8)
    assert cp.flash_attn_type == (1 if e.flash_attn else 0)


def test_no_tree_past_the_split_decodes_as_llama_cpp(quant_models):
    """Heads loaded but no tree to run (tree="auto" planned none, or a fixed one-node tree): one-token
    decodes keep all threads past 256 KV cells, so the text equals llama-cpp-python's on all threads
    bit for bit, at its speed. A tree used below the split only still brings the one-thread rule back
    (its last step may write batched rows past 256 cells)."""
    path = quant_models["Q8_0"]
    e = Engine(path, path.replace(".gguf", ".medusa.gguf"), n_ctx=1024, n_threads=2)  # auto
    e.use_trees("chain:0")
    assert e.n_threads_kv_split == 2 and e.guarantee == "bitwise"
    rng = np.random.default_rng(15)
    ids = [1] + [int(t) for t in rng.integers(3, e.model.n_vocab, 300)]
    base = llama_cpp_baseline(e, n_ctx=1024)
    assert base.context_params.n_threads == 2
    ref = llama_cpp_greedy(base, e.model, ids, N_TOKENS)
    got = run(e, ids, GREEDY, N_TOKENS)
    assert got == ref, f"differs from llama-cpp-python on 2 threads at {first_divergence(got, ref)}"
    assert e.ctx.n_threads == 2
    e.use_trees("chain:3", "chain:0")
    assert e.n_threads_kv_split == 1
