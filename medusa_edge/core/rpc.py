"""llama.cpp's RPC backend: a model's layers on other machines' devices (docs/scaling.md, "RPC").

A llama.cpp RPC server offers its devices (its GPUs, else its CPU) over TCP. A model loaded with
``rpc_servers`` places layers on them as on local GPUs: every server's devices first, in the order
given, then the local GPUs; ``n_gpu_layers`` counts the layers on all of them (-1: every layer and
the output layer), split by each device's free memory. Each decode then runs device by device and
sends only activations between them; the weights travel once, at load. The output layer sits on
the last device that holds layers, and so do the Medusa heads (native Model.output_device).

This module holds the two things llama.cpp does not:

- ``check_servers``: the servers are checked before llama.cpp connects, because llama.cpp aborts
  the whole process on a server that refuses the connection, does not speak its protocol version,
  or dies (GGML_ABORT in ggml-rpc.cpp). Each is sent the protocol's HELLO (command 14, fixed across
  versions) with a timeout, unless this process holds a connection to it already (a server serves
  one connection at a time, so a second one would wait behind ours).
- ``serve``: the server itself (``medusa-edge rpc-server``). llama-cpp-python builds the RPC backend
  library but not llama.cpp's rpc-server tool, so this calls the function that tool calls,
  ``ggml_backend_rpc_start_server`` (reached through ggml's backend registry, as the tool does),
  with ctypes on the libraries llama-cpp-python installed.

The RPC backend exists only in a llama-cpp-python built with ``GGML_RPC=on``
(``MEDUSA_RPC=1 scripts/setup.sh``); without it every entry point raises ``RpcError`` saying so.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import threading
from typing import Optional, Sequence, Union

from medusa_edge.errors import RpcError

#: How to get a llama-cpp-python with the RPC backend (the error every entry point gives without one).
BUILD_HINT = (
    "this llama-cpp-python was built without llama.cpp's RPC backend. Rebuild it with RPC: "
    "MEDUSA_RPC=1 scripts/setup.sh (from a checkout of medusa-edge), or "
    "CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36 "
    "(--no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so it would reinstall the cached build without RPC)"
)

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
PROBE_TIMEOUT_S = 10.0

# The HELLO exchange (ggml-rpc.cpp): request | cmd u8 = 14 | size u64 | conn_caps[24] |, answered
# with | size u64 | major u8 | minor u8 | patch u8 | pad u8 | conn_caps[24] |. All-zero conn_caps
# ask for no transport upgrade (plain TCP). The command number is fixed across protocol versions.
_RPC_CMD_HELLO = 14
_CONN_CAPS = 24


def _native():
    from medusa_edge._loader import native

    return native


def available() -> bool:
    """Whether the installed llama.cpp has its RPC backend."""
    return bool(_native().supports_rpc())


def parse_servers(servers: Union[str, Sequence[str], None]) -> list[str]:
    """``servers`` as a list of "host:port" (a comma-separated string, as llama.cpp's --rpc and
    llama-cpp-python's ``rpc_servers`` take it, or a list); RpcError for a malformed, repeated or
    out-of-range entry. llama.cpp splits an endpoint at its first ':' and resolves the host as IPv4."""
    if servers is None:
        return []
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise RpcError(f"rpc_servers: {raw!r} is not a 'host:port' string")
        ep = raw.strip()
        if not ep and isinstance(servers, str):
            continue
        host, sep, port = ep.partition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise RpcError(f"rpc_servers: {raw!r} is not 'host:port' (an IPv4 host name or address and a port 1-65535)")
        if ep in out:
            raise RpcError(f"rpc_servers: {ep} is listed twice")
        out.append(ep)
    return out


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """The protocol version (major, minor, patch) the server at ``endpoint`` answers HELLO with;
    RpcError when nothing answers in ``timeout`` seconds or the answer is not one this llama.cpp
    accepts (same major, minor no newer: ggml-rpc.cpp's negotiate_hello)."""
    host, _, port = endpoint.partition(":")
    want = tuple(_native().rpc_protocol())
    start = f"start one there with: medusa-edge rpc-server --host <its address> --port {port}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", _CONN_CAPS) + bytes(_CONN_CAPS))
            head = _recv(s, 8)
            (size,) = struct.unpack("<Q", head)
            body = _recv(s, min(size, 64))
    except socket.timeout:
        raise RpcError(f"RPC server {endpoint} did not answer within {timeout:g} s: a server serves one client at a "
                       "time, and another client may hold it") from None
    except ConnectionRefusedError:
        raise RpcError(f"RPC server {endpoint}: nothing listens there; {start}") from None
    except (OSError, EOFError) as e:  # reset, closed, unreachable, unresolvable
        raise RpcError(f"RPC server {endpoint}: {getattr(e, 'strerror', None) or e}; is it a llama.cpp RPC server? "
                       f"({start})") from None
    if len(body) < 3:
        raise RpcError(f"{endpoint} is not a llama.cpp RPC server (it answered HELLO with {size} bytes)")
    got = (body[0], body[1], body[2])
    if got[0] != want[0] or got[1] > want[1] or size != 4 + _CONN_CAPS:
        raise RpcError(f"RPC server {endpoint} speaks protocol {'.'.join(map(str, got))}, this llama.cpp "
                       f"{'.'.join(map(str, want))}: run a server built from the same llama.cpp "
                       "(llama-cpp-python 0.3.36, e.g. medusa-edge rpc-server)")
    return got


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("it closed the connection during HELLO")
        buf += chunk
    return buf


