"""Embeddings (``embed``/``create_embedding`` and ``POST /v1/embeddings``), ``close()`` and the
context manager, ``stopping_criteria`` as a cancel hook, ``detokenize`` and the named chat formats,
each against llama-cpp-python 0.3.36 on the same GGUF (and the openai client for the server)."""

import inspect
import threading
import time

import numpy as np
import pytest

import llama_cpp
from llama_cpp import llama_chat_format

from medusa_edge import ClosedError, Medusa
from medusa_edge.api import chat_prompt_tokens
from medusa_edge.chat_template import FORMATS, VICUNA_SYSTEM
from medusa_edge.default_model import demo_model_path
from medusa_edge.testing import write_llama_gguf

Q = "USER: What colour is the sky?\nASSISTANT:"
TEXTS = ["Hello world", "The sky is blue.", "Tell me a story about a fox."]


@pytest.fixture(scope="module")
def demo():
    return Medusa(demo_model_path(), n_ctx=512, flash_attn=False)  # flash attention as llama-cpp-python's default


@pytest.fixture(scope="module")
def llama_embed():
    return llama_cpp.Llama(demo_model_path(), embedding=True, flash_attn=False, verbose=False)


# -- embeddings ---------------------------------------------------------------------------------
def test_embed_per_token_equals_llama_cpp(demo, llama_embed):
    assert demo.pooling_type() == llama_embed.pooling_type() == 0  # a generative model: one vector per token
    for normalize in (False, True):
        for text in TEXTS:
            assert demo.embed(text, normalize=normalize) == llama_embed.embed(text, normalize=normalize)
    # a list is one vector list per text (llama-cpp-python misreads the second text of a batch
    # without pooling, so it is compared one text at a time)
    got = demo.embed(TEXTS)
    assert got == [llama_embed.embed(t) for t in TEXTS] and len(got[1]) == len(demo.tokenize(TEXTS[1]))
    r = demo.create_embedding("Hello world", model="m")
    want = llama_embed.create_embedding("Hello world", model="m")
    assert r == want


@pytest.mark.parametrize("pooling", [1, 2, 3])  # mean, cls, last: from the GGUF's metadata
def test_embed_pooled_equals_llama_cpp(tmp_path, pooling):
    path = write_llama_gguf(str(tmp_path / f"pool{pooling}.gguf"), seed=3, pooling_type=pooling).path
    med = Medusa(path, flash_attn=False, tree="chain:0")
    ref = llama_cpp.Llama(path, embedding=True, flash_attn=False, verbose=False)
    texts = ["hello world", "the cat", "a b c d e f"] * 3
    assert med.pooling_type() == ref.pooling_type() == pooling
    assert med.embed(texts) == ref.embed(texts)  # nine texts, one batch of sequences
    assert med.embed(texts, normalize=True) == ref.embed(texts, normalize=True)
    assert med.create_embedding(texts) == ref.create_embedding(texts)
    assert len(med.embed("hello world")) == 64


def test_embed_limits_and_bad_input(tmp_path):
    path = write_llama_gguf(str(tmp_path / "p.gguf"), seed=3, pooling_type=1).path
    med = Medusa(path, n_batch=16, tree="chain:0", flash_attn=False)
    ref = llama_cpp.Llama(path, embedding=True, n_batch=16, flash_attn=False, verbose=False)
    long = "hello world " * 20
    assert med.embed(long) == ref.embed(long)  # truncated to the first 16 tokens
    with pytest.raises(ValueError, match=r"exceed batch size of 16"):
        med.embed(long, truncate=False)
    for bad in ([], None, [1, 2], ["ok", 3]):
        with pytest.raises(ValueError, match="input must be"):
            med.embed(bad)
    with pytest.raises(ValueError, match="pooling_type"):
        Medusa(path, pooling_type=7)
    assert Medusa(path, tree="chain:0", pooling_type=0).pooling_type() == 0  # overrides the metadata


