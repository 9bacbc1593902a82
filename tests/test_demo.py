"""The bundled demo model (the tests' fast model): shipped in the package, loads offline."""

import os

from medusa_edge import Medusa
from medusa_edge.default_model import demo_model_path
from medusa_edge.heads.schema import sidecar_path


def test_demo_files_ship_inside_the_package_and_are_small():
    model = demo_model_path()
    heads = sidecar_path(model)
    assert os.path.isfile(model) and os.path.isfile(heads)
    assert os.path.getsize(model) + os.path.getsize(heads) <= 40 * 2**20


def test_demo_model_answers_and_medusa_pays_in_domain():
    llm = Medusa(demo_model_path(), n_ctx=512, tree="heads")  # its heads sit beside it, with their stored tree
    assert llm.engine.heads is not None
    prompt = llm.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}])
    assert prompt == "USER: What colour is the sky?\nASSISTANT:"
    r = llm.create_completion(prompt, max_tokens=32, temperature=0)
    assert "blue" in r["choices"][0]["text"]
    assert r["medusa"]["tokens_per_step"] > 1.5