def check_servers(servers: Union[str, Sequence[str], None], n_gpu_layers: int) -> list[str]:
    """The parsed ``servers`` (``parse_servers``), each answering (``probe``) unless this process
    holds it already; RpcError without the RPC backend, or with ``n_gpu_layers`` 0 (every layer
    would stay on this machine)."""
    eps = parse_servers(servers)
    if not eps:
        return eps
    if not available():
        raise RpcError(f"rpc_servers {','.join(eps)}: {BUILD_HINT}")
    if n_gpu_layers == 0:
        raise RpcError("rpc_servers: with n_gpu_layers=0 (-ngl 0) every layer stays on this machine; pass "
                       "n_gpu_layers=-1 (-ngl -1) to put all of them on the servers (and the local GPUs), or how many")
    native = _native()
    for ep in eps:
        if not native.rpc_in_use(ep):
            probe(ep)
    return eps


# -- the server --------------------------------------------------------------------------------

_DEV_CPU, _DEV_ACCEL = 0, 3  # enum ggml_backend_dev_type (ggml-backend.h)
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))


def _ggml():
    """libggml (the backend registry) as llama-cpp-python loaded it."""
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib",
                                   "libggml.dylib" if sys.platform == "darwin" else "libggml.so"))
    for name, res, args in (
        ("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        ("ggml_backend_dev_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
        ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def server_devices(lib, names: Sequence[str] = ()) -> list:
    """The devices a server offers, as llama.cpp's rpc-server picks them: the named ones
    (``ggml_backend_dev_by_name``), else every device that is not the CPU or a CPU accelerator,
    else the CPU. RpcError for an unknown name."""
    devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    if names:
        out = []
        for n in names:
            d = lib.ggml_backend_dev_by_name(n.encode())
            if not d:
                have = ", ".join(lib.ggml_backend_dev_name(x).decode() for x in devs)
                raise RpcError(f"unknown device {n!r} (this machine has: {have})")
            out.append(d)
        return out
    out = [d for d in devs if lib.ggml_backend_dev_type(d) not in (_DEV_CPU, _DEV_ACCEL)]
    return out or [d for d in devs if lib.ggml_backend_dev_type(d) == _DEV_CPU][:1]


def default_threads() -> int:
    """rpc-server's default for its CPU device: half the hardware threads, at least 1."""
    return max(1, (os.cpu_count() or 1) // 2)


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, n_threads: Optional[int] = None,
          devices: Sequence[str] = (), cache_dir: Optional[str] = None) -> None:
    """Run llama.cpp's RPC server on ``host:port`` until the process ends (Ctrl-C, a signal):
    llama.cpp's ``ggml_backend_rpc_start_server``, which returns only when it cannot listen.
    ``n_threads``: the CPU device's threads (default ``default_threads``); ``devices``: ggml device
    names to offer (default as ``server_devices``); ``cache_dir``: where the server keeps large
    tensors it was sent, by hash, so that a client loading the same model again sends hashes
    instead (llama.cpp's rpc-server --cache). RpcError without the RPC backend, for a host that is
    not an IPv4 address (the server binds with inet_addr), or when it cannot listen."""
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise RpcError(f"--host {host!r}: the RPC server binds an IPv4 address (e.g. 127.0.0.1 or 0.0.0.0)")
    if not 1 <= port <= 65535:
        raise RpcError(f"--port {port}: not a port (1-65535)")
    if not available():
        raise RpcError(BUILD_HINT)
    n_threads = n_threads or default_threads()
    if n_threads < 1:
        raise RpcError(f"--threads {n_threads}: must be >= 1")
    lib = _ggml()  # its registry is filled: importing the native layer ran llama_backend_init
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_start_server") if reg else None
    if not addr:
        raise RpcError(BUILD_HINT)
    start = _START_SERVER(addr)
    devs = server_devices(lib, devices)
    if not devs:
        raise RpcError("no ggml device to offer")
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    if host != "127.0.0.1":
        print(f"medusa-edge rpc-server: WARNING: listening on {host}, not 127.0.0.1. The RPC protocol has no "
              "authentication or encryption: never expose it to an untrusted network.", file=sys.stderr)
    names = ", ".join(f"{lib.ggml_backend_dev_name(d).decode()} ({lib.ggml_backend_dev_description(d).decode()})"
                      for d in devs)
    print(f"medusa-edge rpc-server: {host}:{port}, devices {names}, {n_threads} CPU threads", file=sys.stderr, flush=True)
    arr = (ctypes.c_void_p * len(devs))(*devs)
    failed = threading.Event()

    def run():
        # blocks in llama.cpp's accept loop (ctypes releases the GIL); returns only on a failure
        start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, n_threads, len(devs), arr)
        failed.set()

    t = threading.Thread(target=run, name="rpc-server", daemon=True)
    t.start()
    # The main thread waits, so Ctrl-C (KeyboardInterrupt, delivered to it) ends the process.
    while not failed.wait(0.5):
        pass
    sys.stdout.flush()
    raise RpcError(f"the RPC server could not listen on {host}:{port} (the port is in use, or the address is not "
                   "this machine's)")
