"""Every console script and subcommand answers --help and lists its main flags, the commands that
load a model share one table of model and numerics flags (medusa_edge/cli/args.py), and the old
spellings stay accepted without being listed."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from medusa_edge import cli
from medusa_edge.cli import args as cli_args
from medusa_edge.cli import bench, chat

BIN = os.path.dirname(sys.executable)

#: one spelling per flag, llama.cpp's: every command that loads a model lists these
MODEL_FLAGS = ("--heads", "--ctx-size", "--threads", "--n-gpu-layers")
NUMERICS_FLAGS = ("--flash-attn", "--cache-type-k", "--cache-type-v", "--exact", "--no-exact")
#: the spellings commands took before: accepted, never listed
OLD_SPELLINGS = ("--n-ctx", "--gpu-layers", "--temperature")

HELP = {
    ("medusa-edge",): ("generate", "trees", "serve", "export", "verify", "tune", "bench", "prompts", "train"),
    ("medusa-edge", "generate"): ("--prompt", "--tree", "--temp", "--max-tokens", *MODEL_FLAGS, *NUMERICS_FLAGS),
    ("medusa-edge", "serve"): ("--host", "--port", "--api-key", "--tree", *MODEL_FLAGS, *NUMERICS_FLAGS),
    ("medusa-edge", "bench"): ("--prompts", "--num-prompts", "--replay", "--tree", *MODEL_FLAGS, *NUMERICS_FLAGS),
    ("medusa-edge", "tune"): ("--remeasure", "--json", *MODEL_FLAGS, *NUMERICS_FLAGS),
    ("medusa-edge", "verify"): ("--prompts", "--tree", "--temp", *MODEL_FLAGS, *NUMERICS_FLAGS),
    ("medusa-edge", "export"): ("HEADS.gguf", "OUT_DIR", "--layout", "--base", "--dtype"),
    ("medusa-edge", "trees"): (),
    ("medusa-edge", "prompts"): ("-n", "--seed", "--output", "--heldout"),
    ("medusa-edge", "train"): ("--data", "--output", "--heads", "--no-root-input"),
    ("medusa-chat",): ("--prompt", "--system", "--temp", *MODEL_FLAGS, *NUMERICS_FLAGS),
    ("medusa-convert",): ("--quant", "--check"),
}


@pytest.mark.parametrize("argv", list(HELP), ids=" ".join)
def test_help(argv):
    r = subprocess.run([os.path.join(BIN, argv[0]), *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    for flag in HELP[argv]:
        assert flag in r.stdout, (argv, flag)
    if "--ctx-size" in HELP[argv]:  # a command of the table: the old spellings are not listed
        for flag in OLD_SPELLINGS:
            assert f"{flag} " not in r.stdout and f"{flag}," not in r.stdout, (argv, flag)


def test_python_m_training_modules_still_run():
    """The subcommands delegate; ``python -m`` of the same modules keeps working."""
    for module in ("medusa_edge.training.prompts", "medusa_edge.training.train", "medusa_edge.cli.export"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stderr)


def _parsers() -> dict:
    """Each command's parser, built as its main builds it (without loading a model)."""
    top = argparse.ArgumentParser()
    sub = top.add_subparsers(dest="cmd")
    cli._add_generate(sub)
    cli._add_serve(sub)
    return {"generate": sub.choices["generate"], "serve": sub.choices["serve"], "medusa-chat": chat.build_parser()}


def test_old_spellings_are_hidden_aliases():
    """--n-ctx, --gpu-layers and --temperature set what -c/--ctx-size, -ngl/--n-gpu-layers and --temp set."""
    for name, p in _parsers().items():
        new = p.parse_args(["-p", "x", "-c", "512", "-ngl", "3"] if name == "generate" else ["-c", "512", "-ngl", "3"])
        old = p.parse_args(["-p", "x", "--n-ctx", "512", "--gpu-layers", "3"] if name == "generate"
                           else ["--n-ctx", "512", "--gpu-layers", "3"])
        assert new == old and (new.ctx_size, new.n_gpu_layers) == (512, 3), name
        assert p.parse_args(["-p", "x"] if name == "generate" else []).ctx_size == 2048, name
    g = _parsers()["generate"]
    assert g.parse_args(["-p", "x", "--temperature", "0.5"]).temp == 0.5
    assert chat.build_parser().parse_args(["--temperature", "0.5"]).temperature == 0.5
    assert bench.parse_args(["--gpu-layers", "2"]).n_gpu_layers == 2


def test_model_kwargs_are_the_engine_keywords():
    p = argparse.ArgumentParser()
    cli_args.add_model_args(p)
    cli_args.add_numerics_args(p)
    a = p.parse_args(["m.gguf", "-c", "256", "-t", "2", "-ngl", "-1", "-fa", "on", "-ctk", "q8_0", "--no-exact"])
    assert cli_args.model_kwargs(a) == dict(n_ctx=256, n_threads=2, n_gpu_layers=-1, flash_attn=True, type_k=8, type_v=1,
                                            exact=False)
    assert cli_args.model_kwargs(p.parse_args([]))["exact"] == "auto"


def test_every_subcommand_is_listed_once():
    r = subprocess.run([os.path.join(BIN, "medusa-edge"), "--help"], capture_output=True, text=True, timeout=120)
    listed = re.findall(r"^    (\S+) ", r.stdout, re.M)
    assert sorted(listed) == sorted({"generate", "trees", "serve", "export", *cli.DELEGATED}), listed
