"""What a caller passes to the engine and gets back besides tokens: sampling parameters (as
llama-cpp-python names them), the proposer type, logit-bias normalisation, and per-call statistics."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

#: proposer(generated, n_heads, top_k) -> [n_heads, top_k] token ids, rank-sorted. ``generated``
#: holds the tokens emitted so far, the current root last. Replaces the heads (tests, other drafts).
#: With tree="step:N" it returns (ids, logp): also the [n_heads, top_k] log-probabilities the tree grows from.
Proposer = Callable[[list, int, int], np.ndarray]


@dataclass
class SamplingParams:
    """What to draw, as llama-cpp-python's sampler chain: ``temperature == 0`` is greedy,
    ``temperature < 0`` draws from the penalised softmax with no truncation. ``acceptance``: "exact" keeps the output
    identical to plain decoding with the same chain and seed; "typical" is the paper's lossy
    typical acceptance (root greedy, reference defaults)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0xFFFFFFFF
    acceptance: str = "exact"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    #: GBNF text (llama.cpp's grammar sampler, after the penalties as in llama-cpp-python); None: free text.
    #: One grammar state follows the accepted path, so the output stays plain decoding's under it.
    grammar: Optional[str] = None
    grammar_root: str = "root"
    #: ((token, bias), ...) added to those tokens' logits at every verified row, before the
    #: penalties (where llama-cpp-python's logit_bias processor runs); None or empty: no bias.
    #: ``normalize_logit_bias`` makes it from llama-cpp-python's / OpenAI's {token: bias}.
    logit_bias: Optional[tuple] = None

    def __post_init__(self):
        if self.acceptance not in ("exact", "typical"):
            raise ValueError(f"acceptance must be 'exact' or 'typical' (lossy), got {self.acceptance!r}")
        if self.grammar is not None:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise ValueError("grammar must be non-empty GBNF text")
            if not isinstance(self.grammar_root, str) or not self.grammar_root:
                raise ValueError("grammar_root must name the grammar's start rule")
            if self.acceptance != "exact":
                raise ValueError("a grammar needs acceptance='exact' (typical acceptance would skip the grammar)")
        if self.logit_bias:
            if self.acceptance != "exact":
                raise ValueError("logit_bias needs acceptance='exact' (typical acceptance would skip the bias)")

    @property
    def plain_argmax(self) -> bool:
        """Greedy with no penalties, no grammar and no bias: the argmax computed natively is the whole sampler."""
        return (self.temperature == 0 and self.repeat_penalty == 1.0 and self.frequency_penalty == 0
                and self.presence_penalty == 0 and self.grammar is None and not self.logit_bias)


#: Most entries a logit_bias may have (OpenAI's limit is 300; each entry costs every sampled row).
MAX_LOGIT_BIAS = 1024


def normalize_logit_bias(logit_bias, n_vocab: int) -> Optional[tuple]:
    """llama-cpp-python's / OpenAI's ``{token_id: bias}`` (keys ints or decimal strings, as JSON
    sends them) as ``SamplingParams.logit_bias``: sorted ((token, bias), ...), None when empty.
    A key that names no token of the vocabulary, a bias that is not a finite number, or more than
    ``MAX_LOGIT_BIAS`` entries is a ValueError naming it. Keys that name the same token keep the
    last bias, as llama-cpp-python's ``{int(k): float(v)}`` does."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token ids to biases, got {type(logit_bias).__name__}")
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries, got {len(logit_bias)}")
    out: dict[int, float] = {}
    for k, v in logit_bias.items():
        if isinstance(k, bool) or not isinstance(k, (int, str, np.integer)):
            raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
        if isinstance(k, str) and not re.fullmatch(r"-?[0-9]{1,12}", k):
            raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
        k_int = int(k)
        if not 0 <= k_int < n_vocab:
            raise ValueError(f"logit_bias names token {k!r}, outside the vocabulary [0, {n_vocab})")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"logit_bias for token {k!r} must be a number, got {v!r}")
        b = float(v)
        if not math.isfinite(b) or abs(b) > float(np.finfo(np.float32).max):  # the sampler adds it as a float32
            raise ValueError(f"logit_bias for token {k!r} must be a finite number, got {v!r}")
        out[k_int] = b
    return tuple(sorted(out.items())) or None


@dataclass
class Stats:
    """Statistics of one generation. Times in seconds."""

    n_prompt: int = 0
    n_prompt_reused: int = 0  # prompt tokens whose KV came from the previous call (not decoded)
    n_generated: int = 0
    steps: int = 0  # tree forwards (the prefill's forward is not a step)
    realigned: int = 0  # accepted tokens decoded again to keep the KV cache in position order (exact mode)
    padded: int = 0  # plain steps decoded with a scratch row, as batched rows (exact mode, past 256 cells)
    accepted_hist: Counter = field(default_factory=Counter)  # accepted candidates per step -> count
    head_accepts: list = field(default_factory=list)  # [n_heads] steps in which head i's node was accepted
    t_prefill: float = 0.0
    t_decode: float = 0.0  # llama_decode of the trees
    t_heads: float = 0.0
    t_total: float = 0.0
    exact: str = "bitwise"  # Engine.guarantee: "bitwise" (equals plain decoding) or "verified"

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens committed per tree forward (1 + accepted candidates)."""
        return sum((k + 1) * c for k, c in self.accepted_hist.items()) / self.steps if self.steps else 0.0

    @property
    def t_other(self) -> float:
        """Time in the loop outside llama_decode and the heads: the engine's own overhead."""
        return max(self.t_total - self.t_prefill - self.t_decode - self.t_heads, 0.0)

    def as_dict(self) -> dict:
        gen_time = self.t_total - self.t_prefill
        return {
            "steps": self.steps,
            "exact": self.exact,
            "prompt_tokens": self.n_prompt,
            "prompt_tokens_reused": self.n_prompt_reused,
            "generated_tokens": self.n_generated,
            "tokens_per_step": round(self.tokens_per_step, 4),
            "realigned_tokens": self.realigned,
            "padded_steps": self.padded,
            "accepted_length_histogram": {int(k): int(v) for k, v in sorted(self.accepted_hist.items())},
            "head_acceptance": [round(a / self.steps, 4) if self.steps else 0.0 for a in self.head_accepts],
            "time_prefill_s": round(self.t_prefill, 6),
            "time_decode_s": round(self.t_decode, 6),
            "time_heads_s": round(self.t_heads, 6),
            "time_other_s": round(self.t_other, 6),
            "time_total_s": round(self.t_total, 6),
            "tokens_per_second": round(self.n_generated / gen_time, 3) if gen_time > 0 else 0.0,
        }
