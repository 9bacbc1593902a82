"""`medusa-edge serve` as a strict, compatible server, against a real server subprocess on
127.0.0.1 (bundled demo model) and the official openai client: any model name is served and the
response names the real one; CORS preflights; Host and Origin allow-lists (DNS rebinding,
cross-origin text/plain POSTs); the API key as x-api-key; /v1/health; every body field honoured or
refused by name; body, header and prompt limits; read timeouts that half-sent requests cannot
outlast; and a bounded fuzz loop of malformed requests that all get 4xx or a clean close."""

import json
import random
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from medusa_edge.server.access import Access  # noqa: E402 (needs the server extra)
from test_server import ServerProcess  # noqa: E402 (the same subprocess harness)

MODEL = "demo-model.gguf"
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
SKY = [{"role": "user", "content": "What colour is the sky?"}]
MAX_BODY = 256 * 1024
TIMEOUT = 1.0  # header and body timeouts of the test server
MAX_PROMPT = 200  # --max-prompt-tokens
APP_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("server_hardening")
    s = ServerProcess(d / "hardening.log", "--queue", "4", "--api-key", KEY, "--max-body-bytes", str(MAX_BODY),
                      "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT),
                      "--max-prompt-tokens", str(MAX_PROMPT), "--cors-origins", APP_ORIGIN)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def post(server, path, body, headers=None, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # ensure_ascii: surrogates as \\ud800
    return httpx.post(f"{server.url}/v1/{path}", content=data,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})}, **kw)


