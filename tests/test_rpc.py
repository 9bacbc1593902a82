"""llama.cpp's RPC backend: a model split over two real ``medusa-edge rpc-server`` processes on
127.0.0.1, Medusa on (the demo model and its heads), gives the text of the same model run locally
with the same numerics settings; ``rpc_servers`` through Medusa, medusa-chat and medusa-edge serve;
one clear error for each way RPC cannot work, and for a llama.cpp built without it."""

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from medusa_edge import Medusa, ModelLoadError, RpcError
from medusa_edge._loader import native
from medusa_edge.core import rpc
from medusa_edge.default_model import demo_model_path

NO_RPC = "llama-cpp-python here was built without llama.cpp's RPC backend (MEDUSA_RPC=1 scripts/setup.sh builds it)"
needs_rpc = pytest.mark.skipif(not native.supports_rpc(), reason=NO_RPC)
PROMPTS = ["Once upon a time", "Q: Tell me about a fox.\nA:", "The little bear went to the river and"]
TIMEOUT = 300  # generous: the machine may be busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RpcServer:
    """``medusa-edge rpc-server`` in a subprocess on a free loopback port, one CPU thread (so its
    one-token decodes past 512 KV cells stay batch-invariant: exact mode holds there too)."""

    def __init__(self, log_path):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "medusa_edge.cli", "rpc-server", "--port", str(self.port),
                                      "-t", "1"], stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.log_path = log_path
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.probe(self.endpoint, timeout=2)
                return
            except RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"rpc-server did not start:\n{open(log_path).read()}")
                time.sleep(0.1)

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
    if not native.supports_rpc():
        pytest.skip(NO_RPC)
    d = tmp_path_factory.mktemp("rpc")
    started = []
    try:
        for i in range(2):
            started.append(RpcServer(d / f"server{i}.log"))
        yield [s.endpoint for s in started]
    finally:
        for s in started:
            s.stop()


def texts(llm, n=64):
    return [llm.create_completion(p, max_tokens=n, temperature=0)["choices"][0]["text"] for p in PROMPTS]


# -- without the RPC backend (the default build) ---------------------------------------------------

