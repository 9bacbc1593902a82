"""The public API, shaped like llama-cpp-python's ``Llama`` so an app can switch with one line.

Layers: ``Engine`` yields token ids per forward; ``TextStream`` turns them into text chunks
(UTF-8 safe, stop strings held back until decided); ``Medusa.create_completion`` wraps the
chunks in llama-cpp-python's dict shapes, plus a ``medusa`` entry with the statistics.
"""

from __future__ import annotations

import codecs
import os
import random
import sys
import time
import uuid
from typing import Iterator, Optional, Sequence, Union

from . import chat_template, schema
from .engine import Engine, Proposer, SamplingParams, Stats

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED


class TextStream:
    """Incremental detokenizer with stop strings.

    ``push(piece)`` returns the text that is now final; ``stopped`` turns true when a stop
    string appears (the output ends right before it). Bytes of an unfinished UTF-8 character
    and text that could still become a stop string are held back. Invalid UTF-8 is dropped,
    as llama-cpp-python does.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, piece: bytes, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += self.decoder.decode(piece, final)
        text = self.text
        cut = len(text)
        for s in self.stop:
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i != -1 and i < cut:
                cut = i
                self.stopped = True
        if not self.stopped and not final:
            # hold back a tail that is a prefix of some stop string
            hold = 0
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            cut = len(text) - hold
        out = text[self.sent : cut] if cut > self.sent else ""
        self.sent = max(self.sent, cut)
        return out


def prompt_tokens(model, prompt: Union[str, Sequence[int]]) -> list[int]:
    """Token ids of a prompt: the text with special tokens parsed, preceded by BOS when the model
    wants one and the text does not already start with it (a chat template that emits
    ``bos_token`` must not get a second one; llama.cpp's chat code strips it the same way). A
    list of ids is taken as is. ``model``: a native Model."""
    if isinstance(prompt, str):
        toks = list(model.tokenize(prompt, False, True)) if prompt else []
        if model.add_bos and model.bos >= 0 and toks[:1] != [model.bos]:
            toks.insert(0, model.bos)
        return toks or [model.bos]
    return [int(t) for t in prompt]


def render_chat(model, messages: Sequence[dict], add_generation_prompt: bool = True,
                template: Optional[str] = None) -> str:
    """Render ``messages`` with ``template`` (default: the GGUF's tokenizer.chat_template) in a
    jinja2 sandbox, or in the Vicuna v1.1 format when there is none. ``model``: a native Model."""
    messages = chat_template.check_messages(messages)
    tmpl = template if template is not None else model.chat_template()
    if not tmpl:
        return chat_template.vicuna(messages, add_generation_prompt)
    piece = lambda t: model.token_to_piece(t, True).decode("utf-8", "replace") if t >= 0 else ""
    return chat_template.render(tmpl, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=piece(model.bos), eos_token=piece(model.eos))


class Medusa:
    """A GGUF model with Medusa heads. Arguments follow ``llama_cpp.Llama``.

    ``heads_path=None`` looks for ``<model stem>.medusa.gguf`` next to the model; with no heads
    the model decodes plainly (and says so once on stderr). ``tree`` is a preset name, ``chain:N``,
    a JSON file or a list of paths; by default the heads file's own tree.
    """

    def __init__(
        self,
        model_path: Optional[str] = None,
        heads_path: Optional[str] = None,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        n_threads: Optional[int] = None,
        seed: int = DEFAULT_SEED,
        tree=None,
        f32_kv: bool = False,
        flash_attn: Optional[bool] = None,
        exact: bool = True,
        verbose: bool = False,
    ):
        if model_path is None:
            from .demo import demo_model_path

            model_path = demo_model_path()
        if heads_path is None:
            candidate = schema.sidecar_path(model_path)
            if os.path.isfile(candidate):
                heads_path = candidate
            elif tree is None and os.path.isfile(model_path):
                print(f"medusa-edge: no heads file {candidate}; decoding plainly (one token per forward)", file=sys.stderr)
        self.model_path = model_path
        self.verbose = verbose
        self._seed = seed
        self.engine = Engine(
            model_path, heads_path, tree=tree, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
            n_gpu_layers=n_gpu_layers, f32_kv=f32_kv, flash_attn=flash_attn, exact=exact, verbose=verbose,
        )
        self.last_stats: Optional[Stats] = None

    # -- tokens ----------------------------------------------------------------------------------
    @property
    def tree(self):
        return self.engine.tree

    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def n_vocab(self) -> int:
        return self.engine.model.n_vocab

    def token_bos(self) -> int:
        return self.engine.model.bos

    def token_eos(self) -> int:
        return self.engine.model.eos

    def tokenize(self, text: Union[bytes, str], add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self.engine.model.tokenize(text, add_bos, special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        m = self.engine.model
        return b"".join(m.token_to_piece(int(t), special) for t in tokens)

    def _prompt_tokens(self, prompt: Union[str, Sequence[int]]) -> list[int]:
        return prompt_tokens(self.engine.model, prompt)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the GGUF's tokenizer.chat_template, or the Vicuna format."""
        return render_chat(self.engine.model, messages, add_generation_prompt)

    # -- completion ------------------------------------------------------------------------------
    def create_completion(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        stream: bool = False,
        *,
        acceptance: str = "exact",
        proposer: Optional[Proposer] = None,
    ):
        """Complete ``prompt``. Returns llama-cpp-python's completion dict, or with ``stream=True``
        an iterator of its chunks. Both carry ``medusa`` statistics (the last chunk does)."""
        if seed is None:  # llama-cpp-python's chaining: each call draws the next seed from the last
            self._seed = seed = random.Random(self._seed).randint(0, 2**32)
        params = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, seed=seed, acceptance=acceptance,
        )
        prompt_tokens = self._prompt_tokens(prompt)
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self.n_ctx() - len(prompt_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        chunks = self._stream(prompt_tokens, params, max_tokens, stops, proposer)
        if stream:
            return chunks
        text, finish, last = [], None, None
        for c in chunks:
            text.append(c["choices"][0]["text"])
            finish, last = c["choices"][0]["finish_reason"], c
        return {
            "id": last["id"], "object": "text_completion", "created": last["created"], "model": last["model"],
            "choices": [{"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": last["usage"], "medusa": last["medusa"],
        }

    __call__ = create_completion

    def _stream(self, prompt_tokens, params, max_tokens, stops, proposer) -> Iterator[dict]:
        cid, created, model = f"cmpl-{uuid.uuid4()}", int(time.time()), self.model_path

        def chunk(text, finish=None, extra=None):
            c = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if extra:
                c.update(extra)
            return c

        stats = Stats()
        self.last_stats = stats
        text = TextStream(stops)
        m = self.engine.model
        finish = "length"
        n_completion = 0
        gen = self.engine.generate(prompt_tokens, params, max_tokens, proposer=proposer, stats=stats)
        try:
            for new in gen:
                piece = b""
                for t in new:
                    if m.is_eog(t):
                        finish = "stop"
                        break
                    n_completion += 1
                    piece += m.token_to_piece(t, False)
                out = text.push(piece)
                if text.stopped:
                    finish = "stop"
                if out:
                    yield chunk(out)
                if text.stopped or finish == "stop":
                    break
            tail = text.push(b"", final=True)
            if tail:
                yield chunk(tail)
        finally:
            gen.close()
        usage = {"prompt_tokens": len(prompt_tokens), "completion_tokens": n_completion,
                 "total_tokens": len(prompt_tokens) + n_completion}
        yield chunk("", finish, {"usage": usage, "medusa": stats.as_dict()})
