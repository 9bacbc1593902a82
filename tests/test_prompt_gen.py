"""The self-distillation prompt generator: deterministic, prefix-stable (a data cache extends),
held-out topics unseen in training, and the second set of kinds appended after the first; and
the one prompt loader the trainer, verify and bench read prompt files with."""

import json
import os

import pytest

from medusa_edge.training import prompts as pg


def test_deterministic_and_every_list_a_prefix_of_a_longer_one():
    a = pg.generate(300, seed=1)
    assert a == pg.generate(300, seed=1) and len(set(a)) == 300
    assert pg.generate(120, seed=1) == a[:120]
    assert pg.generate(300, seed=2) != a


def test_second_set_is_appended_and_prefix_stable():
    first = pg.generate(200, seed=0)
    both = pg.generate(200, seed=0, n_more=150)
    assert both[:200] == first and len(both) == 350 and len(set(both)) == 350
    assert pg.generate(200, seed=0, n_more=60) == both[:260]
    more = both[200:]
    # the second set's kinds, each present (role play, extraction, reasoning, discussion, constraint)
    assert any(s.startswith(("Pretend you are", "Act as a", "Role-play", "You are", "Imagine you are", "Stay in character")) for s in more)
    assert any("\"" in s and s.startswith(("Extract", "From this review", "Read this", "Turn this", "What is the main claim", "List the dates")) for s in more)
    assert any(s.startswith("What comes next in the sequence") or "step by step" in s for s in more)
    assert not set(more) & set(pg.generate(400, seed=0))  # none repeats a first-set prompt


def test_heldout_topics_never_appear_in_training_prompts():
    train = pg.generate(600, seed=0, n_more=200)
    held = [t for ts in pg.TOPICS.values() for t in ts if pg._split_of(t, 0.1) == "heldout"]
    assert held
    assert not [t for t in held if any(t in p for p in train)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        pg.generate(10, split="test")
    with pytest.raises(ValueError):
        pg.generate(10, n_more=-1)
    with pytest.raises(SystemExit) as e:  # the CLI: argparse's usage error, not a traceback
        pg.main(["--n-more", "-3"])
    assert e.value.code == 2


def test_cli_writes_both_splits_in_proportion(tmp_path):
    out, held = tmp_path / "p.jsonl", tmp_path / "h.jsonl"
    assert pg.main(["-n", "80", "--n-more", "20", "-o", str(out), "--heldout", str(held), "--n-heldout", "50"]) == 0
    train = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    heldout = [json.loads(line)["prompt"] for line in held.read_text().splitlines()]
    assert train == pg.generate(80, n_more=20) and len(heldout) == 50
    assert heldout[40:] == pg.generate(40, split="heldout", n_more=10)[40:]  # 20% of the second set, like training


def test_load_prompts_formats(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join([
        json.dumps({"prompt": "a"}), json.dumps({"text": "b"}), json.dumps({"turns": ["c", "d"]}), json.dumps("e"),
        json.dumps({"messages": [{"role": "user", "content": "f"}]}), "",
    ]))
    got = pg.load_prompts(str(p))
    assert got[:4] == ["a", "b", "c", "e"] and got[4] == [{"role": "user", "content": "f"}]
    assert pg.prompt_messages("a") == [{"role": "user", "content": "a"}] and pg.prompt_messages(got[4]) == got[4]
    assert pg.prompt_text(got[4]) == "f" and pg.prompt_text("a") == "a"
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "mt_bench_questions.jsonl")
    if os.path.exists(bench):
        assert len(pg.load_prompts(bench)) >= 80


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "a"}\n{"question": 1}\n', r"bad.jsonl:2: .*\"prompt\""),
    ('{"prompt": "a"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
    ('{"turns": [{"x": 1}]}\n', r"bad.jsonl:1: \"turns\" must start with a string"),
    ('{"messages": [{"content": "x"}]}\n', r"bad.jsonl:1: every entry of \"messages\""),
    ("\n\n", r"bad.jsonl: no prompts"),
    ("", r"bad.jsonl: no prompts"),
])
def test_load_prompts_refuses_bad_files(tmp_path, text, match):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(ValueError, match=match):
        pg.load_prompts(str(tmp_path / "bad.jsonl"))


def test_verify_reads_prompts_with_the_same_loader(tmp_path):
    """``medusa-edge verify``: its built-in prompts without a file, any loader format with one, and its limit."""
    from medusa_edge.cli import verify

    assert verify.load_prompts(None, None) == verify.DEFAULT_PROMPTS
    assert verify.load_prompts(None, 3) == verify.DEFAULT_PROMPTS[:3]
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join([json.dumps({"turns": ["q1", "ignored"]}), json.dumps("q2"), json.dumps({"text": "q3"})]))
    assert verify.load_prompts(str(p), None) == pg.load_prompts(str(p)) == ["q1", "q2", "q3"]
    assert verify.load_prompts(str(p), 2) == ["q1", "q2"]
