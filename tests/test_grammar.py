"""Grammars and JSON output under Medusa, lossless: greedy text under a GBNF grammar equals
llama-cpp-python's with the same grammar, and this engine's own plain decoding with it while the
tree is in use; seeded sampling likewise; JSON schemas through the server and the openai client."""

import json

import numpy as np
import pytest
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from medusa_edge import Engine, Medusa, SamplingParams, Stats
from medusa_edge.default_model import demo_model_path
from medusa_edge.core.exactness import first_divergence, llama_cpp_baseline
from medusa_edge.testing import _WORDS, quantized_test_model, truth_proposer

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
          "required": ["name", "age", "pets"]}
WORDS_GBNF = 'root ::= (" the" | " water" | " of" | " people" | " and" | " time")+ "."'
GRAMMARS = [JSON_GBNF, json_schema_to_gbnf(json.dumps(PERSON)), WORDS_GBNF]


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory):
    return quantized_test_model(str(tmp_path_factory.mktemp("grammar")))


@pytest.fixture(scope="module")
def demo():
    # the heads file's own tree: "auto" may keep a 2-core CPU's short prompts plain
    return Medusa(demo_model_path(), n_ctx=1024, tree="heads")


def person_model(pydantic):
    """A pydantic model whose JSON schema bounds every string and list, so that a toy model's
    answer ends inside max_tokens."""

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        age: int
        pets: list[pydantic.constr(max_length=12)] = pydantic.Field(max_length=3)

    return Person


def parse(Person, text):
    """Validate against the schema. strict=False: llama-cpp-python's schema converter (llama.cpp's
    json_schema_to_grammar.py of its version) lets strings hold raw control characters."""
    return Person.model_validate(json.loads(text, strict=False))


def run(engine, ids, params, n, **kw):
    return [t for new in engine.generate(ids, params, n, reuse_prefix=False, **kw) for t in new]


def test_greedy_under_grammar_equals_llama_cpp_python(quant_model, capsys):
    """10 prompts, three grammars (JSON, a converted schema, a word list): llama-cpp-python's
    greedy text under the grammar, the engine's plain decoding and Medusa's tree all agree."""
    plain = Engine(quant_model, tree="chain:0", n_ctx=512)
    med = Engine(quant_model, quant_model.replace(".gguf", ".medusa.gguf"), tree="mc_sim_7b_63", n_ctx=512)
    assert plain.guarantee == "bitwise"
    base = llama_cpp_baseline(plain, n_ctx=512)
    rng = np.random.default_rng(0)
    st = Stats()
    n_constrained = 0
    for i in range(10):
        words = rng.choice(_WORDS, size=int(rng.integers(3, 10)))
        ids = plain.model.tokenize(" ".join(words), True, False)
        gbnf = GRAMMARS[i % len(GRAMMARS)]
        lcp = []
        for t in base.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True, grammar=LlamaGrammar.from_string(gbnf)):
            lcp.append(int(t))
            if len(lcp) == 40 or plain.model.is_eog(t):
                break
        params = SamplingParams(temperature=0.0, grammar=gbnf)
        ref = run(plain, ids, params, 40)
        assert ref == lcp, f"grammar {i % 3}: plain decoding differs from llama-cpp-python at {first_divergence(ref, lcp)}"
        free = run(plain, ids, SamplingParams(temperature=0.0), 40)
        n_constrained += free != ref
        got = run(med, ids, params, 40, proposer=truth_proposer(ref, rng), stats=st)
        assert got == ref, f"grammar {i % 3}: Medusa diverged at {first_divergence(got, ref)}"
    assert n_constrained == 10  # the grammar changed every answer: the test is not vacuous
    with capsys.disabled():
        print(f"\n[grammar] 10 prompts identical to llama-cpp-python; Medusa tokens/step {st.tokens_per_step:.2f}")
    assert st.tokens_per_step > 1.5


def test_demo_medusa_equals_plain_decoding_under_grammar(demo):
    """The demo model and its own heads: JSON schema, JSON object and a GBNF grammar, greedy and
    seeded sampling, Medusa's text equals plain decoding's with the same grammar; the tree is in use."""
    e = demo.engine
    prompts = ["Q: Tell me about a fox.\nA:", "Once upon a time", "Q: What colour is the sky?\nA:",
               "Q: Count from 1 to 5.\nA:", "The little bear"]
    schema_gbnf = json_schema_to_gbnf(json.dumps(PERSON))
    st = Stats()
    for j, text in enumerate(prompts):
        ids = demo._prompt_tokens(text)
        for gbnf in (schema_gbnf, JSON_GBNF, WORDS_GBNF):
            for params in (SamplingParams(temperature=0.0, grammar=gbnf),
                           SamplingParams(temperature=0.8, seed=17 + j, grammar=gbnf),
                           SamplingParams(temperature=0.7, seed=5, repeat_penalty=1.3, top_k=0, grammar=gbnf)):
                ref = run(e, ids, params, 48, max_depth=0)
                got = run(e, ids, params, 48, stats=st)
                assert got == ref, (text, params.temperature, first_divergence(got, ref))
    assert st.tokens_per_step > 1.2, st.tokens_per_step


