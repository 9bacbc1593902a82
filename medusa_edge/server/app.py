"""OpenAI-compatible HTTP server over one ``Medusa`` instance: ``medusa-edge serve [MODEL]``.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole, or streamed as server-sent
events ending in ``data: [DONE]``), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health`` and ``GET /v1/health``.
Bodies have llama-cpp-python's shapes (``Medusa.create_chat_completion`` / ``create_completion``
make them); the last chunk, or the whole response, carries ``usage`` and ``medusa`` statistics.
The ``model`` field may name anything (one model is served); responses name the served one.

Strict: every body field is either honoured or refused with a 400 that names it; none is dropped
with a 200. ``grammar`` (GBNF), ``response_format`` (``text``, ``json_object``, ``json_schema``)
and llama-server's ``json_schema`` constrain the text, and ``logit_bias`` shifts it, losslessly.
Chat takes ``tools``/``tool_choice`` (and ``functions``/``function_call``), ``role: "tool"`` results
and assistant ``tool_calls`` (``medusa_edge.tools``). Fields whose neutral value
changes nothing (``mirostat_mode: 0``, ``tfs_z: 1``, ...) are accepted at that value only. Hostile input gets
a 4xx: bodies are bounded in size (413), in JSON depth and must hold valid text; numbers are
range-checked against what the native sampler takes; an over-long prompt is refused before it is
tokenized. Header and body reads have deadlines (the connection is closed, or answered 408).

Local by default: ``Host`` must name this machine (loopback names, or what ``--host`` binds) and a
browser's ``Origin`` must be allowed (loopback origins on any port, plus ``--cors-origins``), so a
web page the user opens cannot drive the server (DNS rebinding, cross-origin ``text/plain``
POSTs); allowed origins get CORS headers and preflight answers.

One worker thread runs the generations one after another, off the event loop; each chunk is handed
to the loop as soon as it is made. Requests wait in a bounded queue: when it is full the answer is
503 with ``Retry-After``. A client that disconnects stops its generation after the current step
(the generator is closed) and the log says so. Errors are OpenAI-shaped:
``{"error": {"message", "type", "param", "code"}}``.

Needs the ``server`` extra: ``pip install 'medusa-edge[server]'`` (starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import re
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from medusa_edge import grammar as _grammar
from medusa_edge.errors import ContextOverflowError

log = logging.getLogger("medusa_edge.server")

_END = object()  # the worker's last item for a request


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def _as_api_error(e: BaseException, param: str) -> APIError:
    """A generation's exception as the client sees it; ``param``: the request field with the input."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param, "context_length_exceeded")
    if isinstance(e, ValueError):  # ChatTemplateError, bad messages, bad parameters
        return APIError(400, str(e), param, "invalid_value")
    log.error("generation failed: %s: %s", type(e).__name__, e)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "internal_error", "server_error")


def _is_role_chunk(item) -> bool:
    return isinstance(item, dict) and item.get("choices", [{}])[0].get("delta") == {"role": "assistant"}


# -- limits ----------------------------------------------------------------------------------------
@dataclass
class Limits:
    """What one request may cost the server before it is refused.

    ``max_body_bytes``: a larger body gets 413 (a declared Content-Length at once, a chunked body as
    soon as it passes the limit: at most this much is ever held). ``header_timeout``: seconds for a
    request's line and headers to arrive, counted from its first byte (or from the connection);
    past it the connection is closed. ``body_timeout``: seconds for the whole body, counted from the
    end of the headers; past it the answer is 408 and the connection is closed. ``max_header_bytes``:
    the request line plus headers (larger gets 431, or 400 from h11 while it arrives).
    ``max_prompt_tokens``: longer prompts are refused with ``context_length_exceeded`` (None: the
    context size)."""

    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_prompt_tokens: Optional[int] = None


#: JSON nested deeper than this is refused (requests need 5 levels; json's own C parser would
#: raise RecursionError near 1,000).
MAX_JSON_DEPTH = 64
#: Bodies larger than this are parsed off the event loop, so other clients keep being answered.
_PARSE_IN_THREAD = 64 * 1024

I32_MAX = 2**31 - 1  # the native sampler's int32 parameters (top_k) and token counts


