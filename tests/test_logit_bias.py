"""logit_bias under Medusa, lossless: greedy text with a bias equals llama-cpp-python's with the same
bias (on a quantized model in its bit-exact region, with a proposer that makes the tree accept),
and seeded draws equal the engine's own plain decoding with it; bad biases are ValueErrors."""


import numpy as np
import pytest

from medusa_edge import Engine, Medusa, SamplingParams, Stats
from medusa_edge.core.params import MAX_LOGIT_BIAS, normalize_logit_bias
from medusa_edge.core.exactness import first_divergence, llama_cpp_baseline
from medusa_edge.testing import _WORDS, quantized_test_model, truth_proposer


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory):
    return quantized_test_model(str(tmp_path_factory.mktemp("bias")))


def run(engine, ids, params, n, **kw):
    return [t for new in engine.generate(ids, params, n, reuse_prefix=False, **kw) for t in new]


def bias_for(free, rng, n_vocab):
    """A bias that changes the answer: the free answer's tokens pushed down (by amounts float32
    cannot hold exactly, so both sides' rounding is compared), a few random tokens pushed up.
    String keys, as JSON sends them, for half of the entries."""
    bias = {}
    for t in sorted(set(free))[:6]:
        bias[str(t) if t % 2 else int(t)] = -float(rng.uniform(0.5, 6.0))
    for t in rng.integers(3, n_vocab, size=4):
        bias[int(t)] = float(rng.uniform(0.3, 3.0))
    return bias


