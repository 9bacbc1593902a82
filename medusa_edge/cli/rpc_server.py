"""``medusa-edge rpc-server``: llama.cpp's RPC server, offering this machine's devices to a model
split over machines (``--rpc`` / ``rpc_servers`` on the machine that runs the model).

    medusa-edge rpc-server [--host 127.0.0.1] [--port 50052] [-t THREADS] [-d DEV,...] [--cache]

The server is llama.cpp's own (core/rpc.py), with llama.cpp's rpc-server flags. It serves one
client at a time and runs until stopped (Ctrl-C). It has no authentication or encryption: bind it
to an address only trusted machines reach.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from medusa_edge.core import rpc

    ap = argparse.ArgumentParser(prog="medusa-edge rpc-server", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-H", "--host", default="127.0.0.1",
                    help="IPv4 address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    ap.add_argument("-p", "--port", type=int, default=rpc.DEFAULT_PORT, help=f"port (default {rpc.DEFAULT_PORT})")
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help=f"threads of the CPU device (default half the cores: {rpc.default_threads()} here)")
    ap.add_argument("-d", "--device", default=None,
                    help="comma-separated ggml devices to offer (default: the GPUs, else the CPU)")
    ap.add_argument("-c", "--cache", action="store_true",
                    help="keep large tensors the clients send in a local cache, so a model loaded again sends hashes "
                         "instead ($LLAMA_CACHE/rpc, default ~/.cache/llama.cpp/rpc)")
    args = ap.parse_args(argv)
    cache_dir = None
    if args.cache:
        root = os.environ.get("LLAMA_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llama.cpp")
        cache_dir = os.path.join(root, "rpc")
    devices = [d.strip() for d in (args.device or "").split(",") if d.strip()]
    try:
        rpc.serve(args.host, args.port, n_threads=args.threads, devices=devices, cache_dir=cache_dir)
    except rpc.RpcError as e:
        print(f"medusa-edge rpc-server: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmedusa-edge rpc-server: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