# -- Host and Origin -------------------------------------------------------------------------------
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _split_host(value: str) -> Optional[str]:
    """The host name of a ``Host`` header value (port and IPv6 brackets removed, lower case, no
    trailing dot); None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not re.fullmatch(r":\d{1,5}", value[end + 1:])):
            return None
        return value[1:end]
    host, sep, port = value.partition(":")
    if sep and not re.fullmatch(r"\d{1,5}", port):
        return None
    if not host or not re.fullmatch(r"[a-z0-9._-]+", host):
        return None
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Access:
    """Which ``Host`` and ``Origin`` header values are served.

    Hosts: loopback names and addresses always; the ``--host`` address or name when it is not a
    loopback one; when it is a wildcard (0.0.0.0, ::), every IP literal and this machine's names
    (a DNS-rebinding page always arrives under its own domain name, never an IP literal); the
    host names of ``cors_origins`` (names the user trusts, e.g. a UI served under the same name);
    ``allowed_hosts`` adds names, ``"*"`` allows all. Origins (sent by browsers): http(s) origins
    on loopback names, any port, always; ``cors_origins`` adds exact origins, ``"*"`` allows all.
    A request with no ``Origin`` (SDKs, curl) is not a browser's cross-origin call and passes."""

    def __init__(self, bind_host: str = "127.0.0.1", cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = ()):
        self.any_origin = "*" in cors_origins
        self.origins = {self._norm_origin(o) for o in cors_origins if o != "*"}
        self.any_host = "*" in allowed_hosts
        self.hosts = set(_LOOPBACK_NAMES)
        for h in allowed_hosts:
            if h != "*":
                self.hosts.add(_split_host(h) or h.lower())
        for o in self.origins:
            with contextlib.suppress(ValueError):
                if urlsplit(o).hostname:
                    self.hosts.add(urlsplit(o).hostname.rstrip("."))
        self.any_ip = False
        bind = (bind_host or "").strip().strip("[]").lower()
        ip = _ip(bind)
        if not bind or (ip is not None and ip.is_unspecified):
            self.any_ip = True
            for name in {socket.gethostname(), socket.getfqdn()}:
                if name:
                    self.hosts.update({name.lower().rstrip("."), name.lower().split(".")[0] + ".local"})
        elif not _is_loopback(bind):
            self.hosts.add(bind.rstrip("."))

    @staticmethod
    def _norm_origin(origin: str) -> str:
        return origin.strip().rstrip("/").lower()

    def host_ok(self, value: Optional[str]) -> bool:
        if value is None or self.any_host:  # HTTP/1.0 may send none; browsers always send one
            return True
        host = _split_host(value)
        if host is None:
            return False
        if host in self.hosts or _is_loopback(host):
            return True
        return self.any_ip and _ip(host) is not None

    def origin_ok(self, origin: str) -> bool:
        if self.any_origin:
            return True
        norm = self._norm_origin(origin)
        if norm in self.origins:
            return True
        try:
            u = urlsplit(norm)
            u.port  # noqa: B018 (raises on a malformed port)
        except ValueError:
            return False
        return u.scheme in ("http", "https") and u.hostname is not None and _is_loopback(u.hostname) \
            and norm == f"{u.scheme}://{u.netloc}"


# -- request validation ----------------------------------------------------------------------------
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
# Function calling, honoured on chat (checked by _tools_of with medusa_edge.tools.resolve).
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
# Constrained output, honoured on both endpoints (checked by _grammar_of): GBNF text (llama-server's
# and llama-cpp-python's "grammar"), OpenAI's response_format, llama-server's json_schema.
_CONSTRAINTS = ("grammar", "response_format", "json_schema")
# Honoured on both endpoints (checked by _logit_bias_of): {token_id: bias}, keys strings as JSON has them.
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


