"""Find, validate and stream Medusa heads from the published layouts (reference section 1).

* Medusa-1 heads dir: ``config.json`` + ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt``;
  keys ``{i}.{j}.linear.weight`` [H,H], ``{i}.{j}.linear.bias`` [H], ``{i}.{L}.weight`` [V,H].
* "version 2" heads: the same without ``{i}.{L}.weight`` (W_out is the base lm_head).
* Medusa-2 full checkpoint: a Llama/Mistral checkpoint plus ``medusa_head.{i}...`` keys.

The head count and ResBlock count come from the tensors, never from config.json (the published
vicuna-7b config says 2 heads where the file holds 5).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medusa_edge import schema
from medusa_edge.heads_gguf import StreamTensor, heads_tensor_type

from .checkpoint import Checkpoint, ConvertError, index_names, load_json, model_weight_files

MEDUSA2_PREFIX = "medusa_head."
HEADS_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt", "medusa_lm_head.bin")

_LIN = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_OUT = re.compile(r"^(\d+)\.(\d+)\.weight$")


@dataclass
class HeadsSource:
    """Where heads come from and what they look like, validated."""

    path: Path  # the heads dir or file the user named
    ckpt: Checkpoint
    prefix: str  # "" or "medusa_head."
    n_heads: int
    n_layers: int
    n_embd: int
    n_vocab: Optional[int]  # None for shared-output ("version 2") heads
    shared_output: bool
    medusa2_dir: Optional[Path] = None  # set when the heads live in a full Medusa-2 checkpoint
    config: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        files = sorted({str(self.ckpt.file(self.prefix + k)) for k in self._keys()})
        return files[0] if len(files) == 1 else str(self.path)

    def _keys(self):
        for i in range(self.n_heads):
            for j in range(self.n_layers):
                yield f"{i}.{j}.linear.weight"
                yield f"{i}.{j}.linear.bias"
            if not self.shared_output:
                yield f"{i}.{self.n_layers}.weight"

    @property
    def base_name_hint(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def stream_tensors(self, head_type: str) -> list[StreamTensor]:
        """The heads as schema-named tensors, read a block of rows at a time."""
        out = []

        def reader(src):
            return lambda r0, r1: self.ckpt.rows(src, r0, r1)

        def vec_reader(src):
            return lambda r0, r1: self.ckpt.rows(src)

        for i in range(self.n_heads):
            for j in range(self.n_layers):
                for name, src, vec in (
                    (schema.res_weight(i, j), f"{i}.{j}.linear.weight", False),
                    (schema.res_bias(i, j), f"{i}.{j}.linear.bias", True),
                ):
                    shape = self.ckpt.shape(self.prefix + src)
                    rd = vec_reader(self.prefix + src) if vec else reader(self.prefix + src)
                    out.append(StreamTensor(name, shape, heads_tensor_type(name, shape, head_type), rd))
            if not self.shared_output:
                name, src = schema.output_weight(i), self.prefix + f"{i}.{self.n_layers}.weight"
                shape = self.ckpt.shape(src)
                out.append(StreamTensor(name, shape, heads_tensor_type(name, shape, head_type), reader(src)))
        return out


def _parse_layout(ckpt: Checkpoint, names: list[str], prefix: str, label: str) -> tuple[int, int, int, Optional[int], bool]:
    """(n_heads, n_layers, n_embd, n_vocab or None, shared_output) from the key names and shapes."""
    lin: dict[int, dict[int, set]] = {}
    outs: dict[int, list[int]] = {}
    for full in names:
        k = full[len(prefix):]
        m = _LIN.match(k)
        if m:
            lin.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
            continue
        m = _OUT.match(k)
        if m:
            outs.setdefault(int(m[1]), []).append(int(m[2]))
            continue
        raise ConvertError(
            f"{label}: unknown key layout: tensor {full!r} is not a Medusa head key "
            f"(expected '{prefix}{{i}}.{{j}}.linear.weight', '{prefix}{{i}}.{{j}}.linear.bias', '{prefix}{{i}}.{{L}}.weight')"
        )
    heads = sorted(set(lin) | set(outs))
    if not heads:
        raise ConvertError(f"{label}: no Medusa head tensors found")
    if heads != list(range(len(heads))):
        missing = sorted(set(range(max(heads) + 1)) - set(heads))
        raise ConvertError(f"{label}: head indices are not 0..{max(heads)}: head {missing[0]} is missing")
    n_heads = len(heads)
    layer_counts = set()
    for i in heads:
        js = sorted(lin.get(i, {}))
        if js != list(range(len(js))):
            raise ConvertError(f"{label}: head {i} has ResBlocks {js}, expected 0..{len(js) - 1}")
        if not js:
            raise ConvertError(f"{label}: head {i} has no ResBlock ('{prefix}{i}.0.linear.weight' is missing)")
        for j in js:
            if lin[i][j] != {"weight", "bias"}:
                part = ({"weight", "bias"} - lin[i][j]).pop()
                raise ConvertError(f"{label}: tensor '{prefix}{i}.{j}.linear.{part}' is missing")
        layer_counts.add(len(js))
        o = outs.get(i, [])
        if len(o) > 1 or (o and o[0] != len(js)):
            raise ConvertError(
                f"{label}: unknown key layout: head {i} has output key(s) {['%s%d.%d.weight' % (prefix, i, j) for j in o]}, "
                f"expected only '{prefix}{i}.{len(js)}.weight' after its {len(js)} ResBlock(s)"
            )
    if len(layer_counts) != 1:
        raise ConvertError(f"{label}: heads have different ResBlock counts {sorted(layer_counts)}")
    n_layers = layer_counts.pop()
    with_out = [i for i in heads if outs.get(i)]
    if with_out and len(with_out) != n_heads:
        miss = next(i for i in heads if not outs.get(i))
        raise ConvertError(f"{label}: tensor '{prefix}{miss}.{n_layers}.weight' is missing (other heads have one)")
    shared = not with_out

    w0 = ckpt.shape(f"{prefix}0.0.linear.weight")
    if len(w0) != 2 or w0[0] != w0[1]:
        raise ConvertError(f"{label}: '{prefix}0.0.linear.weight' has shape {list(w0)}, expected a square [H, H]")
    H = int(w0[0])
    V = None
    for i in heads:
        for j in range(n_layers):
            for part, want in (("weight", (H, H)), ("bias", (H,))):
                k = f"{prefix}{i}.{j}.linear.{part}"
                if tuple(ckpt.shape(k)) != want:
                    raise ConvertError(f"{label}: '{k}' has shape {list(ckpt.shape(k))}, expected {list(want)}")
        if not shared:
            k = f"{prefix}{i}.{n_layers}.weight"
            s = tuple(ckpt.shape(k))
            if len(s) != 2 or s[1] != H or (V is not None and s[0] != V):
                exp = f"[{V if V is not None else 'V'}, {H}]"
                raise ConvertError(f"{label}: '{k}' has shape {list(s)}, expected {exp}")
            V = int(s[0])
    return n_heads, n_layers, H, V, shared


def _config_notes(cfg: dict, n_heads: int, n_layers: int, label: str) -> list[str]:
    notes = []
    c_heads, c_layers = cfg.get("medusa_num_heads"), cfg.get("medusa_num_layers")
    if c_heads is not None and c_heads != n_heads:
        notes.append(f"{label}: config says medusa_num_heads={c_heads}, the tensors hold {n_heads} heads: using {n_heads}")
    if c_layers is not None and c_layers != n_layers:
        notes.append(f"{label}: config says medusa_num_layers={c_layers}, the tensors hold {n_layers}: using {n_layers}")
    return notes


def open_heads(path: Path) -> HeadsSource:
    """Open HEADS (a Medusa-1 dir or file, or a Medusa-2 full checkpoint dir) and validate it."""
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in (".gguf",):
            raise ConvertError(f"{path}: HEADS must be a Hugging Face Medusa checkpoint, not a GGUF")
        heads_dir, files = path.parent, [path]
    else:
        heads_dir = path
        files = None
        for fn in HEADS_FILES:
            if (path / fn).is_file():
                files = [path / fn]
                break
    cfg_path = heads_dir / "config.json"
    cfg = load_json(cfg_path) if cfg_path.is_file() else {}

    if files is not None:
        ckpt = Checkpoint(files)
        names = ckpt.names()
        prefix = MEDUSA2_PREFIX if names and all(n.startswith(MEDUSA2_PREFIX) for n in names) else ""
        label = str(files[0])
        n_heads, n_layers, H, V, shared = _parse_layout(ckpt, names, prefix, label)
        src = HeadsSource(path, ckpt, prefix, n_heads, n_layers, H, V, shared, None, cfg)
        src.notes = _config_notes(cfg, n_heads, n_layers, str(cfg_path))
        if cfg.get("version") == "2" and not shared:
            src.notes.append(f"{cfg_path}: config says version 2 (shared lm_head), but the heads have their own W_out: using it")
        return src

    # a full Medusa-2 checkpoint?
    weights = model_weight_files(path)
    if weights is None:
        raise ConvertError(
            f"{path}: no Medusa heads found (expected {' or '.join(HEADS_FILES[:2])} with config.json, "
            "or a Medusa-2 checkpoint with medusa_head.* tensors)"
        )
    listed = index_names(path)
    if listed is not None and not any(n.startswith(MEDUSA2_PREFIX) for n in listed):
        raise ConvertError(f"{path}: no Medusa heads found: the checkpoint has no medusa_head.* tensors (a plain base model?)")
    ckpt = Checkpoint(weights)
    names = [n for n in ckpt.names() if n.startswith(MEDUSA2_PREFIX)]
    if not names:
        raise ConvertError(f"{path}: no Medusa heads found: the checkpoint has no medusa_head.* tensors (a plain base model?)")
    n_heads, n_layers, H, V, shared = _parse_layout(ckpt, names, MEDUSA2_PREFIX, str(path))
    src = HeadsSource(path, ckpt, MEDUSA2_PREFIX, n_heads, n_layers, H, V, shared, path, cfg)
    src.notes = _config_notes(cfg, n_heads, n_layers, str(cfg_path))
    return src


def warn(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)
