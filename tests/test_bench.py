"""`medusa-edge bench`: its report, its equality check, and replay mode."""

import json

import numpy as np
import pytest

from medusa_edge.cli import bench
from medusa_edge.default_model import demo_model_path
from medusa_edge.core.engine import Engine, SamplingParams

F32 = dict(flash_attn=False, exact=False)
METHOD_FIELDS = {
    "method", "replayed", "prompts", "tokens", "seconds", "tokens_per_s_median", "tokens_per_s_p25", "tokens_per_s_p75",
    "tokens_per_s_total", "speedup_median", "speedup_total", "plain_tokens_per_s_median", "tokens_per_step",
    "head_acceptance", "ms_per_step", "equal_to_plain", "mismatched_prompts",
}


def test_bench_reports_every_field(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [q]}) for q in ["What colour is the sky?", "Tell me a story about a fox."]))
    out = tmp_path / "out"
    rc = bench.main([demo_model_path(), "--prompts", str(prompts), "-n", "2", "--max-tokens", "24", "--tree", "chain:2",
                     "-o", str(out), "--quiet"])
    assert rc == 0
    r = json.loads((out / "bench.json").read_text())
    assert {"model", "heads", "prompts", "max_tokens", "device", "tree", "costs", "methods"} <= set(r)
    names = [m["method"] for m in r["methods"]]
    assert names[:4] == ["plain", "medusa", "medusa[chain:2]", "llama-cpp-python"] and names[-1] == "prompt-lookup"
    for m in r["methods"]:
        assert set(m) == METHOD_FIELDS, m["method"]
        assert m["prompts"] == 2 and m["tokens"] > 0 and m["tokens_per_s_median"] > 0
        if "threads)" not in m["method"]:  # greedy, same numerics: every method gives plain decoding's tokens
            assert m["equal_to_plain"], m
    chain2 = r["methods"][2]
    assert chain2["tokens_per_step"] > 1.0 and len(chain2["head_acceptance"]) == 4
    assert set(chain2["ms_per_step"]) == {"decode", "heads", "other"} and chain2["ms_per_step"]["decode"] > 0
    assert r["costs"]["batch"][0] == 1 and r["costs"]["ratio"][0] == 1.0
    assert (out / "bench.md").read_text().count("|") > 20 and (out / "bench.png").stat().st_size > 1000


def test_replay_runs_every_tree_and_no_exact_plans_freely(tmp_path, monkeypatch):
    """--replay replays each --tree too; --no-exact leaves exact mode (what a GPU needs to get a tree)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["Tell me a story about a fox."]}))
    out = tmp_path / "out"
    rc = bench.main([demo_model_path(), "--prompts", str(prompts), "-n", "1", "--max-tokens", "48", "--replay", "vicuna-7b",
                     "--tree", "chain:2", "--no-llama-cpp", "--no-exact", "-o", str(out), "--quiet"])
    assert rc == 0
    r = json.loads((out / "bench.json").read_text())
    by_name = {m["method"]: m for m in r["methods"]}
    assert "medusa[chain:2]" in by_name and by_name["medusa[chain:2]"]["replayed"]
    assert by_name["medusa[chain:2]"]["tokens"] >= 40  # a long answer: chance alone cannot keep it at 1 token a step
    assert by_name["medusa[chain:2]"]["tokens_per_step"] > 1.0
    assert "exact batch -" in r["device"]  # not measured: exact mode is off


def test_equality_check_catches_a_divergence(models):
    e = Engine(models["f32"].path, models["f32_heads"].path, tree="chain:2", n_ctx=256, n_threads=1, **F32)
    good = bench.engine_method("medusa", e)
    plain = bench.engine_method("plain", e, max_depth=0)

    def tampered_run(ids, n):
        r = good.run(ids, n)
        r.tokens[5] = (r.tokens[5] + 1) % e.model.n_vocab
        return r

    ids = [e.model.tokenize(t, True, False) for t in ("the world", "a river")]
    res = bench.run_bench([plain, good, bench.Method("tampered", tampered_run)], ids, 16, progress=False)
    by = {m["method"]: m for m in res["methods"]}
    assert by["medusa"]["equal_to_plain"] and not by["tampered"]["equal_to_plain"]
    assert by["tampered"]["mismatched_prompts"] == [0, 1]


@pytest.mark.parametrize("right", [True, False])
def test_replay_all_right_accepts_full_depth_all_wrong_nothing(models, right):
    e = Engine(models["f32"].path, None, tree="chain:4", n_ctx=256, n_threads=1, **F32)
    ids = e.model.tokenize("between the school and the river", True, False)
    plain = bench.engine_method("plain", e, max_depth=0).run(ids, 41)
    profile = [[1.0 if right else 0.0] + [0.0] * 9] * 4
    prop = bench.ReplayProposer(plain.tokens, profile, e.model.n_vocab, seed=0)
    r = bench.engine_method("replay", e, proposer=prop).run(ids, 41)
    assert r.tokens == plain.tokens
    # 40 tokens after the prefill's. Out of exact mode the prefill gives the last prompt row's
    # hidden state, so the heads propose at the first step: 8 x (1 + 4)
    if right:
        assert r.steps == 8 and r.head_accepts == [8, 8, 8, 8]
    else:
        assert r.steps == 40 and r.head_accepts == [0, 0, 0, 0]


def test_profile_validation(tmp_path):
    assert bench.load_profile("vicuna-7b")[0][0] == 0.60
    bad = tmp_path / "bad.json"
    bad.write_text("[[0.9, 0.5]]")
    with pytest.raises(ValueError, match="sum to at most 1"):
        bench.load_profile(str(bad))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k_m"])
def test_random_gguf_of_given_shapes_loads_and_decodes(tmp_path, qtype):
    """bench/make_random_gguf.py (streamed random blocks) writes a GGUF llama.cpp loads and decodes."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("make_random_gguf", os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                                   "make_random_gguf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    mod.write(path, "tiny", qtype, log=None)
    e = Engine(path, tree="chain:0", n_ctx=128, n_threads=1, **F32)
    assert e.model.n_embd == 256 and e.model.n_vocab == 1024
    out = [t for ts in e.generate([1, 5, 9], SamplingParams(), 8) for t in ts]
    assert len(out) == 8 and all(0 <= t < 1024 for t in out)


def test_backend_sampling_gives_tree_rows_the_host_argmax(tmp_path):
    """bench/backend_argmax.py: with a greedy sampler chain on every seq id, llama.cpp's backend
    sampling gives each row of a 7-row tree (rows carrying seq-id sets) the host's argmax, on this
    machine's backend; the default per-seq output limit is 1 (the script raises it)."""
    import json
    import os
    import subprocess
    import sys

    from medusa_edge.testing import write_llama_gguf

    base = write_llama_gguf(str(tmp_path / "r.gguf"), seed=3, vocab_size=1024)
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "backend_argmax.py")
    p = subprocess.run([sys.executable, script, base.path, "--reps", "2", "--threads", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print("\n", res)
    assert res["equal"] and len(set(res["host_argmax"])) >= 3  # distinct rows, so equality means something
    assert res["default_n_outputs_max_per_seq"] == 1
