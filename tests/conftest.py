"""Session fixtures: tiny random-weight Llama GGUFs and heads, built in well under a second each."""

import pytest

from medusa_edge.testing import write_llama_gguf, write_random_heads


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    m = {}
    m["f32"] = write_llama_gguf(str(d / "tiny-f32.gguf"), seed=0)
    m["f32_heads"] = write_random_heads(str(d / "tiny-f32.medusa.gguf"), m["f32"], n_heads=4, seed=1, head_type="f32")
    m["other_vocab"] = write_llama_gguf(str(d / "other-vocab.gguf"), seed=0, vocab_salt=7, vocab_size=m["f32"].n_vocab)
    m["dir"] = d
    return m
