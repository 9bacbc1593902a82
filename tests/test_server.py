"""`medusa-edge serve` through the official openai client: a real server subprocess on 127.0.0.1
(bundled demo model), streaming and whole chat and text completions, OpenAI-shaped errors, a client
that disconnects mid-stream, 20 concurrent streaming clients, a full queue, the API key."""

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from medusa_edge import cli
from medusa_edge.default_model import demo_model_path

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

MODEL = "demo-model.gguf"  # the served id: the GGUF's file name
SKY = [{"role": "user", "content": "What colour is the sky?"}]
QUESTIONS = ["What colour is the sky?", "Tell me a story about a fox.", "Count from 1 to 10.", "What is 2 plus 3?"]
# A slow request: near-uniform sampling over the demo's 1024 tokens; with seed 0 the end-of-text
# token is drawn only after ~800 tokens (seconds of decoding), far more than the tests read.
SLOW = dict(max_tokens=1900, temperature=100.0, seed=0, extra_body={"top_k": 0, "min_p": 0.0}, top_p=1.0)


class ServerProcess:
    def __init__(self, log_path, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medusa_edge.cli", "serve", demo_model_path(), "--port", str(self.port), *args],
            stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def client(self, api_key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=300, **kw)  # generous: the machine may be busy

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    # main: room for 20 concurrent clients; small: one waiting slot and an API key
    main = ServerProcess(d / "main.log", "--queue", "32")
    small = ServerProcess(d / "small.log", "--queue", "1", "--api-key", "sekret")
    try:
        yield {"main": main.wait_ready(), "small": small.wait_ready()}
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


def ask(client, question, stream=True):
    """(answer, last chunk) of a greedy chat answer."""
    msgs = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=48)
        return r.choices[0].message.content, r
    text, last = [], None
    for c in client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=48, stream=True):
        text.append(c.choices[0].delta.content or "")
        last = c
    return "".join(text), last


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_stream(server):
    chunks = list(server.client().chat.completions.create(model=MODEL, messages=SKY, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "blue" in text
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and not last.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert last.usage.completion_tokens >= 1 and last.usage.prompt_tokens >= 1
    medusa = last.model_extra["medusa"]
    assert medusa["steps"] >= 1 and medusa["tokens_per_step"] >= 1 and "head_acceptance" in medusa


def test_chat_whole(server):
    r = server.client().chat.completions.create(model=MODEL, messages=SKY, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and "blue" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["medusa"]["generated_tokens"] >= r.usage.completion_tokens
    # the same answer streamed
    assert ask(server.client(), SKY[0]["content"])[0] == r.choices[0].message.content


def test_completions(server):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.choices[0].text
    assert r.model_extra["medusa"]["steps"] >= 1
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    assert "medusa" in chunks[-1].model_extra


def test_model_field_optional(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": SKY, "temperature": 0})
    assert r.status_code == 200 and "blue" in r.json()["choices"][0]["message"]["content"]


def _error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("path,body,status,param,code", [
    ("chat/completions", {"model": ["gpt-4"], "messages": SKY}, 400, "model", "invalid_type"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 3000}]}, 400, "messages", "context_length_exceeded"),
    ("completions", {"prompt": "hi " * 3000}, 400, "prompt", "context_length_exceeded"),
    ("chat/completions", {"messages": SKY, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("chat/completions", {"messages": SKY, "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("chat/completions", {"messages": SKY, "presence_penalty": 3}, 400, "presence_penalty", "invalid_value"),
    ("chat/completions", {"messages": SKY, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400, "tools",
     "invalid_value"),
    ("chat/completions", {"messages": SKY, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("chat/completions", {"messages": SKY, "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ("chat/completions", {"messages": SKY, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("chat/completions", {"messages": "What colour is the sky?"}, 400, "messages", "invalid_type"),
    ("chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages", None),
    ("chat/completions", {}, 400, "messages", "missing_required_parameter"),
    ("completions", {"prompt": {"text": "x"}}, 400, "prompt", "invalid_type"),
    ("completions", {"prompt": "x", "stop": 3}, 400, "stop", "invalid_type"),
])
def test_bad_requests(server, path, body, status, param, code):
    _error(httpx.post(f"{server.url}/v1/{path}", json=body), status, param, code)


def test_bad_json_and_path(server):
    _error(httpx.post(server.url + "/v1/chat/completions", content=b"{not json"), 400, None, "invalid_json")
    _error(httpx.post(server.url + "/v1/chat/completions", json=[1, 2]), 400, None, "invalid_json")
    _error(httpx.get(server.url + "/v1/nothing"), 404)


def test_errors_through_openai_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:  # any model name is served, unknown fields are not
        client.chat.completions.create(model="gpt-4", messages=SKY, extra_body={"mirostat_mode": 2})
    assert e.value.code == "unsupported_parameter" and e.value.param == "mirostat_mode"
    with pytest.raises(openai.BadRequestError) as e:  # a streamed request fails before its headers
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 3000}], stream=True)
    assert e.value.code == "context_length_exceeded"


def test_disconnect_stops_generation(server):
    client = server.client()
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", stream=True, **SLOW)
    first = next(iter(stream))
    assert first.choices[0].text
    stream.close()
    deadline = time.monotonic() + 15
    while "generation stopped" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "client disconnected: generation stopped" in server.log()
    assert "blue" in ask(client, SKY[0]["content"])[0]  # the server goes on


def test_concurrent_streams(server, capsys):
    """20 streaming clients at once, greedy: each answer equals the single-client answer."""
    client = server.client()
    expected = {}
    for q in QUESTIONS:
        text, last = ask(client, q)
        expected[q] = (text, last.choices[0].finish_reason)
    n = 20
    barrier = threading.Barrier(n)
    results = [None] * n

    def one(i):
        q = QUESTIONS[i % len(QUESTIONS)]
        c = server.client()
        barrier.wait()
        t0 = time.perf_counter()
        try:
            text, last = ask(c, q)
            results[i] = (q, text, last.choices[0].finish_reason, time.perf_counter() - t0)
        except Exception as e:  # reported below
            results[i] = (q, e, None, None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for q, text, finish, _ in results:
        assert not isinstance(text, Exception), text
        assert (text, finish) == expected[q]
    lat = sorted(r[3] for r in results)
    p50, p95 = statistics.median(lat), lat[int(round(0.95 * (n - 1)))]
    with capsys.disabled():  # shown without -s
        print(f"\n{n} concurrent streaming clients: latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")


def test_full_queue_503(servers):
    """--queue 1: one request runs, one waits, the rest are answered 503 with Retry-After."""
    small = servers["small"]
    client = small.client(api_key="sekret")
    release = threading.Event()
    outcomes = []

    def slow():
        try:
            stream = client.completions.create(model=MODEL, prompt="Once upon a time", stream=True, **SLOW)
        except openai.APIStatusError as e:
            outcomes.append((e.status_code, e.response.headers.get("retry-after"), e.code))
            return
        outcomes.append((200, None, None))
        next(iter(stream))
        release.wait(30)
        stream.close()

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(o[0] == 503 for o in outcomes) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()  # the running stream closes, the waiting one starts and closes
    for t in threads:
        t.join(60)
    assert sorted(o[0] for o in outcomes) == [200, 200, 503, 503], outcomes
    assert all(o[1] is not None and int(o[1]) >= 1 and o[2] == "queue_full" for o in outcomes if o[0] == 503)
    assert "blue" in ask(client, SKY[0]["content"])[0]


def test_api_key(servers):
    small = servers["small"]
    with pytest.raises(openai.AuthenticationError):
        small.client(api_key="wrong").models.list()
    _error(httpx.post(small.url + "/v1/chat/completions", json={"messages": SKY}), 401, None, "invalid_api_key")
    assert [m.id for m in small.client(api_key="sekret").models.list().data] == [MODEL]
    assert httpx.get(small.url + "/health").status_code == 200  # health needs no key


def test_serve_defaults():
    """Loopback only, 16 waiting requests, the demo model, unless told otherwise."""
    sub = argparse.ArgumentParser().add_subparsers()
    cli._add_serve(sub)
    args = sub.choices["serve"].parse_args([])
    assert (args.host, args.port, args.queue, args.model, args.api_key) == ("127.0.0.1", 8080, 16, None, None)