def test_api_response_formats(demo):
    pydantic = pytest.importorskip("pydantic")

    Person = person_model(pydantic)

    msgs = [{"role": "user", "content": "Tell me about a fox."}]
    r = demo.create_chat_completion(msgs, temperature=0, max_tokens=200, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True}})
    parse(Person, r["choices"][0]["message"]["content"])
    assert r["medusa"]["tokens_per_step"] > 1.0
    r = demo.create_chat_completion(msgs, temperature=0, max_tokens=200, response_format={"type": "json_object"})
    assert isinstance(json.loads(r["choices"][0]["message"]["content"], strict=False), dict)
    # the same text as the grammar given directly, as text or as a LlamaGrammar
    a = demo.create_completion("Once upon a time", temperature=0, max_tokens=30, grammar=WORDS_GBNF)
    b = demo.create_completion("Once upon a time", temperature=0, max_tokens=30,
                               grammar=LlamaGrammar.from_string(WORDS_GBNF))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert set(a["choices"][0]["text"].replace(".", "").split()) <= {"the", "water", "of", "people", "and", "time"}
    c = demo.create_completion("Once upon a time", temperature=0, max_tokens=30, response_format={"type": "text"})
    d = demo.create_completion("Once upon a time", temperature=0, max_tokens=30)
    assert c["choices"][0]["text"] == d["choices"][0]["text"]


def test_bad_grammars_and_schemas_are_value_errors(demo):
    bad = [dict(grammar='root ::= ("a"'), dict(grammar="root ::= undefined_rule"), dict(grammar='start ::= "a"'),
           dict(grammar=3), dict(grammar="root ::= " + "(" * 5000 + '"a"' + ")" * 5000),
           dict(response_format={"type": "xml"}), dict(response_format="json_object"),
           dict(response_format={"type": "json_schema"}),
           dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": 1}}}),
           dict(response_format={"type": "json_object", "schema": {"type": "string", "maxLength": 10**9}}),
           dict(response_format={"type": "json_object"}, grammar=WORDS_GBNF),
           dict(grammar=WORDS_GBNF, acceptance="typical")]
    for kw in bad:
        with pytest.raises(ValueError):
            demo.create_completion("Once upon a time", max_tokens=4, **kw)
    # a grammar no token can continue (tokens whose text starts with NUL are never allowed): a
    # clear error mid-generation, not llama.cpp's abort; the instance goes on
    with pytest.raises(ValueError, match="allows no token"):
        demo.create_completion("Once upon a time", max_tokens=4, temperature=0, grammar='root ::= "\\x00"')
    with pytest.raises(ValueError, match="allows no token"):
        demo.create_completion("Once upon a time", max_tokens=4, temperature=0.8, seed=1, grammar='root ::= "\\x00"')
    assert demo.create_completion("Once upon a time", max_tokens=4, temperature=0)["choices"][0]["text"]


def test_server_json_schema_openai_client(tmp_path):
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    from test_server import ServerProcess

    Person = person_model(pydantic)

    srv = ServerProcess(tmp_path / "server.log", "--tree", "heads").wait_ready()  # "auto" may stay plain here
    try:
        client = srv.client()
        msgs = [{"role": "user", "content": "Tell me about a fox."}]
        r = client.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=200, response_format={
            "type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}})
        parse(Person, r.choices[0].message.content)
        assert r.model_extra["medusa"]["tokens_per_step"] > 1.0
        # streamed, and llama-server's fields: json_schema and grammar on /v1/completions
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="any", messages=msgs, temperature=0, max_tokens=200, stream=True, response_format={"type": "json_object"}))
        assert isinstance(json.loads(text, strict=False), dict)
        r = client.completions.create(model="any", prompt="Once upon a time", temperature=0, max_tokens=200,
                                      extra_body={"json_schema": PERSON})
        assert set(json.loads(r.choices[0].text, strict=False)) == {"name", "age", "pets"}
        r = client.completions.create(model="any", prompt="Once upon a time", temperature=0, max_tokens=20,
                                      extra_body={"grammar": WORDS_GBNF})
        assert set(r.choices[0].text.replace(".", "").split()) <= {"the", "water", "of", "people", "and", "time"}
        for body, param in (({"grammar": 'root ::= ("a"'}, "grammar"), ({"json_schema": {"properties": 1, "type": "object"}},
                                                                        "json_schema"),
                            ({"response_format": {"type": "json_object"}, "grammar": WORDS_GBNF}, None)):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="any", prompt="x", max_tokens=4, extra_body=body)
            assert e.value.param == param and e.value.code == "invalid_value", e.value.body
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()
