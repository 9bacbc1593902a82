"""OpenAI-compatible HTTP server over one ``Medusa`` instance: ``medusa-edge serve [MODEL]``.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole, or streamed as server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Bodies have
llama-cpp-python's shapes (``Medusa.create_chat_completion`` / ``create_completion`` make them);
the last chunk, or the whole response, carries ``usage`` and ``medusa`` statistics.

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
import json
import logging
import math
import os
import queue
import threading
from typing import Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors import ContextOverflowError

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


# -- request validation ----------------------------------------------------------------------------
# field -> (type, valid?, what is valid). Fields not sent keep the API's defaults; unknown ones are ignored.
_COMMON = {
    "max_tokens": (int, lambda v: v >= 1, ">= 1"),
    "temperature": (float, lambda v: v >= 0, ">= 0 (0: greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, ">= 0 (0: off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "typical_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "repeat_penalty": (float, lambda v: v > 0, "> 0"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "seed": (int, lambda v: True, "an integer"),
}
_CHAT = {**_COMMON, "logprobs": (bool, lambda v: True, "a boolean"),
         "top_logprobs": (int, lambda v: 0 <= v <= 20, "in [0, 20]")}
_TEXT = {**_COMMON, "logprobs": (int, lambda v: 0 <= v <= 20, "in [0, 20]"), "echo": (bool, lambda v: True, "a boolean")}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean"}


def _params(body: dict, fields: dict) -> dict:
    """The generation keyword arguments of a request body, checked."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    kw = {}
    for name, (kind, ok, what) in fields.items():
        v = body.get(name)
        if v is None:
            continue
        if kind is bool:
            good = isinstance(v, bool)
        else:
            good = not isinstance(v, bool) and isinstance(v, int if kind is int else (int, float)) and math.isfinite(v)
        if not good:
            raise APIError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, got {json.dumps(v)}", name, "invalid_type")
        if not ok(v):
            raise APIError(400, f"'{name}' must be {what}, got {v}", name, "invalid_value")
        kw[name] = v
    stop = body.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
        kw["stop"] = stop
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    for name in ("tools", "functions", "response_format", "logit_bias"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    return kw


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {json.dumps(stream)}", "stream", "invalid_type")
    return stream


class Server:
    """The app's state: the model, the bounded queue and the worker thread."""

    def __init__(self, llm, model_id: str, queue_size: int = 16, api_key: Optional[str] = None):
        self.llm, self.model_id, self.api_key = llm, model_id, api_key
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
        sent = request.headers.get("authorization", "").encode()
        if self.api_key and not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if model is not None and model not in (self.model_id, self.llm.model_path):
            if not isinstance(model, str):
                raise APIError(400, "'model' must be a string", "model", "invalid_type")
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}'",
                           "model", "model_not_found")
        return body

    # -- running a generation -----------------------------------------------------------------
    async def _run(self, request: Request, call: Callable, stream: bool, param: str):
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
        return StreamingResponse(self._sse(head, out, cancel, param), media_type="text/event-stream",
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

    async def _sse(self, head: list, out: asyncio.Queue, cancel: threading.Event, param: str):
        try:
            item = head.pop(0)
            while item is not _END:
                if isinstance(item, BaseException):  # after the headers: an error event, then the end
                    yield f"data: {json.dumps(_as_api_error(item, param).body())}\n\n"
                    return
                yield f"data: {json.dumps(item)}\n\n"
                item = head.pop(0) if head else await out.get()
            yield "data: [DONE]\n\n"
        finally:  # finished, or cancelled because the client disconnected
            cancel.set()

    # -- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        body = await self._body(request)
        kw, stream = _params(body, _CHAT), _stream_flag(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of messages", "messages",
                           "invalid_type" if messages is not None else "missing_required_parameter")
        return await self._run(request, lambda s: self.llm.create_chat_completion(messages, stream=s, model=self.model_id, **kw),
                               stream, "messages")

    async def completions(self, request: Request):
        body = await self._body(request)
        kw, stream = _params(body, _TEXT), _stream_flag(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        tokens = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not isinstance(prompt, str) and not tokens:
            raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           "prompt", "invalid_type" if prompt is not None else "missing_required_parameter")
        if tokens and not all(0 <= t < self.llm.n_vocab() for t in prompt):
            raise APIError(400, f"'prompt' has token ids outside the vocabulary [0, {self.llm.n_vocab()})",
                           "prompt", "invalid_value")
        return await self._run(request, lambda s: self.llm.create_completion(prompt, stream=s, model=self.model_id, **kw), stream, "prompt")

    async def models(self, request: Request):
        self._auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": int(os.path.getmtime(self.llm.model_path)),
             "owned_by": "medusa-edge"}]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id})


def create_app(llm, model_id: Optional[str] = None, queue_size: int = 16, api_key: Optional[str] = None) -> Starlette:
    """The ASGI app serving ``llm`` (a ``Medusa``) under ``model_id`` (default: the file's name)."""
    s = Server(llm, model_id or os.path.basename(llm.model_path), queue_size, api_key)

    async def api_error(request, e: APIError):
        return e.response()

    async def http_error(request, e: HTTPException):  # unknown path, wrong method
        return APIError(e.status_code, e.detail, None, None, headers=e.headers).response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(s.shutdown)

    app = Starlette(lifespan=lifespan, routes=[
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
    ], exception_handlers={APIError: api_error, HTTPException: http_error})
    app.state.server = s
    return app


def serve(llm, host: str = "127.0.0.1", port: int = 8080, *, queue_size: int = 16,
          api_key: Optional[str] = None, model_id: Optional[str] = None) -> None:
    """Serve ``llm`` until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(llm, model_id, queue_size, api_key)
    log.info("serving %s as '%s' on http://%s:%d/v1 (queue %d)%s", llm.model_path, app.state.server.model_id,
             host, port, queue_size, ", API key required" if api_key else "")

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.server.closing.set()  # running streams end after their current step
            await super().shutdown(sockets)

    Uvicorn(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)).run()
