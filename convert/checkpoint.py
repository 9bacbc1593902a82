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
        self._st_off = {}  # safetensors tensor name -> (file offset, dtype)
        self._mmapped = set()  # torch files loaded with mmap=True
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
        """Parse the header ourselves: tensors are then read with pread, a block of rows at a time,
        so neither the process's memory nor its RSS grows with the file (no mmap)."""
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{f}: truncated safetensors file ({size} bytes)")
                n = int.from_bytes(head, "little")
                if n <= 0 or 8 + n > size:
                    raise ConvertError(f"{f}: corrupt or truncated safetensors header (header of {n} bytes, file of {size})")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"{f}: corrupt safetensors header ({_short(e)})") from None
        base = 8 + n
        for k, v in header.items():
            if k == "__metadata__":
                continue
            try:
                dtype, shape, (b0, b1) = v["dtype"], tuple(int(x) for x in v["shape"]), v["data_offsets"]
            except Exception:
                raise ConvertError(f"{f}: corrupt safetensors header (bad entry for {k!r})") from None
            if dtype not in _ST_DTYPES:
                raise ConvertError(f"{f}: tensor {k} has dtype {dtype}; only F32, F16 and BF16 are supported")
            if b1 - b0 != int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype][1] or b0 < 0:
                raise ConvertError(f"{f}: corrupt safetensors header (size of {k} does not match its shape)")
            if base + b1 > size:
                raise ConvertError(f"{f}: truncated safetensors file ({size} bytes, tensor {k} ends at {base + b1})")
            self._add(k, _Entry(f, shape, _ST_DTYPES[dtype][0]))
            self._st_off[k] = (base + b0, dtype)

    def _open_torch(self, f: Path) -> None:
        torch = _torch()
        try:
            sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            mmapped = True
        except RuntimeError as e:
            msg = str(e)
            if "mmap" in msg and "zipfile" in msg:
                # legacy (pre-1.6) pickle: cannot be mmapped, so it is read whole
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True)
                    mmapped = False
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
        if mmapped:
            self._mmapped.add(f)

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
            if name in self._st_off:
                out = self._read_st(name, e, r0, r1)
            else:
                t = self._pt[e.file][name]
                if r0 is not None and len(e.shape) > 0:
                    t = t[r0:r1]
                out = t.to(torch.float32, copy=True).numpy()
                if e.file in self._mmapped:
                    _drop_pages(t)
        except ConvertError:
            raise
        except Exception as ex:
            raise ConvertError(f"{e.file}: cannot read tensor {name} ({_short(ex)})") from None
        if not np.all(np.isfinite(out)):
            raise ConvertError(f"{e.file}: tensor {name} holds NaN or infinite values (corrupt file?)")
        return np.ascontiguousarray(out)


    def _read_st(self, name: str, e: _Entry, r0, r1) -> np.ndarray:
        off, dtype = self._st_off[name]
        shape = e.shape
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        if r0 is None or len(shape) < 2:
            r0, r1, out_shape = 0, (shape[0] if shape else 1), shape
        else:
            r1 = min(r1, shape[0])
            out_shape = (r1 - r0, *shape[1:])
        isz = _ST_DTYPES[dtype][1]
        nbytes = (r1 - r0) * row * isz
        with open(e.file, "rb") as fh:
            buf = os.pread(fh.fileno(), nbytes, off + r0 * row * isz)
        if len(buf) != nbytes:
            raise ConvertError(f"{e.file}: truncated while reading tensor {name}")
        if dtype == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, dtype="<f2" if dtype == "F16" else "<f4").astype(np.float32)
        return a.reshape(out_shape)


_ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = None


def _drop_pages(t) -> None:
    """Tell the kernel we are done with the mmapped pages under ``t`` (a view of a checkpoint
    loaded with mmap=True), so streaming a large file does not leave it all in our RSS.
    The mapping is private and read-only to us: the pages refault from the file if touched again."""
    global _libc
    try:
        if _libc is None:
            import ctypes
            import ctypes.util

            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if not t.is_contiguous() or t.numel() == 0:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        a0 = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the tensor
        a1 = end // _PAGE * _PAGE
        if a1 > a0:
            _libc.madvise(a0, a1 - a0, 4)  # MADV_DONTNEED
    except Exception:  # best effort: memory use is an optimisation, never an error
        pass


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