def _parse_body(raw: bytes) -> dict:
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
                raise APIError(400, f"'{name}' is not supported: {why} (got {_short(v)})", name, "unsupported_parameter")
        elif name not in allowed:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=True)
    return s if len(s) <= n else s[: n - 3] + "..."


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
                           + f", got {_short(v)}", alias, "invalid_value" if _is_int(v) else "invalid_type")
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
            raise APIError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, got {_short(v)}", name, "invalid_type")
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
            raise APIError(400, f"'{name}' must be a number, got {_short(body[name])}", name, "invalid_type")
    for name, kind in (("cache_prompt", bool), ("user", str)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise APIError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, got {_short(body[name])}", name, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {_short(model)}", "model", "invalid_type")
    # combinations the API refuses, named here rather than by the API's message on the input field
    if "top_logprobs" in fields and kw.get("top_logprobs") is not None and not kw.get("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    if kw.get("echo") and kw.get("logprobs") is not None:
        raise APIError(400, "'echo' with 'logprobs' is not supported (the prompt's logits are not kept)", "echo",
                       "invalid_value")
    return kw


def _grammar_of(body: dict, engine) -> Optional[str]:
    """The GBNF text that ``grammar``, ``response_format`` or ``json_schema`` asks for (None: free
    text), converted and parsed here so that a bad one is a 400 naming its field before anything
    is queued."""
    given = {k: body[k] for k in _CONSTRAINTS if body.get(k) is not None}
    for name, kinds, what in (("grammar", (str,), "a string (GBNF)"), ("response_format", (dict,), "an object"),
                              ("json_schema", (dict,), "an object (a JSON schema)")):
        if name in given and not isinstance(given[name], kinds):
            raise APIError(400, f"'{name}' must be {what}, got {_short(given[name])}", name, "invalid_type")
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


def _logit_bias_of(body: dict, n_vocab: int) -> Optional[dict]:
    """``logit_bias`` checked here (token ids in the vocabulary, finite numbers, a bounded count),
    so that a bad one is a 400 naming the field before anything is queued."""
    from medusa_edge.core.engine import normalize_logit_bias

    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise APIError(400, f"'logit_bias' must be an object of token ids to biases, got {_short(v)}", "logit_bias",
                       "invalid_type")
    try:
        got = normalize_logit_bias(v, n_vocab)
    except ValueError as e:
        raise APIError(400, str(e), "logit_bias", "invalid_value") from None
    return dict(got) if got else None


def _tools_of(body: dict, messages) -> dict:
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


def _stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage: a final chunk with ``usage`` and no choices, as OpenAI sends)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {_short(stream)}", "stream", "invalid_type")
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