def test_embedding_leaves_generation_cache_alone(demo):
    first = demo.create_completion(Q, max_tokens=24, temperature=0)
    again = demo.create_completion(Q + first["choices"][0]["text"] + "\nUSER: And grass?\nASSISTANT:",
                                   max_tokens=24, temperature=0)
    demo.embed(TEXTS)  # between two turns of a conversation
    follow = demo.create_completion(Q + first["choices"][0]["text"] + "\nUSER: And grass?\nASSISTANT:",
                                    max_tokens=24, temperature=0)
    assert follow["choices"][0]["text"] == again["choices"][0]["text"]
    assert follow["medusa"]["prompt_tokens_reused"] == follow["usage"]["prompt_tokens"] - 1  # all but the last


# -- close and the context manager --------------------------------------------------------------
def test_close_and_context_manager():
    with Medusa(demo_model_path(), n_ctx=256) as llm:
        text = llm.create_completion(Q, max_tokens=8, temperature=0)["choices"][0]["text"]
        llm.embed("hi")
        engine = llm.engine
        stream = llm.create_completion(Q, max_tokens=32, temperature=0, stream=True)
        next(stream)
    assert text and llm.closed and engine.ctx is None and engine.model is None and engine.heads is None
    for call in (lambda: llm.create_completion(Q), lambda: llm.create_chat_completion([{"role": "user", "content": "x"}]),
                 lambda: llm.embed("x"), lambda: llm.tokenize(b"x"), lambda: llm.detokenize([1]), llm.n_ctx):
        with pytest.raises(ClosedError, match="closed"):
            call()
    with pytest.raises(Exception, match="superseded"):  # a stream left open does not touch freed memory
        next(stream)
    llm.close()  # twice: a no-op


def test_close_waits_for_another_threads_generation():
    llm = Medusa(demo_model_path(), n_ctx=512)
    out = {}
    started = threading.Event()

    def gen():
        def crit(ids, logits):
            started.set()
            return False
        out["r"] = llm.create_completion(Q, max_tokens=64, temperature=0, stopping_criteria=crit)

    t = threading.Thread(target=gen)
    t.start()
    started.wait(60)
    llm.close()
    t.join(60)
    assert out["r"]["choices"][0]["text"] and llm.closed


# -- stopping_criteria: a cancel hook -----------------------------------------------------------
def test_stopping_criteria_equals_llama_cpp():
    llm = Medusa(demo_model_path(), n_ctx=512)
    ref = llama_cpp.Llama(demo_model_path(), n_ctx=512, verbose=False)
    n_prompt = len(llm.tokenize(Q.encode(), special=False))
    seen = []

    def after(n):
        def crit(ids, logits):
            seen.append((len(ids), logits.shape))
            return len(ids) >= n_prompt + n
        return crit

    for n in (1, 2, 3):  # the answer ("The sky is blue.") is longer
        got = llm.create_completion(Q, max_tokens=32, temperature=0, stopping_criteria=after(n))
        want = ref.create_completion(Q, max_tokens=32, temperature=0, stopping_criteria=llama_cpp.StoppingCriteriaList([after(n)]))
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"] == "stop"
        assert got["usage"]["completion_tokens"] == n
    assert seen[0] == (n_prompt, (llm.n_vocab(),))  # the first call: the prompt, and the logits of the first token
    with pytest.raises(ValueError, match="callable"):
        llm.create_completion(Q, stopping_criteria=3)


def test_cancel_non_streaming_chat_from_another_thread():
    llm = Medusa(demo_model_path(), n_ctx=2048)
    cancel, started = threading.Event(), threading.Event()

    def criteria(ids, logits):
        started.set()  # a token was decoded: the other thread may cancel now
        return cancel.is_set()

    # the canceller waits for the first token, so the test holds on a loaded machine as on an idle one
    threading.Thread(target=lambda: started.wait(60) and (time.sleep(0.2), cancel.set()), daemon=True).start()
    r = llm.create_chat_completion([{"role": "user", "content": "Tell me a story about a fox."}], max_tokens=1500,
                                   temperature=100, top_k=0, top_p=1, min_p=0, seed=0, stopping_criteria=criteria)
    assert r["choices"][0]["finish_reason"] == "stop" and 0 < r["usage"]["completion_tokens"] < 1500
    # the instance goes on: the next call answers in full
    assert "blue" in llm.create_chat_completion([{"role": "user", "content": "What colour is the sky?"}],
                                                temperature=0)["choices"][0]["message"]["content"]


