"""Who may reach the server, and what a request may cost before the app sees it.

Local by default: ``Host`` must name this machine (loopback names, or what ``--host`` binds) and a
browser's ``Origin`` must be allowed (loopback origins on any port, plus ``--cors-origins``), so a
web page the user opens cannot drive the server (DNS rebinding, cross-origin ``text/plain``
POSTs); allowed origins get CORS headers and preflight answers (``Access``, ``Guard``).

Bounded by ``Limits``: the request line and headers in bytes (431; 400 from h11 while they arrive)
and in time (the connection is closed: ``header_timeout_protocol``), the body in bytes (413) and in
time (408). ``Guard`` reads the whole body within them before the app is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import Response

from medusa_edge.server.api_error import APIError, short

log = logging.getLogger("medusa_edge.server")


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
                403, f"the origin {short(origin)} is not allowed (see --cors-origins)", None, "forbidden_origin",
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


def header_timeout_protocol(timeout: float):
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

