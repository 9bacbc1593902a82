"""What a request body may hold, checked before anything is queued.

Strict: every body field is either honoured or refused with a 400 that names it; none is dropped
with a 200. ``grammar`` (GBNF), ``response_format`` (``text``, ``json_object``, ``json_schema``)
and llama-server's ``json_schema`` constrain the text, and ``logit_bias`` shifts it, losslessly.
Chat takes ``tools``/``tool_choice`` (and ``functions``/``function_call``), ``role: "tool"`` results
and assistant ``tool_calls`` (``medusa_edge.tools``). Fields whose neutral value changes nothing
(``mirostat_mode: 0``, ``tfs_z: 1``, ...) are accepted at that value only. A body must be a JSON
object, nested at most ``MAX_JSON_DEPTH`` deep, whose strings are valid text; numbers are
range-checked against what the native sampler takes.

Each check raises ``APIError`` (400) naming the field; the endpoints in ``medusa_edge.server.app``
call them in order: ``parse_body``, then ``chat_params`` or ``completion_params``, ``grammar_of``,
``logit_bias_of``, ``stream_flags``, and ``check_messages`` with ``tools_of`` or ``prompt_of``;
``embedding_input`` for ``/v1/embeddings``.
"""

from __future__ import annotations

import json
import math
from typing import Optional, Union

from medusa_edge import grammar as _grammar
from medusa_edge.server.api_error import APIError, short

#: JSON nested deeper than this is refused (a chat message's text part is 5 levels deep, JSON
#: schemas in ``response_format`` and ``tools`` nest further; json's own C parser raises
#: RecursionError near the interpreter's recursion limit, 1,000 by default).
MAX_JSON_DEPTH = 64

