"""The heads in torch: their modules (``build_heads``), targets, loss, held-out evaluation, and
the device and precision they train on. The recipe (targets 2+i ahead, ``decay**i`` weights, soft
targets) is in ``training.train``'s docstring. torch is imported inside the functions that use
it: importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medusa_edge.core.tree import TOP_K

if TYPE_CHECKING:
    from medusa_edge.training.data import RowStore

#: A target outside the draft vocabulary: no loss, a miss in the held-out figures. -100 (torch's
#: ignore_index) marks a position past the end of its sequence, which is neither.
OUT_OF_DRAFT = -2


def _torch():
    import torch

    return torch


def build_heads(n_heads: int, n_layers: int, w_out: np.ndarray, shared_output: bool = False, seed: int = 0,
                w_embd: "np.ndarray | None" = None):
    """Medusa heads as in the reference: ResBlocks (weight zeroed, bias default init) then W_out
    (per head, from the base's output matrix; frozen and shared when ``shared_output``). With
    ``w_embd`` (the base's token embedding [V, H], frozen) the heads have root input (see
    ``schema``): the first ResBlock reads [h; w_embd[root]]. ``forward(h, root)``."""
    torch = _torch()
    nn = torch.nn

    class ResBlock(nn.Module):
        def __init__(self, h, n_in=None):
            super().__init__()
            self.linear = nn.Linear(n_in or h, h)
            nn.init.zeros_(self.linear.weight)
            self.act = nn.SiLU()

        def forward(self, x, extra=None):
            y = self.linear(x if extra is None else torch.cat([x, extra], -1))
            return x + self.act(y)

    class Head(nn.Sequential):
        def forward(self, x, extra=None):
            for j, blk in enumerate(self):
                x = blk(x, extra if j == 0 else None)
            return x

    class MedusaHeads(nn.Module):
        def __init__(self):
            super().__init__()
            V, H = w_out.shape
            self.shared_output = shared_output
            self.root_input = w_embd is not None
            first = 2 * H if self.root_input else H
            self.res = nn.ModuleList([Head(*[ResBlock(H, first if j == 0 else H) for j in range(n_layers)]) for _ in range(n_heads)])
            if self.root_input:
                if w_embd.shape[1] != w_out.shape[1]:  # the output matrix may be a draft vocabulary's rows
                    raise ValueError(f"token embedding is {w_embd.shape}, output matrix {w_out.shape}")
                # not in the state dict: it is the base's, read again from the GGUF
                self.register_buffer("w_embd", torch.tensor(np.asarray(w_embd, dtype=np.float32)), persistent=False)
            w = torch.tensor(np.asarray(w_out, dtype=np.float32))
            if shared_output:
                self.register_buffer("w_shared", w.clone())
                self.out = None
            else:
                self.out = nn.ModuleList([nn.Linear(H, V, bias=False) for _ in range(n_heads)])
                with torch.no_grad():
                    for o in self.out:
                        o.weight.copy_(w)

        def forward(self, h, root=None):
            """[B, H] (and root tokens [B] with root input) -> [n_heads, B, V] logits."""
            e = None
            if self.root_input:
                if root is None:
                    raise ValueError("root-input heads need the root tokens")
                e = self.w_embd[root]
            if self.out is None:  # one product with the shared matrix for all heads
                x = torch.cat([r(h, e) for r in self.res])
                return (x @ self.w_shared.t()).view(len(self.res), h.shape[0], -1)
            return torch.stack([self.out[i](r(h, e)) for i, r in enumerate(self.res)])

    torch.manual_seed(seed)
    return MedusaHeads()


def make_targets(tokens: np.ndarray, lengths: np.ndarray, n_heads: int) -> np.ndarray:
    """[N, n_heads] int64: head i at row j of a sequence -> tokens[j + 1 + i], -100 past its end."""
    N = len(tokens)
    tgt = np.full((N, n_heads), -100, np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for s, e in zip(starts, ends):
        n = e - s
        for i in range(n_heads):
            k = n - 1 - i  # rows with a target
            if k > 0:
                tgt[s : s + k, i] = tokens[s + 1 + i : e]
    return tgt


def heads_loss(logits, targets, weights, teacher=None, soft: float = 0.0):
    """sum_i weights[i] * loss(head i); also the per-head losses (list of floats).

    loss(head i) = (1 - soft) * CE(head i, the base's token) + soft * CE(head i, the base's
    distribution), where ``teacher[i]`` holds the base's logits at the target positions (rows
    without a target are ignored). ``soft=0`` is the reference's hard-label loss."""
    torch = _torch()
    F = torch.nn.functional
    total = 0.0
    per = []
    for i in range(logits.shape[0]):
        t = targets[:, i]
        m = t >= 0
        t = torch.where(m, t, torch.full_like(t, -100))  # OUT_OF_DRAFT targets are ignored as well
        if bool(m.any()):
            li = F.cross_entropy(logits[i].float(), t, ignore_index=-100) if soft < 1.0 else 0.0
            if soft > 0.0:
                p = torch.softmax(teacher[i][m].float(), -1)
                ls = -(p * torch.log_softmax(logits[i][m].float(), -1)).sum(-1).mean()
                li = (1.0 - soft) * li + soft * ls
        else:
            li = logits[i].sum() * 0.0
        total = total + weights[i] * li
        per.append(float(li.detach()))
    return total, per


