"""The bundled demo model: shipped in the package, loads offline, answers from the command line."""

import os
import subprocess
import sys

from medusa_edge import Medusa
from medusa_edge.demo import demo_model_path
from medusa_edge.schema import sidecar_path


def test_demo_files_ship_inside_the_package_and_are_small():
    model = demo_model_path()
    heads = sidecar_path(model)
    assert os.path.isfile(model) and os.path.isfile(heads)
    assert os.path.getsize(model) + os.path.getsize(heads) <= 40 * 2**20


def test_demo_model_answers_and_medusa_pays_in_domain():
    llm = Medusa(n_ctx=512)  # no model argument: the bundled one, with its heads
    assert llm.engine.heads is not None
    prompt = llm.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}])
    assert prompt == "USER: What colour is the sky?\nASSISTANT:"
    r = llm.create_completion(prompt, max_tokens=32, temperature=0)
    assert "blue" in r["choices"][0]["text"]
    assert r["medusa"]["tokens_per_step"] > 1.5


def test_command_line_answers_with_no_model_argument(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_PROXY="*", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    p = subprocess.run(
        [sys.executable, "-m", "medusa_edge.cli", "generate", "--chat", "-p", "What sound does a cow make?", "-n", "24"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "moo" in p.stdout.lower()
    assert "tokens/step" in p.stderr