I32_MAX = 2**31 - 1  # the native sampler's int32 parameters (top_k) and token counts


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A JSON number that is finite (a huge integer is: ``math.isfinite`` would overflow on it)."""
    return _is_int(v) or isinstance(v, float) and math.isfinite(v)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}

# Honoured fields passed to the API: name -> (type, valid?, what is valid). Ranges are what the
# native sampler takes without overflow or a degenerate distribution (top_k is an int32, the
# float parameters are float32; a temperature or repeat penalty near 0 divides logits into
# infinities, whose softmax is NaN).
_SAMPLING = {
    "max_tokens": (int, lambda v: 1 <= v <= I32_MAX, f"in [1, {I32_MAX}]"),
    "temperature": (float, lambda v: v == 0 or 1e-3 <= v <= 1000, "0 (greedy) or in [0.001, 1000]"),
    "top_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "top_k": (int, lambda v: 0 <= v <= I32_MAX, f"in [0, {I32_MAX}] (0: off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "typical_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "repeat_penalty": (float, lambda v: 0.01 <= v <= 100, "in [0.01, 100] (1: off)"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "seed": (int, lambda v: -(2**63) <= v < 2**64, "a 64-bit integer"),
}
_CHAT = {**_SAMPLING, "logprobs": (bool, lambda v: True, "a boolean"),
         "top_logprobs": (int, lambda v: 0 <= v <= 20, "in [0, 20]")}
_TEXT = {**_SAMPLING, "logprobs": (int, lambda v: 0 <= v <= 20, "in [0, 20]"), "echo": (bool, lambda v: True, "a boolean")}

# Fields accepted only at a value that asks for nothing this server does not do (what it does
# anyway); any other value is refused by name. name -> (accepted values, what they mean).
_NEUTRAL = {
    "n": ([1], "only n=1 is supported"),
    "mirostat_mode": ([0], "mirostat sampling is not supported (0: off)"),
    "tfs_z": ([1], "tail-free sampling is not supported (1: off)"),
    "ignore_eos": ([False], "ignore_eos is not supported"),
    "n_probs": ([0], "n_probs is not supported; use logprobs"),
    "penalty_last_n": ([64], "the repeat penalty looks at the last 64 tokens; no other window is supported"),
    "stop_token_ids": ([[]], "stop_token_ids is not supported; use stop strings"),
}
_CHAT_NEUTRAL = {
    **_NEUTRAL,
    "parallel_tool_calls": ([True], "parallel_tool_calls: false is not supported (a reply may hold several calls)"),
}
_TEXT_NEUTRAL = {
    **_NEUTRAL,
    "suffix": ([""], "suffix (fill-in-the-middle) is not supported"),
    "best_of": ([1], "only best_of=1 is supported"),
    "tools": ([[]], "tools are for /v1/chat/completions"),
    "functions": ([[]], "functions are for /v1/chat/completions"),
}
# Refused whenever sent (not null) where the endpoint does not take them: tools are for chat.
_REFUSED = {
    "tool_choice": "tool_choice needs tools, which are for /v1/chat/completions",
    "parallel_tool_calls": "parallel_tool_calls needs tools, which are for /v1/chat/completions",
    "function_call": "function_call needs functions, which are for /v1/chat/completions",
}
# Function calling, honoured on chat (checked by tools_of with medusa_edge.tools.resolve).
_TOOLS = ("tools", "tool_choice", "functions", "function_call")
# Accepted and honoured, checked elsewhere or with no effect on the text by definition.
_OTHER = {
    "model",  # any name: one model is served, and the response names it
    "stream", "stream_options", "stop",
    "n_predict",  # llama-server's max_tokens (-1: until the context is full)
    "user",  # an end-user id for the operator's logs; it changes nothing in the answer
    "cache_prompt",  # the cached prefix is always reused, and the text equals a cold start's
    "mirostat_tau", "mirostat_eta",  # inert: mirostat_mode 0 (off) is the only mode accepted
}
# Constrained output, honoured on both endpoints (checked by grammar_of): GBNF text (llama-server's
# and llama-cpp-python's "grammar"), OpenAI's response_format, llama-server's json_schema.
_CONSTRAINTS = ("grammar", "response_format", "json_schema")
# Honoured on both endpoints (checked by logit_bias_of): {token_id: bias}, keys strings as JSON has them.
_BIASES = ("logit_bias",)
_CHAT_FIELDS = {"messages", "max_completion_tokens", *_CHAT, *_CHAT_NEUTRAL, *_OTHER, *_CONSTRAINTS, *_BIASES, *_TOOLS}
_TEXT_FIELDS = {"prompt", *_TEXT, *_TEXT_NEUTRAL, *_OTHER, *_CONSTRAINTS, *_BIASES}

# /v1/embeddings: OpenAI's fields. Token-id inputs and ``dimensions`` are refused by name.
_EMBED_FIELDS = {"input", "model", "encoding_format", "user"}
_EMBED_NEUTRAL = {"dimensions": ([], "dimensions is not supported: embeddings have the model's size")}
_EMBED_FORMATS = ("float", "base64")  # base64: little-endian float32, what the openai client asks for by default
_MAX_EMBED_INPUTS = 2048  # OpenAI's limit on inputs per request

_ROLES = ("system", "user", "assistant", "tool", "function")
# Message keys besides role and content that are accepted only when null/empty: the SDKs send
# them back with an assistant message they received.
_MESSAGE_EMPTY_KEYS = {"tool_calls", "function_call", "tool_call_id", "refusal", "audio", "annotations", "name"}
# Keys honoured on some roles: an assistant's tool_calls, a tool result's tool_call_id, a function
# result's name (checked by medusa_edge.tools.check_history and rendered by the template).
_MESSAGE_KEYS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}, "function": {"name"}}

_MAX_STOPS = 16
_MAX_STOP_CHARS = 1024


def _same(v, accepted) -> bool:
    """``v == accepted`` with types respected (``False`` is not ``0``, ``1.0`` is ``1``)."""
    if isinstance(accepted, bool) or isinstance(v, bool):
        return type(v) is type(accepted) and v == accepted
    if isinstance(accepted, (int, float)):
        return _is_num(v) and v == accepted
    return type(v) is type(accepted) and v == accepted


def _check_json(body, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` and strings that are not valid text (lone UTF-16
    surrogates, which JSON's ``\\ud800`` escapes can carry and UTF-8 cannot encode). Iterative:
    the depth of the input does not become the depth of the stack."""
    stack = [(body, 1, "")]
    while stack:
        obj, depth, path = stack.pop()
        if depth > limit:
            raise APIError(400, f"the request body is nested deeper than {limit} levels", path or None, "invalid_json")
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(k, str) and not k.isascii():
                _check_text(k, _join(path, "<key>"))
            if isinstance(v, str):
                if not v.isascii():
                    _check_text(v, _join(path, k))
            elif isinstance(v, (dict, list)):
                if v:
                    stack.append((v, depth + 1, _join(path, k)))


def _join(path: str, k) -> str:
    if isinstance(k, int):
        return f"{path}[{k}]"
    k = k if k.isascii() and k.isprintable() else repr(k.encode("utf-8", "backslashreplace"))
    return f"{path}.{k}" if path else k


def _check_text(s: str, param: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid text (it holds a lone UTF-16 surrogate)", param,
                       "invalid_value") from None


def parse_body(raw: bytes) -> dict:
    def constant(name):  # NaN, Infinity: not JSON
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", None,
                       "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:  # also ints of more than 4,300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    _check_json(body)
    return body


def _refuse_fields(body: dict, allowed: set, neutral: dict) -> None:
    """Every field of ``body`` is honoured, neutral, or refused here by name (nulls are absent)."""
    for name in sorted(body):
        v = body[name]
        if v is None:
            continue
        if name in _REFUSED and name not in allowed:
            raise APIError(400, f"'{name}' is not supported: {_REFUSED[name]}", name, "unsupported_parameter")
        if name in neutral:
            accepted, why = neutral[name]
            if not any(_same(v, a) for a in accepted):
                raise APIError(400, f"'{name}' is not supported: {why} (got {short(v)})", name, "unsupported_parameter")
        elif name not in allowed:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")