def error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def raw(port, data: bytes, timeout=10.0, close_after_send=False) -> tuple:
    """Send ``data`` on a fresh connection; (status or None, seconds until the server answered or closed)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # the server answered and closed while we were still sending
            pass
        if close_after_send:
            return None, 0.0
        got = b""
        try:
            while b"\r\n" not in got:
                part = s.recv(4096)
                if not part:
                    break
                got += part
        except ConnectionResetError:
            pass
        status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else None
        return status, time.monotonic() - t0


# -- compatibility ---------------------------------------------------------------------------------
def test_any_model_name_openai_client(server):
    client = server.client(api_key=KEY)
    for name in ("gpt-4o", "llama3", "", "x" * 300):
        r = client.chat.completions.create(model=name, messages=SKY, temperature=0, max_tokens=8)
        assert r.model == MODEL and r.choices[0].message.content
    r = client.completions.create(model="text-davinci-003", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert r.model == MODEL and r.usage.completion_tokens == 4


def test_unsupported_field_refused_by_name_openai_client(server):
    client = server.client(api_key=KEY)
    for field, value in [("mirostat_mode", 2),
                         ("n_probs", 3), ("ignore_eos", True), ("stop_token_ids", [2]), ("suffix_x", 1),
                         ("dry_multiplier", 0.8)]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=4, extra_body={field: value})
        assert e.value.param == field and e.value.code == "unsupported_parameter", (field, e.value.body)
        assert field in e.value.message
    # constrained output is honoured (tests/test_grammar.py); a bad one is refused naming its field
    for field, value in [("response_format", {"type": "xml"}), ("grammar", "root ::= ("),
                         ("json_schema", {"type": "object", "properties": 1}), ("logit_bias", {"1": "5"}),
                         ("logit_bias", {"99999999": 1}), ("logit_bias", {"x": 1})]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=4, extra_body={field: value})
        assert e.value.param == field and e.value.code == "invalid_value", (field, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=SKY, tool_choice="auto")  # no tools
    assert e.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert e.value.param == "suffix"


def test_neutral_and_honoured_fields(server):
    client = server.client(api_key=KEY)
    # neutral values change nothing: the answer equals the plain request's
    plain = client.chat.completions.create(model=MODEL, messages=SKY, temperature=0, max_tokens=12)
    same = client.chat.completions.create(
        model=MODEL, messages=SKY, temperature=0, max_tokens=12, response_format={"type": "text"}, user="u1",
        extra_body={"mirostat_mode": 0, "tfs_z": 1.0, "logit_bias": {}, "cache_prompt": True, "n_probs": 0,
                    "ignore_eos": False, "grammar": None})
    assert same.choices[0].message.content == plain.choices[0].message.content
    # llama-server's n_predict is max_tokens
    r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"n_predict": 5})
    assert r.usage.completion_tokens == 5
    error(post(server, "completions", {"prompt": "x", "n_predict": 5, "max_tokens": 6}), 400, "n_predict")
    # stream_options.include_usage: a last chunk with usage and no choices, as OpenAI sends it
    chunks = list(client.chat.completions.create(model=MODEL, messages=SKY, temperature=0, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason and chunks[-1].usage == chunks[-2].usage
    error(post(server, "chat/completions", {"messages": SKY, "stream_options": {"include_usage": True}}), 400,
          "stream_options")


@pytest.mark.parametrize("path,body,param,code", [
    ("completions", {"prompt": "x", "top_k": 2**31}, "top_k", "invalid_value"),
    ("completions", {"prompt": "x", "top_k": -1}, "top_k", "invalid_value"),
    ("completions", {"prompt": "x", "max_tokens": 2**31}, "max_tokens", "invalid_value"),
    ("completions", {"prompt": "x", "max_tokens": 10**400}, "max_tokens", "invalid_value"),
    ("completions", {"prompt": "x", "seed": 2**64}, "seed", "invalid_value"),
    ("completions", {"prompt": "x", "temperature": 1e300}, "temperature", "invalid_value"),
    ("completions", {"prompt": "x", "temperature": 1e-30}, "temperature", "invalid_value"),
    ("completions", {"prompt": "x", "repeat_penalty": 1e-30}, "repeat_penalty", "invalid_value"),
    ("completions", {"prompt": "x", "top_p": -0.1}, "top_p", "invalid_value"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
    ("completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo", "invalid_value"),
    ("chat/completions", {"messages": SKY, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("completions", {"prompt": "x", "stop": ["a"] * 17}, "stop", "invalid_value"),
    ("completions", {"prompt": "\ud800"}, "prompt", "invalid_value"),
    ("completions", {"prompt": "x", "model": "gpt\udfff"}, "model", "invalid_value"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a\ud83d"}]}, "messages[0].content", "invalid_value"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages[0].content[0].text", "invalid_value"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages", "invalid_value"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "hi", "tool_call_id": "1"}]}, "messages",
     "invalid_value"),  # answers no call
    ("chat/completions", {"messages": [{"role": "function", "content": "hi"}]}, "messages", "invalid_value"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages",
     "unsupported_parameter"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages", "unsupported_parameter"),
    ("completions", {"prompt": "hi " * 5000}, "prompt", "context_length_exceeded"),  # bytes: before tokenizing
    ("completions", {"prompt": "hi " * (MAX_PROMPT + 10)}, "prompt", "context_length_exceeded"),  # counted tokens
    ("completions", {"prompt": [5] * (MAX_PROMPT + 1)}, "prompt", "context_length_exceeded"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * (MAX_PROMPT + 10)}]}, "messages",
     "context_length_exceeded"),
])
def test_refused_values(server, path, body, param, code):
    error(post(server, path, body), 400, param, code)


def test_deep_json_and_bad_text(server):
    error(post(server, "completions", b"[" * 10000 + b"]" * 10000), 400, None, "invalid_json")
    error(post(server, "completions", b'{"prompt": ' + b'{"a": ' * 10000 + b"1" + b"}" * 10001), 400, None, "invalid_json")
    error(post(server, "completions", b'{"prompt": "x", "top_k": NaN}'), 400, None, "invalid_json")
    error(post(server, "completions", b'{"prompt": "\xff\xfe"}'), 400, None, "invalid_json")
    error(post(server, "completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"), 400, None, "invalid_json")


# -- access --------------------------------------------------------------------------------------
def test_health_and_api_key(server):
    for path in ("/health", "/v1/health"):
        r = httpx.get(server.url + path)  # no key needed
        assert r.status_code == 200 and r.json()["status"] == "ok"
    error(httpx.get(server.url + "/v1/models"), 401, None, "invalid_api_key")
    error(httpx.get(server.url + "/v1/models", headers={"x-api-key": "wrong"}), 401)
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).json()["data"][0]["id"] == MODEL
    r = post(server, "chat/completions", {"messages": SKY, "max_tokens": 3}, headers={"Authorization": "", "x-api-key": KEY})
    assert r.status_code == 200


def test_cors_preflight(server):
    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8000", "https://localhost", APP_ORIGIN):
        r = httpx.options(server.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert r.status_code == 204, (origin, r.text)
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "x-stainless-os" in r.headers["access-control-allow-headers"]
        assert "origin" in r.headers["vary"].lower()
    # the actual request from an allowed origin carries the header, and its errors do too
    r = post(server, "chat/completions", {"messages": SKY, "max_tokens": 3}, headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": APP_ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    # a foreign origin: no preflight, no request
    r = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                                    "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_host_and_origin_allow_lists(server):
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own name as Host
    error(post(server, "completions", {"prompt": "x", "max_tokens": 2}, headers={"Host": "evil.example"}), 403, None,
          "forbidden_host")
    error(post(server, "completions", {"prompt": "x"}, headers={"Host": f"127.0.0.1.evil.example:{server.port}"}), 403)
    # a cross-origin "simple" request (text/plain, no preflight) from a web page
    error(post(server, "completions", {"prompt": "x", "max_tokens": 2},
               headers={"Origin": "https://evil.example", "Content-Type": "text/plain"}), 403, None, "forbidden_origin")
    error(post(server, "completions", {"prompt": "x"}, headers={"Origin": "null"}), 403)
    error(post(server, "completions", {"prompt": "x"}, headers={"Origin": "http://localhost.evil.example"}), 403)
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "LOCALHOST"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host, **AUTH}).status_code == 200, host


def test_access_policy_unit():
    a = Access("127.0.0.1")
    assert a.host_ok("localhost:8080") and a.host_ok("[::1]:1") and a.host_ok("127.0.0.2") and a.host_ok(None)
    assert not a.host_ok("192.168.1.5:8080") and not a.host_ok("evil.example") and not a.host_ok("[::1")
    assert a.origin_ok("http://localhost:3000") and a.origin_ok("https://127.0.0.1") and a.origin_ok("http://[::1]:9")
    assert not a.origin_ok("null") and not a.origin_ok("file://") and not a.origin_ok("http://localhost:3000/x")
    assert not a.origin_ok("chrome-extension://abc") and not a.origin_ok("http://localhost:bad")
    lan = Access("192.168.1.5", cors_origins=["https://app.example/"], allowed_hosts=["api.example"])
    assert lan.host_ok("192.168.1.5:8080") and lan.host_ok("api.example") and not lan.host_ok("10.0.0.1")
    assert lan.host_ok("app.example") and not lan.host_ok("other.example")  # a trusted origin's name
    assert lan.origin_ok("https://app.example") and not lan.origin_ok("https://other.example")
    wild = Access("0.0.0.0")
    assert wild.host_ok("10.0.0.1:8080") and wild.host_ok("[fe80::1]") and not wild.host_ok("evil.example")
    assert Access("127.0.0.1", cors_origins=["*"], allowed_hosts=["*"]).origin_ok("https://any.example")
    assert Access("127.0.0.1", allowed_hosts=["*"]).host_ok("any.example")


# -- limits --------------------------------------------------------------------------------------
def _rss_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_body_size_limit(server):
    error(post(server, "completions", b" " * (MAX_BODY + 1)), 413, None, "request_too_large")
    rss = _rss_kib(server.proc.pid)

    def chunked():  # 10 MB with no Content-Length: refused once past the limit, never held
        for _ in range(320):
            yield b" " * 32768

    try:
        r = httpx.post(server.url + "/v1/completions", content=chunked(), headers=AUTH)
        assert r.status_code == 413
    except httpx.TransportError:  # answered 413 and closed while the client was still sending
        pass
    assert _rss_kib(server.proc.pid) - rss < 32 * 1024
    # a 10 MB declared body is refused from its headers, at once
    status, seconds = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 10000000\r\n\r\n{")
    assert status == 413 and seconds < 5
    assert post(server, "completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_header_limit(server):
    r = httpx.get(server.url + "/v1/models", headers={"X-Big": "a" * 20000, **AUTH})
    error(r, 431, None, "headers_too_large")
    r = httpx.get(server.url + "/v1/models", headers={**{f"X-H{i}": "v" * 40 for i in range(500)}, **AUTH})
    assert r.status_code == 431
    assert httpx.get(server.url + "/v1/models", headers={"X-Ok": "a" * 8000, **AUTH}).status_code == 200
    # a head sent slowly is bounded while it arrives (h11 answers 400 past the limit)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(100):
                s.sendall(b"X-Pad: " + b"p" * 1000 + b"\r\n")
                time.sleep(0.001)
        except OSError:
            pass
        got = s.recv(100)
    assert got.startswith(b"HTTP/1.1 400") or got == b""


def test_half_sent_requests_time_out_and_do_not_starve(server):
    """50 bodies declared as 1,000 bytes and sent as 10, and 20 request heads never finished: each is
    closed within the timeout, and meanwhile other clients are answered at once."""
    results, threads = [], []

    def half(data):
        results.append(raw(server.port, data, timeout=TIMEOUT + 20))

    for i in range(70):
        data = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123456789" if i < 50
                else b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        threads.append(threading.Thread(target=half, args=(data,)))
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert httpx.get(server.url + "/v1/health", timeout=5).status_code == 200
    assert post(server, "completions", {"prompt": "Once upon a time", "max_tokens": 4}, timeout=30).status_code == 200
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(TIMEOUT + 30)
    assert len(results) == 70
    assert sorted(s for s, _ in results if s is not None) == [408] * 50  # the heads: closed with no answer
    assert max(sec for _, sec in results) < TIMEOUT + 4, sorted(sec for _, sec in results)[-5:]
    # a connection that sends nothing at all is closed too
    assert raw(server.port, b"", timeout=TIMEOUT + 20)[1] < TIMEOUT + 4


# -- fuzz ----------------------------------------------------------------------------------------
# field -> values that are wrong for it on both endpoints (a type, or a range the native layer cannot take)
_NOT_NUMBER = ["7", [], {}, True, [1], "\ud800", {"a": [[[]]]}]
_INT_BAD = _NOT_NUMBER + [10**30, -(10**30), 10**400, 1.5, 1e308]
_FLOAT_BAD = _NOT_NUMBER + [1e308, -1e308, 10**400, -(10**400)]
_BAD = {
    "max_tokens": _INT_BAD + [0, -1, 2**31], "top_k": _INT_BAD + [-1, 2**31, 2**63], "seed": _INT_BAD + [2**64, -(2**63) - 1],
    "top_logprobs": _INT_BAD + [21, -1], "n": _INT_BAD + [2, 0], "n_predict": _INT_BAD + [0, -2],
    "logprobs": ["7", [], {}, 1.5, -1, 10**30], "temperature": _FLOAT_BAD + [-0.5, 1001, 1e-30], "top_p": _FLOAT_BAD + [1.01, -0.1],
    "min_p": _FLOAT_BAD + [2, -1], "typical_p": _FLOAT_BAD + [0, 1.5], "repeat_penalty": _FLOAT_BAD + [0, 1e-30, -1, 101],
    "presence_penalty": _FLOAT_BAD + [2.5, -3], "frequency_penalty": _FLOAT_BAD + [2.5, -3],
    "mirostat_tau": ["7", [], {}, True], "echo": [1, 0, "true", [], {}], "stream": [1, 0, "true", [], {}],
    "cache_prompt": [1, "no", []], "stop": [1, [1], {}, ["a"] * 17, ["x" * 2000], True, [None], ["\udc00"]],
    "model": [1, [], {}, True, 1.5, "\ud800"], "user": [1, [], {}, True],
    "stream_options": [{"include_usage": True}, {"x": 1}, 1, "a"],
    "max_completion_tokens": _INT_BAD + [0, -1],
    "response_format": ["text", {}, [], 1, {"type": "text", "x": 1}, {"type": "xml"}, {"type": "json_schema"},
                        {"type": "json_schema", "json_schema": {"schema": 5}}, {"type": "json_object", "schema": []}],
    "grammar": [1, [], {}, True, "a", "root ::= (", "root ::= undefined", "(" * 5000],
    "json_schema": [1, "a", [], True, {"type": "object", "properties": 1}, {"$ref": "https://example.com/s.json"}],
    "logit_bias": [1, "a", [], True, {"a": 1}, {"1": "x"}, {"-1": 1}, {"99999999": 1}, {"1": 1e308}, {"1": [1]},
                   {str(i): 1 for i in range(1025)}],
    "parallel_tool_calls": [False, 1, "a", [], {}],
}
_UNKNOWN = ["suffix_", "tools", "functions", "tool_choice", "n_probs", "ignore_eos", "min_keep",
            "dry_base", "xtc_probability", "samplers", "id_slot", "lora", "t_max_predict_ms", "return_tokens",
            "penalty_last_n", "stop_token_ids", "mirostat_mode", "store", "metadata", "service_tier",
            "modalities", "audio", "prediction", "reasoning_effort", "function_call",
            "web_search_options", "\u00e9t\u00e9", "a b", "x"]
_STREAM = dict(max_tokens=64, temperature=0, stream=True)


def _malformed(rng: random.Random):
    """(path, body bytes, extra headers) of one malformed request."""
    chat = rng.random() < 0.5
    path = "chat/completions" if chat else "completions"
    good = {"messages": SKY} if chat else {"prompt": "Once upon a time"}
    good = {**good, "max_tokens": 4, "temperature": 0}
    kind = rng.randrange(10)
    headers = {}
    if kind == 0:  # broken JSON
        data = json.dumps(good).encode()
        choice = rng.randrange(6)
        if choice == 0:
            body = data[: rng.randrange(1, len(data) - 1)]
        elif choice == 1:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif choice == 2:
            body = data + b"}garbage"
        elif choice == 3:
            body = data.replace(b"4", b"Infinity", 1)
        elif choice == 4:
            body = b'{"prompt": "\xc3\x28", "messages": "\xed\xa0\x80"}'
        else:
            body = b""
        return path, body, headers
    body = dict(good)
    if kind == 1:  # a wrong type or out-of-range number
        field = rng.choice(sorted(_BAD))
        if field == "max_completion_tokens" and not chat:
            field = "max_tokens"
        if field == "echo" and chat:
            field = "stream"
        body[field] = rng.choice(_BAD[field])
    elif kind == 2:  # unknown or unsupported fields
        body[rng.choice(_UNKNOWN)] = rng.choice([1, "a", [1], {"a": 1}, True])
    elif kind == 3:  # deep nesting somewhere
        depth = rng.choice([65, 200, 1000, 5000])
        field = rng.choice(["prompt", "messages", "stop", "x"])
        return path, (b'{"' + field.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"), headers
    elif kind == 4:  # surrogates in text
        s = rng.choice(["\ud800", "a\udfff", "\udbff\udbff", "ok\ud83d"])
        where = rng.randrange(4)
        if where == 0:
            body["model"] = s
        elif where == 1:
            body["stop"] = [s]
        elif where == 2:
            body[s] = 1
        elif chat:
            body["messages"] = [{"role": "user", "content": s}]
        else:
            body["prompt"] = s
    elif kind == 5:  # bad messages or prompts
        if chat:
            body["messages"] = rng.choice([[], "hi", [1], [{"role": "robot", "content": "x"}], [{"role": "user"}] * 0,
                                           [{"role": "user", "content": 5}], [{"role": None, "content": "x"}],
                                           [{"role": "user", "content": [{"type": "image_url"}]}],
                                           [{"role": "user", "content": "x", "tool_calls": [{}]}],
                                           [{"role": "function", "content": "x"}], [{"content": "x"}]])
        else:
            body["prompt"] = rng.choice([[], [-1], [10**9], [1.5], {"a": 1}, ["a", "b"], [True], None, 5, [[1]]])
    elif kind == 6:  # the body is not an object
        return path, json.dumps(rng.choice([[], [good], "x", 1, None, True])).encode(), headers
    elif kind == 7:  # a foreign Host or Origin, or no key
        choice = rng.randrange(3)
        headers = ({"Host": rng.choice(["evil.example", "attacker.test:80", "10.1.2.3"])} if choice == 0 else
                   {"Origin": rng.choice(["https://evil.example", "null", "http://localhost.evil"])} if choice == 1 else
                   {"Authorization": rng.choice(["", "Bearer nope", "Basic x"])})
    elif kind == 8:  # too long a prompt
        if chat:
            body["messages"] = [{"role": "user", "content": "word " * rng.choice([MAX_PROMPT + 5, 4000, 40000])}]
        else:
            body["prompt"] = "word " * rng.choice([MAX_PROMPT + 5, 4000, 40000])
    else:  # oversized body
        return path, b'{"prompt": "' + b"a" * (MAX_BODY + rng.randrange(1, 1000)) + b'"}', headers
    return path, json.dumps(body).encode(), headers


def _raw_malformed(rng: random.Random, port: int):
    """(bytes, close right after sending) of a malformed or cut-off request on a raw connection."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n".encode()
    full = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    kind = rng.randrange(7)
    if kind == 0:  # cut off mid-request (head or body), then closed
        return full[: rng.randrange(1, len(full) - 1)], True
    if kind == 1:  # a request line that is not HTTP
        return rng.choice([b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
                           b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"]), False
    if kind == 2:  # conflicting or invalid lengths
        return rng.choice([head + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
                           head + b"Content-Length: -1\r\n\r\n", head + b"Content-Length: abc\r\n\r\n",
                           head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"]), False
    if kind == 3:  # a huge header
        return head + b"X-Pad: " + b"p" * 20000 + b"\r\n\r\n", False
    if kind == 4:  # a body declared larger than the limit
        return head + f"Content-Length: {MAX_BODY * 40}\r\n\r\n".encode() + body, False
    if kind == 5:  # an unknown path or method
        return rng.choice([b"DELETE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                           b"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                           b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"]), False
    return full.replace(b"Host: 127.0.0.1", b"Host: evil.example"), False


def test_fuzz_malformed_requests(server, capsys):
    """2,020 malformed requests (at least 1,000 asked): each gets a 4xx (or 503 from the queue) or a clean close;
    none gets another 5xx; cut-off streams stop their generation; then a good request succeeds."""
    rng = random.Random(20240523)
    statuses: dict = {}
    bad = []
    t0 = time.monotonic()
    n = 0

    def record(status, what):
        statuses[status] = statuses.get(status, 0) + 1
        if status is not None and (status >= 500 and status != 503 or status < 400):
            bad.append((status, what))

    with httpx.Client(base_url=server.url + "/v1", headers=AUTH, timeout=60) as client:
        for _ in range(1800):
            path, data, headers = _malformed(rng)
            try:
                r = client.post(path, content=data, headers={"Content-Type": "application/json", **headers})
                record(r.status_code, (path, data[:200], headers, r.text[:300]))
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "queue_full"
            except httpx.TransportError:  # the server closed the connection (oversized body): a clean close
                record(None, None)
            n += 1
        t_json = time.monotonic() - t0
        for _ in range(200):  # raw connections: cut-off, garbage, oversized heads
            data, close = _raw_malformed(rng, server.port)
            status, _ = raw(server.port, data, timeout=TIMEOUT + 20, close_after_send=close)
            record(status, data[:200])
            n += 1
        t_raw = time.monotonic() - t0 - t_json
        for i in range(20):  # streams cut off after their first chunk
            path, body = (("chat/completions", {"messages": SKY}) if i % 2 else ("completions", {"prompt": "Once upon"}))
            with client.stream("POST", path, json={**body, **_STREAM}) as r:
                assert r.status_code in (200, 503), r.read()
                if r.status_code == 200:
                    next(r.iter_lines())
            n += 1
    elapsed = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nfuzz: {n} malformed requests in {elapsed:.1f} s (bodies {t_json:.1f} s, raw connections {t_raw:.1f} s, "
              f"cut-off streams {elapsed - t_json - t_raw:.1f} s); statuses {dict(sorted(statuses.items(), key=str))}")
    assert not bad, bad[:5]
    assert n >= 1000
    # the server goes on: a good request through the openai client
    r = server.client(api_key=KEY).chat.completions.create(model="anything", messages=SKY, temperature=0, max_tokens=16)
    assert r.model == MODEL and "blue" in r.choices[0].message.content
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert '" 500' not in log


def test_serve_limit_defaults():
    """The limits' flags and their defaults: 4 MiB bodies, 16 KiB heads, 10 s to send either, prompts
    up to the context size, loopback hosts and origins only."""
    import argparse

    from medusa_edge import cli
    from medusa_edge.server import Limits

    sub = argparse.ArgumentParser().add_subparsers()
    cli._add_serve(sub)
    args = sub.choices["serve"].parse_args([])
    assert (args.max_body_bytes, args.max_header_bytes, args.header_timeout, args.body_timeout, args.max_prompt_tokens,
            args.cors_origins, args.allowed_hosts) == (4 * 2**20, 16384, 10.0, 10.0, None, [], [])
    d = Limits()
    assert (d.max_body_bytes, d.max_header_bytes, d.header_timeout, d.body_timeout, d.max_prompt_tokens) == \
        (args.max_body_bytes, args.max_header_bytes, args.header_timeout, args.body_timeout, None)
    args = sub.choices["serve"].parse_args(["--cors-origins", "https://a.example,https://b.example", "--cors-origins", "*"])
    assert args.cors_origins == ["https://a.example,https://b.example", "*"]
