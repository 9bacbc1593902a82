"""Preset names resolved offline from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .checkpoint import ConvertError

BASE_PRESETS = {
    "vicuna7b": "lmsys/vicuna-7b-v1.3",
    "vicuna13b": "lmsys/vicuna-13b-v1.3",
    "vicuna33b": "lmsys/vicuna-33b-v1.3",
    "zephyr7b": "HuggingFaceH4/zephyr-7b-beta",
}

#: heads presets: short names for the published FasterDecoding repos (full repo ids work too)
HEADS_PRESETS = {
    "medusa-vicuna7b": "FasterDecoding/medusa-vicuna-7b-v1.3",
    "medusa-vicuna13b": "FasterDecoding/medusa-vicuna-13b-v1.3",
    "medusa-vicuna33b": "FasterDecoding/medusa-vicuna-33b-v1.3",
    "medusa2-vicuna7b": "FasterDecoding/medusa-v1.0-vicuna-7b-v1.5",
    "medusa2-vicuna13b": "FasterDecoding/medusa-1.0-vicuna-13b-v1.5",
    "medusa2-vicuna33b": "FasterDecoding/medusa-1.0-vicuna-33b-v1.3",
    "medusa2-zephyr7b": "FasterDecoding/medusa-1.0-zephyr-7b-beta",
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> Path:
    """The Hugging Face hub cache dir, as huggingface_hub computes it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def cached_snapshot(repo_id: str) -> Path:
    """The local snapshot dir of ``repo_id`` (refs/main, else the newest), or a ConvertError
    that says where it looked and what to download."""
    cache = hub_cache()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        if (snaps / rev).is_dir():
            return snaps / rev
    if snaps.is_dir():
        cands = [p for p in snaps.iterdir() if p.is_dir()]
        if cands:
            return max(cands, key=lambda p: p.stat().st_mtime)
    raise ConvertError(
        f"{repo_id} is not in the Hugging Face cache (looked in {repo_dir}): download it first with "
        f"`huggingface-cli download {repo_id}` (set HF_HOME or HF_HUB_CACHE if your cache is elsewhere)"
    )


def resolve(spec: str, presets: dict, what: str) -> tuple[Path, Optional[str]]:
    """(local path, repo id or None) for a path, a preset name or a Hugging Face repo id."""
    p = Path(spec).expanduser()
    if p.exists():
        return p, None
    repo = presets.get(spec.lower())
    if repo is None and _REPO_ID.match(spec) and not spec.startswith((".", "/")):
        repo = spec
    if repo is None:
        names = ", ".join(presets)
        raise ConvertError(f"{spec}: no such file or directory, and not a {what} preset ({names}) or a Hugging Face repo id")
    return cached_snapshot(repo), repo


def repo_name(path: Path, repo_id: Optional[str]) -> str:
    """A readable model name: the repo's name (also for paths inside the HF cache), else the dir name."""
    if repo_id:
        return repo_id.split("/")[-1]
    parts = path.resolve().parts if path.exists() else path.parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.split("--")[-1]
    name = path.name if path.is_dir() else path.stem
    return name or "model"
