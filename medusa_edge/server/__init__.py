"""The OpenAI-compatible HTTP server over one Medusa instance."""

from medusa_edge.server.app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
