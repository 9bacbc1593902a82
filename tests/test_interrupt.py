"""Ctrl-C during a long decode: it stops within a moment, raises KeyboardInterrupt, and the object
stays usable (the next call gives the same output as a fresh one)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from medusa_edge import Engine, SamplingParams
from medusa_edge.testing import write_llama_gguf

LONG = [1] + [300 + (i % 300) for i in range(7000)]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    # big enough that a 7000-token prompt takes seconds on a CPU
    return write_llama_gguf(str(tmp_path_factory.mktemp("slow") / "slow.gguf"), n_embd=256, n_layer=6, n_head=4,
                            n_head_kv=4, n_ff=768, n_ctx_train=16384).path


def test_sigint_stops_a_long_prefill_and_the_engine_recovers(slow_model):
    e = Engine(slow_model, tree="chain:0", n_ctx=8192, n_batch=8192)  # one decode for the whole prompt
    short = e.model.tokenize("the water is", True, False)
    before = [t for new in e.generate(short, SamplingParams(), 16) for t in new]
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        for _ in e.generate(LONG, SamplingParams(), 4):
            pass
    assert time.perf_counter() - t0 < 2.5  # a full prefill of this prompt takes 4-7 s here
    after = [t for new in e.generate(short, SamplingParams(), 16) for t in new]
    assert after == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back


def test_ctrl_c_in_the_command_line(slow_model):
    text = " ".join(["water"] * 1500)  # about 7500 tokens
    p = subprocess.Popen(
        [sys.executable, "-m", "medusa_edge.cli", "generate", slow_model, "-p", text, "-c", "16384", "-n", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    p.stdout.read(5)  # the CLI echoes the prompt just before decoding it
    time.sleep(0.5)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert time.perf_counter() - t0 < 2.0
    assert p.returncode == 130
    assert err.strip().splitlines()[-1] == "medusa-edge: interrupted"