def test_greedy_bias_equals_llama_cpp_python(quant_model, capsys):
    """10 prompts: llama-cpp-python's greedy text with logit_bias, the engine's plain decoding with
    the bias and Medusa's tree (through Medusa.create_completion) all agree; the bias changed every answer."""
    plain = Engine(quant_model, tree="chain:0", n_ctx=512)
    assert plain.guarantee == "bitwise"
    llm = Medusa(quant_model, quant_model.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=512)
    assert llm.engine.tree.n_nodes > 1 and llm.engine.guarantee == "bitwise"
    base = llama_cpp_baseline(plain, n_ctx=512)
    n_vocab = plain.model.n_vocab
    rng = np.random.default_rng(1)
    st = Stats()
    n_changed = 0
    for i in range(10):
        ids = plain.model.tokenize(" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 10)))), True, False)
        free = run(plain, ids, SamplingParams(temperature=0.0), 40)
        bias = bias_for(free, rng, n_vocab)
        params = SamplingParams(temperature=0.0, logit_bias=normalize_logit_bias(bias, n_vocab))
        assert not params.plain_argmax
        ref = run(plain, ids, params, 40)
        n_changed += ref != free
        lcp = base.create_completion(list(ids), max_tokens=40, temperature=0.0, repeat_penalty=1.0,
                                     logit_bias=bias)["choices"][0]["text"]
        ref_text = llm.detokenize([t for t in ref if not plain.model.is_eog(t)]).decode("utf-8", "ignore")
        assert lcp == ref_text, f"prompt {i}: plain decoding with the bias differs from llama-cpp-python"
        got = llm.create_completion(list(ids), max_tokens=40, temperature=0.0, logit_bias=bias,
                                    proposer=truth_proposer(ref, rng))
        assert got["choices"][0]["text"] == ref_text, f"prompt {i}: Medusa diverged"
        got = run(llm.engine, ids, params, 40, proposer=truth_proposer(ref, rng), stats=st)
        assert got == ref, f"prompt {i}: Medusa diverged at {first_divergence(got, ref)}"
    assert n_changed == 10
    with capsys.disabled():
        print(f"\n[logit_bias] 10 prompts identical to llama-cpp-python; Medusa tokens/step {st.tokens_per_step:.2f}")
    assert st.tokens_per_step > 1.5


def test_seeded_and_penalised_bias_equals_plain_decoding(quant_model):
    """Seeded sampling, with and without penalties and a grammar: Medusa's draws with a bias equal
    plain decoding's with it."""
    e = Engine(quant_model, quant_model.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=512)
    rng = np.random.default_rng(2)
    for i in range(6):
        ids = e.model.tokenize(" ".join(rng.choice(_WORDS, size=5)), True, False)
        free = run(e, ids, SamplingParams(temperature=0.0), 32, max_depth=0)
        bias = normalize_logit_bias(bias_for(free, rng, e.model.n_vocab), e.model.n_vocab)
        for params in (SamplingParams(temperature=0.8, seed=11 + i, logit_bias=bias),
                       SamplingParams(temperature=0.7, seed=3, repeat_penalty=1.3, top_k=0, logit_bias=bias),
                       SamplingParams(temperature=0.0, repeat_penalty=1.2, logit_bias=bias),
                       SamplingParams(temperature=0.0, logit_bias=bias, grammar='root ::= [a-z ]+ "."')):
            ref = run(e, ids, params, 32, max_depth=0)
            got = run(e, ids, params, 32, proposer=truth_proposer(ref, rng))
            assert got == ref, (i, params, first_divergence(got, ref))


def test_ban_and_force(quant_model):
    """-100 bans a token in every row; +100 makes it every token (OpenAI's documented use)."""
    llm = Medusa(quant_model, tree="chain:0", n_ctx=256)
    ids = llm.tokenize(b"the water of people")
    free = run(llm.engine, ids, SamplingParams(temperature=0.0), 24)
    banned = {t: -100 for t in set(free)}
    out = run(llm.engine, ids, SamplingParams(temperature=0.0, logit_bias=normalize_logit_bias(banned, 10**6)), 24)
    assert not set(out) & set(free)
    forced = llm.create_completion(ids, max_tokens=5, temperature=0.9, seed=4, logit_bias={"7": 100})
    assert forced["usage"]["completion_tokens"] == 5
    assert forced["choices"][0]["text"] == llm.detokenize([7] * 5).decode("utf-8", "ignore")


def test_bad_biases_are_value_errors(quant_model):
    llm = Medusa(quant_model, tree="chain:0", n_ctx=256)
    n = llm.engine.model.n_vocab
    for bad in ({n: 1.0}, {-1: 1.0}, {"x": 1.0}, {"1.5": 1.0}, {"5_0": 1.0}, {1.5: 1.0}, {True: 1.0}, {1: float("nan")},
                {1: float("inf")}, {1: 1e39}, {1: "3"}, {1: None}, [(1, 2.0)], "1:2",
                {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}):
        with pytest.raises(ValueError, match="logit_bias"):
            llm.create_completion("the water", max_tokens=2, temperature=0, logit_bias=bad)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.create_completion("the water", max_tokens=2, temperature=0, logit_bias={1: 1.0}, acceptance="typical")
    # empty: no bias, the fast argmax path stays
    assert normalize_logit_bias({}, n) is None
    assert SamplingParams(temperature=0.0, logit_bias=normalize_logit_bias({}, n)).plain_argmax
    assert llm.create_completion("the water", max_tokens=2, temperature=0, logit_bias={})["choices"][0]["text"] is not None


def test_server_logit_bias_openai_client(tmp_path):
    """The server honours logit_bias on both endpoints (string keys, as JSON sends them): the text
    equals the API's with the same bias, and differs from the free text."""
    pytest.importorskip("openai")
    from test_server import ServerProcess

    from medusa_edge.default_model import demo_model_path

    llm = Medusa(demo_model_path(), n_ctx=1024, tree="heads")
    msgs = [{"role": "user", "content": "What colour is the sky?"}]
    free = llm.create_chat_completion(msgs, temperature=0, max_tokens=16)["choices"][0]["message"]["content"]
    banned = {str(t): -100 for t in llm.tokenize(free.encode(), add_bos=False)[:3]}
    want = llm.create_chat_completion(msgs, temperature=0, max_tokens=16, logit_bias=banned)["choices"][0]["message"]
    want_text = llm.create_completion("Once upon a time", temperature=0, max_tokens=16, logit_bias=banned)
    assert want["content"] != free
    srv = ServerProcess(tmp_path / "server.log", "--tree", "heads").wait_ready()
    try:
        client = srv.client()
        r = client.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=16, logit_bias=banned)
        assert r.choices[0].message.content == want["content"]
        r = client.completions.create(model="any", prompt="Once upon a time", temperature=0, max_tokens=16,
                                      logit_bias=banned)
        assert r.choices[0].text == want_text["choices"][0]["text"]
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()
