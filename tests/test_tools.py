"""Tools / function calling: OpenAI's tools, tool_choice and the older functions through the GGUF's
own tools-aware template (or the Hermes fallback), tool calls parsed into message.tool_calls and
streamed deltas, required/named choices enforced by a grammar; end to end with the openai client
against the server on a test GGUF that carries a tools template."""

import json
import socket
import subprocess
import sys
import time

import pytest

from medusa_edge import Medusa, tools
from medusa_edge.api import render_chat
from medusa_edge.testing import write_llama_gguf

# A Qwen2.5-style template (shortened): tools in a system block, calls as <tool_call> JSON,
# results as <tool_response> user turns; assistant tool_calls rendered with arguments | tojson.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Minimal templates that teach the other two formats (what call_format looks for).
LLAMA3_TEMPLATE = ("{% if tools %}Environment: ipython\nCall a function as JSON {\"name\": ..., \"parameters\": ...}:\n"
                   "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
                   "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
MISTRAL_TEMPLATE = ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
                    "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %} answer or [TOOL_CALLS]:")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(call, names=("get_weather", "get_time")):
    """A tool call as OpenAI gives it: id, type function, a known name, arguments a JSON string
    that satisfies the tool's schema."""
    assert call["id"].startswith("call_") and call["type"] == "function"
    fn = call["function"]
    assert fn["name"] in names
    args = json.loads(fn["arguments"])
    if fn["name"] == "get_weather":
        assert args["city"] in ("Paris", "Oslo", "Rome") and args["unit"] in ("c", "f")
    else:
        assert args["zone"] in ("UTC", "CET")
    return fn["name"], args


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_llama_gguf(str(tmp_path_factory.mktemp("tools") / "tools.gguf"), seed=4,
                            chat_template=TOOLS_TEMPLATE).path


@pytest.fixture(scope="module")
def llm(gguf):
    return Medusa(gguf, n_ctx=2048, tree="chain:0")


# -- parsing, on the formats templates use ----------------------------------------------------
def test_parse_formats():
    spec = tools.resolve(TOOLS)
    cases = [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>', None, 1),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>', "Let me check.", 2),
        ('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}', None, 1),  # unclosed at the end
        ('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}', None, 1),  # Llama 3.1
        ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', None, 1),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "f"}}, '
         '{"name": "get_time", "arguments": {"zone": "CET"}}]', None, 2),  # Mistral
    ]
    for text, content, n in cases:
        got_content, calls = tools.parse(text, spec)
        assert got_content == content and len(calls) == n, text
        for c in calls:
            check_call(c)
        assert len({c["id"] for c in calls}) == n
    # not calls: prose, JSON that names no offered tool, broken JSON
    for text in ("The weather is fine.", '{"name": "rm_rf", "arguments": {}}', '<tool_call>{"name": "get_time", "argu',
                 '{"answer": 42}'):
        assert tools.parse(text, spec) == (text, [])


def test_resolve_refuses_bad_requests():
    bad = [dict(tools="x"), dict(tools=[{"type": "code"}]), dict(tools=[{"type": "function", "function": {"name": "a b"}}]),
           dict(tools=[WEATHER, WEATHER]), dict(tools=[WEATHER], tool_choice="always"),
           dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
           dict(tool_choice="auto"), dict(functions=[WEATHER["function"]], tools=[WEATHER]),
           dict(function_call="auto"), dict(tools=[{"type": "function", "function": {"name": "f", "parameters": 3}}]),
           dict(tools=[WEATHER] * 200)]
    for kw in bad:
        with pytest.raises(ValueError):
            tools.resolve(**kw)
    assert tools.resolve() is None and tools.resolve([], "none") is None
    assert tools.resolve(functions=[WEATHER["function"]], function_call={"name": "get_weather"}).choice == "get_weather"


def test_template_receives_tools_and_history(llm):
    """transformers' convention: the template gets ``tools`` and assistant calls with arguments as
    an object; without tool support, the Hermes fallback is written into the messages."""
    spec = tools.resolve(TOOLS)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    msgs, extra = tools.prepare(history, spec, TOOLS_TEMPLATE)
    text = render_chat(llm.engine.model, msgs, **extra)
    assert json.dumps(WEATHER) in text and '"arguments": {"city": "Paris", "unit": "c"}' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    msgs, extra = tools.prepare(history, spec, None)  # no template: the fallback
    assert extra == {} and msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in msgs[2]["content"]
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"}
    # tool_choice none: the tools stay out of the prompt
    msgs, extra = tools.prepare(ASK, tools.resolve(TOOLS, "none"), TOOLS_TEMPLATE)
    assert extra == {} and msgs == ASK


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_choices_give_valid_calls(llm, stream):
    for choice, names in (("required", ("get_weather", "get_time")),
                          ({"type": "function", "function": {"name": "get_time"}}, ("get_time",))):
        for seed in (1, 2):
            r = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice=choice, temperature=0.8, seed=seed,
                                           max_tokens=200, stream=stream)
            if stream:
                chunks = list(r)
                calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
                content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
                finish = chunks[-1]["choices"][0]["finish_reason"]
                assert [tc["index"] for tc in calls] == list(range(len(calls)))
                assert "usage" in chunks[-1]
            else:
                msg = r["choices"][0]["message"]
                calls, content, finish = msg["tool_calls"], msg["content"] or "", r["choices"][0]["finish_reason"]
            assert finish == "tool_calls" and content == "" and len(calls) == 1, r
            check_call(calls[0], names)


