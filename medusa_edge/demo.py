"""The bundled demo model (a small Llama with trained Medusa heads), shipped inside the package."""

from importlib import resources

from .errors import ModelLoadError

DEMO_MODEL = "demo-model.gguf"


def demo_model_path() -> str:
    p = resources.files(__package__).joinpath("models", DEMO_MODEL)
    if not p.is_file():
        raise ModelLoadError(
            f"no model given and the bundled demo model ({p}) is not installed in this build: pass a GGUF path"
        )
    return str(p)
