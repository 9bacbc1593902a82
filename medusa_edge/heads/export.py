"""Medusa-1 heads in the layouts the serving engines load (the command: ``medusa-edge export``, cli/export.py).

Layouts (each written to its own subdirectory of OUT_DIR):

``faster-medusa/``  the FasterDecoding/Medusa layout: ``medusa_lm_head.safetensors`` with keys
    ``{i}.{j}.linear.weight`` [H, H], ``{i}.{j}.linear.bias`` [H] (ResBlock j of head i) and
    ``{i}.{L}.weight`` [V, H] (head i's output matrix), plus ``config.json`` with
    ``medusa_num_heads``, ``medusa_num_layers`` and ``base_model_name_or_path``. Read by
    - the reference (``MedusaModel``'s ``medusa_head``: ResBlocks then a Linear per head);
    - TGI: ``text-generation-launcher --model-id DIR`` follows ``base_model_name_or_path`` to the
      base and loads the heads from DIR (config.json must not name ``architectures``: TGI takes
      that key to mean an MLP speculator, so it is never written here);
    - TensorRT-LLM's ``examples/medusa/convert_checkpoint.py --medusa_model_dir DIR``, which
      takes the head and layer counts from its own flags, not from config.json: pass
      ``--num_medusa_heads N --num_medusa_layers L`` with this export's N and L. Its older
      README and ``build.py`` also pass ``--fixed_num_medusa_heads N`` to override a wrong
      ``medusa_num_heads`` in a published config.json; here the config is right, so where that
      flag exists give it N as well (or leave it out).
``vllm/``  vLLM's Medusa draft model (``vllm/model_executor/models/medusa.py``,
    ``vllm/transformers_utils/configs/medusa.py``): ``model.safetensors`` with
    ``blocks.{i}.layers.{j}.weight`` / ``.bias`` and ``lm_heads.{i}.weight``, and ``config.json``
    with ``model_type: medusa``, ``architectures: [MedusaModel]``, ``num_heads``,
    ``num_hidden_layers``, ``hidden_size``, ``vocab_size``, ``truncated_vocab_size``,
    ``medusa_fc_bias: true`` (vLLM's ResBlock has no bias unless told) and ``original_lm_head``.

Output matrices. Heads with their own W_out export it as is. Shared-output heads reuse the base's
output matrix, which the heads file does not hold, so ``base`` (the model GGUF) is required:
- FasterDecoding/TGI/TensorRT-LLM have no sharing: every head gets its own copy (N x V x H
  values in the checkpoint's dtype; the summary states the size);
- vLLM shares one matrix when ``original_lm_head`` is true: one copy, ``lm_heads.0.weight``.
The copy is the base's matrix as llama.cpp reads it (dequantized from the GGUF's type).

Dtype. Matrices are written as float16, bfloat16 or float32; ``auto`` keeps f16 heads as float16
(exact) and writes f32 and q8_0 heads as float32 (exact: a q8_0 value is an f16 scale times an
int8, which float16 would round). Biases stay float32 whatever the dtype (they are tiny, every
loader casts them, and the heads file holds them as f32), so a round trip through the converter
gives back the same heads file.

Root-input heads (this project's extension: the first ResBlock also reads the embedding of the
base's own next token) have a [H, 2H] first block that no serving engine implements; they are
refused with RootInputHeadsError, which says how to train standard heads.

The config.json of both layouts carries a ``medusa_edge`` section (tree, rank accuracies, whether
the output matrix is the base's), which the converter (``python -m convert BASE DIR``) uses to
rebuild the same heads GGUF; the engines ignore it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from medusa_edge.heads import schema
from medusa_edge.errors import MedusaError

LAYOUTS = ("faster-medusa", "vllm")
DTYPES = ("auto", "float16", "bfloat16", "float32")
FASTER_FILE = "medusa_lm_head.safetensors"
VLLM_FILE = "model.safetensors"
#: the section of config.json this project reads back; engines ignore unknown keys
META_KEY = "medusa_edge"
META_FORMAT = 1
#: rows are converted and written in blocks of about this many float32 bytes
BLOCK_BYTES = 32 << 20

_ST_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class ExportError(MedusaError):
    """The heads cannot be exported as asked; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class RootInputHeadsError(ExportError):
    """Root-input heads: no serving engine reads a first ResBlock that also takes e(root)."""

    exit_code = 2