def _params(body: dict, fields: dict, allowed: set, neutral: dict) -> dict:
    """The generation keyword arguments of a request body, checked."""
    _refuse_fields(body, allowed, neutral)
    body = dict(body)
    # max_tokens' aliases: OpenAI's max_completion_tokens and llama-server's n_predict
    for alias in ("max_completion_tokens", "n_predict"):
        v = body.get(alias)
        if v is None or alias not in allowed:
            continue
        if not _is_int(v) or not (1 <= v <= I32_MAX or (alias == "n_predict" and v == -1)):
            raise APIError(400, f"'{alias}' must be an integer in [1, {I32_MAX}]"
                           + (" or -1 (until the context is full)" if alias == "n_predict" else "")
                           + f", got {short(v)}", alias, "invalid_value" if _is_int(v) else "invalid_type")
        if body.get("max_tokens") is not None and body["max_tokens"] != v:
            raise APIError(400, f"'{alias}' and 'max_tokens' disagree", alias, "invalid_value")
        if v == -1:
            body["max_tokens"], body["_until_full"] = None, True
        else:
            body["max_tokens"] = v
    kw = {}
    for name, (kind, ok, what) in fields.items():
        v = body.get(name)
        if v is None:
            continue
        if kind is bool:
            good = isinstance(v, bool)
        elif kind is int:
            good = _is_int(v)
        else:
            good = _is_num(v)
        if not good:
            raise APIError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, got {short(v)}", name, "invalid_type")
        if not ok(v):
            raise APIError(400, f"'{name}' must be {what}, got {v}", name, "invalid_value")
        kw[name] = v
    if body.get("_until_full"):
        kw["max_tokens"] = -1  # the API: <= 0 generates until the context is full
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
        if len(stops) > _MAX_STOPS or any(len(s) > _MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"'stop' takes at most {_MAX_STOPS} strings of at most {_MAX_STOP_CHARS} characters",
                           "stop", "invalid_value")
        kw["stop"] = stop
    for name in ("mirostat_tau", "mirostat_eta"):
        if body.get(name) is not None and not _is_num(body[name]):
            raise APIError(400, f"'{name}' must be a number, got {short(body[name])}", name, "invalid_type")
    for name, kind in (("cache_prompt", bool), ("user", str)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise APIError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, got {short(body[name])}", name, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {short(model)}", "model", "invalid_type")
    # combinations the API refuses, named here rather than by the API's message on the input field
    if "top_logprobs" in fields and kw.get("top_logprobs") is not None and not kw.get("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    if kw.get("echo") and kw.get("logprobs") is not None:
        raise APIError(400, "'echo' with 'logprobs' is not supported (the prompt's logits are not kept)", "echo",
                       "invalid_value")
    return kw


def chat_params(body: dict) -> dict:
    """The generation keyword arguments of a ``/v1/chat/completions`` body, checked."""
    return _params(body, _CHAT, _CHAT_FIELDS, _CHAT_NEUTRAL)


def completion_params(body: dict) -> dict:
    """The generation keyword arguments of a ``/v1/completions`` body, checked."""
    return _params(body, _TEXT, _TEXT_FIELDS, _TEXT_NEUTRAL)


def prompt_of(body: dict, n_vocab: int) -> Union[str, list]:
    """A ``/v1/completions`` prompt, checked: a string, or a non-empty list of token ids in
    ``[0, n_vocab)`` (a list holding one string is that string)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    tokens = isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
    if not isinstance(prompt, str) and not tokens:
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       "prompt", "invalid_type" if prompt is not None else "missing_required_parameter")
    if tokens and not all(0 <= t < n_vocab for t in prompt):
        raise APIError(400, f"'prompt' has token ids outside the vocabulary [0, {n_vocab})", "prompt", "invalid_value")
    return prompt


def embedding_input(body: dict) -> tuple[list, str]:
    """A ``/v1/embeddings`` body, checked: (the input strings, the encoding format)."""
    _refuse_fields(body, _EMBED_FIELDS, _EMBED_NEUTRAL)
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, "'input' must be a string or a non-empty list of strings (token-id inputs are not supported)",
                       "input", "invalid_type" if inp is not None else "missing_required_parameter")
    if len(texts) > _MAX_EMBED_INPUTS:
        raise APIError(400, f"'input' takes at most {_MAX_EMBED_INPUTS} strings, got {len(texts)}", "input", "invalid_value")
    fmt = body.get("encoding_format") or "float"
    if fmt not in _EMBED_FORMATS:
        raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {short(fmt)}", "encoding_format",
                       "invalid_value")
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise APIError(400, f"'{name}' must be a string, got {short(body[name])}", name, "invalid_type")
    return texts, fmt


def grammar_of(body: dict, engine) -> Optional[str]:
    """The GBNF text that ``grammar``, ``response_format`` or ``json_schema`` asks for (None: free
    text), converted and parsed here so that a bad one is a 400 naming its field before anything
    is queued."""
    given = {k: body[k] for k in _CONSTRAINTS if body.get(k) is not None}
    for name, kinds, what in (("grammar", (str,), "a string (GBNF)"), ("response_format", (dict,), "an object"),
                              ("json_schema", (dict,), "an object (a JSON schema)")):
        if name in given and not isinstance(given[name], kinds):
            raise APIError(400, f"'{name}' must be {what}, got {short(given[name])}", name, "invalid_type")
    if not given:
        return None
    param = next(iter(given)) if len(given) == 1 else None
    try:
        got = _grammar.resolve(given.get("grammar"), given.get("response_format"), given.get("json_schema"))
        if got is None:
            return None
        engine.check_grammar(*got)
    except ValueError as e:
        raise APIError(400, str(e), param, "invalid_value") from None
    return got[0]


def logit_bias_of(body: dict, n_vocab: int) -> Optional[dict]:
    """``logit_bias`` checked here (token ids in the vocabulary, finite numbers, a bounded count),
    so that a bad one is a 400 naming the field before anything is queued."""
    from medusa_edge.core.params import normalize_logit_bias

    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise APIError(400, f"'logit_bias' must be an object of token ids to biases, got {short(v)}", "logit_bias",
                       "invalid_type")
    try:
        got = normalize_logit_bias(v, n_vocab)
    except ValueError as e:
        raise APIError(400, str(e), "logit_bias", "invalid_value") from None
    return dict(got) if got else None


def tools_of(body: dict, messages) -> dict:
    """The function-calling keyword arguments, checked here so that a bad tool list or an
    assistant message with malformed tool_calls is a 400 naming its field before anything is queued."""
    from medusa_edge import tools as _tools

    kw = {k: body[k] for k in _TOOLS if body.get(k) is not None}
    try:
        spec = _tools.resolve(**kw)
        if spec is not None and spec.forced:
            _tools.grammar(spec, "hermes")  # the tools' schemas convert (the format changes only the wrapper)
    except ValueError as e:
        param = next((k for k in sorted(kw, key=len, reverse=True) if k in str(e)), next(iter(kw), None))
        raise APIError(400, str(e), param, "invalid_value") from None
    try:
        _tools.check_history(messages)
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from None
    return kw


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage: a final chunk with ``usage`` and no choices, as OpenAI sends)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {short(stream)}", "stream", "invalid_type")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    for k, v in opts.items():
        if k != "include_usage" and v is not None:
            raise APIError(400, f"'stream_options.{_join('', k)}' is not supported by this server",
                           "stream_options", "unsupported_parameter")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
    return stream, bool(usage)


def check_messages(messages) -> tuple[list, int]:
    """The chat messages, checked: (messages, UTF-8 bytes of their text)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    n_bytes = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object with 'role' and 'content'", "messages", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise APIError(400, f"'{where}.role' must be a string", "messages", "invalid_type" if role is not None
                           else "missing_required_parameter")
        if role not in _ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(_ROLES)}, got {short(role)}",
                           "messages", "invalid_value")
        for k, v in m.items():
            if k in ("role", "content") or k in _MESSAGE_KEYS.get(role, ()):
                if k in ("tool_call_id", "name") and v is not None and not isinstance(v, str):
                    raise APIError(400, f"'{where}.{k}' must be a string", "messages", "invalid_type")
                continue
            if k not in _MESSAGE_EMPTY_KEYS:
                raise APIError(400, f"'{where}.{_join('', k)}' is not supported by this server", "messages",
                               "unsupported_parameter")
            if v not in (None, [], ""):
                raise APIError(400, f"'{where}.{k}' is not supported by this server (only null or empty)", "messages",
                               "unsupported_parameter")
        content = m.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            n_bytes += len(content.encode("utf-8"))
            continue
        if not isinstance(content, list):
            raise APIError(400, f"'{where}.content' must be a string or a list of text parts", "messages", "invalid_type")
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"'{where}.content[{j}]': only {{\"type\": \"text\", \"text\": ...}} parts are supported",
                               "messages", "unsupported_parameter")
            extra = [k for k, v in part.items() if k not in ("type", "text") and v is not None]
            if extra:
                raise APIError(400, f"'{where}.content[{j}].{_join('', extra[0])}' is not supported by this server",
                               "messages", "unsupported_parameter")
            n_bytes += len(part["text"].encode("utf-8"))
    return messages, n_bytes

