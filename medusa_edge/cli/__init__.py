"""medusa-edge command line: the name -> command table (``main``), and generate, trees and serve.

    medusa-edge generate [MODEL] -p PROMPT [--heads FILE] [--tree NAME] [-n N] [--temp T] ...
    medusa-edge trees
    medusa-edge verify [MODEL] [--heads FILE] [--prompts FILE.jsonl] [-n N] ...
    medusa-edge tune [MODEL] [--heads FILE] [--remeasure] [--json FILE]
    medusa-edge bench [MODEL] [--heads FILE] [--prompts FILE.jsonl] [-n N] [--tree T ...] [--replay PROFILE]
    medusa-edge serve [MODEL] [--host H] [--port P] [--api-key KEY] [--queue N] ...
    medusa-edge export HEADS.gguf OUT_DIR [--layout faster-medusa|vllm|all] [--base MODEL.gguf]
    medusa-edge prompts -n N --seed S -o PROMPTS.jsonl [--heldout FILE]
    medusa-edge train BASE.gguf --data PROMPTS.jsonl -o BASE.medusa.gguf ...
    medusa-edge rpc-server [--host H] [--port P] [-t N]
"""

from __future__ import annotations

import argparse
import sys

# one table of model and numerics flags for every command
from medusa_edge.cli.args import add_model_args, add_numerics_args, add_rpc_args, hidden_alias, medusa_from_args, rpc_kwargs

EPILOG = """examples:
  medusa-edge generate --chat -p "Tell me a story about a cat."  # default model (SmolLM2-135M-Instruct), chat format
  medusa-edge generate model.gguf -p "Hello" -n 128              # heads: model.medusa.gguf if present
  medusa-edge generate model.gguf --heads h.medusa.gguf --tree chain:3 --temp 0.7 --seed 1
  medusa-edge generate model.gguf -p "Hi" --no-medusa            # plain decoding, for comparison
  medusa-edge tune model.gguf                                   # the tree auto picks here, and why
  medusa-edge bench model.gguf -n 20                            # side by side with plain and prompt lookup
"""


def _add_generate(sub):
    g = sub.add_parser(
        "generate", help="stream a completion and print Medusa statistics",
        description="Stream a completion of PROMPT with Medusa decoding, then print tokens/s, tokens per step "
        "and acceptance. Output equals plain llama.cpp decoding of the same model (greedy, or sampled with the same seed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(g)
    g.add_argument("-p", "--prompt", required=True, help="text to complete")
    g.add_argument("--chat", action="store_true", help="treat PROMPT as a user message and format it with the model's chat template")
    g.add_argument("--tree", help="tree: auto (default: planned for this device from its measured costs and the heads' "
                   "accuracies, or none when plain decoding is faster; see 'medusa-edge tune'), heads (the tree stored in "
                   "the heads file), a preset (see 'medusa-edge trees'), chain:N, step:N (at most N candidates, grown "
                   "each step from the heads' probabilities), or a JSON file of paths")
    g.add_argument("--no-medusa", action="store_true", help="decode plainly, one token per forward")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128; <= 0: until the context is full)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default 0)")
    hidden_alias(g, "--temperature", "temp", type=float)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--typical", action="store_true", help="typical acceptance (LOSSY: faster at T > 0, output differs from plain decoding)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_numerics_args(g)
    add_rpc_args(g)
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def _generate(args) -> int:
    from medusa_edge import MedusaError, TreeError

    try:
        llm = medusa_from_args(args, tree="chain:0" if args.no_medusa else args.tree, verbose=args.verbose,
                               **rpc_kwargs(args))
        from medusa_edge.api import chat_prompt_tokens

        # a chat turn is tokenized as create_chat_completion tokenizes it (the template owns BOS)
        prompt = (chat_prompt_tokens(llm.engine.model, [{"role": "user", "content": args.prompt}], llm.chat_template)
                  if args.chat else args.prompt)
        chunks = llm.create_completion(
            prompt, max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop, stream=True,
            acceptance="typical" if args.typical else "exact",
        )
        sys.stdout.write(args.prompt + ("\n" if args.chat else ""))
        sys.stdout.flush()
        last = None
        for c in chunks:
            sys.stdout.write(c["choices"][0]["text"])
            sys.stdout.flush()
            last = c
        sys.stdout.write("\n")
    except (MedusaError, TreeError) as e:
        print(f"medusa-edge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmedusa-edge: interrupted", file=sys.stderr)
        return 130
    s = last["medusa"]
    hist = " ".join(f"{k}:{v}" for k, v in s["accepted_length_histogram"].items())
    heads = " ".join(f"{a:.2f}" for a in s["head_acceptance"])
    print(
        f"\n{s['generated_tokens']} tokens in {s['time_total_s']:.2f} s ({s['tokens_per_second']:.1f} tok/s after a "
        f"{s['prompt_tokens']}-token prompt) | {s['steps']} steps, {s['tokens_per_step']:.2f} tokens/step | "
        f"tree {llm.tree.n_nodes} nodes | accepted per step {hist or '-'} | head acceptance {heads or '-'} | "
        f"time: decode {s['time_decode_s']:.3f} s, heads {s['time_heads_s']:.3f} s, other {s['time_other_s']:.3f} s",
        file=sys.stderr,
    )
    return 0


def _trees(_args) -> int:
    from medusa_edge.core.tree import PRESETS, Tree

    for name in sorted(PRESETS):
        t = Tree.resolve(name)
        print(f"{name:20s} {t.n_nodes} nodes, {t.n_leaves} leaves, depth {t.max_depth}")
    print("chain:N              N+1 nodes, 1 leaf, depth N (top-1 of each head)")
    print("step:N               at most N+1 nodes, chosen each step from the heads' probabilities (the likeliest paths)")
    return 0


