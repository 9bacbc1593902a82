"""Find, validate and stream Medusa heads from the published layouts (reference section 1).

* Medusa-1 heads dir: ``config.json`` + ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt``;
  keys ``{i}.{j}.linear.weight`` [H,H], ``{i}.{j}.linear.bias`` [H], ``{i}.{L}.weight`` [V,H].
* "version 2" heads: the same without ``{i}.{L}.weight`` (W_out is the base lm_head).
* Medusa-2 full checkpoint: a Llama/Mistral checkpoint plus ``medusa_head.{i}...`` keys.
* vLLM's Medusa draft model: ``config.json`` (``model_type: medusa``) + ``model.safetensors`` with
  ``blocks.{i}.layers.{j}.weight`` [H,H], ``.bias`` [H] (absent unless ``medusa_fc_bias``: read as
  zeros) and ``lm_heads.{i}.weight`` [V,H], or one ``lm_heads.0.weight`` when ``original_lm_head``.

A head set whose output matrices are all the base model's own (vLLM's ``original_lm_head``, or
heads written by ``medusa-edge export`` from shared-output heads) is recognised by
``HeadsSource.match_base_output`` and converted back to shared-output heads.

The head count and ResBlock count come from the tensors, never from config.json (the published
vicuna-7b config says 2 heads where the file holds 5).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from medusa_edge.heads import schema
from medusa_edge.heads.writer import StreamTensor, heads_tensor_type

from .checkpoint import Checkpoint, ConvertError, index_names, load_json, model_weight_files

MEDUSA2_PREFIX = "medusa_head."
HEADS_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt", "medusa_lm_head.bin")
#: the section of config.json that ``medusa-edge export`` writes (see medusa_edge/heads/export.py)
EXPORT_META_KEY = "medusa_edge"

_VLLM_BLOCK = re.compile(r"^(?:medusa_heads\.)?blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_VLLM_HEAD = re.compile(r"^(?:medusa_heads\.)?lm_heads\.(\d+)\.weight$")

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
    # why the output matrices may be the base's own (then match_base_output decides), or None
    shared_hint: Optional[str] = None

    @property
    def exported(self) -> dict:
        """The ``medusa_edge`` section of config.json (tree, rank accuracies) or {}."""
        m = self.config.get(EXPORT_META_KEY)
        return m if isinstance(m, dict) else {}

    def match_base_output(self, base_gguf: Path) -> bool:
        """True when every head's W_out equals the output matrix of ``base_gguf`` (as llama.cpp
        reads it, stored in the checkpoint's dtype): the heads then convert to shared-output heads,
        which reuse that matrix instead of carrying copies. Reads the matrices a block at a time."""
        from medusa_edge.heads.export import ExportError, open_base_matrix, stored_as_float32

        if self.shared_output or self.n_vocab is None:
            return False
        try:
            bm, _ = open_base_matrix(str(base_gguf))
        except ExportError as e:
            raise ConvertError(str(e)) from None
        if (bm.n_vocab, bm.n_embd) != (self.n_vocab, self.n_embd):
            return False
        step = max(1, (32 << 20) // (4 * self.n_embd))
        for i in range(self.n_heads):
            name = self.prefix + f"{i}.{self.n_layers}.weight"
            dt = str(self.ckpt.dtype(name))
            if dt not in ("float16", "bfloat16", "float32"):
                return False
            for r0 in range(0, self.n_vocab, step):
                r1 = min(self.n_vocab, r0 + step)
                if not np.array_equal(self.ckpt.rows(name, r0, r1), stored_as_float32(bm.rows(r0, r1), dt)):
                    return False
        return True

    def use_shared_output(self) -> None:
        """Drop the heads' W_out (after match_base_output): the base's own matrix serves."""
        self.shared_output = True

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

    if files is None and cfg.get("model_type") == "medusa":
        weights = model_weight_files(path)
        if weights is None:
            raise ConvertError(f"{path}: a vLLM Medusa config.json but no model.safetensors or pytorch_model.bin beside it")
        return _open_vllm(path, Checkpoint(weights), cfg, cfg_path)

    if files is not None:
        ckpt = Checkpoint(files)
        names = ckpt.names()
        if names and any(_VLLM_BLOCK.match(n) for n in names):
            return _open_vllm(path, ckpt, cfg, cfg_path)
        prefix = MEDUSA2_PREFIX if names and all(n.startswith(MEDUSA2_PREFIX) for n in names) else ""
        label = str(files[0])
        n_heads, n_layers, H, V, shared = _parse_layout(ckpt, names, prefix, label)
        src = HeadsSource(path, ckpt, prefix, n_heads, n_layers, H, V, shared, None, cfg)
        src.notes = _config_notes(cfg, n_heads, n_layers, str(cfg_path))
        if cfg.get("version") == "2" and not shared:
            src.notes.append(f"{cfg_path}: config says version 2 (shared lm_head), but the heads have their own W_out: using it")
        if src.exported.get("shared_output") is True and not shared:
            src.shared_hint = f"{cfg_path}: written by medusa-edge export from shared-output heads"
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


class _VllmCheckpoint:
    """A vLLM Medusa checkpoint seen under the FasterDecoding key names that ``_parse_layout`` and
    ``HeadsSource`` read: ``alias`` maps those names to the file's; ``zeros`` are biases the file
    lacks (vLLM's ResBlock has none unless ``medusa_fc_bias``), read as zeros."""

    def __init__(self, ckpt: Checkpoint, alias: dict, zeros: dict):
        self.ckpt, self.alias, self.zeros = ckpt, alias, zeros
        self.entries = {k: ckpt.entries[v] for k, v in alias.items()}

    def names(self) -> list[str]:
        return list(self.alias) + list(self.zeros)

    def shape(self, name: str) -> tuple:
        return self.zeros[name] if name in self.zeros else self.ckpt.shape(self.alias[name])

    def dtype(self, name: str) -> str:
        return "float32" if name in self.zeros else self.ckpt.dtype(self.alias[name])

    def file(self, name: str) -> Path:
        return self.ckpt.file(self.alias[name] if name in self.alias else next(iter(self.alias.values())))

    def rows(self, name: str, r0: Optional[int] = None, r1: Optional[int] = None) -> np.ndarray:
        if name in self.zeros:
            return np.zeros(self.zeros[name], np.float32)
        return self.ckpt.rows(self.alias[name], r0, r1)


def _open_vllm(path: Path, ckpt: Checkpoint, cfg: dict, cfg_path: Path) -> HeadsSource:
    """A vLLM Medusa draft model (vllm/model_executor/models/medusa.py's weight names)."""
    label = str(path)
    blocks: dict[int, dict[int, dict[str, str]]] = {}
    heads: dict[int, str] = {}
    for n in ckpt.names():
        m = _VLLM_BLOCK.match(n)
        if m:
            blocks.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = n
            continue
        m = _VLLM_HEAD.match(n)
        if m:
            heads[int(m[1])] = n
            continue
        if n.split(".")[-1] == "token_map":
            raise ConvertError(f"{label}: a vLLM Medusa checkpoint with a token_map (truncated vocabulary) cannot be "
                               "converted: llama.cpp heads predict the whole vocabulary")
        raise ConvertError(f"{label}: unknown key layout: tensor {n!r} is not a vLLM Medusa key "
                           "(expected 'blocks.{i}.layers.{j}.weight', '.bias', 'lm_heads.{i}.weight')")
    if not blocks:
        raise ConvertError(f"{label}: no Medusa head tensors found")
    n_layers = len(blocks.get(0, {}))
    with_bias = any("bias" in parts for layers in blocks.values() for parts in layers.values())
    alias: dict[str, str] = {}
    zeros: dict[str, tuple] = {}
    for i, layers in blocks.items():
        for j, parts in layers.items():
            if "weight" not in parts:
                raise ConvertError(f"{label}: tensor 'blocks.{i}.layers.{j}.weight' is missing")
            alias[f"{i}.{j}.linear.weight"] = parts["weight"]
            if "bias" in parts:
                alias[f"{i}.{j}.linear.bias"] = parts["bias"]
            elif with_bias:
                raise ConvertError(f"{label}: tensor 'blocks.{i}.layers.{j}.bias' is missing (other blocks have one)")
            else:
                zeros[f"{i}.{j}.linear.bias"] = (int(ckpt.shape(parts["weight"])[0]),)
    shared_lm_head = bool(cfg.get("original_lm_head", False))
    if shared_lm_head:
        if 0 not in heads:
            raise ConvertError(f"{label}: config says original_lm_head but tensor 'lm_heads.0.weight' is missing")
        for i in blocks:
            alias[f"{i}.{n_layers}.weight"] = heads[0]
    else:
        for i, n in heads.items():
            alias[f"{i}.{n_layers}.weight"] = n
    view = _VllmCheckpoint(ckpt, alias, zeros)
    n_heads, n_layers, H, V, shared = _parse_layout(view, view.names(), "", label)
    src = HeadsSource(path, view, "", n_heads, n_layers, H, V, shared, None, cfg)
    for key, got in (("num_heads", n_heads), ("num_hidden_layers", n_layers)):
        if cfg.get(key) is not None and cfg[key] != got:
            src.notes.append(f"{cfg_path}: config says {key}={cfg[key]}, the tensors hold {got}: using {got}")
    if shared_lm_head:
        src.shared_hint = f"{cfg_path}: original_lm_head (one output matrix for all heads)"
    elif src.exported.get("shared_output") is True:
        src.shared_hint = f"{cfg_path}: written by medusa-edge export from shared-output heads"
    return src


def warn(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)