# -- detokenize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_detokenize_equals_llama_cpp(which, models):
    path = demo_model_path() if which == "demo" else models["f32"].path
    llm = Medusa(path, tree="chain:0")
    ref = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    for text in ["Hello world", " leading space", "the cat sat", "a\nb", ""]:
        for add_bos in (True, False):
            ids = ref.tokenize(text.encode(), add_bos=add_bos)
            assert llm.tokenize(text, add_bos=add_bos) == ids
            for special in (False, True):
                assert llm.detokenize(ids, special=special) == ref.detokenize(ids, special=special), (text, add_bos)
    assert llm.detokenize(llm.tokenize("Hello world")) == b"Hello world"


# -- chat formats ---------------------------------------------------------------------------------
CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name the planets."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


def _formatter(name):
    handler = llama_chat_format.LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)
    return inspect.getclosurevars(handler).nonlocals["chat_formatter"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_chat_formats_token_for_token(name, models):
    ref_fmt = _formatter(name)
    for path in (demo_model_path(), models["f32"].path):
        llm = Medusa(path, tree="chain:0", chat_format=name)
        ref = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        for msgs in CHATS:
            if name == "vicuna" and msgs[0]["role"] == "system":
                continue  # FastChat uses the system message; llama-cpp-python drops it (below)
            prompt = ref_fmt(messages=msgs).prompt
            assert llm.apply_chat_template(msgs) == prompt
            want = ref.tokenize(prompt.encode(), add_bos=True, special=True)
            assert chat_prompt_tokens(llm.engine.model, msgs, llm.chat_template) == want


def test_vicuna_is_fastchats_v1_1():
    msgs = CHATS[1]
    text = FORMATS["vicuna"](msgs)
    assert text == (f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello! How can I help?</s>USER: Name the planets. ASSISTANT:")
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")
    # a system message replaces the default one, as FastChat's server does
    assert FORMATS["vicuna"](CHATS[2]) == "You are terse. USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:"
    assert FORMATS["vicuna"](CHATS[0], add_generation_prompt=False) == f"{VICUNA_SYSTEM} USER: What colour is the sky? "


# -- POST /v1/embeddings --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pooled_server(tmp_path_factory):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_server import ServerProcess

    s = ServerProcess(tmp_path_factory.mktemp("embed_server") / "server.log", "--pooling", "mean")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def test_embeddings_endpoint_openai_client(pooled_server):
    import httpx
    import openai

    ref = Medusa(demo_model_path(), pooling_type=1)  # the server's settings: flash attention auto
    want = [[float(np.float32(v)) for v in e] for e in ref.embed(TEXTS)]
    client = pooled_server.client()
    for fmt in ("float", openai.omit):  # the client asks for base64 unless told (float32, it decodes them)
        r = client.embeddings.create(model="any-name", input=TEXTS, encoding_format=fmt)
        assert r.model == "demo-model.gguf" and [d.index for d in r.data] == [0, 1, 2]
        assert [d.embedding for d in r.data] == want
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(ref.tokenize(t)) for t in TEXTS)
    one = client.embeddings.create(model="m", input="Hello world", encoding_format="float")
    # alone, not in a batch of three: llama.cpp's sums run in another order, as in llama-cpp-python
    assert len(one.data) == 1 and one.data[0].embedding == [float(np.float32(v)) for v in ref.embed("Hello world")]
    for body, param in (({"input": "x", "dimensions": 8}, "dimensions"), ({"input": [[1, 2]]}, "input"),
                        ({"input": []}, "input"), ({}, "input"), ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
                        ({"input": "x", "temperature": 0}, "temperature")):
        resp = httpx.post(pooled_server.url + "/v1/embeddings", json=body, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (body, resp.text)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="m", input="x", dimensions=8)
    # a model without pooling: per-token vectors are not OpenAI's shape
    assert Medusa(demo_model_path()).pooling_type() == 0
