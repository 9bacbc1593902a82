"""Exceptions raised at the package boundary. Each message names the file or value at fault."""


class MedusaError(Exception):
    """Base class for medusa_edge errors."""


class ModelLoadError(MedusaError):
    """The model GGUF cannot be loaded or cannot be used for tree verification."""


class HeadsError(MedusaError):
    """The heads GGUF is unreadable, or was made for a different base model."""


class ContextOverflowError(MedusaError, ValueError):
    """The prompt (or the requested work) does not fit the context window."""
