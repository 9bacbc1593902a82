"""create_chat_completion and create_completion with llama-cpp-python's
parameters and shapes; streaming text (UTF-8, stop strings, close); KV prefix reuse == cold start."""

import numpy as np
import pytest

from medusa_edge import Medusa, TextStream
from medusa_edge.default_model import demo_model_path
from medusa_edge.core.exactness import llama_cpp_baseline
from medusa_edge.testing import _WORDS, write_llama_gguf

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    path = write_llama_gguf(str(tmp_path_factory.mktemp("chat") / "chat.gguf"), seed=4, chat_template=TEMPLATE).path
    med = Medusa(path, n_ctx=512, tree="chain:0")
    return med, llama_cpp_baseline(med.engine, n_ctx=512)


@pytest.fixture(scope="module")
def demo():
    return Medusa(demo_model_path(), n_ctx=1024)


def shape(x):
    """Keys and value types, recursively (ids, times and texts differ; the structure must not)."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items() if k != "medusa"}
    if isinstance(x, list):
        return [shape(v) for v in x[:1]]
    return type(x).__name__ if x is not None else None


def test_chat_shapes_and_greedy_text_match_llama_cpp_python(templated):
    med, base = templated
    rng = np.random.default_rng(0)
    same = 0
    for i in range(20):
        msgs = [{"role": "user", "content": " ".join(rng.choice(_WORDS, size=6))}]
        a = med.create_chat_completion(msgs, max_tokens=32, temperature=0)
        b = base.create_chat_completion(msgs, max_tokens=32, temperature=0)
        if i == 0:
            assert shape(a) == shape(b)
            sa = list(med.create_chat_completion(msgs, max_tokens=8, temperature=0, stream=True))
            sb = list(base.create_chat_completion(msgs, max_tokens=8, temperature=0, stream=True))
            assert sa[0]["choices"][0]["delta"] == {"role": "assistant"} == sb[0]["choices"][0]["delta"]
            assert shape(sa[1]) == shape(sb[1])
            assert sa[-1]["choices"][0]["delta"] == {} and sa[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert "medusa" in sa[-1] and "usage" in sa[-1] and "medusa" in a
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in sa) == \
                   "".join(c["choices"][0]["delta"].get("content", "") for c in sb)
        ta, tb = a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]
        if b["usage"]["completion_tokens"] > 32:
            # llama-cpp-python runs past max_tokens to finish a UTF-8 sequence; max_tokens is exact here
            assert tb.startswith(ta) and a["usage"]["completion_tokens"] == 32
            continue
        assert ta == tb and a["usage"] == b["usage"]
        same += 1
    assert same >= 15


def test_completion_parameters_follow_llama_cpp_python(templated):
    med, base = templated
    prompt = "the water is"
    # positional order: suffix is second
    with pytest.raises(ValueError, match="suffix"):
        med.create_completion(prompt, "tail")
    for name, kw in (("mirostat_mode", {"mirostat_mode": 2}), ("grammar", {"grammar": object()}),
                     ("logit_bias", {"logit_bias": {10**9: 2.0}})):
        with pytest.raises(ValueError, match=name):
            med.create_completion(prompt, **kw)
    with pytest.raises(ValueError, match="tools"):
        med.create_chat_completion([{"role": "user", "content": "x"}], tools=[{}])
    # penalties, echo, temperature < 0 and seeds: the same text as llama-cpp-python
    for kw in ({"frequency_penalty": 0.8, "presence_penalty": 0.5, "temperature": 0},
               {"temperature": -1, "seed": 3}, {"temperature": 0.7, "seed": 11, "typical_p": 0.9},
               {"echo": True, "temperature": 0}, {"logit_bias": {1: 2.0, "5": -3.3}, "temperature": 0},
               {"logit_bias": {7: 1.5}, "temperature": 0.8, "seed": 5}):
        a = med.create_completion(prompt, max_tokens=24, **kw)
        b = base.create_completion(prompt, max_tokens=24, **kw)
        assert a["choices"][0]["text"] == b["choices"][0]["text"], kw
    # logprobs: the same tokens and values, to float rounding
    a = med.create_completion(prompt, max_tokens=8, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    base2 = llama_cpp_baseline(med.engine, n_ctx=512, logits_all=True)
    b = base2.create_completion(prompt, max_tokens=8, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert np.allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-4)
    assert [sorted(x) for x in a["top_logprobs"]] == [sorted(x) for x in b["top_logprobs"]]
    c = med.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    entry = c["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "bytes", "logprob", "top_logprobs"} and entry["top_logprobs"]  # keyed by text, as llama-cpp-python


def test_text_stream_never_splits_a_character_and_catches_straddling_stops():
    emoji = "🦊 狐".encode()
    s = TextStream(stop=["END"])
    out = [s.push(emoji[i : i + 1]) for i in range(len(emoji))]
    assert all("\ufffd" not in o for o in out) and "".join(out) == "🦊 狐"
    assert [o for o in out if o] == ["🦊", " ", "狐"]
    s = TextStream(stop=["the end"])
    got = [s.push(p) for p in (b"and so th", b"e e", b"nd of it")]
    assert "".join(got) == "and so " and s.stopped


def test_byte_token_streams_stay_valid_utf8(tmp_path):
    """Random weights at a high temperature emit byte tokens (<0xF0>, ...) in any order: every
    chunk must be whole characters, and together the chunks are the full text."""
    med = Medusa(write_llama_gguf(str(tmp_path / "b.gguf"), seed=9).path, n_ctx=512, tree="chain:0")
    for seed in range(8):
        chunks = [c["choices"][0]["text"] for c in
                  med.create_completion("the", max_tokens=64, temperature=2.0, top_k=0, top_p=1.0, min_p=0, seed=seed, stream=True)]
        full = med.create_completion("the", max_tokens=64, temperature=2.0, top_k=0, top_p=1.0, min_p=0, seed=seed)
        assert "".join(chunks) == full["choices"][0]["text"]
        for c in chunks:
            c.encode("utf-8")  # no lone surrogates
            assert "\ufffd" not in c


def test_stop_string_across_chunks_and_usage(demo):
    q = "USER: What colour is the sky?\nASSISTANT:"
    full = demo.create_completion(q, max_tokens=32, temperature=0)
    text = full["choices"][0]["text"]
    assert " blue" in text
    stop = text[text.index(" blue") - 2 : text.index(" blue") + 3]  # straddles token boundaries
    chunks = list(demo.create_completion(q, max_tokens=32, temperature=0, stop=[stop], stream=True))
    got = "".join(c["choices"][0]["text"] for c in chunks)
    assert got == text[: text.index(stop)] and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    n = chunks[-1]["usage"]["completion_tokens"]
    # completion_tokens counts exactly the tokens the returned text came from
    ids = _greedy_ids(demo, demo.tokenize(q.encode(), special=True), 32)
    text_of = lambda k: demo.detokenize(ids[:k]).decode("utf-8", "ignore")
    assert text_of(n).startswith(got) and len(text_of(n - 1)) < len(got) and n < full["usage"]["completion_tokens"]


def _greedy_ids(llm, ids, n):
    from medusa_edge import SamplingParams

    out = []
    for new in llm.engine.generate(ids, SamplingParams(temperature=0), n):
        out += new
    return out


def test_close_mid_stream_then_reuse(demo):
    q = "USER: Tell me a story about a fox.\nASSISTANT:"
    want = demo.create_completion(q, max_tokens=48, temperature=0)["choices"][0]["text"]
    s = demo.create_chat_completion([{"role": "user", "content": "Tell me a story about a fox."}], max_tokens=48,
                                    temperature=0, stream=True)
    next(s), next(s)
    s.close()
    assert demo.engine._holder is None  # the generation let go of the context
    assert demo.create_completion(q, max_tokens=48, temperature=0)["choices"][0]["text"] == want


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_prefix_reuse_equals_cold_start_over_five_turns(demo, temperature, capsys):
    warm = demo
    cold = Medusa(demo_model_path(), n_ctx=1024)
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    questions = ["What colour is the sky?", "Tell me a story about a fox.", "What is 3 plus 4?",
                 "What sound does a cow make?", "Name three animals."]
    reused = []
    for turn, q in enumerate(questions):
        msgs.append({"role": "user", "content": q})
        a = warm.create_chat_completion(msgs, max_tokens=48, temperature=temperature, seed=turn)
        cold.engine.ctx.truncate(0)  # forget everything: a cold start
        b = cold.create_chat_completion(msgs, max_tokens=48, temperature=temperature, seed=turn)
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], f"turn {turn}"
        assert b["medusa"]["prompt_tokens_reused"] == 0
        reused.append(a["medusa"]["prompt_tokens_reused"])
        msgs.append({"role": "assistant", "content": a["choices"][0]["message"]["content"]})
    assert all(r > 0 for r in reused[1:])
    with capsys.disabled():
        print(f"\n[prefix reuse T={temperature}] reused prompt tokens per turn: {reused}")
