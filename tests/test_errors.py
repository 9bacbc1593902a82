"""Bad input gives a Python exception that names the problem; the process survives."""

import os

import numpy as np
import pytest

from medusa_edge import ContextOverflowError, Engine, HeadsError, Medusa, ModelLoadError, TreeError
from medusa_edge._loader import native
from medusa_edge.testing import make_vocab, write_random_heads


def truncate_copy(src, dst, frac):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: int(len(data) * frac)])
    return dst


def test_heads_with_other_hidden_size(models, tmp_path):
    p = str(tmp_path / "h.medusa.gguf")
    write_random_heads(p, models["f32"], n_embd=32)
    with pytest.raises(HeadsError, match="hidden size 32.*has 64"):
        Engine(models["f32"].path, p)


def test_heads_with_other_vocab_size(models, tmp_path):
    p = str(tmp_path / "h.medusa.gguf")
    write_random_heads(p, models["f32"], n_vocab=700)
    with pytest.raises(HeadsError, match="vocabulary of 700 tokens.*has 646"):
        Engine(models["f32"].path, p)


def test_heads_for_other_tokenizer_same_size(models):
    assert models["other_vocab"].n_vocab == models["f32"].n_vocab
    with pytest.raises(HeadsError, match="different tokenizer"):
        Engine(models["other_vocab"].path, models["f32_heads"].path)


@pytest.mark.parametrize("frac", [0.9, 0.5, 0.02])
def test_truncated_heads_file(models, tmp_path, frac):
    p = truncate_copy(models["f32_heads"].path, str(tmp_path / "cut.medusa.gguf"), frac)
    with pytest.raises(HeadsError, match="truncated|corrupt"):
        Engine(models["f32"].path, p)
    # the native loader checks on its own too (it is also reachable without the Python checks)
    with pytest.raises(ValueError, match="truncated|corrupt"):
        native.Heads(p, models["f32"].path, 1)


def test_not_a_gguf(models, tmp_path):
    p = tmp_path / "notes.medusa.gguf"
    p.write_text("these are not weights\n" * 10)
    with pytest.raises(HeadsError, match="not a GGUF"):
        Engine(models["f32"].path, str(p))
    with pytest.raises(ValueError, match="not a GGUF"):
        native.Heads(str(p), models["f32"].path, 1)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        Engine(str(p))


def test_base_model_given_as_heads(models):
    with pytest.raises(HeadsError, match="not 'medusa'"):
        Engine(models["f32"].path, models["other_vocab"].path)


def test_truncated_model(models, tmp_path):
    p = truncate_copy(models["f32"].path, str(tmp_path / "cut.gguf"), 0.6)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        Engine(p)


def test_missing_files(models, tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        Engine(str(tmp_path / "nope.gguf"))
    with pytest.raises(HeadsError, match="no such file"):
        Engine(models["f32"].path, str(tmp_path / "nope.medusa.gguf"))


def test_tree_with_more_leaves_than_sequences(models):
    wide = [[a] for a in range(10)] + [[a, b] for a in range(10) for b in range(10)]
    wide += [[a, b, c] for a in range(3) for b in range(10) for c in range(10)]
    with pytest.raises(TreeError, match="370 leaves.*256"):
        Engine(models["f32"].path, models["f32_heads"].path, tree=wide)


def test_tree_with_more_nodes_than_n_batch(models):
    with pytest.raises(TreeError, match="64 nodes but n_batch is 32"):
        Engine(models["f32"].path, models["f32_heads"].path, tree="mc_sim_7b_63", n_batch=32)


def test_tree_deeper_than_heads_and_rank_beyond_top_k(models):
    with pytest.raises(TreeError, match="needs 5 Medusa heads"):
        Engine(models["f32"].path, models["f32_heads"].path, tree="chain:5")
    with pytest.raises(TreeError, match="rank 12.*top_k"):
        Engine(models["f32"].path, models["f32_heads"].path, tree=[[0], [12]])


def test_native_guards_instead_of_llama_cpp_aborts(models):
    """llama.cpp GGML_ASSERTs (kills the process) on a batch over n_batch: the native layer checks first."""
    e = Engine(models["f32"].path, models["f32_heads"].path, tree="chain:4", n_ctx=256, n_batch=32)
    big = native.TreeShape(list(range(40)), [[0]] * 40)
    e.ctx.truncate(0)
    e.ctx.prefill([1, 5, 6], 0)
    with pytest.raises(ValueError, match="exceeds n_batch 32"):
        e.ctx.decode_tree(big, np.full(40, 5, np.int32), 3)
    wide = native.TreeShape([0, 1, 1], [[0, 1], [0], [1]])  # 2 leaves, context holds 1 sequence
    with pytest.raises(ValueError, match="2 leaves"):
        e.ctx.decode_tree(wide, np.array([5, 6, 7], np.int32), 3)
    with pytest.raises(IndexError):
        e.ctx.decode_tree(native.TreeShape([0], [[0]]), np.array([10**6], np.int32), 3)
    with pytest.raises(IndexError):
        e.ctx.logits(5)
    # and the engine still works afterwards
    assert len(list(e.generate([1, 5, 6], __import__("medusa_edge").SamplingParams(), 8))) >= 1


def test_recurrent_model_refused(tmp_path):
    """A Mamba GGUF (metadata only: the check runs before any weight is read)."""
    import gguf

    p = str(tmp_path / "mamba.gguf")
    tokens, scores, types = make_vocab()
    w = gguf.GGUFWriter(p, "mamba")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(128)
    w.add_ssm_state_size(16)
    w.add_ssm_time_step_rank(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="recurrent or hybrid"):
        Engine(p)


def test_prompt_longer_than_context(models):
    med = Medusa(models["f32"].path, models["f32_heads"].path, n_ctx=256)
    long_prompt = " ".join(["water"] * 300)
    n = len(med.tokenize(long_prompt))
    with pytest.raises(ContextOverflowError, match=f"prompt has {n} tokens but the context holds 256"):
        med.create_completion(long_prompt, max_tokens=4)
    # the object is still usable
    assert med.create_completion("water", max_tokens=4, temperature=0)["usage"]["completion_tokens"] == 4


def test_mismatch_messages_name_the_files(models, tmp_path):
    p = str(tmp_path / "small.medusa.gguf")
    write_random_heads(p, models["f32"], n_embd=32)
    with pytest.raises(HeadsError) as ei:
        Engine(models["f32"].path, p)
    assert os.path.basename(p) in str(ei.value) and os.path.basename(models["f32"].path) in str(ei.value)
