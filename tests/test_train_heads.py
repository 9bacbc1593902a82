"""Medusa-1 heads training (medusa-edge train) on tiny GGUF bases.

The base is a random-weight Llama whose blocks add little to the residual stream
(``residual_scale=0.1``): its greedy text falls into loops, so what it writes 2-4 tokens ahead
is learnable from a few thousand positions, as real text is for a real model. A default random
base (``residual_scale=1``) is close to unlearnable at this size (held-out top-1 about 5%).
"""

import json
import os
import random
import time

import numpy as np
import pytest

from medusa_edge.api import chat_prompt_tokens

from medusa_edge.core import tune
from medusa_edge.core.engine import Engine, SamplingParams, Stats
from medusa_edge.core.tree import TOP_K
from medusa_edge.testing import _WORDS, write_llama_gguf
from medusa_edge.training import data as td
from medusa_edge.training import model as hm
from medusa_edge.training import train as th
from medusa_edge.training.prompts import load_prompts

N_HEADS = 3
GEN = 48


def _prompts(n, seed):
    r = random.Random(seed)
    return [" ".join(r.choice(_WORDS) for _ in range(r.randint(3, 8))) for _ in range(n)]


def _write_jsonl(path, prompts, key="prompt"):
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({key: p}) + "\n")


def _args(base, data, out, *extra):
    return th.parse_args([
        # the reference's layout and rate (own output matrices, lr 1e-3), which these tests were sized for
        base, "--data", data, "-o", out, "--heads", str(N_HEADS), "--gen-tokens", str(GEN), "--batch", "256",
        "--no-shared-output", "--lr", "1e-3",
        "--threads", "1", "--device", "cpu", "--quiet", "--measure", "0", "--val-frac", "0.2", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_heads")
    base = write_llama_gguf(str(d / "loopy.gguf"), seed=0, n_layer=2, residual_scale=0.1)
    data = str(d / "prompts.jsonl")
    _write_jsonl(data, _prompts(36, seed=0))
    out = str(d / "loopy.medusa.gguf")
    logs = []
    t0 = time.perf_counter()
    summary = th.train(_args(base.path, data, out, "--steps", "200", "--save-every", "100", "--eval-every", "100",
                             "--keep-checkpoint"), log=logs.append)
    print(f"\ntraining run: {time.perf_counter() - t0:.1f} s")
    print("\n".join(logs))
    return {"dir": d, "base": base, "data": data, "out": out, "summary": summary, "logs": logs}


def test_help_has_example(capsys):
    with pytest.raises(SystemExit) as e:
        th.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and "--data" in text and "--heads" in text and "--device" in text


def test_few_steps_reduce_heads_loss(trained):
    """A few AdamW steps on cached hidden states lower the (decay-weighted) heads loss."""
    import torch

    cache = td.DataCache(str(trained["out"])[:-5] + ".data", json.load(open(str(trained["out"])[:-5] + ".data/meta.json"))["identity"])
    hidden, tokens, lengths, _ = cache.load()
    targets = hm.make_targets(tokens, lengths, N_HEADS)
    rows = np.nonzero(targets[:, 0] >= 0)[0][:512]
    h = torch.from_numpy(hidden.take(rows))
    t = torch.from_numpy(targets[rows])
    w_out = td.read_output_matrix(trained["base"].path)
    model = hm.build_heads(N_HEADS, 1, w_out, seed=0)
    weights = [0.8 ** i for i in range(N_HEADS)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        before, per_before = hm.heads_loss(model(h), t, weights)
    for _ in range(8):
        loss, _ = hm.heads_loss(model(h), t, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, per_after = hm.heads_loss(model(h), t, weights)
    print(f"\nheads loss over 8 steps: {float(before):.3f} -> {float(after):.3f}; per head {per_before} -> {per_after}")
    assert float(after) < 0.9 * float(before)
    assert all(a < b for a, b in zip(per_after, per_before))
    # and the full run lowered train and held-out loss
    s = trained["summary"]
    print(f"full run: train loss {s['loss_first']} -> {s['loss_last']}, held-out {s['heldout_loss_before']} -> {s['heldout_loss_after']}")
    assert s["loss_last"] < 0.7 * s["loss_first"]
    assert s["heldout_loss_after"] < 0.7 * s["heldout_loss_before"]


def test_trained_heads_raise_tokens_per_step(trained):
    """The written heads GGUF loads in the engine and gives more than one token per step on
    held-out prompts of the training domain; output is identical to plain greedy decoding."""
    s = trained["summary"]
    print(f"\nheld-out top-1 {s['heldout_top1']} top-5 {s['heldout_top5']}; default tree {s['tree']}")
    base, heads = trained["base"].path, trained["out"]
    held_out = _prompts(8, seed=123)
    plain = Engine(base, tree="chain:0", n_ctx=256, n_threads=1)
    results = {}
    for tree in ("chain:3", "heads"):  # "heads": the tree stored in the heads file
        eng = Engine(base, heads, tree=tree, n_ctx=256, n_threads=1)
        tok = steps = 0
        for p in held_out:
            ids = eng.model.tokenize(p, True, False)
            st = Stats()
            out = [t for ts in eng.generate(ids, SamplingParams(temperature=0.0), GEN, stats=st) for t in ts]
            ref = [t for ts in plain.generate(ids, SamplingParams(temperature=0.0), GEN) for t in ts]
            assert out == ref
            tok += sum((k + 1) * c for k, c in st.accepted_hist.items())
            steps += st.steps
        results[tree if tree != "heads" else f"stored ({eng.tree.n_nodes} nodes)"] = tok / steps
    print("mean tokens per step on held-out prompts:", {k: round(v, 3) for k, v in results.items()})
    assert all(v > 1.3 for v in results.values()), results
    # the stored tree was grown from the held-out accuracies and respects the node budget
    assert 1 < len(s["tree"]) + 1 <= 8
    assert max(len(p) for p in s["tree"]) <= N_HEADS


def test_heads_file_metadata(trained):
    from medusa_edge.core.engine import read_heads_info

    info = read_heads_info(trained["out"])
    eng = Engine(trained["base"].path, tree="chain:0", n_ctx=64, n_threads=1)
    assert info["n_heads"] == N_HEADS and info["n_layers"] == 1 and not info["shared_output"]
    assert info["root_input"] and info["schema_version"] == 2  # the trainer's default
    assert info["n_embd"] == eng.model.n_embd and info["n_vocab"] == eng.model.n_vocab
    assert info["base_vocab_hash"] == f"{eng.model.vocab_fingerprint():016x}"
    assert json.loads(info["tree"]) == trained["summary"]["tree"]


def test_hidden_states_match_engine(trained):
    """Every cached row equals the engine's post-norm hidden state for the same prefix."""
    cache_dir = str(trained["out"])[:-5] + ".data"
    meta = json.load(open(os.path.join(cache_dir, "meta.json")))
    assert meta["complete"] and meta["format"] == td.DATA_FORMAT
    assert meta["max_hidden_check_diff"] < 1e-3
    shard = dict(np.load(os.path.join(cache_dir, meta["shards"][0]["file"] + ".npz")))
    shard["hidden"] = np.load(os.path.join(cache_dir, meta["shards"][0]["file"] + ".npy"))
    assert shard["hidden"].dtype == np.float16 and shard["tokens"].dtype == np.int32
    prompts = load_prompts(trained["data"])
    eng = Engine(trained["base"].path, tree="chain:0", n_ctx=256, n_threads=1)
    i, n = int(shard["prompt_index"][0]), int(shard["lengths"][0])
    ids = eng.model.tokenize(prompts[i], True, False)
    assert int(shard["prompt_len"][0]) == len(ids)
    toks = shard["tokens"][:n].tolist()
    for j in (1, n // 2, n - 1):
        h = eng.hidden_state(ids + toks[:j])
        np.testing.assert_allclose(shard["hidden"][j].astype(np.float32), h, atol=2e-2 * np.abs(h).max())
        assert int(np.argmax(eng.next_logits(ids + toks[:j]))) == toks[j]  # row j's next token is tokens[j]


def test_cache_reused_and_resume(trained, tmp_path):
    """A rerun reuses the data cache; --resume continues from the checkpoint; the result is the same."""
    before = open(trained["out"], "rb").read()
    logs = []
    s = th.train(_args(trained["base"].path, trained["data"], trained["out"], "--steps", "200", "--save-every", "100",
                       "--eval-every", "100", "--resume", "--keep-checkpoint"), log=logs.append)
    assert any("resumed from" in l and "step 200" in l for l in logs), logs
    assert s["time_data_s"] < 1.0
    assert open(trained["out"], "rb").read() == before


def test_interrupted_run_resumes_exactly(trained, tmp_path, monkeypatch):
    """Stopped after its checkpoint at step 10, a 20-step run resumed with --resume writes the
    same heads as an uninterrupted run."""
    cache = str(trained["out"])[:-5] + ".data"
    common = ("--steps", "20", "--save-every", "10", "--cache", cache, "--tree", "chain:2")
    full = str(tmp_path / "full.medusa.gguf")
    th.train(_args(trained["base"].path, trained["data"], full, *common), log=lambda *a: None)

    part = str(tmp_path / "part.medusa.gguf")
    real = th.heads_loss
    calls = {"n": 0}

    def stop_at_13(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(th, "heads_loss", stop_at_13)  # the name the training loop calls
    with pytest.raises(KeyboardInterrupt):
        th.train(_args(trained["base"].path, trained["data"], part, *common), log=lambda *a: None)
    monkeypatch.setattr(th, "heads_loss", real)
    assert not os.path.exists(part) and os.path.exists(str(tmp_path / "part.medusa.ckpt.pt"))
    logs = []
    th.train(_args(trained["base"].path, trained["data"], part, *common, "--resume"), log=logs.append)
    assert any("resumed from" in l and "step 10" in l for l in logs), logs
    assert open(part, "rb").read() == open(full, "rb").read()


def test_checkpoint_removed_and_accuracies_stored(trained, tmp_path):
    """By default the checkpoint is deleted once the heads are written (the summary says how big it
    was); the held-out per-rank accuracies are stored in the heads file for the tree tuner."""
    from medusa_edge.core.engine import read_heads_info

    out = str(tmp_path / "clean.medusa.gguf")
    cache = str(trained["out"])[:-5] + ".data"
    s = th.train(_args(trained["base"].path, trained["data"], out, "--steps", "12", "--save-every", "5", "--cache", cache),
                 log=lambda *a: None)
    assert not os.path.exists(str(tmp_path / "clean.medusa.ckpt.pt"))
    assert s["checkpoint"].startswith("removed (")
    acc = read_heads_info(out)["rank_accuracy"]
    assert len(acc) == N_HEADS and all(len(r) == TOP_K for r in acc)
    np.testing.assert_allclose([r[0] for r in acc], s["heldout_top1"], atol=1e-4)
    assert s["history"][0]["step"] == 0 and s["history"][-1]["step"] == 12


def test_batched_generation_matches_one_at_a_time(trained):
    """Sequences generated 8 at a time (continuous batching, prompts of different lengths) give
    the same greedy tokens, and hidden states within float noise, as one at a time."""
    prompts = load_prompts(trained["data"])[:12]
    base = td.BaseModel(trained["base"].path, 128, 1, chat="off")
    jobs = [(i, base.prompt_tokens(p, 64)) for i, p in enumerate(prompts)]
    runs = []
    for parallel in (1, 8):
        g = td.BatchedGenerator(trained["base"].path, parallel, 64 + GEN + 2, 1)
        runs.append({k: (o, h) for k, o, h in g.run(jobs, GEN)})
        g.close()
    assert sorted(runs[0]) == sorted(runs[1]) == list(range(12))
    for k in range(12):
        (o1, h1), (o8, h8) = runs[0][k], runs[1][k]
        assert o1 == o8 and len(o1) == GEN and h1.shape == (GEN, base.n_embd)
        np.testing.assert_allclose(h8, h1, atol=1e-3 * np.abs(h1).max())
    # row 0 is the engine's hidden state after the prefill
    h0 = base.hidden_after_prefill(jobs[3][1])
    np.testing.assert_allclose(runs[1][3][1][0], h0, atol=1e-3 * np.abs(h0).max())


def test_shared_output_heads_load(trained, tmp_path):
    """--shared-output: ResBlocks only, W_out reused from the base; the engine runs them."""
    from medusa_edge.core.engine import read_heads_info

    out = str(tmp_path / "shared.medusa.gguf")
    cache = str(trained["out"])[:-5] + ".data"
    s = th.train(_args(trained["base"].path, trained["data"], out, "--steps", "60", "--cache", cache, "--shared-output",
                       "--head-type", "q8_0"), log=lambda *a: None)
    assert read_heads_info(out)["shared_output"]
    assert s["heldout_loss_after"] < s["heldout_loss_before"]
    eng = Engine(trained["base"].path, out, tree="chain:2", n_ctx=128, n_threads=1)
    st = Stats()
    for _ in eng.generate(eng.model.tokenize("the world", True, False), SamplingParams(), 16, stats=st):
        pass
    assert st.n_generated == 16


def test_cache_for_other_base_refused(trained, tmp_path):
    other = write_llama_gguf(str(tmp_path / "other.gguf"), seed=5, n_layer=2, residual_scale=0.1)
    cache = str(trained["out"])[:-5] + ".data"
    with pytest.raises(ValueError, match="another base model or other settings"):
        th.train(_args(other.path, trained["data"], str(tmp_path / "o.medusa.gguf"), "--steps", "1", "--cache", cache), log=lambda *a: None)
    assert th.main([other.path, "--data", trained["data"], "--cache", cache, "--quiet", "-o", str(tmp_path / "o.gguf")]) == 1


def test_prompts_tokenized_as_the_api_does(tmp_path):
    """Prompts go through the same chat format and tokenization as the API at inference."""
    tmpl = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    m = write_llama_gguf(str(tmp_path / "chat.gguf"), chat_template=tmpl)
    b = td.BaseModel(m.path, 64, 1)
    ids = b.prompt_tokens("the world", 32)
    # a jinja template is in charge of BOS (this one emits none), as in llama-cpp-python's chat
    assert ids == list(b.model.tokenize("[INST] the world [/INST]", False, True))
    assert ids == chat_prompt_tokens(b.model, [{"role": "user", "content": "the world"}])
    assert b.prompt_tokens("the world " * 40, 16)[-1] == ids[-1] and len(b.prompt_tokens("the world " * 40, 16)) == 16
    plain = td.BaseModel(m.path, 64, 1, chat="off")
    assert plain.prompt_tokens("the world", 32) == [1] + list(plain.model.tokenize("the world", False, True))
    vicuna = td.BaseModel(trained_free_base(tmp_path), 64, 1, chat="on")
    from medusa_edge.chat_template import VICUNA_SYSTEM

    assert vicuna.prompt_tokens("hi", 256) == [1] + list(vicuna.model.tokenize(f"{VICUNA_SYSTEM} USER: hi ASSISTANT:", False, True))


def trained_free_base(tmp_path):
    return write_llama_gguf(str(tmp_path / "nochat.gguf")).path


def test_auto_tree_is_tunes_growth(trained):
    """--tree auto stores core.tune's greedy growth of the held-out accuracies, by depth then ranks;
    ties go to the shallower node (tune's rule: here [1] before [0, 0])."""
    from medusa_edge.core.engine import read_heads_info

    acc = np.zeros((3, 10))
    acc[0, :3] = [0.8, 0.1, 0.05]
    acc[1, :2] = [0.6, 0.2]
    acc[2, 0] = 0.5
    assert tune.grow_tree(acc, 4) == [[0], [0, 0], [0, 0, 0]]
    assert sorted(map(tuple, tune.grow_tree(acc, 6))) == [(0,), (0, 0), (0, 0, 0), (0, 1), (1,)]
    assert tune.expected_tokens(acc, [[0], [0, 0]]) == pytest.approx(1 + 0.8 + 0.48)
    assert tune.grow_tree(acc, 1) == []
    tie = np.array([[0.5, 0.25], [0.5, 0.0]])  # [0, 0] and [1] both 0.25
    assert tune.grow_tree(tie, 3) == [[0], [1]]
    # the trained run: the stored tree is sorted, and as good as tune's growth of the stored
    # accuracies (rounded to 5 decimals in the file, so compare expected tokens, not paths)
    s = trained["summary"]
    assert s["tree"] == sorted(s["tree"], key=lambda p: (len(p), p))
    acc = np.asarray(read_heads_info(trained["out"])["rank_accuracy"])
    assert tune.expected_tokens(acc, s["tree"]) == pytest.approx(tune.expected_tokens(acc, tune.grow_tree(acc, 8)), abs=1e-3)
    assert s["expected_tokens_per_step"] == pytest.approx(tune.expected_tokens(acc, s["tree"]), abs=2e-3)


def test_generation_resumes_after_an_interruption(trained, tmp_path, monkeypatch):
    """Generation stopped part-way keeps the shards written before the stop; a rerun continues
    after the last one and ends with the same data as a run that was never stopped."""
    prompts = load_prompts(trained["data"])[:20]
    base = td.BaseModel(trained["base"].path, 128, 1, chat="off")
    kw = dict(gen_tokens=16, temperature=0.0, seed=0, max_prompt_tokens=64, n_parallel=4, shard_size=4, progress=False,
              log=lambda *a: None)
    full = td.DataCache(str(tmp_path / "full"), {"k": 1})
    td.generate_data(base, prompts, full, **kw)
    real = td.BatchedGenerator.run

    def stop_after_9(self, *a, **k):
        for n, item in enumerate(real(self, *a, **k)):
            if n == 9:
                raise KeyboardInterrupt
            yield item

    part = td.DataCache(str(tmp_path / "part"), {"k": 1})
    monkeypatch.setattr(td.BatchedGenerator, "run", stop_after_9)
    with pytest.raises(KeyboardInterrupt):
        td.generate_data(base, prompts, part, **kw)
    monkeypatch.setattr(td.BatchedGenerator, "run", real)
    assert not part.complete and 0 < part.n_done < 20 and part.n_done % 4 == 0
    td.generate_data(base, prompts, td.DataCache(str(tmp_path / "part"), {"k": 1}), **kw)
    a, b = full.load(), td.DataCache(str(tmp_path / "part"), {"k": 1}).load()
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    np.testing.assert_allclose(a[0].take(np.arange(len(a[1]))), b[0].take(np.arange(len(b[1]))), atol=1e-2)


def test_cache_extended_by_a_longer_prompt_list(trained, tmp_path):
    """A prompt list that starts with the cached prompts extends the cache (only the new prompts
    are generated); one whose cached part differs is refused."""
    import shutil

    cache = str(tmp_path / "ext.data")
    shutil.copytree(str(trained["out"])[:-5] + ".data", cache)
    prompts = load_prompts(trained["data"])
    longer = str(tmp_path / "longer.jsonl")
    _write_jsonl(longer, prompts + _prompts(4, seed=77))
    logs = []
    s = th.train(_args(trained["base"].path, longer, str(tmp_path / "e.medusa.gguf"), "--steps", "2", "--cache", cache),
                 log=logs.append)
    assert any(f"{len(prompts)} prompts cached" in l and "4 more to generate" in l for l in logs), logs
    meta = json.load(open(os.path.join(cache, "meta.json")))
    assert meta["complete"] and meta["prompts_n"] == meta["next_prompt"] == len(prompts) + 4
    assert s["sequences"] > trained["summary"]["sequences"]
    other = str(tmp_path / "other.jsonl")
    _write_jsonl(other, ["something else entirely"] + prompts[1:] + _prompts(4, seed=77))
    with pytest.raises(ValueError, match="made from other prompts"):
        th.train(_args(trained["base"].path, other, str(tmp_path / "o.medusa.gguf"), "--steps", "1", "--cache", cache),
                 log=lambda *a: None)


def test_root_input_off_writes_reference_heads(trained, tmp_path):
    """--no-root-input: the reference's heads (schema 1, square first ResBlock)."""
    from medusa_edge.core.engine import read_heads_info

    out = str(tmp_path / "ref.medusa.gguf")
    th.train(_args(trained["base"].path, trained["data"], out, "--steps", "5", "--no-root-input",
                   "--cache", str(trained["out"])[:-5] + ".data"), log=lambda *a: None)
    info = read_heads_info(out)
    assert not info["root_input"] and info["schema_version"] == 1


def test_soft_target_loss_by_hand():
    """--soft-targets W: (1-W) * CE(base's token) + W * CE(base's distribution), rows without a
    target ignored; W=0 is the hard-label loss unchanged."""
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)  # [heads, rows, vocab]
    teacher = [torch.randn(3, 5, generator=g) * 3 for _ in range(2)]
    targets = torch.tensor([[1, 4], [2, -100], [0, 3]])
    w = [1.0, 0.8]

    def by_hand(i, soft):
        rows = [r for r in range(3) if targets[r, i] >= 0]
        hard = sum(-float(torch.log_softmax(logits[i, r], -1)[targets[r, i]]) for r in rows) / len(rows)
        sft = sum(-float((torch.softmax(teacher[i][r], -1) * torch.log_softmax(logits[i, r], -1)).sum()) for r in rows) / len(rows)
        return (1 - soft) * hard + soft * sft

    for soft in (0.0, 0.5, 1.0):
        total, per = hm.heads_loss(logits, targets, w, teacher, soft)
        assert per == pytest.approx([by_hand(0, soft), by_hand(1, soft)], rel=1e-5)
        assert float(total) == pytest.approx(w[0] * per[0] + w[1] * per[1], rel=1e-5)
    # the teacher matters only when soft > 0
    assert hm.heads_loss(logits, targets, w, teacher, 0.5)[1] != hm.heads_loss(logits, targets, w, [t * 0 for t in teacher], 0.5)[1]
    assert hm.heads_loss(logits, targets, w)[1] == pytest.approx(hm.heads_loss(logits, targets, w, [t * 0 for t in teacher], 0.0)[1])


def test_soft_targets_train_and_are_checked(trained, tmp_path):
    """A run with --soft-targets learns (held-out loss falls) and records the setting; a weight
    outside [0, 1] is refused before any work."""
    out = str(tmp_path / "soft.medusa.gguf")
    cache = str(trained["out"])[:-5] + ".data"
    s = th.train(_args(trained["base"].path, trained["data"], out, "--steps", "40", "--cache", cache, "--shared-output",
                       "--soft-targets", "1"), log=lambda *a: None)
    assert s["soft_targets"] == 1.0
    assert s["heldout_loss_after"] < 0.8 * s["heldout_loss_before"]
    with pytest.raises(ValueError, match="--soft-targets"):
        th.train(_args(trained["base"].path, trained["data"], str(tmp_path / "x.medusa.gguf"), "--steps", "1",
                       "--cache", cache, "--soft-targets", "1.5"), log=lambda *a: None)