@pytest.mark.skipif(native.supports_rpc(), reason="this llama.cpp has the RPC backend: the error is for builds without")
def test_without_rpc_backend_one_clear_error():
    """Every entry point says the build has no RPC backend and how to build one; nothing connects."""
    for call in (lambda: Medusa(demo_model_path(), rpc_servers="127.0.0.1:50052", n_gpu_layers=-1),
                 lambda: Medusa(demo_model_path(), rpc_servers=["127.0.0.1:50052", "127.0.0.1:50053"], n_gpu_layers=-1),
                 lambda: rpc.serve("127.0.0.1", free_port())):
        with pytest.raises(RpcError) as e:
            call()
        msg = str(e.value)
        assert "without llama.cpp's RPC backend" in msg and "MEDUSA_RPC=1 scripts/setup.sh" in msg, msg
        assert 'CMAKE_ARGS="-DGGML_RPC=on"' in msg and "--no-cache-dir" in msg, msg
    assert issubclass(RpcError, ModelLoadError)
    r = subprocess.run([sys.executable, "-m", "medusa_edge.cli", "rpc-server", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "MEDUSA_RPC=1 scripts/setup.sh" in r.stderr, r.stderr


def test_rpc_servers_checked_before_anything_loads():
    """Malformed lists are refused whether or not RPC is built in (no connection is tried)."""
    for bad, what in (("127.0.0.1", "is not 'host:port'"), (["a:1", "a:1"], "listed twice"),
                      ("host:0", "is not 'host:port'"), ("host:http", "is not 'host:port'"), ([5], "not a 'host:port'")):
        with pytest.raises(RpcError, match=what):
            Medusa(demo_model_path(), rpc_servers=bad, n_gpu_layers=-1)
    assert rpc.parse_servers(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert rpc.parse_servers(None) == [] and rpc.parse_servers("") == []


# -- with it ---------------------------------------------------------------------------------------

@needs_rpc
def test_medusa_over_two_rpc_servers_equals_local(servers, capsys):
    """The demo model split over two servers (every layer offloaded) with its heads and their
    tree: the heads run on the output layer's device (the second server), the text equals the
    local CPU run's with the same numerics (bit-exact mode on both), and Medusa accepts."""
    local = Medusa(demo_model_path(), n_ctx=1024, tree="heads")
    remote = Medusa(demo_model_path(), n_ctx=1024, tree="heads", n_gpu_layers=-1, rpc_servers=",".join(servers))
    try:
        m = remote.engine.model
        assert m.rpc_servers == servers
        assert m.devices == [f"RPC0 ({servers[0]})", f"RPC1 ({servers[1]})"]
        assert m.output_device == f"RPC1 ({servers[1]})"
        del m  # close() must free the last reference: a model alive past its servers aborts the process
        assert remote.engine.heads.backend.endswith(f"[{servers[1]}]"), remote.engine.heads.backend
        assert local.engine.heads.backend == "CPU"
        assert native.rpc_in_use(servers[0]) and native.rpc_in_use(servers[1])
        assert remote.engine.guarantee == local.engine.guarantee == "bitwise"
        assert remote.engine.tree.n_nodes > 1
        want = texts(local)
        steps = tokens = 0
        for p, w in zip(PROMPTS, want):
            r = remote.create_completion(p, max_tokens=64, temperature=0)
            assert r["choices"][0]["text"] == w, p
            steps += r["medusa"]["steps"]
            tokens += r["medusa"]["generated_tokens"]
        with capsys.disabled():
            print(f"\n[rpc] 2 servers: text identical to local on {len(PROMPTS)} prompts, {tokens / steps:.2f} tokens/step")
        assert tokens / steps > 1.5
    finally:
        remote.close()
        local.close()
    assert not native.rpc_in_use(servers[0]) and not native.rpc_in_use(servers[1])  # the connections are closed


@needs_rpc
def test_rpc_errors_are_clear(servers):
    """A port nothing listens on, n_gpu_layers=0, a server held by another client, a peer that
    is not an RPC server: RpcError naming the fault, never llama.cpp's abort of the process."""
    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(RpcError, match="nothing listens there; start one there with: medusa-edge rpc-server"):
        Medusa(demo_model_path(), rpc_servers=[servers[0], nobody], n_gpu_layers=-1)
    with pytest.raises(RpcError, match="n_gpu_layers=0"):
        Medusa(demo_model_path(), rpc_servers=servers)
    host, port = servers[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as holder:  # another client: served alone
        holder.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))
        assert len(holder.recv(64)) > 0
        with pytest.raises(RpcError, match="did not answer within 1 s: a server serves one client at a time"):
            rpc.probe(servers[0], timeout=1)
    with socket.socket() as s:  # a TCP peer that closes at once
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        ep = f"127.0.0.1:{s.getsockname()[1]}"
        t = threading.Thread(target=lambda: s.accept()[0].close(), daemon=True)
        t.start()
        with pytest.raises(RpcError, match="is it a llama.cpp RPC server"):
            rpc.probe(ep, timeout=5)
    assert rpc.probe(servers[0]) == tuple(native.rpc_protocol())  # free again once the holder left
    r = subprocess.run([sys.executable, "-m", "medusa_edge.cli", "rpc-server", "--port", port],
                       capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and f"could not listen on {servers[0]}" in r.stderr, r.stderr


@needs_rpc
def test_chat_and_serve_take_rpc(servers, tmp_path):
    """``--rpc`` (the shared argument table) through medusa-chat and medusa-edge serve: the same
    greedy answer as the local model gives."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    question = "What colour is the sky?"
    local = Medusa(demo_model_path(), n_ctx=2048)
    try:
        want = local.create_chat_completion([{"role": "user", "content": question}], temperature=0,
                                            max_tokens=48)["choices"][0]["message"]["content"]
    finally:
        local.close()
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path))
    rpc_args = ["--rpc", ",".join(servers), "-ngl", "-1"]
    r = subprocess.run([sys.executable, "-m", "medusa_edge.cli.chat", demo_model_path(), "--temperature", "0",
                        "-n", "48", "-p", question, *rpc_args], env=env, capture_output=True, text=True,
                       timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "medusa_edge.cli", "serve", demo_model_path(), "--port", str(port),
                             *rpc_args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, open(tmp_path / "serve.log").read()
            time.sleep(0.1)
        got = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=TIMEOUT, json={
            "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 48}).json()
        assert got["choices"][0]["message"]["content"] == want
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