def test_tool_choice_none_and_auto_give_text(llm):
    none = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16)
    plain = llm.create_chat_completion(ASK, temperature=0, max_tokens=16)
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    assert "tool_calls" not in none["choices"][0]["message"]
    # auto on a random-weight model: it answers with text, streamed and not, the same text
    a = llm.create_chat_completion(ASK, tools=TOOLS, temperature=0, max_tokens=24)
    s = "".join(c["choices"][0]["delta"].get("content") or "" for c in llm.create_chat_completion(
        ASK, tools=TOOLS, temperature=0, max_tokens=24, stream=True))
    assert a["choices"][0]["finish_reason"] in ("stop", "length") and a["choices"][0]["message"]["content"] == s


@pytest.mark.parametrize("template,fmt", [(LLAMA3_TEMPLATE, "llama3"), (MISTRAL_TEMPLATE, "mistral"), (None, "hermes")])
def test_each_format_forced_call(tmp_path, template, fmt):
    """Llama 3.1 JSON, Mistral [TOOL_CALLS] and the Hermes fallback (no template: Vicuna) each get
    a grammar in their format, and the call parses back."""
    path = write_llama_gguf(str(tmp_path / "m.gguf"), seed=4, chat_template=template).path
    m = Medusa(path, n_ctx=2048, tree="chain:0")
    assert tools.call_format(template) == fmt
    r = m.create_chat_completion(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                 temperature=0, max_tokens=200)
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    check_call(r["choices"][0]["message"]["tool_calls"][0], ("get_weather",))


def test_functions_legacy_api(llm):
    r = llm.create_chat_completion(ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"},
                                   temperature=0, max_tokens=200)
    ch = r["choices"][0]
    assert ch["finish_reason"] == "function_call"
    assert json.loads(ch["message"]["function_call"]["arguments"])["city"] in ("Paris", "Oslo", "Rome")
    with pytest.raises(ValueError, match="grammar"):
        llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})


# -- end to end: the openai client against the server -------------------------------------------
class Server:
    def __init__(self, model, log_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "medusa_edge.cli", "serve", model, "--port", str(self.port),
                                      "--n-ctx", "2048"], stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self):
        httpx = pytest.importorskip("httpx")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(open(self.log_path).read())
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail("server not ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log_file.close()


def test_openai_client_tool_flow(gguf, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    srv = Server(gguf, tmp_path / "server.log").wait_ready()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0, timeout=300)
        for stream in (False, True):
            # 1. tools offered, a call demanded: tool_calls back
            kw = dict(model="any", tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
            if stream:
                deltas = [c.choices[0] for c in client.chat.completions.create(messages=ASK, stream=True, **kw) if c.choices]
                assert deltas[-1].finish_reason == "tool_calls"
                tcs = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
                call = {"id": tcs[0].id, "type": tcs[0].type,
                        "function": {"name": tcs[0].function.name, "arguments": tcs[0].function.arguments}}
            else:
                r = client.chat.completions.create(messages=ASK, **kw)
                assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
                call = r.choices[0].message.tool_calls[0].model_dump()
            name, args = check_call(call)
            # 2. the tool's result sent back, with the assistant message as the SDK returns it: a final answer
            history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": "18 C"})}]
            final = client.chat.completions.create(model="any", messages=history, tools=TOOLS, temperature=0,
                                                   max_tokens=24, tool_choice="none")
            assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
            assert not final.choices[0].message.tool_calls
            auto = client.chat.completions.create(model="any", messages=history, tools=TOOLS, temperature=0, max_tokens=24)
            assert auto.choices[0].message.content or auto.choices[0].message.tool_calls
        # named function
        r = client.chat.completions.create(model="any", messages=ASK, tools=TOOLS, temperature=0.7, seed=3, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
        check_call(r.choices[0].message.tool_calls[0].model_dump(), ("get_time",))
        # refused by name
        for kw, param in ((dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools"),
                          (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                          (dict(tool_choice="required"), "tool_choice")):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="any", messages=ASK, max_tokens=4, **kw)
            assert e.value.param == param, e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="any", max_tokens=4, messages=ASK + [
                {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function", "function": 3}]}])
        assert e.value.param == "messages"
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="any", prompt="x", max_tokens=4, extra_body={"tools": TOOLS})
        assert e.value.param == "tools"
    finally:
        srv.stop()
    assert "Traceback" not in open(tmp_path / "server.log").read()