def _add_serve(sub):
    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models)",
        description="Serve MODEL over an OpenAI-compatible HTTP API. Requests run one at a time; up to --queue more "
        "wait, further ones get 503 with Retry-After. Needs the server extra: pip install 'medusa-edge[server]'.",
    )
    add_model_args(s)
    s.add_argument("--tree", help="auto (default: planned for this device), heads (stored in the heads file), a preset, "
                   "chain:N, step:N (grown each step from the heads' probabilities) or a JSON file")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every /v1 request")
    s.add_argument("--queue", type=int, default=16, help="requests that may wait while one runs (default 16)")
    s.add_argument("--cors-origins", action="append", default=[], metavar="ORIGINS",
                   help="browser origins allowed besides http(s)://localhost, 127.0.0.1 and [::1] on any port, "
                   "comma-separated (e.g. https://app.example.com; their host names are also served as Host); '*' "
                   "allows every origin. Others get 403")
    s.add_argument("--allowed-hosts", action="append", default=[], metavar="NAMES",
                   help="Host header names served besides loopback names, the --host address and the --cors-origins "
                   "names, comma-separated (e.g. behind a reverse proxy); '*' allows every name. Others get 403 "
                   "(DNS rebinding)")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body in bytes; larger gets 413 (default 4194304: 4 MiB)")
    s.add_argument("--max-header-bytes", type=int, default=16 * 1024,
                   help="largest request line plus headers in bytes; larger gets 431 (default 16384)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's headers to arrive; then the connection is closed (default 10)")
    s.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds for a request's body to arrive; then 408 and the connection is closed (default 10)")
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens; longer gets 400 context_length_exceeded, huge texts before "
                   "tokenizing (default: the context size)")
    add_numerics_args(s)
    add_rpc_args(s)
    s.add_argument("--pooling", choices=("none", "mean", "cls", "last"), default=None,
                   help="pooling for /v1/embeddings (default: the model's metadata; generative models have none, "
                   "which /v1/embeddings refuses)")
    s.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def _serve(args) -> int:
    from medusa_edge import MedusaError, TreeError

    try:
        from medusa_edge.server import serve
    except ImportError as e:
        print(f"medusa-edge: error: the server needs its extra ({e}): pip install 'medusa-edge[server]'", file=sys.stderr)
        return 1
    from medusa_edge.server import Limits

    if args.queue < 0:
        print("medusa-edge: error: --queue must be >= 0", file=sys.stderr)
        return 2
    for flag, v in (("--max-body-bytes", args.max_body_bytes), ("--max-header-bytes", args.max_header_bytes),
                    ("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                    ("--max-prompt-tokens", 1 if args.max_prompt_tokens is None else args.max_prompt_tokens)):
        if not v > 0:
            print(f"medusa-edge: error: {flag} must be > 0", file=sys.stderr)
            return 2
    limits = Limits(max_body_bytes=args.max_body_bytes, header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    max_header_bytes=args.max_header_bytes, max_prompt_tokens=args.max_prompt_tokens)
    split = lambda values: [v.strip() for value in values for v in value.split(",") if v.strip()]  # noqa: E731
    try:
        llm = medusa_from_args(args, tree=args.tree, verbose=args.verbose, **rpc_kwargs(args),
                               pooling_type=("none", "mean", "cls", "last").index(args.pooling) if args.pooling else -1)
    except (MedusaError, TreeError) as e:
        print(f"medusa-edge: error: {e}", file=sys.stderr)
        return 1
    serve(llm, args.host, args.port, queue_size=args.queue, api_key=args.api_key, limits=limits,
          cors_origins=split(args.cors_origins), allowed_hosts=split(args.allowed_hosts))
    return 0


#: Commands with their own parser: ``medusa-edge NAME ARGS`` runs ``MODULE.main(ARGS)``, as
#: ``python -m MODULE ARGS`` does; the help line is the one ``medusa-edge --help`` lists.
DELEGATED = {
    "verify": ("medusa_edge.cli.verify", "check that Medusa's output equals plain decoding on your model and device"),
    "tune": ("medusa_edge.cli.tune", "measure this device and print the tree auto picks, its cost curve and expected speed-up"),
    "bench": ("medusa_edge.cli.bench", "Medusa against plain decoding, llama-cpp-python and prompt lookup, side by side"),
    "rpc-server": ("medusa_edge.cli.rpc_server", "run llama.cpp's RPC server: this machine's devices for a model split over "
                   "machines (--rpc)"),
    "prompts": ("medusa_edge.training.prompts", "write assistant-style training prompts (JSONL) for 'medusa-edge train'"),
    "train": ("medusa_edge.training.train", "train Medusa-1 heads for a GGUF base model (needs torch; 'train restrict': "
              "a draft vocabulary)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    from medusa_edge.cli import export  # its parser and runner: medusa_edge/cli/export.py

    ap = argparse.ArgumentParser(prog="medusa-edge", description="Lossless Medusa decoding on llama.cpp.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_generate(sub)
    sub.add_parser("trees", help="list the tree presets")
    _add_serve(sub)
    export.add_arguments(sub.add_parser("export", help="write the heads in the layouts vLLM, TGI and TensorRT-LLM load"))
    for name, (_, what) in DELEGATED.items():  # listed here; parsed by their own main
        sub.add_parser(name, help=what, add_help=False)
    args = ap.parse_args(argv)
    return {"generate": _generate, "trees": _trees, "serve": _serve, "export": export.run}[args.cmd](args)
