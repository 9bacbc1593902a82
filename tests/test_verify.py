"""medusa-edge verify: the user's check of exactness on their own model and device."""

import json

from medusa_edge.default_model import demo_model_path
from medusa_edge.cli import verify


def test_verify_reports_identical_answers(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [q, "ignored"]}) for q in
                                 ["What colour is the sky?", "Tell me a story about a fox."]))
    out = tmp_path / "r.json"
    rc = verify.main([demo_model_path(), "--prompts", str(prompts), "--max-tokens", "48", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "2/2 answers identical" in text and "exact batch on this device: 63" in text
    r = json.loads(out.read_text())
    assert [x["identical"] for x in r["results"]] == [True, True] and r["flash_attn"]


def test_verify_locates_a_divergence(monkeypatch, capsys):
    """An injected divergence (Medusa's answer altered at token 5) is found and located."""
    from medusa_edge.core.engine import Engine

    real = Engine.generate

    def tampered(self, prompt, params, max_tokens, **kw):
        n = 0
        for new in real(self, prompt, params, max_tokens, **kw):
            if kw.get("max_depth") != 0 and n <= 5 < n + len(new):
                new = list(new)
                new[5 - n] = (new[5 - n] + 1) % self.model.n_vocab
            n += len(new)
            yield new

    monkeypatch.setattr(Engine, "generate", tampered)
    rc = verify.main([demo_model_path(), "-n", "1", "--max-tokens", "32"])
    text = capsys.readouterr().out
    assert rc == 1 and "DIVERGES at token 5" in text and "0/1 answers identical" in text
