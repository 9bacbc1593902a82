"""`medusa-chat` in a real pseudo-terminal (pexpect), with the bundled demo model: chat turns,
commands, Ctrl-C during a reply and at the prompt, Ctrl-D, history; `-p` and piped stdin."""

import os
import subprocess
import sys

import pytest

from medusa_edge.default_model import demo_model_path

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("prompt_toolkit")

TIMEOUT = 120  # generous: the demo model answers in well under a second, but the machine may be busy
CMD = [sys.executable, "-m", "medusa_edge.cli.chat", demo_model_path()]  # the fast demo model, not the default
# near-uniform sampling over the demo's 1024 tokens: with seed 0 the reply runs ~800 tokens
LONG = ["temperature 100", "top_k 0", "top_p 1", "min_p 0", "seed 0"]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}


def spawn(env, *args):
    child = pexpect.spawn(CMD[0], CMD[1:] + list(args), env=env, encoding="utf-8", timeout=TIMEOUT,
                          dimensions=(40, 200))
    child.expect(">>>")
    return child


def send(child, line, *expect):
    """Type ``line``, wait for each of ``expect`` in turn, then for the next prompt."""
    child.sendline(line)
    for e in expect:
        child.expect(e)
    child.expect(">>>")
    return child.before


def test_two_turns_commands_and_history(env, tmp_path):
    c = spawn(env, "--temperature", "0")
    send(c, "What colour is the sky?", "blue")
    send(c, "Tell me a story about a fox.", r"fox\.[^\n]*\n", r"[a-z]{3,} [a-z]{3,}")  # a second turn, with the first as context
    send(c, "/show info", "demo-model.gguf", r"messages\s+4")
    send(c, "/set parameter temperature 0.7", "Set parameter 'temperature' to '0.7'")
    send(c, "/set parameter top_k many", "Couldn't set parameter")
    send(c, "/set parameter nonsense 1", "Usage: /set parameter")
    send(c, "/show info", "temperature 0.7")
    send(c, "/set system You are terse.", "Set system message.")
    send(c, "/clear", "Cleared session context.")
    send(c, "/show info", "You are terse", r"messages\s+0")
    send(c, "/frobnicate", "Unknown command '/frobnicate'. Type /\\? for help")
    send(c, "/?", "/set", "/clear", "/bye")
    send(c, "/set parameter temperature 0")
    c.sendline('"""What colour')  # a multi-line message; "..." prompts for more
    c.expect(r"\.\.\.")
    c.sendline('is the sky?"""')
    c.expect("blue")
    c.expect(">>>")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    with open(tmp_path / "medusa-edge" / "history") as f:
        history = f.read()
    assert "What colour is the sky?" in history and "/bye" in history


def test_ctrl_c_and_ctrl_d(env):
    c = spawn(env)
    for p in LONG:
        send(c, f"/set parameter {p}", "Set parameter")
    c.sendline("Tell me a story about a fox.")
    c.expect(r"fox\.[^\n]*\n")  # the end of the echoed line
    c.expect(r"[A-Za-z]{3,} [A-Za-z]{3,}")  # the reply is streaming
    c.sendintr()
    c.expect("interrupted: the partial reply stays in the conversation")
    c.expect(">>>")
    send(c, "/show info", r"messages\s+2")  # the question and the partial reply
    send(c, "/set parameter temperature 0")
    send(c, "/clear")
    send(c, "What colour is the sky?", "blue")  # the REPL goes on
    c.sendintr()  # at the prompt: a hint, not an exit
    c.expect("Use Ctrl \\+ d or /bye to exit.")
    c.expect(">>>")
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_failed_turn_returns_to_the_prompt(env, tmp_path):
    c = spawn(env, "--n-ctx", "256", "--temperature", "0")
    long = "What colour is the sky? " * 60  # ~370 tokens
    send(c, long, r"error: [^\n]*256")  # the prompt does not fit n_ctx
    send(c, "/show info", r"messages\s+0")  # the failed turn is not in the conversation
    send(c, "What colour is the sky?", "blue")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    with open(tmp_path / "medusa-edge" / "history") as f:
        assert long.strip() in f.read()  # what was typed is still in the history


def run(env, *args, input=None):
    return subprocess.run(CMD + ["--temperature", "0", *args], env=env, input=input, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=None if input is not None else subprocess.DEVNULL)


def test_one_shot(env):
    r = run(env, "-p", "What colour is the sky?", "--verbose")
    assert r.returncode == 0 and "blue" in r.stdout
    assert "tokens per step" in r.stderr and "eval rate" in r.stderr  # the timing block, on stderr


def test_pipe(env):
    r = run(env, input="What colour is the sky?\n")
    assert r.returncode == 0 and "blue" in r.stdout and r.stdout.count("\n") == 1
    r = run(env, "-p", "Answer this:", input="What colour is the sky?\n")  # -p and stdin together
    assert r.returncode == 0 and r.stdout.strip()
    r = run(env, input="")
    assert r.returncode != 0 and "empty" in r.stderr


def test_chat_past_the_context_drops_the_oldest_turns(env):
    import io

    c = spawn(env, "--n-ctx", "256", "--temperature", "0", "--system", "You are terse.")
    c.logfile_read = seen = io.StringIO()
    questions = ["Tell me a story about a fox.", "What colour is the sky?", "Tell me a story about a bear.",
                 "What colour is grass?", "Tell me a story about a fox.", "Tell me a story about a bear."]
    for q in questions:  # a story is ~70 tokens: by the fourth turn the history leaves too little room
        send(c, q, r"[?.][^\n]*\n", r"[A-Za-z]{3,} [A-Za-z]{3,}")
    send(c, "What colour is the sky?", r"\?[^\n]*\n", "blue")  # still answering
    out = seen.getvalue()
    assert out.count("outgrew the context of 256 tokens") == 1 and "error" not in out  # said once, no failed turn
    c.sendline("/show info")
    c.expect(r"messages\s+(\d+)")
    assert int(c.match.group(1)) < 2 * (len(questions) + 1)  # the oldest turns are gone
    c.expect(">>>")
    c.sendline("/bye")
    c.expect(pexpect.EOF)


def test_model_then_prompt_answers_once(env):
    r = run(env, "What colour is the sky?")  # ollama's run MODEL PROMPT
    assert r.returncode == 0 and "blue" in r.stdout and r.stdout.count("\n") == 1
    r = run(env, "What colour is the sky?", "-p", "again")
    assert r.returncode == 2 and "not both" in r.stderr