class BaseRequiredError(ExportError):
    """Shared-output heads were given without the base model whose output matrix they reuse."""

    exit_code = 2


# -- reading the heads GGUF ------------------------------------------------------------------------

@dataclass
class HeadsFile:
    path: str
    n_heads: int
    n_layers: int
    n_embd: int
    n_vocab: int
    shared_output: bool
    root_input: bool
    tree: Optional[list]
    rank_accuracy: Optional[list]
    base_vocab_hash: str
    tensors: dict  # schema name -> gguf ReaderTensor

    def matrix_types(self) -> set:
        return {t.tensor_type.name for n, t in self.tensors.items() if not n.endswith(".bias")}

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of tensor ``name`` in torch layout, float32 (dequantized)."""
        return _dequantize_rows(self.tensors[name], r0, r1, self.path)

    def shape(self, name: str) -> tuple:
        return tuple(int(d) for d in reversed(self.tensors[name].shape))


def _dequantize_rows(t, r0: int, r1: int, path: str) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    ne0 = int(t.shape[0])
    n_rows = int(np.prod([int(d) for d in t.shape[1:]], dtype=np.int64)) if len(t.shape) > 1 else 1
    data = np.asarray(t.data)
    try:
        if t.tensor_type in (T.F32, T.F16):
            flat = data.reshape(n_rows, ne0)[r0:r1]
            return np.ascontiguousarray(flat, dtype=np.float32)
        raw = data.reshape(n_rows, -1)[r0:r1]
        return gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32).reshape(r1 - r0, ne0)
    except (ValueError, NotImplementedError) as e:
        raise ExportError(f"{path}: cannot read tensor {t.name} of type {t.tensor_type.name} ({e})") from None


def _open_gguf(path: str, what: str):
    import gguf

    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ExportError(f"{path}: not a GGUF file (the {what} must be a .gguf)")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:
        raise ExportError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def _field(r, key):
    f = r.get_field(key)
    return None if f is None else f.contents()


def read_heads(path: str) -> HeadsFile:
    """Open and validate a heads GGUF (the schema in ``medusa_edge.heads.schema``)."""
    r = _open_gguf(path, "heads file")
    if _field(r, "general.architecture") != schema.ARCH:
        raise ExportError(f"{path}: not a Medusa heads GGUF (general.architecture is "
                          f"{_field(r, 'general.architecture')!r}, expected {schema.ARCH!r})")
    version = _field(r, schema.KEY_SCHEMA_VERSION)
    if version is None or int(version) > schema.SCHEMA_VERSION:
        raise ExportError(f"{path}: heads schema version {version} is not one this medusa-edge reads (<= {schema.SCHEMA_VERSION})")
    if r.get_field(schema.KEY_DRAFT_VOCAB) is not None:  # the serving layouts score every token
        raise ExportError(f"{path}: heads with a draft vocabulary ({schema.KEY_DRAFT_VOCAB}) have no layout in the "
                          "serving engines; export the full-vocabulary heads they were restricted from")
    vals = {}
    for key in (schema.KEY_HEAD_COUNT, schema.KEY_BLOCK_COUNT, schema.KEY_EMBEDDING_LENGTH, schema.KEY_VOCAB_SIZE,
                schema.KEY_SHARED_OUTPUT, schema.KEY_BASE_VOCAB_HASH):
        v = _field(r, key)
        if v is None:
            raise ExportError(f"{path}: heads GGUF lacks {key}")
        vals[key] = v
    tree = rank = None
    try:
        s = _field(r, schema.KEY_TREE)
        tree = json.loads(s) if s else None
        s = _field(r, schema.KEY_RANK_ACCURACY)
        rank = json.loads(s) if s else None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: {schema.KEY_TREE} or {schema.KEY_RANK_ACCURACY} is not valid JSON ({e})") from None
    h = HeadsFile(path, int(vals[schema.KEY_HEAD_COUNT]), int(vals[schema.KEY_BLOCK_COUNT]),
                  int(vals[schema.KEY_EMBEDDING_LENGTH]), int(vals[schema.KEY_VOCAB_SIZE]),
                  bool(vals[schema.KEY_SHARED_OUTPUT]), bool(_field(r, schema.KEY_ROOT_INPUT) or False), tree, rank,
                  str(vals[schema.KEY_BASE_VOCAB_HASH]), {t.name: t for t in r.tensors})
    if h.n_heads < 1 or h.n_layers < 1:
        raise ExportError(f"{path}: {h.n_heads} heads x {h.n_layers} ResBlocks: export needs at least one of each")
    H, V = h.n_embd, h.n_vocab
    for i in range(h.n_heads):
        for j in range(h.n_layers):
            n_in = 2 * H if h.root_input and j == 0 else H
            _expect(h, schema.res_weight(i, j), (H, n_in))
            _expect(h, schema.res_bias(i, j), (H,))
        if not h.shared_output:
            _expect(h, schema.output_weight(i), (V, H))
    return h


def _expect(h: HeadsFile, name: str, shape: tuple) -> None:
    if name not in h.tensors:
        raise ExportError(f"{h.path}: tensor {name} is missing")
    if h.shape(name) != shape:
        raise ExportError(f"{h.path}: tensor {name} has shape {list(h.shape(name))}, expected {list(shape)}")


# -- the base model's output matrix ----------------------------------------------------------------

@dataclass
class BaseMatrix:
    """The base GGUF's output matrix (output.weight, or token_embd.weight when tied), as llama.cpp
    reads it for shared-output heads."""

    path: str
    tensor: object
    n_vocab: int
    n_embd: int
    model_id: Optional[str]

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return _dequantize_rows(self.tensor, r0, r1, self.path)


def open_base_matrix(path: str) -> tuple[BaseMatrix, str]:
    """The output matrix of the model GGUF ``path`` and the hash of its vocabulary."""
    r = _open_gguf(path, "base model")
    if _field(r, "general.architecture") == schema.ARCH:
        raise ExportError(f"{path}: this is a heads GGUF, not the base model GGUF")
    tokens = _field(r, "tokenizer.ggml.tokens")
    if not tokens:
        raise ExportError(f"{path}: GGUF lacks tokenizer.ggml.tokens")
    by_name = {t.name: t for t in r.tensors}
    # the tensor the native loader reuses for shared-output heads: output.weight, else the tied embedding
    t = by_name["output.weight"] if "output.weight" in by_name else by_name.get("token_embd.weight")
    if t is None:
        raise ExportError(f"{path}: neither output.weight nor token_embd.weight found")
    n_embd, n_vocab = (int(d) for d in t.shape[:2])
    return BaseMatrix(path, t, n_vocab, n_embd, _guess_model_id(r)), schema.vocab_hash(tokens)


def read_base_matrix(path: str, heads: HeadsFile) -> BaseMatrix:
    """The output matrix of ``path``, checked to be the model ``heads`` were made for."""
    bm, vhash = open_base_matrix(path)
    if vhash != heads.base_vocab_hash:
        raise ExportError(f"{heads.path}: the heads were made for another vocabulary than the one of {path}")
    if (bm.n_vocab, bm.n_embd) != (heads.n_vocab, heads.n_embd):
        raise ExportError(f"{path}: {bm.tensor.name} has shape [{bm.n_vocab}, {bm.n_embd}], the heads need "
                          f"[{heads.n_vocab}, {heads.n_embd}]")
    return bm


def _guess_model_id(r) -> Optional[str]:
    """A Hugging Face repo id for base_model_name_or_path, from the GGUF's own provenance keys."""
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url",
                "general.source.repo_url"):
        v = _field(r, key)
        if isinstance(v, str) and v.strip():
            v = v.strip()
            for prefix in ("https://huggingface.co/", "http://huggingface.co/", "hf://"):
                if v.startswith(prefix):
                    v = v[len(prefix):]
            if v.count("/") == 1 and " " not in v:
                return v
    return None