def _messages(messages) -> tuple[list, int]:
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
            raise APIError(400, f"'{where}.role' must be one of {', '.join(_ROLES)}, got {_short(role)}",
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


class Server:
    """The app's state: the model, the bounded queue and the worker thread."""

    def __init__(self, llm, model_id: str, queue_size: int = 16, api_key: Optional[str] = None,
                 limits: Optional[Limits] = None):
        self.llm, self.model_id, self.api_key = llm, model_id, api_key
        self.limits = limits or Limits()
        n_ctx = llm.n_ctx()
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or n_ctx, n_ctx)
        # No token covers more text than the longest token's piece, so a prompt of more bytes than
        # max_prompt_tokens times that has more tokens than allowed: refused without tokenizing it.
        self.max_piece_bytes = max(1, max((len(llm.detokenize([t], special=True)) for t in range(llm.n_vocab())), default=1))
        self.queue_size = queue_size
        self.slots = threading.BoundedSemaphore(queue_size + 1)  # waiting + running
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.closing = threading.Event()
        self.worker = threading.Thread(target=self._work, name="medusa-worker", daemon=True)
        self.worker.start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the running generation after its current step, drop the queued ones, end the worker."""
        self.closing.set()
        self.jobs.put(None)
        self.worker.join(timeout)

    # -- checks shared by the endpoints --------------------------------------------------------
    def _auth(self, request: Request) -> None:
        """The API key, when set, as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
        if not self.api_key:
            return
        want = self.api_key.encode()
        bearer = request.headers.get("authorization", "").encode("utf-8", "replace")
        x_key = request.headers.get("x-api-key", "").encode("utf-8", "replace")
        if not (hmac.compare_digest(bearer, b"Bearer " + want) | hmac.compare_digest(x_key, want)):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        raw = await request.body()  # already read, within the limits, by the guard
        if len(raw) > _PARSE_IN_THREAD:
            return await asyncio.to_thread(_parse_body, raw)
        return _parse_body(raw)

    def _check_prompt_bytes(self, n_bytes: int, param: str) -> None:
        if n_bytes > self.max_prompt_tokens * self.max_piece_bytes:
            raise APIError(400, f"the prompt is too long: {n_bytes} bytes of text make more than {self.max_prompt_tokens} "
                           f"tokens (the most this server takes)", param, "context_length_exceeded")

    def _check_prompt_tokens(self, n_tokens: int, param: str) -> None:
        if n_tokens > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_tokens} tokens; this server takes at most {self.max_prompt_tokens}",
                           param, "context_length_exceeded")

    # -- running a generation -----------------------------------------------------------------
    async def _run(self, request: Request, call: Callable, stream: bool, param: str, include_usage: bool = False):
        """Queue ``call(stream)`` for the worker and answer with its result or its chunks."""
        if not self.slots.acquire(blocking=False):
            raise APIError(503, f"the server is busy ({self.queue_size} requests waiting); retry later", None,
                           "queue_full", "server_error", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown)
                cancel.set()

        def job() -> None:
            try:
                if cancel.is_set() or self.closing.is_set():
                    log.info("request dropped before it started (client disconnected, or shutdown)")
                    return
                result = call(stream)
                if not stream:
                    put(result)
                    return
                for chunk in result:
                    put(chunk)
                    if cancel.is_set() or self.closing.is_set():
                        result.close()
                        stats = getattr(self.llm, "last_stats", None)
                        log.info("%s: generation stopped after %s tokens",
                                 "client disconnected" if cancel.is_set() else "shutting down",
                                 stats.n_generated if stats is not None else "some")
                        if not cancel.is_set():
                            put(APIError(503, "the server is shutting down", None, "shutting_down", "server_error"))
                        return
            except Exception as e:  # handed to the client; the worker goes on
                put(e)
            finally:
                put(_END)
                self.slots.release()

        self.jobs.put(job)
        # The headers wait for the first text (past the prefill), so that input errors such as a
        # prompt over n_ctx become 4xx answers; a stream's opening role chunk does not count.
        head = [await self._next(request, out, cancel)]
        while stream and _is_role_chunk(head[-1]):
            head.append(await self._next(request, out, cancel))
        if isinstance(head[-1], BaseException):
            raise _as_api_error(head[-1], param)
        if head[0] is _END:  # dropped before it started: the client left, or the server is stopping
            raise APIError(503, "the server is shutting down", None, "shutting_down", "server_error")
        if not stream:
            return JSONResponse(head[0])
        return StreamingResponse(self._sse(head, out, cancel, param, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _next(self, request: Request, out: asyncio.Queue, cancel: threading.Event):
        """The worker's next item; a client that leaves meanwhile cancels its request."""
        get = asyncio.ensure_future(out.get())
        try:
            while not (await asyncio.wait({get}, timeout=0.5))[0]:
                if await request.is_disconnected():
                    cancel.set()
            return get.result()
        finally:
            get.cancel()

    async def _sse(self, head: list, out: asyncio.Queue, cancel: threading.Event, param: str, include_usage: bool):
        try:
            item, last = head.pop(0), None
            while item is not _END:
                if isinstance(item, BaseException):  # after the headers: an error event, then the end
                    yield f"data: {json.dumps(_as_api_error(item, param).body())}\n\n"
                    return
                yield f"data: {json.dumps(item)}\n\n"
                last = item
                item = head.pop(0) if head else await out.get()
            if include_usage and isinstance(last, dict) and "usage" in last:
                # OpenAI's stream_options.include_usage: one more chunk, no choices, the usage
                yield "data: " + json.dumps({k: last[k] for k in ("id", "object", "created", "model") if k in last}
                                            | {"choices": [], "usage": last["usage"]}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # finished, or cancelled because the client disconnected
            cancel.set()

    # -- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        body = await self._body(request)
        kw = _params(body, _CHAT, _CHAT_FIELDS, _CHAT_NEUTRAL)
        kw["grammar"] = _grammar_of(body, self.llm.engine)
        kw["logit_bias"] = _logit_bias_of(body, self.llm.n_vocab())
        stream, include_usage = _stream_flags(body)
        messages, n_bytes = _messages(body.get("messages"))
        kw.update(_tools_of(body, messages))
        self._check_prompt_bytes(n_bytes, "messages")
        limited = self.max_prompt_tokens < self.llm.n_ctx()  # else the engine checks against n_ctx

        def call(s):
            if limited:
                from medusa_edge.api import chat_prompt_tokens

                self._check_prompt_tokens(len(chat_prompt_tokens(self.llm.engine.model, messages, self.llm.chat_template)),
                                          "messages")
            return self.llm.create_chat_completion(messages, stream=s, model=self.model_id, **kw)

        return await self._run(request, call, stream, "messages", include_usage)

    async def completions(self, request: Request):
        body = await self._body(request)
        kw = _params(body, _TEXT, _TEXT_FIELDS, _TEXT_NEUTRAL)
        kw["grammar"] = _grammar_of(body, self.llm.engine)
        kw["logit_bias"] = _logit_bias_of(body, self.llm.n_vocab())
        stream, include_usage = _stream_flags(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        tokens = isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
        if not isinstance(prompt, str) and not tokens:
            raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           "prompt", "invalid_type" if prompt is not None else "missing_required_parameter")
        if tokens:
            if not all(0 <= t < self.llm.n_vocab() for t in prompt):
                raise APIError(400, f"'prompt' has token ids outside the vocabulary [0, {self.llm.n_vocab()})",
                               "prompt", "invalid_value")
            self._check_prompt_tokens(len(prompt), "prompt")
        else:
            self._check_prompt_bytes(len(prompt.encode("utf-8")), "prompt")
        limited = not tokens and self.max_prompt_tokens < self.llm.n_ctx()

        def call(s):
            if limited:
                from medusa_edge.api import prompt_tokens

                self._check_prompt_tokens(len(prompt_tokens(self.llm.engine.model, prompt)), "prompt")
            return self.llm.create_completion(prompt, stream=s, model=self.model_id, **kw)

        return await self._run(request, call, stream, "prompt", include_usage)

    async def embeddings(self, request: Request):
        """OpenAI's embeddings: ``Medusa.create_embedding`` on its own context (generation's cache
        is untouched), queued like a generation. A model without pooling gives one vector per
        token, which is not OpenAI's shape: 400 (``medusa-edge serve --pooling mean`` pools it)."""
        body = await self._body(request)
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
            raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {_short(fmt)}", "encoding_format",
                           "invalid_value")
        for name in ("model", "user"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise APIError(400, f"'{name}' must be a string, got {_short(body[name])}", name, "invalid_type")

        def call(_):
            if self.llm.pooling_type() == 0:
                raise APIError(400, "this model has no pooling (its embeddings are per token, not OpenAI's shape): serve it "
                               "with --pooling mean, cls or last", "input", "invalid_value")
            r = self.llm.create_embedding(texts, model=self.model_id)
            if fmt == "base64":
                import base64

                import numpy as np

                for d in r["data"]:
                    d["embedding"] = base64.b64encode(np.asarray(d["embedding"], "<f4").tobytes()).decode("ascii")
            return r

        return await self._run(request, call, False, "input")

    async def models(self, request: Request):
        self._auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": int(os.path.getmtime(self.llm.model_path)),
             "owned_by": "medusa-edge"}]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id})


