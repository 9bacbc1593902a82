"""The public API, shaped like llama-cpp-python's ``Llama`` so an app can switch with one line.

Layers: ``Engine`` yields token ids per forward; ``TextStream`` turns them into text chunks
(UTF-8 safe, stop strings held back until decided); ``Medusa.create_completion`` wraps the
chunks in llama-cpp-python's dict shapes, plus a ``medusa`` entry with the statistics.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import random
import sys
import threading
import time
import uuid
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from medusa_edge import chat_template
from medusa_edge.heads import schema
from medusa_edge import tools as _tools
from medusa_edge import grammar as _grammar
from medusa_edge.core.engine import Engine
from medusa_edge.core.params import Proposer, SamplingParams, Stats, normalize_logit_bias
from medusa_edge.errors import ClosedError

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


def chat_prompt_tokens(model, messages: Sequence[dict], template: Optional[str] = None, **extra) -> list[int]:
    """Token ids of a chat prompt exactly as llama-cpp-python's ``create_chat_completion`` builds
    them: a jinja template is in charge of BOS (its text is tokenized with special tokens parsed and
    nothing added: a template that emits ``bos_token`` gets one BOS, one that does not gets none);
    a named format (``chat_template.FORMATS``) and the Vicuna fallback get the model's BOS as a
    plain prompt does. ``model``: a native Model."""
    text = render_chat(model, messages, template=template, **extra)
    tmpl = template if template is not None else model.chat_template()
    if tmpl and not callable(tmpl):
        return list(model.tokenize(text, False, True)) or [model.bos]
    return prompt_tokens(model, text)


def render_chat(model, messages: Sequence[dict], add_generation_prompt: bool = True,
                template: Optional[str] = None, **extra) -> str:
    """Render ``messages`` with ``template`` (default: the GGUF's tokenizer.chat_template) in a
    jinja2 sandbox, or with a named format's function (``chat_template.FORMATS``), or in the Vicuna
    v1.1 format when there is none. ``model``: a native Model. ``extra``: more template variables
    (``tools``, as transformers passes them; only a jinja template receives them)."""
    messages = chat_template.check_messages(messages)
    tmpl = template if template is not None else model.chat_template()
    if callable(tmpl):
        return tmpl(messages, add_generation_prompt)
    if not tmpl:
        return chat_template.vicuna(messages, add_generation_prompt)
    piece = lambda t: model.token_to_piece(t, True).decode("utf-8", "replace") if t >= 0 else ""
    return chat_template.render(tmpl, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=piece(model.bos), eos_token=piece(model.eos), **extra)


class Medusa:
    """A GGUF model with Medusa heads. Arguments follow ``llama_cpp.Llama``.

    ``heads_path=None`` looks for ``<model stem>.medusa.gguf`` next to the model; with no heads
    the model decodes plainly (and says so once on stderr). ``tree`` is a preset name, ``chain:N``,
    a JSON file or a list of paths, ``"heads"`` for the heads file's own, ``"step:N"`` for at most
    N candidates chosen each step from the heads' probabilities, or ``"auto"`` (the default with
    heads): the tree planned for this device (docs/design.md section 8).
    ``flash_attn`` (None: llama.cpp's auto), ``type_k``/``type_v`` (KV cache ggml types, e.g.
    ``llama_cpp.GGML_TYPE_Q8_0``; default F16) are llama-cpp-python's. ``exact``: "auto" (default)
    keeps every output equal to plain decoding's with the same settings where the device has an
    exact region (CPUs with flash attention and quantized weights), and elsewhere (GPUs, F16/F32
    weights) runs Medusa with per-row verification, whose text may differ at near-ties; True keeps
    the text bit-identical everywhere (plain decoding where no region exists); False leaves exact
    mode. ``create_*``'s ``medusa["exact"]`` says which holds (docs/design.md section 5).
    ``pooling_type`` (llama-cpp-python's: -1 the model's, 0 none, 1 mean, 2 cls, 3 last) is for
    ``embed``/``create_embedding``, which run on a context of their own, made on first use.
    ``rpc_servers`` (llama-cpp-python's: "host:port" of llama.cpp RPC servers, comma-separated or a
    list) puts the ``n_gpu_layers`` offloaded layers (-1: all) on those servers' devices, then on
    the local GPUs; the heads run where the output layer is (docs/scaling.md, "RPC").
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
        type_k: Optional[int] = None,
        type_v: Optional[int] = None,
        exact: "bool | str" = "auto",
        chat_format: Optional[str] = None,
        pooling_type: int = -1,
        verbose: bool = False,
        rpc_servers: "Sequence[str] | str | None" = None,
    ):
        if chat_format is not None and chat_format not in chat_template.FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}: use one of {', '.join(sorted(chat_template.FORMATS))} "
                             "(or leave it unset for the GGUF's own template)")
        # None: the GGUF's template (or Vicuna if it has none); else a named format's render function
        self.chat_template = None if chat_format is None else chat_template.FORMATS[chat_format]
        if model_path is None:  # the default model and its shipped heads (demo.py)
            from medusa_edge.default_model import default_model

            model_path, default_heads = default_model()
            heads_path = heads_path or default_heads
        if heads_path is None:
            candidate = schema.sidecar_path(model_path)
            if os.path.isfile(candidate):
                heads_path = candidate
            elif tree is None and os.path.isfile(model_path):
                print(f"medusa-edge: no heads file {candidate}; decoding plainly (one token per forward)", file=sys.stderr)
        self.model_path = model_path
        self.verbose = verbose
        self._seed = seed
        # the embeddings context (create_embedding/embed): made on first use, beside generation's
        self._embedder = None
        self._embed_lock = threading.Lock()
        if not isinstance(pooling_type, int) or isinstance(pooling_type, bool) or not -1 <= pooling_type <= 3:
            raise ValueError(f"pooling_type must be -1 (the model's), 0 none, 1 mean, 2 cls or 3 last, got {pooling_type!r}")
        self._embed_settings = (n_batch, -1 if flash_attn is None else int(bool(flash_attn)), pooling_type)
        self.engine = Engine(
            model_path, heads_path, tree=tree, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
            n_gpu_layers=n_gpu_layers, f32_kv=f32_kv, flash_attn=flash_attn, type_k=type_k, type_v=type_v, exact=exact,
            verbose=verbose, rpc_servers=rpc_servers,
        )
        self.last_stats: Optional[Stats] = None

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the native model, its contexts (generation's and the embeddings') and the heads.
        Waits for a generation running in another thread; a stream of this instance left open
        raises BusyError when resumed; every later call raises ClosedError. Closing twice is a no-op."""
        engine = self.__dict__.get("engine")
        if engine is None or isinstance(engine, _Closed):
            return
        with self._embed_lock:
            engine._claim(object())  # never released: the cache belongs to nobody any more
            self._embedder = None
            self.engine = _Closed()
            for name in ("ctx", "heads", "model"):
                setattr(engine, name, None)

    @property
    def closed(self) -> bool:
        return isinstance(self.__dict__.get("engine"), _Closed)

    def __enter__(self) -> "Medusa":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        """The tokens' text, as ``Llama.detokenize``: after a leading BOS the first space (the
        SentencePiece word marker of the first word) is dropped."""
        m = self.engine.model
        tokens = [int(t) for t in tokens]
        out = b"".join(m.token_to_piece(t, special) for t in tokens)
        if tokens and tokens[0] == m.bos and out[:1] == b" ":
            return out[1:]
        return out

    def _prompt_tokens(self, prompt: Union[str, Sequence[int]]) -> list[int]:
        return prompt_tokens(self.engine.model, prompt)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the chat format: ``chat_format`` given at construction, else the
        GGUF's tokenizer.chat_template (sandboxed), else the Vicuna v1.1 format."""
        return render_chat(self.engine.model, messages, add_generation_prompt, template=self.chat_template)

    # -- embeddings ------------------------------------------------------------------------------
    def pooling_type(self) -> int:
        """llama.cpp's pooling type for embeddings, from the model's metadata (0 none: one vector
        per token; 1 mean, 2 cls, 3 last: one per input)."""
        return self._get_embedder().pooling_type

    def _get_embedder(self):
        from medusa_edge._loader import native

        model = self.engine.model  # ClosedError once closed
        if self._embedder is None:
            n_batch, flash_attn, pooling = self._embed_settings
            try:
                self._embedder = native.Embedder(model, n_batch, self.engine.n_threads_batch, flash_attn, pooling)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"embeddings: {e}") from None
        return self._embedder

    def embed(self, input: Union[str, Sequence[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Embeddings as ``Llama.embed`` gives them: for a string one embedding, for a list one per
        string. With pooling (the model's metadata says mean, cls or last) an embedding is a list of
        n_embd floats; without (generative models) a list of such lists, one per token. Each text is
        tokenized with BOS; ``truncate`` keeps its first n_batch tokens, else a longer one raises
        ValueError. ``normalize``: unit L2 norm. ``return_count``: also the number of tokens.
        Runs on a context of its own: generation's KV cache and prefix reuse are untouched."""
        inputs = [input] if isinstance(input, str) else input
        if not isinstance(inputs, (list, tuple)) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise ValueError("input must be a string or a non-empty list of strings")
        with self._embed_lock:
            emb = self._get_embedder()
            n_batch, n_seq_max = emb.n_batch, emb.n_seq_max
            data: list = []
            total = 0
            group: list[list[int]] = []
            n_group = 0

            def flush():
                for a in emb.embed(group):
                    a = a.astype(np.float64)
                    if normalize:  # llama-cpp-python's normalize_embedding, per vector (same rounding)
                        a = np.array([v / n if n != 0.0 else v for v in a.reshape(-1, a.shape[-1])
                                      for n in (float(np.linalg.norm(v)),)]).reshape(a.shape)
                    data.append(a.tolist())

            for text in inputs:
                tokens = self.tokenize(text, add_bos=True, special=False)
                if truncate:
                    tokens = tokens[:n_batch]
                if not tokens:
                    raise ValueError("an input tokenizes to no tokens (an empty string, and the model adds no BOS)")
                if len(tokens) > n_batch:
                    raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {n_batch}")
                total += len(tokens)
                if group and (n_group + len(tokens) > n_batch or len(group) >= n_seq_max):
                    flush()
                    group, n_group = [], 0
                group.append(tokens)
                n_group += len(tokens)
            flush()
        output = data[0] if isinstance(input, str) else data
        return (output, total) if return_count else output

    def create_embedding(self, input: Union[str, Sequence[str]], model: Optional[str] = None) -> dict:
        """``Llama.create_embedding``: OpenAI's embeddings list, with ``usage``."""
        embeds, total = self.embed(input, return_count=True)
        if isinstance(input, str):
            embeds = [embeds]
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
            "model": model if model is not None else self.model_path,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    # -- completion ------------------------------------------------------------------------------
    def create_completion(
        self,
        prompt: Union[str, Sequence[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Union[str, Sequence[str], None] = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria=None,
        logits_processor=None,
        grammar=None,
        logit_bias=None,
        *,
        acceptance: str = "exact",
        proposer: Optional[Proposer] = None,
        response_format=None,
    ):
        """Complete ``prompt``, with ``llama_cpp.Llama.create_completion``'s parameters (same
        positional order) and its dict or chunk shapes, plus a ``medusa`` statistics entry (on the
        response, or on the last chunk). ``temperature == 0`` is greedy; ``< 0`` samples from the
        penalised distribution with no truncation, as llama-cpp-python does. ``stopping_criteria``
        (llama-cpp-python's ``(input_ids, logits) -> bool``, e.g. a ``StoppingCriteriaList``) is asked
        before each new token and ends the completion with ``finish_reason: "stop"``: a cancel hook.
        ``grammar`` (GBNF text or a ``llama_cpp.LlamaGrammar``) or ``response_format`` (keyword;
        ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"schema": ...}}``)
        constrains the text with llama.cpp's grammar sampler, losslessly: the text is plain
        decoding's under the same grammar. A grammar or schema that cannot be used raises ValueError.
        ``logit_bias`` ({token_id: bias}, string keys too, as JSON sends them) is added to those
        tokens' logits before the penalties at every row, as llama-cpp-python does, losslessly.
        Parameters this engine cannot honour raise ValueError naming them."""
        _unsupported(suffix=(suffix, None), tfs_z=(tfs_z, 1.0), mirostat_mode=(mirostat_mode, 0),
                     logits_processor=(logits_processor, None))
        bias = normalize_logit_bias(logit_bias, self.engine.model.n_vocab)
        constrained = _grammar.resolve(grammar, response_format)
        if constrained is not None:
            self.engine.check_grammar(*constrained)
        if logprobs is not None and (not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"logprobs must be a non-negative integer (top alternatives per token), got {logprobs!r}")
        if echo and logprobs is not None:
            raise ValueError("echo with logprobs is not supported (the prompt's logits are not kept)")
        params = self._params(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                              presence_penalty, seed, acceptance)
        if constrained is not None:
            params = dataclasses.replace(params, grammar=constrained[0], grammar_root=constrained[1])
        if bias is not None:
            params = dataclasses.replace(params, logit_bias=bias)  # checks: a bias needs exact acceptance
        prompt_ids = self._prompt_tokens(prompt)
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self.n_ctx() - len(prompt_ids)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prefix = prompt if echo and isinstance(prompt, str) else (
            self.detokenize(prompt_ids).decode("utf-8", "ignore") if echo else "")
        # logprobs' text_offset counts from the prompt's start, as in llama-cpp-python
        offset = len(prompt) if isinstance(prompt, str) else len(self.detokenize(prompt_ids).decode("utf-8", "ignore"))
        if stopping_criteria is not None and not callable(stopping_criteria):
            raise ValueError(f"stopping_criteria must be callable (input_ids, logits) -> bool, got {stopping_criteria!r}")
        chunks = self._stream(prompt_ids, params, max_tokens, stops, proposer, logprobs, prefix, model or self.model_path,
                              offset, stopping_criteria)
        if stream:
            return chunks
        return _collect(chunks)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: Sequence[dict],
        functions=None,
        function_call=None,
        tools=None,
        tool_choice=None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Union[str, Sequence[str], None] = None,
        seed: Optional[int] = None,
        response_format=None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor=None,
        grammar=None,
        logit_bias=None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
        *,
        acceptance: str = "exact",
        proposer: Optional[Proposer] = None,
        stopping_criteria=None,
    ):
        """A chat turn, with ``llama_cpp.Llama.create_chat_completion``'s parameters and shapes:
        the messages rendered with the chat format (the GGUF's template in a sandbox, ``chat_format``
        given at construction, or Vicuna v1.1), then a completion. Streams a role delta, content
        deltas, then ``finish_reason`` with ``usage`` and ``medusa`` on that last chunk.
        ``stopping_criteria`` (keyword; llama-cpp-python's chat call has none): as in
        ``create_completion``, e.g. ``lambda ids, logits: event.is_set()`` to cancel from another thread.
        ``tools``/``tool_choice`` (and the older ``functions``/``function_call``): OpenAI's function
        calling, through the template's own tools support or a Hermes-style fallback; calls come back
        in ``message.tool_calls`` with ``finish_reason: "tool_calls"`` (``medusa_edge.tools``)."""
        spec = _tools.resolve(tools, tool_choice, functions, function_call)
        if top_logprobs is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        tmpl = self.chat_template if self.chat_template is not None else self.engine.model.chat_template()
        messages, extra = _tools.prepare(messages, spec, tmpl)
        if spec is not None and spec.forced:
            if grammar is not None or (response_format is not None and response_format != {"type": "text"}):
                raise ValueError("tool_choice 'required' or a named function constrains the output with a grammar: "
                                 "grammar and response_format cannot be given with it")
            grammar = _tools.grammar(spec, _tools.call_format(tmpl))
        ids = chat_prompt_tokens(self.engine.model, messages, self.chat_template, **extra)
        n_logprobs = (top_logprobs or 0) if logprobs else None
        out = self.create_completion(
            ids, None, max_tokens, temperature, top_p, min_p, typical_p, n_logprobs, False, stop, frequency_penalty,
            presence_penalty, repeat_penalty, top_k, stream, seed, tfs_z, mirostat_mode, mirostat_tau, mirostat_eta,
            model, stopping_criteria, logits_processor, grammar, logit_bias, acceptance=acceptance, proposer=proposer,
            response_format=response_format,
        )
        if spec is not None and spec.active:
            return _tools.chat_chunks(_chat_chunks(out), spec) if stream else _tools.chat_response(_chat_response(out), spec)
        return _chat_chunks(out) if stream else _chat_response(out)

    def _params(self, temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty,
                seed, acceptance) -> SamplingParams:
        for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                        ("repeat_penalty", repeat_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):
            if not isinstance(v, (int, float)) or v != v:
                raise ValueError(f"{name} must be a number, got {v!r}")
        if not isinstance(top_k, int):
            raise ValueError(f"top_k must be an integer, got {top_k!r}")
        if seed is None:  # llama-cpp-python's chaining: each call draws the next seed from the last
            self._seed = seed = random.Random(self._seed).randint(0, 2**32)
        return SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            seed=int(seed), acceptance=acceptance,
        )

    def _stream(self, prompt_ids, params, max_tokens, stops, proposer, n_logprobs, prefix, model, offset,
                stopping_criteria=None) -> Iterator[dict]:
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text, finish=None, logprobs=None, extra=None):
            c = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}
            if extra:
                c.update(extra)
            return c

        stats = Stats()
        self.last_stats = stats
        text = TextStream(stops)
        m = self.engine.model
        finish = "length"
        tokens: list[int] = []  # returned candidates (EOG excluded)
        ends: list[int] = []  # len(text.text) after each token: which tokens the returned text covers
        # the logits that chose each token: for logprobs, and for stopping_criteria's second argument
        rows: Optional[list] = [] if n_logprobs is not None or stopping_criteria is not None else None
        lp = _Logprobs(self, n_logprobs, offset) if n_logprobs is not None else None
        gen = self.engine.generate(prompt_ids, params, max_tokens, proposer=proposer, stats=stats, logits_out=rows)
        sent_tokens = 0
        try:
            if prefix:
                yield chunk(prefix)
            for new in gen:
                out = []
                for t in new:
                    # llama-cpp-python's contract: called for each new token with the prompt and the
                    # tokens before it, and the logits that chose it; True ends the completion
                    # ("stop") without that token. A cancel hook for calls that do not stream.
                    if stopping_criteria is not None and stopping_criteria(
                            np.array(prompt_ids + tokens, dtype=np.intc), rows[len(tokens)]):
                        finish = "stop"
                        break
                    if m.is_eog(t):
                        finish = "stop"
                        break
                    tokens.append(t)
                    out.append(text.push(m.token_to_piece(t, False)))
                    ends.append(len(text.text))
                    if text.stopped:
                        finish = "stop"
                        break
                out = "".join(out)
                if out:
                    n_cov = _covered(ends, text.sent)
                    yield chunk(out, logprobs=lp.entries(tokens[sent_tokens:n_cov], rows[sent_tokens:n_cov]) if lp else None)
                    sent_tokens = n_cov
                if finish == "stop":
                    break
            tail = text.push(b"", final=True)
            if tail:
                n_cov = _covered(ends, text.sent)
                yield chunk(tail, logprobs=lp.entries(tokens[sent_tokens:n_cov], rows[sent_tokens:n_cov]) if lp else None)
                sent_tokens = n_cov
        finally:
            gen.close()
        n_completion = _covered(ends, text.sent) if text.stopped else len(tokens)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n_completion,
                 "total_tokens": len(prompt_ids) + n_completion}
        yield chunk("", finish, extra={"usage": usage, "medusa": stats.as_dict()})


class _Closed:
    """Stands in for the engine of a closed Medusa: every use raises ClosedError."""

    def __getattr__(self, name):
        raise ClosedError("this Medusa instance is closed (close() freed its model and contexts); create a new one")


def _unsupported(**given) -> None:
    for name, (value, default) in given.items():
        if value is not None and value != default:
            raise ValueError(f"{name} is not supported by medusa-edge (got {value!r})")


def _covered(ends: list[int], n_chars: int) -> int:
    """How many tokens contributed to the first ``n_chars`` characters of the text."""
    n = 0
    prev = 0
    for e in ends:
        if prev >= n_chars and e > prev:
            break
        n += 1
        prev = e
    return n


class _Logprobs:
    """llama-cpp-python's completion logprobs: per token its text, text offset, log-probability
    and the top-N alternatives (log-softmax of the raw logits that chose it)."""

    def __init__(self, llm, n: int, offset: int):
        self.llm, self.n, self.offset = llm, n, offset

    def entries(self, tokens, rows) -> dict:
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for t, z in zip(tokens, rows):
            z = z.astype(np.float64)
            logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            piece = self.llm.detokenize([t]).decode("utf-8", "ignore")
            top = {}
            for i in np.argsort(-logp, kind="stable")[: self.n]:
                top[self.llm.detokenize([int(i)]).decode("utf-8", "ignore")] = float(logp[i])
            top[piece] = float(logp[t])
            out["tokens"].append(piece)
            out["text_offset"].append(self.offset)
            out["token_logprobs"].append(float(logp[t]))
            out["top_logprobs"].append(top)
            self.offset += len(piece)
        return out


def _collect(chunks) -> dict:
    """A completion response from its chunks (llama-cpp-python's non-streaming shape)."""
    text, logprobs, finish, last = [], None, None, None
    for c in chunks:
        ch = c["choices"][0]
        text.append(ch["text"])
        if ch["logprobs"]:
            if logprobs is None:
                logprobs = {k: [] for k in ch["logprobs"]}
            for k, v in ch["logprobs"].items():
                logprobs[k].extend(v)
        finish, last = ch["finish_reason"], c
    return {
        "id": last["id"], "object": "text_completion", "created": last["created"], "model": last["model"],
        "choices": [{"text": "".join(text), "index": 0, "logprobs": logprobs, "finish_reason": finish}],
        "usage": last["usage"], "medusa": last["medusa"],
    }


def _chat_logprobs(lp: Optional[dict]) -> Optional[dict]:
    if lp is None:
        return None
    return {"content": [{"token": tok, "bytes": None, "logprob": l,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in top.items()]}
                        for tok, l, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])],
            "refusal": None}


def _chat_chunks(chunks) -> Iterator[dict]:
    """Completion chunks as chat chunks, in llama-cpp-python's order: a role delta, content
    deltas, then an empty delta with finish_reason (and here ``usage`` and ``medusa``)."""
    it = iter(chunks)
    try:
        for i, c in enumerate(it):
            ch = c["choices"][0]
            head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
            if i == 0:
                yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
            if ch["finish_reason"] is None and not ch["text"]:
                continue
            out = {**head, "choices": [{"index": 0, "delta": {"content": ch["text"]} if ch["finish_reason"] is None else {},
                                        "logprobs": _chat_logprobs(ch["logprobs"]), "finish_reason": ch["finish_reason"]}]}
            for k in ("usage", "medusa"):
                if k in c:
                    out[k] = c[k]
            yield out
    finally:
        close = getattr(it, "close", None)
        if close:
            close()


def _chat_response(r: dict) -> dict:
    return {
        "id": "chat" + r["id"], "object": "chat.completion", "created": r["created"], "model": r["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r["choices"][0]["text"]},
                     "logprobs": _chat_logprobs(r["choices"][0]["logprobs"]), "finish_reason": r["choices"][0]["finish_reason"]}],
        "usage": r["usage"], "medusa": r["medusa"],
    }