# -- dtype rounding (the converter uses the same function to recognise an exported base matrix) -----

def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` (float32) as the checkpoint stores it: float16 and float32 as numpy casts them,
    bfloat16 rounded to nearest even as torch does. Returns the storage array (uint16 for bf16)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    if dtype == "bfloat16":
        u = a.view(np.uint32).astype(np.uint64)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(a)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded
    raise ValueError(f"dtype must be one of {', '.join(DTYPES[1:])}, got {dtype!r}")


def stored_as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """What a reader gets back from ``round_to_dtype(a, dtype)``, as float32."""
    s = round_to_dtype(a, dtype)
    if dtype == "bfloat16":
        return (s.astype(np.uint32) << 16).view(np.float32)
    return s.astype(np.float32)


# -- a streaming safetensors writer ----------------------------------------------------------------

@dataclass
class _Tensor:
    name: str
    shape: tuple  # torch order
    dtype: str  # float16 | bfloat16 | float32
    rows: Callable[[int, int], np.ndarray]  # rows [r0, r1) as float32 (a 1-D tensor: the whole vector)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * (4 if self.dtype == "float32" else 2)


def _write_safetensors(path: str, tensors: Sequence[_Tensor], metadata: dict) -> int:
    """Write ``tensors`` a block of rows at a time; to ``path + '.tmp'``, renamed at the end."""
    header: dict = {"__metadata__": metadata}
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for t in tensors:
                n_rows = t.shape[0] if len(t.shape) > 1 else 1
                row_bytes = 4 * (int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else int(t.shape[0]))
                step = max(1, BLOCK_BYTES // max(row_bytes, 1))
                written = 0
                for r0 in range(0, n_rows, step):
                    r1 = min(n_rows, r0 + step)
                    block = t.rows(r0, r1)
                    want = (r1 - r0, *t.shape[1:]) if len(t.shape) > 1 else tuple(t.shape)
                    if tuple(block.shape) != want:
                        raise ExportError(f"tensor {t.name}: rows {r0}:{r1} have shape {tuple(block.shape)}, expected {want}")
                    data = round_to_dtype(block, t.dtype)
                    f.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
                    written += data.nbytes
                if written != t.nbytes:  # pragma: no cover - defensive
                    raise ExportError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


def _write_json(path: str, data: dict) -> int:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return os.path.getsize(path)


# -- export ----------------------------------------------------------------------------------------

@dataclass
class LayoutResult:
    layout: str
    directory: str
    files: dict  # file name -> bytes
    output_copies: int  # copies of the base's output matrix written (shared-output heads)
    output_copy_bytes: int  # bytes of one such copy
    notes: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def choose_dtype(heads: HeadsFile, dtype: str = "auto") -> str:
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "float16" if heads.matrix_types() == {"F16"} else "float32"


def refuse_root_input(heads: HeadsFile) -> None:
    if heads.root_input:
        raise RootInputHeadsError(
            f"{heads.path}: these heads read the embedding of the base's own next token (root input), which "
            "vLLM, TGI and TensorRT-LLM do not implement, so they cannot be exported. Train standard heads with "
            "`medusa-edge train BASE.gguf --data PROMPTS.jsonl --no-root-input` and export those"
        )


def _meta_section(heads: HeadsFile) -> dict:
    return {"format": META_FORMAT, "shared_output": heads.shared_output, "tree": heads.tree,
            "rank_accuracy": heads.rank_accuracy, "base_vocab_hash": heads.base_vocab_hash}


def export(heads_path: str, out_dir: str, layouts: Sequence[str] = LAYOUTS, base: Optional[str] = None,
           dtype: str = "auto", base_model_id: Optional[str] = None) -> list[LayoutResult]:
    """Write the heads of ``heads_path`` under ``out_dir/<layout>/`` for each of ``layouts``."""
    for lay in layouts:
        if lay not in LAYOUTS:
            raise ExportError(f"unknown layout {lay!r}: use {', '.join(LAYOUTS)} or all")
    heads = read_heads(heads_path)
    refuse_root_input(heads)
    dt = choose_dtype(heads, dtype)
    bm = None
    if heads.shared_output:
        if base is None:
            raise BaseRequiredError(
                f"{heads_path}: these heads reuse the base model's output matrix, which the engines need written "
                f"into the checkpoint ({human_bytes(heads.n_vocab * heads.n_embd * (4 if dt == 'float32' else 2))} per copy "
                "in " + dt + "): pass --base MODEL.gguf, the model the heads were trained on"
            )
        bm = read_base_matrix(base, heads)
    elif base is not None:
        bm = read_base_matrix(base, heads)  # only checked, and a source for base_model_name_or_path
    model_id = base_model_id or (bm.model_id if bm is not None else None)
    notes = []
    if not model_id:
        notes.append("base_model_name_or_path is empty: set it in config.json (or pass --base-model-id) to the "
                     "base model's Hugging Face id or local dir before serving with TGI")
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for lay in layouts:
        d = os.path.join(out_dir, lay)
        os.makedirs(d, exist_ok=True)
        if lay == "faster-medusa":
            results.append(_export_faster(heads, bm, d, dt, model_id or "", list(notes)))
        else:
            results.append(_export_vllm(heads, bm, d, dt, list(notes)))
    return results


def _block_tensors(heads: HeadsFile, dt: str, wname, bname) -> list[_Tensor]:
    out = []
    for i in range(heads.n_heads):
        for j in range(heads.n_layers):
            w, b = schema.res_weight(i, j), schema.res_bias(i, j)
            out.append(_Tensor(wname(i, j), heads.shape(w), dt, lambda r0, r1, w=w: heads.rows(w, r0, r1)))
            out.append(_Tensor(bname(i, j), heads.shape(b), "float32",
                               lambda r0, r1, b=b: heads.rows(b, 0, 1).reshape(-1)))
    return out


def _output_tensor(heads: HeadsFile, bm: Optional[BaseMatrix], i: int, name: str, dt: str) -> _Tensor:
    shape = (heads.n_vocab, heads.n_embd)
    if heads.shared_output:
        return _Tensor(name, shape, dt, bm.rows)
    src = schema.output_weight(i)
    return _Tensor(name, shape, dt, lambda r0, r1: heads.rows(src, r0, r1))


def _export_faster(heads: HeadsFile, bm, d: str, dt: str, model_id: str, notes: list) -> LayoutResult:
    L = heads.n_layers
    tensors = _block_tensors(heads, dt, lambda i, j: f"{i}.{j}.linear.weight", lambda i, j: f"{i}.{j}.linear.bias")
    for i in range(heads.n_heads):  # no engine reading this layout shares an output matrix: one per head
        tensors.append(_output_tensor(heads, bm, i, f"{i}.{L}.weight", dt))
    files = {FASTER_FILE: _write_safetensors(os.path.join(d, FASTER_FILE), tensors, {"format": "pt"})}
    cfg = {
        # the reference's MedusaConfig fields; TGI reads medusa_num_heads/medusa_num_layers and follows
        # base_model_name_or_path. No "architectures" key: TGI would then not load the heads as Medusa.
        "medusa_num_heads": heads.n_heads,
        "medusa_num_layers": L,
        "base_model_name_or_path": model_id,
        "hidden_size": heads.n_embd,
        "vocab_size": heads.n_vocab,
        "torch_dtype": dt,
        META_KEY: _meta_section(heads),
    }
    files["config.json"] = _write_json(os.path.join(d, "config.json"), cfg)
    copies = heads.n_heads if heads.shared_output else 0
    return LayoutResult("faster-medusa", d, files, copies, heads.n_vocab * heads.n_embd * (4 if dt == "float32" else 2), notes)


def _export_vllm(heads: HeadsFile, bm, d: str, dt: str, notes: list) -> LayoutResult:
    tensors = _block_tensors(heads, dt, lambda i, j: f"blocks.{i}.layers.{j}.weight", lambda i, j: f"blocks.{i}.layers.{j}.bias")
    if heads.shared_output:  # vLLM shares one matrix across heads when original_lm_head is set
        tensors.append(_output_tensor(heads, bm, 0, "lm_heads.0.weight", dt))
    else:
        for i in range(heads.n_heads):
            tensors.append(_output_tensor(heads, bm, i, f"lm_heads.{i}.weight", dt))
    files = {VLLM_FILE: _write_safetensors(os.path.join(d, VLLM_FILE), tensors, {"format": "pt"})}
    cfg = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": heads.n_embd,
        "vocab_size": heads.n_vocab,
        "truncated_vocab_size": heads.n_vocab,
        "num_heads": heads.n_heads,
        "num_hidden_layers": heads.n_layers,
        "medusa_fc_bias": True,
        "original_lm_head": heads.shared_output,
        "torch_dtype": dt,
        META_KEY: _meta_section(heads),
    }
    files["config.json"] = _write_json(os.path.join(d, "config.json"), cfg)
    copies = 1 if heads.shared_output else 0
    return LayoutResult("vllm", d, files, copies, heads.n_vocab * heads.n_embd * (4 if dt == "float32" else 2), notes)


def human_bytes(n: int) -> str:
    """A byte count as people read it: 512 B, 1.50 KiB, ..., GiB at most."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    return str(n)
