"""The OpenAI-compatible HTTP server over one Medusa instance.

``app``: the worker, the routes, ``create_app`` and ``serve``; ``requests``: the checks on a
request body; ``access``: ``Limits``, the ``Host``/``Origin`` allow-lists and the ASGI guard in front
of the routes; ``api_error``: errors in OpenAI's shape.
"""

from medusa_edge.server.app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
