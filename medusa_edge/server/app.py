"""OpenAI-compatible HTTP server over one ``Medusa`` instance: ``medusa-edge serve [MODEL]``.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole, or streamed as server-sent
events ending in ``data: [DONE]``), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health`` and ``GET /v1/health``.
Bodies have llama-cpp-python's shapes (``Medusa.create_chat_completion`` / ``create_completion``
make them); the last chunk, or the whole response, carries ``usage`` and ``medusa`` statistics.
The ``model`` field may name anything (one model is served); responses name the served one.

Request bodies are checked field by field before anything is queued (``medusa_edge.server.requests``);
a prompt of more bytes than ``max_prompt_tokens`` tokens can cover is refused before it is
tokenized. In front of the routes, ``Guard`` (``medusa_edge.server.access``) serves only requests
addressed to this machine (``Host``) from allowed browser origins (``Origin``), and reads the body
within ``Limits``.

One worker thread runs the generations one after another, off the event loop; each chunk is handed
to the loop as soon as it is made. Requests wait in a bounded queue: when it is full the answer is
503 with ``Retry-After``. A client that disconnects stops its generation after the current step
(the generator is closed) and the log says so. Errors are OpenAI-shaped
(``medusa_edge.server.api_error``).

Needs the ``server`` extra: ``pip install 'medusa-edge[server]'`` (starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import threading
from typing import Callable, Optional, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from medusa_edge.server.access import Access, Guard, Limits, header_timeout_protocol
from medusa_edge.server.api_error import APIError, as_api_error
from medusa_edge.server.requests import (
    chat_params,
    check_messages,
    completion_params,
    embedding_input,
    grammar_of,
    logit_bias_of,
    parse_body,
    prompt_of,
    stream_flags,
    tools_of,
)

log = logging.getLogger("medusa_edge.server")

_END = object()  # the worker's last item for a request
#: Bodies larger than this are parsed off the event loop, so other clients keep being answered.
_PARSE_IN_THREAD = 64 * 1024


def _is_role_chunk(item) -> bool:
    return isinstance(item, dict) and item.get("choices", [{}])[0].get("delta") == {"role": "assistant"}


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
            return await asyncio.to_thread(parse_body, raw)
        return parse_body(raw)

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
            raise as_api_error(head[-1], param)
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
                    yield f"data: {json.dumps(as_api_error(item, param).body())}\n\n"
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
        kw = chat_params(body)
        kw["grammar"] = grammar_of(body, self.llm.engine)
        kw["logit_bias"] = logit_bias_of(body, self.llm.n_vocab())
        stream, include_usage = stream_flags(body)
        messages, n_bytes = check_messages(body.get("messages"))
        kw.update(tools_of(body, messages))
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
        kw = completion_params(body)
        kw["grammar"] = grammar_of(body, self.llm.engine)
        kw["logit_bias"] = logit_bias_of(body, self.llm.n_vocab())
        stream, include_usage = stream_flags(body)
        prompt = prompt_of(body, self.llm.n_vocab())
        tokens = isinstance(prompt, list)
        if tokens:
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
        texts, fmt = embedding_input(body)

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
                           http=header_timeout_protocol(limits.header_timeout),
                           h11_max_incomplete_event_size=limits.max_header_bytes)).run()
