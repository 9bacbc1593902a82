"""The GPU path (skipped where llama.cpp was built without a GPU backend; bench/gpu.sh runs it):
the heads on the model's device, Medusa against plain decoding with every layer offloaded, and
step timings that include the device's work."""

from pathlib import Path

import numpy as np
import pytest

from convert.base import quantize_gguf
from medusa_edge import Engine, SamplingParams, Stats
from medusa_edge._loader import native
from medusa_edge.testing import write_llama_gguf, write_random_heads

pytestmark = pytest.mark.skipif(not native.supports_gpu_offload(), reason="llama.cpp has no GPU backend here")
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    src = write_llama_gguf(str(d / "base-f32.gguf"), n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, seed=3)
    path = d / "base-Q8_0.gguf"
    quantize_gguf(Path(src.path), path, "Q8_0")
    heads = write_random_heads(str(d / "base-Q8_0.medusa.gguf"), src, n_heads=4, seed=5, head_type="f32")
    return str(path), heads.path


def test_heads_on_gpu_match_cpu(gpu_model):
    """f32 heads on the GPU give the CPU's top-1 for at least 99% of hidden states, and say so."""
    path, heads_path = gpu_model
    gpu = native.Heads(heads_path, path, 4, True)
    cpu = native.Heads(heads_path, path, 4, False)
    assert gpu.backend != cpu.backend and not gpu.on_fallback, (gpu.backend, cpu.backend)
    rng = np.random.default_rng(0)
    agree = total = 0
    for _ in range(50):
        h = rng.standard_normal(gpu.n_embd).astype(np.float32)
        g, _ = gpu.propose_hidden(h, 10)
        c, _ = cpu.propose_hidden(h, 10)
        agree += int((g[:, 0] == c[:, 0]).sum())
        total += g.shape[0]
    assert agree >= 0.99 * total


def test_offloaded_medusa_equals_plain_or_says_how_often_not(gpu_model, capsys):
    """All layers on the GPU: where the probe finds an exact batch, Medusa's greedy text equals
    plain decoding's on every prompt; otherwise the flip rate is printed (never claimed exact)."""
    path, heads_path = gpu_model
    plain = Engine(path, tree="chain:0", n_ctx=1024, n_gpu_layers=-1)
    med = Engine(path, heads_path, tree="chain:3", n_ctx=1024, n_gpu_layers=-1)
    rng = np.random.default_rng(1)
    same = 0
    for _ in range(10):
        ids = [1] + [int(t) for t in rng.integers(3, plain.model.n_vocab, 30)]
        ref = [t for new in plain.generate(ids, GREEDY, 64, reuse_prefix=False) for t in new]
        got = [t for new in med.generate(ids, GREEDY, 64, reuse_prefix=False) for t in new]
        same += got == ref
    with capsys.disabled():
        print(f"\n[gpu] exact batch {med.exact_batch}; Medusa equal to plain on {same}/10 prompts")
    if med.exact_batch >= 4:
        assert same == 10


def test_step_time_includes_the_device(gpu_model):
    """The decode time is read after synchronising: it holds most of a plain step, not "other"."""
    path, _ = gpu_model
    e = Engine(path, tree="chain:0", n_ctx=1024, n_gpu_layers=-1)
    st = Stats()
    for _ in e.generate([1, 5, 6, 7], GREEDY, 64, stats=st, reuse_prefix=False):
        pass
    assert st.steps > 0 and st.t_decode > st.t_other


def test_auto_exact_runs_trees_on_the_gpu(gpu_model, capsys):
    """exact="auto" (the default): where the GPU has no exact batch, Medusa keeps its trees, verified
    per row, and says so; the lean heads pass (an argmax at k = 1, no softmax) runs on the device."""
    path, heads_path = gpu_model
    med = Engine(path, heads_path, tree="chain:3", n_ctx=1024, n_gpu_layers=-1)
    if med.exact_batch < 2:
        assert med.guarantee == "verified" and med.tree.n_nodes == 4
    else:
        assert med.guarantee == "bitwise" and med.tree.n_nodes == min(4, med.exact_batch)
    h = np.random.default_rng(2).standard_normal(med.heads.n_embd).astype(np.float32)
    ids, _ = med.heads.propose_hidden(h, 1, 4, 0, logp=False)
    assert ids.shape == (4, 1) and not med.heads.on_fallback and "ARGMAX" in med.heads.graph_ops(1, 4, False)
    # device-side greedy (on by default on a GPU): each row's token equals the host's argmax
    ctx, shape = med.ctx, med._shape(False, med.tree.max_depth, 1024)[1]
    toks = np.array([(11 * i + 5) % med.model.n_vocab for i in range(med.tree.n_nodes)], np.int32)
    ctx.truncate(0)
    ctx.prefill([1, 5, 6, 7, 8], 0, False)
    ctx.set_backend_greedy(False)
    ctx.decode_tree(shape, toks, 5)
    host = ctx.argmax(med.tree.n_nodes)
    ctx.set_backend_greedy(True)
    ctx.truncate(5)
    ctx.decode_tree(shape, toks, 5)
    np.testing.assert_array_equal(ctx.argmax(med.tree.n_nodes), host)
    assert med._device_greedy(GREEDY, None)
    auto = Engine(path, heads_path, n_ctx=1024, n_gpu_layers=-1)
    with capsys.disabled():
        print(f"\n[gpu] exact batch {med.exact_batch}, guarantee {med.guarantee}; auto: up to {auto.max_auto_nodes} "
              f"nodes, planned {auto.tree.n_nodes}, graph reuse while measuring {auto.costs.graph_reuse if auto.costs else '-'}")