@dataclass
class EvalResult:
    loss: float
    per_head_loss: list
    top1: list
    top5: list
    rank_acc: np.ndarray  # [n_heads, TOP_K]: P(target is exactly rank r)
    n_rows: list


def autocast(device: str, precision: str):
    """The training precision as a context: ``bf16`` runs the heads' matrix products in bfloat16
    (fp32 weights and loss), ``fp32`` changes nothing. ``auto`` picks bf16 where the hardware has
    it: on this project's AMX test machine torch's fp32 product of 1024 rows with a 49,152 x 576
    output matrix took 12 s, bf16 0.8 s."""
    import contextlib

    torch = _torch()
    if precision == "auto":
        precision = "bf16" if _has_bf16(device) else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)


def _has_bf16(device: str) -> bool:
    torch = _torch()
    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def evaluate(model, hidden: "RowStore", rows: np.ndarray, targets: np.ndarray, weights, device, batch: int = 1024,
             amp=None, roots: "np.ndarray | None" = None) -> EvalResult:
    """Held-out loss and per-rank accuracies of the heads on ``rows`` (targets[rows] per head;
    ``roots[rows]``, the base's token at each row, for root-input heads)."""
    import contextlib

    torch = _torch()
    amp = amp or contextlib.nullcontext()
    K = targets.shape[1]
    hits = np.zeros((K, TOP_K), np.int64)
    n = np.zeros(K, np.int64)
    n_loss = np.zeros(K, np.int64)
    loss_sum = np.zeros(K)
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            h = torch.from_numpy(hidden.take(rows[s : s + batch])).to(device)
            t = torch.from_numpy(targets[rows[s : s + batch]]).to(device)
            r = None if roots is None else torch.from_numpy(roots[rows[s : s + batch]].astype(np.int64)).to(device)
            with amp:
                logits = model(h, r)
            logits = logits.float()
            k = min(TOP_K, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices  # [K, B, k]
            for i in range(K):
                m = t[:, i] >= 0
                n[i] += int((t[:, i] != -100).sum())  # a target outside the draft vocabulary is a miss
                c = int(m.sum())
                if not c:
                    continue
                n_loss[i] += c
                loss_sum[i] += float(torch.nn.functional.cross_entropy(logits[i][m], t[m, i], reduction="sum"))
                eq = (top[i][m] == t[m, i][:, None]).sum(0).cpu().numpy()
                hits[i, :k] += eq
    model.train()
    nn_ = np.maximum(n, 1)
    rank_acc = hits / nn_[:, None]
    per = (loss_sum / np.maximum(n_loss, 1)).tolist()
    return EvalResult(
        loss=float(sum(w * l for w, l in zip(weights, per))), per_head_loss=per,
        top1=rank_acc[:, 0].tolist(), top5=rank_acc[:, :5].sum(1).tolist(), rank_acc=rank_acc, n_rows=n.tolist(),
    )


def torch_device(name: str) -> str:
    """The torch device for ``--device``: ``auto`` picks cuda, then mps, then cpu; a named one
    torch cannot see is a ValueError."""
    torch = _torch()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: torch sees no MPS device")
    return name