# -- the guard: Host, Origin, CORS, body limits ------------------------------------------------------
_CLOSE = {"Connection": "close"}  # answered before the body was read: the connection cannot be reused
_TOKEN_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of the app: refuses a foreign ``Host`` or ``Origin`` (403), answers
    CORS preflights and adds CORS headers for allowed origins, and reads the whole body itself,
    within ``limits`` (413, 408), before the app sees the request. A client that leaves while
    sending is not answered."""

    def __init__(self, app, access: Access, limits: Limits):
        self.app, self.access, self.limits = app, access, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # h11 bounds only a head still arriving; one that arrives whole is measured here
        head_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        if head_bytes > self.limits.max_header_bytes:
            return await self._error(scope, receive, send, APIError(
                431, f"the request line and headers exceed {self.limits.max_header_bytes} bytes (see --max-header-bytes)",
                None, "headers_too_large", headers=_CLOSE))
        headers = Headers(scope=scope)
        if not self.access.host_ok(headers.get("host")):
            return await self._error(scope, receive, send, APIError(
                403, "this server answers only requests addressed to this machine's names (see --host, --allowed-hosts)",
                None, "forbidden_host", headers=_CLOSE))
        origin = headers.get("origin")
        if origin is not None and not self.access.origin_ok(origin):
            return await self._error(scope, receive, send, APIError(
                403, f"the origin {_short(origin)} is not allowed (see --cors-origins)", None, "forbidden_origin",
                headers=_CLOSE))
        if origin is not None:
            send = self._with_cors(send, origin)
        if scope["method"] == "OPTIONS":
            return await self._options(scope, receive, send, headers, origin)
        try:
            body = await self._read_body(headers, receive)
        except _BodyTooLarge:
            return await self._error(scope, receive, send, APIError(
                413, f"the request body is larger than {self.limits.max_body_bytes} bytes (see --max-body-bytes)", None,
                "request_too_large", headers=_CLOSE))
        except asyncio.TimeoutError:
            return await self._error(scope, receive, send, APIError(
                408, f"the request body did not arrive within {self.limits.body_timeout:g} s", None, "request_timeout",
                headers=_CLOSE))
        if body is None:  # the client left mid-request
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: http.disconnect when the client leaves

        await self.app(scope, replay, send)

    async def _read_body(self, headers: Headers, receive) -> Optional[bytes]:
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        parts, n = [], 0
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), left)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > limit:
                raise _BodyTooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _with_cors(self, send, origin: str):
        async def cors_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"access-control-expose-headers", b"retry-after"),
                                                  (b"vary", b"Origin")]}
            await send(message)
        return cors_send

    async def _options(self, scope, receive, send, headers: Headers, origin: Optional[str]):
        out = {"Allow": "GET, POST, OPTIONS"}
        method = headers.get("access-control-request-method")
        if origin is not None and method is not None:  # a CORS preflight
            asked = headers.get("access-control-request-headers", "")
            # the headers the page asks to send are allowed (the openai JS SDK sends x-stainless-*)
            allow = asked.strip() if asked.strip() and _TOKEN_LIST.fullmatch(asked.strip()) else \
                "authorization, content-type, x-api-key"
            out.update({
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": allow,
                "Access-Control-Max-Age": "600",
            })
            if headers.get("access-control-request-private-network", "").lower() == "true":
                out["Access-Control-Allow-Private-Network"] = "true"
        # the body of an OPTIONS request is not read: the connection is closed after the answer
        # if one was announced
        if headers.get("content-length", "0") not in ("0", "") or "transfer-encoding" in headers:
            out.update(_CLOSE)
        await Response(status_code=204, headers=out)(scope, receive, send)

    async def _error(self, scope, receive, send, e: APIError):
        await e.response()(scope, receive, send)


def _header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol with a deadline for a request's line and headers: a connection that
    opens and sends nothing, or sends a request head slowly (slowloris), is closed ``timeout``
    seconds after its first byte (or after the connection opened)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self._in_request() and not self.transport.is_closing():
                log.info("closing a connection whose request headers did not arrive within %g s", timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._in_request():  # bytes of a new request's head
                self._arm()
            super().data_received(data)
            if self._in_request():  # the head is complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def create_app(llm, model_id: Optional[str] = None, queue_size: int = 16, api_key: Optional[str] = None, *,
               limits: Optional[Limits] = None, access: Optional[Access] = None) -> Starlette:
    """The ASGI app serving ``llm`` (a ``Medusa``) under ``model_id`` (default: the file's name),
    behind the ``Guard`` (``access``: default loopback only). ``app.state.server``: the ``Server``."""
    limits = limits or Limits()
    s = Server(llm, model_id or os.path.basename(llm.model_path), queue_size, api_key, limits)

    async def api_error(request, e: APIError):
        return e.response()

    async def http_error(request, e: HTTPException):  # unknown path, wrong method
        return APIError(e.status_code, e.detail, None, None, headers=e.headers).response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(s.shutdown)

    app = Starlette(lifespan=lifespan, middleware=[Middleware(Guard, access=access or Access(), limits=limits)], routes=[
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/embeddings", s.embeddings, methods=["POST"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
        Route("/v1/health", s.health, methods=["GET"]),
    ], exception_handlers={APIError: api_error, HTTPException: http_error})
    app.state.server = s
    return app


def serve(llm, host: str = "127.0.0.1", port: int = 8080, *, queue_size: int = 16,
          api_key: Optional[str] = None, model_id: Optional[str] = None, limits: Optional[Limits] = None,
          cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = ()) -> None:
    """Serve ``llm`` until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    limits = limits or Limits()
    app = create_app(llm, model_id, queue_size, api_key, limits=limits,
                     access=Access(host, cors_origins, allowed_hosts))
    log.info("serving %s as '%s' on http://%s:%d/v1 (queue %d)%s", llm.model_path, app.state.server.model_id,
             host, port, queue_size, ", API key required" if api_key else "")

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.server.closing.set()  # running streams end after their current step
            await super().shutdown(sockets)

    Uvicorn(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                           http=_header_timeout_protocol(limits.header_timeout),
                           h11_max_incomplete_event_size=limits.max_header_bytes)).run()
