"""The server's errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` is raised by the request checks (``medusa_edge.server.requests``), the guard
(``medusa_edge.server.access``) and the endpoints (``medusa_edge.server.app``), and answered by the
app's exception handler; ``as_api_error`` turns what a generation raised into one.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from starlette.responses import JSONResponse

from medusa_edge.errors import ContextOverflowError

log = logging.getLogger("medusa_edge.server")


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


def as_api_error(e: BaseException, param: str) -> APIError:
    """A generation's exception as the client sees it; ``param``: the request field with the input."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param, "context_length_exceeded")
    if isinstance(e, ValueError):  # ChatTemplateError, bad messages, bad parameters
        return APIError(400, str(e), param, "invalid_value")
    log.error("generation failed: %s: %s", type(e).__name__, e)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "internal_error", "server_error")


def short(v, n: int = 80) -> str:
    """``v`` as JSON, ASCII only, cut to ``n`` characters: how an error message quotes a client's value."""
    s = json.dumps(v, ensure_ascii=True)
    return s if len(s) <= n else s[: n - 3] + "..."
