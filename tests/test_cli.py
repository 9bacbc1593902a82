"""Every console script and subcommand answers --help, and the commands that load a model share one
table of numerics flags (medusa_edge/cli/args.py)."""

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize("argv", [
    ["medusa-edge", "--help"], ["medusa-edge", "generate", "--help"], ["medusa-edge", "bench", "--help"],
    ["medusa-edge", "tune", "--help"], ["medusa-edge", "serve", "--help"], ["medusa-edge", "verify", "--help"],
    ["medusa-edge", "export", "--help"], ["medusa-edge", "trees", "--help"], ["medusa-chat", "--help"],
    ["medusa-convert", "--help"],
])
def test_help(argv):
    r = subprocess.run([os.path.join(BIN, argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    if argv[0] == "medusa-edge" and argv[1] in ("generate", "bench", "tune", "serve"):
        for flag in ("--flash-attn", "--cache-type-k", "--cache-type-v", "--exact", "--no-exact"):
            assert flag in r.stdout, (argv, flag)
