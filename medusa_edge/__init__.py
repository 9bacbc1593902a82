"""medusa-edge: lossless Medusa decoding on llama.cpp."""

from .api import Medusa, TextStream
from .engine import Engine, SamplingParams, Stats
from .errors import ClosedError, ContextOverflowError, HeadsError, MedusaError, ModelLoadError
from .tree import PRESETS, Tree, TreeError

__all__ = [
    "Medusa", "TextStream", "Engine", "SamplingParams", "Stats", "Tree", "TreeError", "PRESETS",
    "MedusaError", "ModelLoadError", "HeadsError", "ContextOverflowError", "ClosedError",
]
__version__ = "0.1.0"
