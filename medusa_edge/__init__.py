"""medusa-edge: lossless Medusa decoding on llama.cpp."""

from medusa_edge.api import Medusa, TextStream
from medusa_edge.core.engine import Engine
from medusa_edge.core.params import SamplingParams, Stats
from medusa_edge.errors import ClosedError, ContextOverflowError, HeadsError, MedusaError, ModelLoadError, RpcError
from medusa_edge.core.tree import PRESETS, Tree, TreeError

__all__ = [
    "Medusa", "TextStream", "Engine", "SamplingParams", "Stats", "Tree", "TreeError", "PRESETS",
    "MedusaError", "ModelLoadError", "RpcError", "HeadsError", "ContextOverflowError", "ClosedError",
]
__version__ = "0.1.0"
