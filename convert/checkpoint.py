"""Read tensors from Hugging Face checkpoints lazily: safetensors (mmapped) and torch pickles
(``torch.load(mmap=True)``), single files or shards with an index. Nothing is loaded until a
tensor's rows are asked for, and then only those rows are copied."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


class ConvertError(Exception):
    """A problem with the inputs, reported as one line naming the file and the problem."""


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in requirements
        raise ConvertError("reading Hugging Face checkpoints needs torch: pip install 'medusa-edge[convert]'") from None
    return torch


def load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


@dataclass
class _Entry:
    file: Path
    shape: tuple
    dtype: str


class Checkpoint:
    """Tensor names, shapes and lazily read rows of one checkpoint (one file or several shards)."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.entries: dict[str, _Entry] = {}
        self._st = {}  # safetensors file -> safe_open handle
        self._pt = {}  # torch file -> state dict of mmapped tensors
        for f in self.files:
            self._open(f)

    # -- opening -------------------------------------------------------------------------------
    def _open(self, f: Path) -> None:
        if not f.is_file():
            raise ConvertError(f"{f}: no such file")
        if f.suffix == ".safetensors":
            self._open_safetensors(f)
        else:
            self._open_torch(f)

    def _add(self, name: str, e: _Entry) -> None:
        if name in self.entries:
            raise ConvertError(f"{e.file}: tensor {name} also appears in {self.entries[name].file}")
        self.entries[name] = e

    def _open_safetensors(self, f: Path) -> None:
        _torch()
        from safetensors import safe_open

        size = f.stat().st_size
        try:
            h = safe_open(str(f), framework="pt")
            keys = list(h.keys())
            for k in keys:
                sl = h.get_slice(k)
                self._add(k, _Entry(f, tuple(sl.get_shape()), str(sl.get_dtype())))
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"{f}: corrupt or truncated safetensors file ({_short(e)})") from None
        # safetensors checks offsets against the file size on open; check again to be sure
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ConvertError(f"{f}: truncated safetensors file ({size} bytes, needs {8 + n + end})")
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"{f}: corrupt safetensors header ({_short(e)})") from None
        self._st[f] = h

    def _open_torch(self, f: Path) -> None:
        torch = _torch()
        try:
            sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            msg = str(e)
            if "mmap" in msg and "zipfile" in msg:
                # legacy (pre-1.6) pickle: cannot be mmapped, so it is read whole
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True)
                except Exception as e2:
                    raise ConvertError(f"{f}: corrupt or truncated torch checkpoint ({_short(e2)})") from None
            else:
                raise ConvertError(f"{f}: corrupt or truncated torch checkpoint ({_short(e)})") from None
        except Exception as e:
            raise ConvertError(f"{f}: corrupt or truncated torch checkpoint ({_short(e)})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ConvertError(f"{f}: expected a state dict (name -> tensor), found {type(sd).__name__}")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise ConvertError(f"{f}: entry {k!r} is a {type(v).__name__}, not a tensor")
            self._add(str(k), _Entry(f, tuple(v.shape), str(v.dtype).replace("torch.", "")))
        self._pt[f] = sd

    # -- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def file(self, name: str) -> Path:
        return self.entries[name].file

    def rows(self, name: str, r0: Optional[int] = None, r1: Optional[int] = None) -> np.ndarray:
        """Rows [r0, r1) of ``name`` as a float32 numpy array (the whole tensor if no range)."""
        torch = _torch()
        e = self.entries[name]
        try:
            if e.file in self._st:
                sl = self._st[e.file].get_slice(name)
                t = sl[r0:r1] if r0 is not None and len(e.shape) > 0 else sl[:]
            else:
                t = self._pt[e.file][name]
                if r0 is not None and len(e.shape) > 0:
                    t = t[r0:r1]
            out = t.to(torch.float32).numpy()
        except Exception as ex:
            raise ConvertError(f"{e.file}: cannot read tensor {name} ({_short(ex)})") from None
        if not np.all(np.isfinite(out)):
            raise ConvertError(f"{e.file}: tensor {name} holds NaN or infinite values (corrupt file?)")
        return np.ascontiguousarray(out)


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return (s[:160] + "...") if len(s) > 160 else (s or type(e).__name__)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def model_weight_files(d: Path) -> Optional[list[Path]]:
    """The weight files of a Hugging Face model dir (safetensors preferred), or None."""
    for idx in INDEX_FILES:
        p = d / idx
        if p.is_file():
            data = load_json(p)
            wm = data.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ConvertError(f"{p}: no weight_map in the index")
            files = []
            for fn in wm.values():
                if fn not in files:
                    files.append(fn)
            paths = [d / fn for fn in files]
            missing = [str(x) for x in paths if not x.is_file()]
            if missing:
                raise ConvertError(f"{p}: shard {missing[0]} is missing")
            return paths
    for fn in WEIGHT_FILES:
        if (d / fn).is_file():
            return [d / fn]
    return None


def index_names(d: Path) -> Optional[list[str]]:
    """Tensor names listed in a model dir's index (without opening shards), or None."""
    for idx in INDEX_FILES:
        p = d / idx
        if p.is_file():
            wm = load_json(p).get("weight_map")
            return list(wm) if isinstance(wm, dict) else None
    return None


def file_size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)
