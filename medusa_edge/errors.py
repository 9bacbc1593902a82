"""Exceptions raised at the package boundary. Each message names the file or value at fault."""


class MedusaError(Exception):
    """Base class for medusa_edge errors."""


class ModelLoadError(MedusaError):
    """The model GGUF cannot be loaded or cannot be used for tree verification."""


class RpcError(ModelLoadError):
    """llama.cpp's RPC backend cannot be used: not built in, a server that does not answer or speaks
    another protocol version, or a malformed ``rpc_servers``."""


class HeadsError(MedusaError):
    """The heads GGUF is unreadable, or was made for a different base model."""


class ContextOverflowError(MedusaError, ValueError):
    """The prompt (or the requested work) does not fit the context window."""


class ChatTemplateError(MedusaError, ValueError):
    """A chat template failed to render, refused the messages, or tried to leave its sandbox."""


class BusyError(MedusaError, RuntimeError):
    """A generator of this instance was resumed after another call had started using its cache."""


class ClosedError(MedusaError, RuntimeError):
    """The instance was closed (``Medusa.close()``): its model and contexts are freed."""
