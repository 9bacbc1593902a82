"""Train Medusa-1 heads for any GGUF base model, on the user's own machine.

    python -m medusa_edge.training.train BASE.gguf --data PROMPTS.jsonl -o BASE.medusa.gguf

Medusa-1 (Cai et al. 2024): the base stays frozen; only the heads learn. Self-distillation:
the base itself, run through the engine (plain decoding, ``tree="chain:0"``), continues every
prompt; its post-final-norm hidden states and its own next tokens are the training data, so
nothing but the user's GGUF and a list of prompts is needed. Head i (0-based) at a position
learns the token 2+i places ahead (the base's own logits give +1), with cross-entropy weighted
``decay**i`` (the paper's lambda_k = 0.8^k); ``--soft-targets W`` moves weight W of each head's
loss onto the base's whole distribution at the target position (``W_out h`` of the cached hidden
state there). Each head is ``W_out_i (x + SiLU(W_i x + b_i))``
(``--layers`` ResBlocks), W_i zero-initialised and W_out_i initialised from the base's output
matrix read from the GGUF (``output.weight``, or ``token_embd.weight`` when tied).

Stages, each cached or checkpointed so a rerun continues where it stopped:

1. **Generate** (llama.cpp through llama-cpp-python, the library the engine runs on): each
   prompt, formatted and tokenized as the API does at inference (as a user message in the chat
   format when the GGUF has a chat template, see ``--chat``), is continued greedily (or sampled
   with ``--temp``) for ``--gen-tokens`` tokens. ``--parallel`` sequences run at once in one
   multi-sequence batch, and the same forward returns every row's hidden state (embeddings on,
   no pooling). The first sequence's first row is checked against the engine's own hidden
   state after its prefill.
2. **Train** (torch, cpu/cuda/mps) on the cached hidden states only: no base forward.
3. **Write** the heads GGUF with ``medusa_edge.heads.writer``, with a default tree grown from
   the held-out per-rank accuracies (as the reference's ``gen_results.py``) to ``--tree-nodes``
   nodes, then (``--measure``) decode a few held-out prompts with the new heads and report
   the mean tokens per step.

Data cache (``--cache DIR``, default ``<output without .gguf>.data/``), format version 2:

  meta.json          {"format": "medusa-edge-heads-data", "version": 2,
                      "identity": {base file (size, sha256 of its first and last MiB),
                                   base vocab hash / n_embd / n_vocab, generation settings
                                   (gen_tokens, temperature, seed, max_prompt_tokens, chat
                                   template)},
                      "prompts_n": int, "prompts_sha256": sha256 of the first prompts_n prompt texts,
                      "shards": [{"file", "n_sequences", "n_rows"}...], "next_prompt": int,
                      "complete": bool, "max_hidden_check_diff": float, "base_path": str}
  shard-NNNNN.npy    float16 [n_rows, n_embd]  post-final-norm hidden states (memory-mapped
                     when training, so the cache may be larger than RAM)
  shard-NNNNN.npz    tokens       int32   [n_rows]          the base's continuation tokens
                     lengths      int32   [n_sequences]     rows per sequence (in order)
                     prompt_index int32   [n_sequences]     line of the prompt in the prompt list
                     prompt_len   int32   [n_sequences]     prompt tokens (not stored)

  Row j of a sequence is the hidden state of the position whose next token (the base's
  choice) is tokens[j]: row 0 is the last prompt token, tokens[0] the first generated token.
  Head i at row j is trained on tokens[j + 1 + i]. A cache whose identity differs from the
  current run (another base, other settings) is refused, and so is a prompt list whose first
  ``prompts_n`` prompts differ from the ones the cache was made from. A longer list that starts
  with them extends the cache: more data later costs only the new prompts (``prompt_gen`` with
  the same seed and a larger ``-n`` gives such a list). Version 1 caches (the prompt hash inside
  the identity) are read and upgraded in place.

Checkpoint: ``<output>.ckpt.pt`` every ``--save-every`` steps (heads, optimizer, schedule,
step, RNG); ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medusa_edge.heads import schema

DATA_FORMAT = "medusa-edge-heads-data"
DATA_VERSION = 2
MAX_RANK = 10  # the engine proposes top-10 per head
OUT_OF_DRAFT = -2  # a target outside the draft vocabulary: no loss, a miss in the held-out figures

EPILOG = """\
example:
  python -m medusa_edge.training.train models/tiny.gguf --data prompts.jsonl \\
      --heads 4 --gen-tokens 128 --steps 2000 -o models/tiny.medusa.gguf
  medusa-edge generate models/tiny.gguf --heads models/tiny.medusa.gguf -p "Hello"

PROMPTS.jsonl: one JSON object per line with a "prompt" or "text" string, or "turns" (a list of
user turns, as in MT-Bench: the first turn is used), or "messages" ([{"role", "content"}...]);
a line may also be a bare JSON string. Use prompts from the domain the heads will serve: they
learn what the base writes after them.
"""


# -- prompts -----------------------------------------------------------------------------------
def load_prompts(path: str) -> list:
    """Prompts from a JSONL file: each a str, or a list of chat messages."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if isinstance(obj, str):
                out.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                out.append(obj["prompt"])
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                out.append(obj["text"])
            elif isinstance(obj, dict) and isinstance(obj.get("turns"), list) and obj["turns"]:
                out.append(str(obj["turns"][0]))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
                out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in obj["messages"]])
            else:
                raise ValueError(f'{path}:{n}: expected a "prompt", "text", "turns" or "messages" field')
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def base_file_id(path: str) -> dict:
    """Identity of a GGUF file, cheap for multi-GB files: size and sha256 of its first and last MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (2 << 20):
            f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return {"size": size, "sha256_head_tail": h.hexdigest()}


# -- base model access ---------------------------------------------------------------------------
class BaseModel:
    """The frozen base as the trainer sees it: its tokenizer and chat format (the API's own
    functions), and the engine's hidden state to cross-check the batched generator against."""

    def __init__(self, path: str, n_ctx: int, n_threads: int, n_gpu_layers: int = 0, chat: str = "auto"):
        import llama_cpp  # before the engine's native extension (one copy of llama.cpp)

        from medusa_edge.core.engine import Engine

        self.path = path
        self.engine = Engine(path, tree="chain:0", n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        self.model = self.engine.model
        self.n_embd = int(self.model.n_embd)
        self.n_vocab = int(self.model.n_vocab)
        self.vocab_hash = f"{self.model.vocab_fingerprint():016x}"
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.template = self._chat_template(chat)

    def _chat_template(self, chat: str) -> bool:
        """Whether prompts are wrapped as a user message in the chat format (as ``Medusa.apply_chat_template``)."""
        try:
            tmpl = self.model.chat_template() or None
        except Exception:
            tmpl = None
        self.template_text = tmpl
        if chat == "off":
            return False
        return chat == "on" or tmpl is not None

    def prompt_tokens(self, prompt, max_tokens: int) -> list[int]:
        """Token ids of a prompt exactly as the API builds them at inference (chat format if
        enabled: the GGUF's template, or the Vicuna format when it has none), keeping the last
        ``max_tokens``."""
        from medusa_edge.api import chat_prompt_tokens, prompt_tokens

        if self.template:
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = chat_prompt_tokens(self.model, msgs)
        else:
            ids = prompt_tokens(self.model, prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt))
        if len(ids) > max_tokens:
            ids = ids[-max_tokens:]
        return ids

    def hidden_after_prefill(self, prompt_ids: list[int]) -> np.ndarray:
        """The engine's hidden state at the last prompt position (the data's cross-check)."""
        self.engine.ctx.truncate(0)
        self.engine.ctx.prefill(list(prompt_ids), 0)
        h = np.array(self.engine.ctx.hidden(0), dtype=np.float32)
        self.engine.ctx.truncate(0)
        return h


class BatchedGenerator:
    """Continues many prompts at once through llama.cpp's multi-sequence batches (continuous
    batching): up to ``n_parallel`` sequences, each in its own KV sequence (``kv_unified`` off,
    so a token attends only its own sequence's cells); every decode carries one token of each
    running sequence plus the prompt tokens of sequences being started. The same forward
    returns each row's logits (the next token) and post-final-norm hidden state (the training
    input), so no second pass over the text is needed.

    Batched rows are not bit-identical to one-token decodes (other matmul shapes), so a greedy
    continuation can differ from the engine's at near-ties; for training data that is harmless.
    """

    def __init__(self, path: str, n_parallel: int, n_ctx_seq: int, n_threads: int, n_gpu_layers: int = 0,
                 n_batch: int = 512):
        import llama_cpp as lc

        from medusa_edge.guards.hw import llama_cpp_llama

        self._lc = lc
        # the Llama object owns the model (loaded with the AMX guard); its own context stays tiny
        self._llm = llama_cpp_llama(path, n_ctx=64, n_batch=64, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                    verbose=False)
        self.n_parallel = max(1, min(int(n_parallel), int(lc.llama_max_parallel_sequences())))
        self.n_batch = max(int(n_batch), self.n_parallel)
        self.n_ctx_seq = int(n_ctx_seq)
        p = lc.llama_context_default_params()
        p.n_ctx = self.n_parallel * self.n_ctx_seq
        p.n_batch = p.n_ubatch = self.n_batch
        p.n_seq_max = self.n_parallel
        p.n_threads = p.n_threads_batch = int(n_threads)
        p.embeddings = True
        p.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        p.kv_unified = False
        model = self._llm._model.model
        self._ctx = lc.llama_init_from_model(model, p)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a {p.n_ctx}-cell context for batched generation")
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(lc.llama_model_n_embd(model))
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._ctx = None

    def __del__(self):
        self.close()

    def _choose(self, logits: np.ndarray, temperature: float, rng) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        z = np.exp(z - z.max())
        return int(rng.choice(len(z), p=z / z.sum()))

    def run(self, jobs, gen_tokens: int, temperature: float = 0.0, seed: int = 0):
        """Yields ``(key, out, hidden)`` for each ``(key, prompt_ids)`` of ``jobs`` as it finishes
        (not in order): ``out`` the continuation (at most ``gen_tokens``, ending at the first
        end-of-generation token, which is kept), ``hidden`` float32 [len(out), n_embd] where row j
        is the state whose next token is out[j] (row 0: the last prompt position)."""
        lc = self._lc
        mem = lc.llama_get_memory(self._ctx)
        jobs = iter(jobs)
        slots: list = [None] * self.n_parallel
        exhausted = False
        b = self._batch
        while True:
            for s in range(self.n_parallel):  # fill free slots
                if slots[s] is None and not exhausted:
                    nxt = next(jobs, None)
                    if nxt is None:
                        exhausted = True
                        break
                    key, ids = nxt
                    if not 1 <= len(ids) < self.n_ctx_seq - 1:
                        raise ValueError(f"prompt {key}: {len(ids)} tokens, the limit is {self.n_ctx_seq - 2}")
                    lc.llama_memory_seq_rm(mem, s, -1, -1)
                    slots[s] = {"key": key, "pending": list(ids), "pos": 0, "out": [], "hid": [],
                                "rng": np.random.default_rng((seed + int(key)) & 0xFFFFFFFF) if temperature > 0 else None}
            if all(x is None for x in slots):
                return
            # one batch: a token for every running sequence, then prompt tokens while room is left
            n = 0
            rows = []  # (slot, batch index) of the rows whose logits are read
            for s, st in enumerate(slots):
                if st is not None and not st["pending"]:
                    n = self._add(b, n, st["out"][-1], st["pos"], s, True)
                    rows.append((s, n - 1))
                    st["pos"] += 1
            for s, st in enumerate(slots):
                if st is not None and st["pending"] and n < self.n_batch:
                    take = st["pending"][: self.n_batch - n]
                    st["pending"] = st["pending"][len(take):]
                    for i, t in enumerate(take):
                        last = i == len(take) - 1 and not st["pending"]
                        n = self._add(b, n, t, st["pos"], s, last)
                        st["pos"] += 1
                    if not st["pending"]:
                        rows.append((s, n - 1))
            b.n_tokens = n
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) during batched generation")
            for s, i in rows:
                st = slots[s]
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                hid = np.ctypeslib.as_array(lc.llama_get_embeddings_ith(self._ctx, i), shape=(self.n_embd,))
                st["hid"].append(np.array(hid, np.float32))
                tok = self._choose(logits, temperature, st["rng"])
                st["out"].append(tok)
                if len(st["out"]) >= gen_tokens or lc.llama_vocab_is_eog(self._vocab, tok) or st["pos"] >= self.n_ctx_seq - 1:
                    yield st["key"], st["out"], np.stack(st["hid"])
                    slots[s] = None
                    lc.llama_memory_seq_rm(mem, s, -1, -1)

    @staticmethod
    def _add(b, n: int, token: int, pos: int, seq: int, logits: bool) -> int:
        b.token[n] = token
        b.pos[n] = pos
        b.n_seq_id[n] = 1
        b.seq_id[n][0] = seq
        b.logits[n] = logits
        return n + 1


def read_output_matrix(path: str, embedding: bool = False) -> np.ndarray:
    """The base's output matrix [n_vocab, n_embd] float32 from the GGUF (token_embd if tied), or
    with ``embedding`` its token embedding (token_embd), dequantized as llama.cpp reads them."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    by_name = {t.name: t for t in reader.tensors}
    t = by_name.get("token_embd.weight") if embedding else by_name.get("output.weight") or by_name.get("token_embd.weight")
    if t is None:
        raise ValueError(f"{path}: " + ("no token_embd.weight" if embedding else "neither output.weight nor token_embd.weight") + " found")
    T = gguf.GGMLQuantizationType
    if t.tensor_type in (T.F32, T.F16, T.BF16) and t.tensor_type != T.BF16:
        w = np.asarray(t.data, dtype=np.float32)
    else:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    n_embd, n_vocab = int(t.shape[0]), int(t.shape[1])
    return w.reshape(n_vocab, n_embd)


# -- data cache ----------------------------------------------------------------------------------
class DataCache:
    """Shards of (hidden, tokens) per sequence under one directory; see the module docstring."""

    def __init__(self, directory: str, identity: dict):
        self.dir = directory
        self.identity = identity
        self.meta_path = os.path.join(directory, "meta.json")
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                self.meta = json.load(f)
            if self.meta.get("format") != DATA_FORMAT or self.meta.get("version") not in (1, DATA_VERSION):
                raise ValueError(f"{directory}: not a medusa-edge heads data cache (format version {DATA_VERSION})")
            if self.meta["version"] == 1:  # the prompts' hash moves out of the identity
                old = self.meta.get("identity", {})
                self.meta["prompts_n"] = int(old.pop("n_prompts", 0))
                self.meta["prompts_sha256"] = old.pop("prompts_sha256", _sha256_json([]))
                self.meta["version"] = DATA_VERSION
            if self.meta.get("identity") != identity:
                diff = sorted(k for k in set(identity) | set(self.meta.get("identity", {}))
                              if identity.get(k) != self.meta.get("identity", {}).get(k))
                raise ValueError(
                    f"data cache {directory} was made for another base model or other settings "
                    f"(differs in: {', '.join(diff)}); delete it or pass another --cache directory"
                )
        else:
            os.makedirs(directory, exist_ok=True)
            self.meta = {"format": DATA_FORMAT, "version": DATA_VERSION, "identity": identity, "shards": [], "complete": False,
                         "prompts_n": 0, "prompts_sha256": _sha256_json([])}
            self._save_meta()

    def use_prompts(self, prompts: list) -> int:
        """Check that ``prompts`` starts with the prompts this cache was made from; a longer list
        reopens a complete cache to extend it. Returns the number of prompts still to generate."""
        n = int(self.meta.get("prompts_n", 0))
        if len(prompts) < n or _sha256_json(prompts[:n]) != self.meta.get("prompts_sha256"):
            raise ValueError(
                f"data cache {self.dir} was made from other prompts (its first {n} differ from the first of the "
                f"{len(prompts)} given); delete it, pass another --cache directory, or give a list that starts with them"
            )
        if self.complete and len(prompts) > self.n_done:
            self.meta["complete"] = False
            self._save_meta()
        return max(len(prompts) - self.n_done, 0)

    def _save_meta(self):
        tmp = self.meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
        os.replace(tmp, self.meta_path)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def n_done(self) -> int:
        """Prompts already processed (those whose continuation was too short are skipped)."""
        return int(self.meta.get("next_prompt", 0))

    def add_shard(self, hidden: list, tokens: list, prompt_index: list, prompt_len: list, next_prompt: int,
                  prompts_sha256: str):
        name = f"shard-{len(self.meta['shards']):05d}"
        path = os.path.join(self.dir, name)
        np.save(path + ".tmp.npy", np.concatenate(hidden).astype(np.float16))
        np.savez(
            path + ".tmp.npz", tokens=np.concatenate(tokens).astype(np.int32),
            lengths=np.array([len(t) for t in tokens], np.int32), prompt_index=np.array(prompt_index, np.int32),
            prompt_len=np.array(prompt_len, np.int32),
        )
        os.replace(path + ".tmp.npy", path + ".npy")
        os.replace(path + ".tmp.npz", path + ".npz")
        self.meta["shards"].append({"file": name, "n_sequences": len(tokens), "n_rows": int(sum(len(t) for t in tokens))})
        self.advance(next_prompt, prompts_sha256)

    def advance(self, next_prompt: int, prompts_sha256: str):
        """Prompts before ``next_prompt`` (whose texts hash to ``prompts_sha256``) are done."""
        self.meta["next_prompt"] = self.meta["prompts_n"] = int(next_prompt)
        self.meta["prompts_sha256"] = prompts_sha256
        self._save_meta()

    def finish(self, **extra):
        self.meta["complete"] = True
        self.meta.update(extra)
        self._save_meta()

    def load(self):
        """hidden (a RowStore over the memory-mapped shards), tokens [N] int32, lengths [S], prompt_index [S]."""
        if not self.meta["shards"]:
            raise ValueError(f"data cache {self.dir} holds no sequences")
        base = [os.path.join(self.dir, s["file"]) for s in self.meta["shards"]]
        parts = [np.load(b + ".npz") for b in base]
        cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
        hidden = RowStore([np.load(b + ".npy", mmap_mode="r") for b in base])
        return hidden, cat("tokens"), cat("lengths"), cat("prompt_index")


class RowStore:
    """Rows of several [n_i, H] arrays (memory-mapped shards) seen as one [N, H] array."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), int(arrays[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), H] (rows in any order)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(shard):
            m = shard == k
            out[m] = self.arrays[k][rows[m] - self.starts[k]]
        return out


def generate_data(base: BaseModel, prompts: list, cache: DataCache, *, gen_tokens: int, temperature: float, seed: int,
                  max_prompt_tokens: int, n_parallel: int = 32, shard_size: int = 64, log=print, progress: bool = True) -> None:
    """Continue every prompt with the base, ``n_parallel`` at a time, and cache the hidden states.

    Sequences finish out of order; a shard is written once the prompts before it are all done,
    so ``next_prompt`` is a watermark and a rerun resumes after the last shard written."""
    from tqdm import tqdm

    start = cache.n_done
    if cache.complete or start >= len(prompts):
        if not cache.complete:
            cache.finish()
        return
    if start:
        log(f"data: resuming at prompt {start} of {len(prompts)} ({cache.dir})")
    max_diff = float(cache.meta.get("max_hidden_check_diff", 0.0))
    ids_of = {}

    def jobs():
        for i in range(start, len(prompts)):
            ids_of[i] = base.prompt_tokens(prompts[i], max_prompt_tokens)
            yield i, ids_of[i]

    gen = BatchedGenerator(base.path, n_parallel, max_prompt_tokens + gen_tokens + 2, base.n_threads, base.n_gpu_layers)
    done: dict = {}
    nxt = start  # the watermark: prompts before it are written
    n_tok = 0
    checked = False
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=start, desc="generating", unit="prompt", dynamic_ncols=True, disable=not progress)
    try:
        for idx, out, hid in gen.run(jobs(), gen_tokens, temperature, seed):
            if not checked:  # one llama.cpp: the batched row 0 is the engine's hidden state
                h0 = base.hidden_after_prefill(ids_of[idx])
                diff = float(np.abs(hid[0] - h0).max()) / max(float(np.abs(h0).max()), 1e-6)
                max_diff = max(max_diff, diff)
                checked = True
                if diff > 5e-2:
                    raise RuntimeError(
                        f"hidden states from llama-cpp-python differ from the engine's (relative {diff:.3g}) "
                        f"on prompt {idx}: the two do not run the same llama.cpp"
                    )
            done[idx] = (out, hid)
            n_tok += len(out)
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}")
            while True:  # write every full run of finished prompts from the watermark on
                end = nxt
                while end in done and end - nxt < shard_size:
                    end += 1
                if end == nxt or (end - nxt < shard_size and end < len(prompts)):
                    break
                buf = [(i, *done.pop(i)) for i in range(nxt, end)]
                keep = [(i, o, h) for i, o, h in buf if len(o) >= 2]
                if keep:
                    cache.meta["max_hidden_check_diff"] = max_diff
                    cache.add_shard([h for _, _, h in keep], [np.array(o, np.int32) for _, o, _ in keep],
                                    [i for i, _, _ in keep], [len(ids_of[i]) for i, _, _ in keep], end,
                                    _sha256_json(prompts[:end]))
                else:
                    cache.advance(end, _sha256_json(prompts[:end]))
                for i in range(nxt, end):
                    ids_of.pop(i, None)
                nxt = end
    finally:
        bar.close()
        gen.close()
    cache.meta["generation_tok_s"] = round(n_tok / max(time.perf_counter() - t0, 1e-9), 1)
    cache.finish(max_hidden_check_diff=max_diff, next_prompt=len(prompts), prompts_n=len(prompts),
                 prompts_sha256=_sha256_json(prompts))


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
    rank_acc: np.ndarray  # [n_heads, MAX_RANK]: P(target is exactly rank r)
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
    hits = np.zeros((K, MAX_RANK), np.int64)
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
            k = min(MAX_RANK, logits.shape[-1])
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


# -- tree from accuracies --------------------------------------------------------------------------
def grow_tree(rank_acc: np.ndarray, n_nodes: int, max_children: int = MAX_RANK) -> list[tuple]:
    """The reference's greedy tree growth (``medusa/eval/gen_results.py``): start from the root,
    repeatedly add the candidate node (next sibling or first child of a node in the tree) with
    the largest expected acceptance, prod of ``rank_acc[depth, rank]`` along its path, until the
    tree holds ``n_nodes`` nodes (root included). Returns the paths (root excluded)."""
    K = rank_acc.shape[0]
    if n_nodes <= 1 or K == 0:
        return []

    def value(p):
        return float(np.prod([rank_acc[d, r] for d, r in enumerate(p)]))

    paths: list[tuple] = []
    cands = {(0,)}
    while len(paths) < n_nodes - 1 and cands:
        best = max(sorted(cands), key=value)
        cands.discard(best)
        paths.append(best)
        if best[-1] + 1 < min(max_children, rank_acc.shape[1]):
            cands.add(best[:-1] + (best[-1] + 1,))
        if len(best) < K:
            cands.add(best + (0,))
    return sorted(paths, key=lambda p: (len(p), p))


def expected_tokens_per_step(rank_acc: np.ndarray, paths: Sequence[Sequence[int]]) -> float:
    """1 + sum over nodes of the product of per-rank accuracies along the path (the same
    independence approximation the reference uses to grow its trees)."""
    return 1.0 + sum(float(np.prod([rank_acc[d, r] for d, r in enumerate(p)])) for p in paths)


# -- the command ------------------------------------------------------------------------------------
def _device(name: str) -> str:
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medusa_edge.training.train",
        description="Train Medusa-1 heads for a GGUF base model (frozen base, self-distillation through "
        "llama.cpp, heads in torch) and write them as a heads GGUF the engine loads.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", help="the base model GGUF")
    p.add_argument("--data", required=True, help="prompts, JSONL (see below)")
    p.add_argument("-o", "--output", help="heads GGUF to write (default: BASE with .medusa.gguf)")
    g = p.add_argument_group("heads")
    g.add_argument("--heads", type=int, default=4, help="number of heads; head i predicts the token 2+i ahead (default 4: trees deeper than 4 rarely pay)")
    g.add_argument("--layers", type=int, default=1, help="ResBlocks per head (default 1)")
    g.add_argument("--shared-output", action=argparse.BooleanOptionalAction, default=True,
                   help="train only the ResBlocks and reuse the base's output matrix (default; a file of a few MB, "
                   "one product per step for all heads). --no-shared-output gives each head its own matrix, "
                   "initialised from the base's (the reference's layout; on SmolLM2 a 229 MB file)")
    g.add_argument("--root-input", action=argparse.BooleanOptionalAction, default=True,
                   help="each head also reads the embedding of the root token (the base's own next token, known when "
                   "the heads propose): on SmolLM2 first-head top-1 0.296 -> 0.370 at 300 steps (demo/README.md), "
                   "for a 2H x H first ResBlock. Default on; --no-root-input gives the reference's heads "
                   "(schema version 1, readable by older medusa-edge)")
    g.add_argument("--head-type", choices=("f32", "f16", "q8_0"), default="f16", help="tensor type in the GGUF (default f16)")
    g.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="heads score only the N most frequent target tokens of the training data (their output "
                        "product shrinks from n_vocab to N rows); targets outside them are left out of the loss "
                        "and count as misses in the held-out figures (default: the whole vocabulary)")
    g = p.add_argument_group("data (self-distillation)")
    g.add_argument("--gen-tokens", type=int, default=128, help="tokens the base generates per prompt (default 128)")
    g.add_argument("--temp", type=float, default=0.0, help="generation temperature; 0 = greedy (default)")
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="keep the last N tokens of long prompts (default 512)")
    g.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts as a user message in the chat format, as the API's apply_chat_template: "
                   "auto = when the GGUF has a chat template (default); on = also without one (Vicuna format)")
    g.add_argument("--cache", help="data cache directory (default: OUTPUT without .gguf, plus .data)")
    g.add_argument("--parallel", type=int, default=32,
                   help="sequences generated at once in one llama.cpp batch (default 32; 1 = one at a time)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all)")
    g.add_argument("--gpu-layers", type=int, default=0, help="layers of the base to offload during generation")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the training rows)")
    g.add_argument("--epochs", type=float, default=2.0, help="passes over the data when --steps is not given (default 2)")
    g.add_argument("--batch", type=int, default=256, help="positions (hidden states) per step (default 256)")
    g.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate, AdamW (default 3e-3: beat the reference's 1e-3 on SmolLM2, demo/README.md)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps, then cosine (default 0.05)")
    g.add_argument("--decay", type=float, default=0.8, help="head i's loss weight is decay**i (paper: 0.8)")
    g.add_argument("--soft-targets", type=float, default=0.0, metavar="W",
                   help="weight of the distillation term: each head also learns the base's whole distribution at "
                        "its target position (computed from the cached hidden states), 1-W stays on the base's "
                        "token (default 0: the reference's hard labels)")
    g.add_argument("--val-frac", type=float, default=0.1, help="fraction of prompts held out (default 0.1)")
    g.add_argument("--train-frac", type=float, default=1.0,
                   help="train on this share of the training sequences (default 1: all; to see what more data buys)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="torch device (default auto)")
    g.add_argument("--max-eval-rows", type=int, default=20000, help="held-out positions evaluated at most (default 20000)")
    g.add_argument("--eval-every", type=int, default=500, help="held-out evaluation every N steps (default 500)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt.pt")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUTPUT.ckpt.pt after training (default: removed once the heads file is written)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="matrix products in training: auto = bf16 where the CPU (AMX, AVX512-BF16) or GPU has it")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--tree", default="auto",
                   help="default tree stored in the heads file: 'auto' grows one from the held-out accuracies to "
                   "--tree-nodes nodes; or a preset, chain:N or a JSON file of paths")
    g.add_argument("--tree-nodes", type=int, default=8,
                   help="node budget of the auto tree, root included (default 8; small trees suit CPUs)")
    g.add_argument("--measure", type=int, default=8,
                   help="after writing, decode N held-out prompts with the heads and report tokens per step (0: skip)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.heads < 1 or args.layers < 1:
        p.error("--heads and --layers must be >= 1")
    if args.output is None:
        args.output = schema.sidecar_path(args.base)
    return args


def data_identity(args, base: "BaseModel") -> dict:
    """What a data cache's rows depend on (a cache made otherwise is refused)."""
    return {
        "base": base_file_id(args.base),
        "base_vocab_hash": base.vocab_hash, "n_embd": base.n_embd, "n_vocab": base.n_vocab,
        "gen_tokens": args.gen_tokens, "temperature": args.temp, "seed": args.seed,
        "max_prompt_tokens": args.max_prompt_tokens,
        "chat": base.template,
        "chat_template_sha256": hashlib.sha256(base.template_text.encode()).hexdigest() if base.template_text else None,
    }


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    pr = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(pr, 1.0)))


def train(args: argparse.Namespace, log=print) -> dict:
    """Run the three stages; returns the summary dict."""
    torch = _torch()
    from tqdm import tqdm

    if not 0.0 <= args.soft_targets <= 1.0:
        raise ValueError(f"--soft-targets must be between 0 and 1, not {args.soft_targets}")
    t_start = time.perf_counter()
    out_stem = args.output[:-5] if args.output.endswith(".gguf") else args.output
    cache_dir = args.cache or out_stem + ".data"
    ckpt_path = out_stem + ".ckpt.pt"
    prompts = load_prompts(args.data)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    n_threads = args.threads or os.cpu_count() or 1
    n_ctx = args.max_prompt_tokens + args.gen_tokens + 8

    # 1. data
    base = BaseModel(args.base, n_ctx, n_threads, args.gpu_layers, args.chat)
    identity = data_identity(args, base)
    cache = DataCache(cache_dir, identity)
    if cache.use_prompts(prompts) and cache.n_done:
        log(f"data: {cache.n_done} prompts cached in {cache_dir}, {len(prompts) - cache.n_done} more to generate")
    cache.meta.setdefault("base_path", os.path.abspath(args.base))
    t0 = time.perf_counter()
    generate_data(base, prompts, cache, gen_tokens=args.gen_tokens, temperature=args.temp, seed=args.seed,
                  max_prompt_tokens=args.max_prompt_tokens, n_parallel=args.parallel, log=log, progress=not args.quiet)
    t_data = time.perf_counter() - t0
    hidden, tokens, lengths, prompt_index = cache.load()
    log(f"data: {len(lengths)} sequences, {len(tokens)} positions, cache {cache_dir}"
        f" (hidden check vs engine: max rel. diff {cache.meta.get('max_hidden_check_diff', 0):.2g})")

    # split by prompt
    K = args.heads
    targets = make_targets(tokens, lengths, K)
    rng = np.random.default_rng(args.seed)
    S = len(lengths)
    n_val = int(round(args.val_frac * S)) if S >= 2 else 0
    n_val = min(max(n_val, 1 if S >= 2 and args.val_frac > 0 else 0), S - 1) if S >= 2 else 0
    val_seq = np.sort(rng.permutation(S)[:n_val])
    seq_of_row = np.repeat(np.arange(S), lengths)
    val_mask = np.isin(seq_of_row, val_seq)
    train_mask = ~val_mask
    if args.train_frac < 1.0:  # a random share of the training sequences (how results grow with data)
        train_seq = np.setdiff1d(np.arange(S), val_seq)
        keep = rng.permutation(train_seq)[: max(1, int(round(args.train_frac * len(train_seq))))]
        train_mask &= np.isin(seq_of_row, keep)
    train_rows = np.nonzero(train_mask & (targets[:, 0] >= 0))[0]
    val_rows = np.nonzero(val_mask & (targets[:, 0] >= 0))[0]
    if len(train_rows) == 0:
        raise ValueError("no training positions: use more prompts or a larger --gen-tokens")
    if len(val_rows) == 0:
        log("warning: no held-out positions (too few prompts): accuracies are on the training data")
        val_rows = train_rows
    val_prompts = sorted(set(int(prompt_index[s]) for s in val_seq))
    draft, coverage = None, None
    if args.draft_vocab is not None:
        draft, targets, coverage = apply_draft_vocab(tokens, train_mask, targets, val_rows, args.draft_vocab, base.n_vocab)
        log(f"draft vocabulary: the {len(draft)} most frequent training tokens; they hold {coverage:.4f} of the held-out"
            " head targets")

    # 2. train
    device = _device(args.device)
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    w_out = read_output_matrix(args.base)
    if w_out.shape != (base.n_vocab, base.n_embd):
        raise ValueError(f"{args.base}: output matrix is {w_out.shape}, expected {(base.n_vocab, base.n_embd)}")
    if draft is not None:
        w_out = np.ascontiguousarray(w_out[draft])  # the heads' logits are over the draft tokens only
    w_embd = read_output_matrix(args.base, embedding=True) if args.root_input else None
    model = build_heads(K, args.layers, w_out, args.shared_output, args.seed, w_embd).to(device)
    # the base's output matrix, for the soft targets' teacher logits (the heads' own copy when shared)
    w_teacher = None
    if args.soft_targets > 0:
        w_teacher = model.w_shared if args.shared_output else torch.tensor(w_out).to(device)
    del w_out, w_embd
    weights = [args.decay ** i for i in range(K)]
    steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * len(train_rows) / args.batch))
    warmup = int(args.warmup * steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))
    config = {"heads": K, "layers": args.layers, "shared_output": args.shared_output, "root_input": args.root_input, "steps": steps,
              "batch": args.batch, "lr": args.lr, "decay": args.decay, "seed": args.seed, "data": identity,
              "n_prompts": len(prompts),
              "train_frac": args.train_frac}
    if args.soft_targets:  # only then, so checkpoints from before the option still resume
        config["soft_targets"] = args.soft_targets
    if draft is not None:
        config["draft_vocab"] = len(draft)
    step = 0
    perm_rng = np.random.default_rng(args.seed + 1)
    resume_order = None
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["config"] != config:
            raise ValueError(f"checkpoint {ckpt_path} was made with other settings; remove it or rerun without --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step = ck["step"]
        perm_rng.bit_generator.state = ck["rng"]
        resume_order = (ck["order"], ck["pos"])
        log(f"resumed from {ckpt_path} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint {ckpt_path}, starting fresh")

    def save_ckpt():
        tmp = ckpt_path + ".tmp"
        torch.save({"config": config, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "rng": perm_rng.bit_generator.state, "order": order, "pos": pos}, tmp)
        os.replace(tmp, ckpt_path)

    if len(val_rows) > args.max_eval_rows:
        val_rows = np.sort(np.random.default_rng(args.seed + 2).choice(val_rows, args.max_eval_rows, replace=False))
    amp = autocast(device, args.precision)
    first = evaluate(model, hidden, val_rows, targets, weights, device, amp=amp, roots=tokens)
    history = [{"step": step, "top1": [round(a, 4) for a in first.top1]}]
    log(f"held-out before training: loss {first.loss:.4f}, top-1 " + " ".join(f"{a:.3f}" for a in first.top1))
    t1 = time.perf_counter()
    if resume_order is not None:
        order, pos = resume_order
    else:
        order, pos = perm_rng.permutation(train_rows), 0
    losses = []
    bar = tqdm(total=steps, initial=step, desc="training", unit="step", dynamic_ncols=True, disable=args.quiet)
    model.train()
    last_eval = first
    while step < steps:
        if pos + args.batch > len(order):
            order = perm_rng.permutation(train_rows)
            pos = 0
        rows = np.sort(order[pos : pos + args.batch])
        pos += args.batch
        h = torch.from_numpy(hidden.take(rows)).to(device)
        t = torch.from_numpy(targets[rows]).to(device)
        teacher = None
        if w_teacher is not None:  # the base's logits at each head's target position: W_out h[row + 1 + i]
            with torch.no_grad(), amp:
                teacher = [torch.from_numpy(hidden.take(np.where(targets[rows, i] >= 0, rows + 1 + i, rows))).to(device)
                           @ w_teacher.t() for i in range(K)]
        with amp:
            logits = model(h, torch.from_numpy(tokens[rows].astype(np.int64)).to(device))
        loss, per = heads_loss(logits, t, weights, teacher, args.soft_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if step % args.eval_every == 0 and step < steps:
            last_eval = evaluate(model, hidden, val_rows, targets, weights, device, amp=amp, roots=tokens)
            history.append({"step": step, "top1": [round(a, 4) for a in last_eval.top1]})
            bar.write(f"step {step}: held-out loss {last_eval.loss:.4f}, top-1 " + " ".join(f"{a:.3f}" for a in last_eval.top1))
        if step % args.save_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    t_train = time.perf_counter() - t1
    final = evaluate(model, hidden, val_rows, targets, weights, device, amp=amp, roots=tokens)
    history.append({"step": step, "top1": [round(a, 4) for a in final.top1]})
    if not args.keep_checkpoint and os.path.exists(ckpt_path):
        ckpt_note = f"removed ({os.path.getsize(ckpt_path) / 1e6:.0f} MB; --keep-checkpoint keeps it for --resume)"
        os.remove(ckpt_path)
    else:
        ckpt_note = f"{ckpt_path} ({os.path.getsize(ckpt_path) / 1e6:.0f} MB)" if os.path.exists(ckpt_path) else "none"

    # 3. tree + write
    if args.tree == "auto":
        paths = grow_tree(final.rank_acc, args.tree_nodes)
    else:
        from medusa_edge.core.tree import Tree

        paths = [list(p) for p in Tree.resolve(args.tree).paths]
        if paths and max(len(p) for p in paths) > K:
            raise ValueError(f"--tree {args.tree} is deeper than --heads {K}")
    write_model(model, args.output, base, args.layers, args.shared_output, paths, args.head_type, final.rank_acc, draft)
    exp_tps = expected_tokens_per_step(final.rank_acc, paths)

    measured = None
    if args.measure > 0:
        measured = measure_tokens_per_step(base, args.output, [prompts[i] for i in val_prompts[: args.measure]]
                                           or prompts[: args.measure], args, n_threads)
    summary = {
        "output": args.output, "checkpoint": ckpt_note, "cache": cache_dir,
        "cache_mb": round(sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir)) / 1e6, 1),
        "generation_tok_s": cache.meta.get("generation_tok_s"), "precision": args.precision,
        "heads": K, "layers": args.layers, "shared_output": args.shared_output, "root_input": args.root_input,
        "soft_targets": args.soft_targets, "history": history,
        "draft_vocab": None if draft is None else len(draft),
        "draft_coverage": None if coverage is None else round(coverage, 4),
        "sequences": int(S), "positions": int(len(tokens)), "train_positions": int(len(train_rows)),
        "heldout_positions": int(len(val_rows)), "steps": step, "device": device,
        "time_data_s": round(t_data, 2), "time_train_s": round(t_train, 2),
        "time_total_s": round(time.perf_counter() - t_start, 2),
        "loss_first": round(losses[0], 4) if losses else None, "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "heldout_loss_before": round(first.loss, 4), "heldout_loss_after": round(final.loss, 4),
        "heldout_top1": [round(a, 4) for a in final.top1], "heldout_top5": [round(a, 4) for a in final.top5],
        "tree": [list(p) for p in paths], "expected_tokens_per_step": round(exp_tps, 3),
        "measured_tokens_per_step": measured,
    }
    log(format_summary(summary))
    return summary


def apply_draft_vocab(tokens: np.ndarray, train_mask: np.ndarray, targets: np.ndarray, val_rows: np.ndarray, n: int,
                      n_vocab: int):
    """The draft vocabulary (the ``n`` most frequent tokens of the training sequences, ids sorted),
    the targets as draft indices (OUT_OF_DRAFT outside it, -100 kept), and the share of held-out
    targets inside it."""
    from medusa_edge.heads.writer import draft_vocab_from_counts

    if not 1 <= n <= n_vocab:
        raise ValueError(f"--draft-vocab {n}: needs 1 to n_vocab = {n_vocab}")
    if n < MAX_RANK:
        raise ValueError(f"--draft-vocab {n}: needs at least {MAX_RANK} tokens (each head proposes up to {MAX_RANK})")
    draft = draft_vocab_from_counts(np.bincount(tokens[train_mask], minlength=n_vocab), n)
    lut = np.full(n_vocab, OUT_OF_DRAFT, np.int64)
    lut[draft] = np.arange(len(draft))
    mapped = np.where(targets >= 0, lut[np.maximum(targets, 0)], targets)
    held = targets[val_rows]
    coverage = float((mapped[val_rows] >= 0).sum() / max(1, (held >= 0).sum()))
    return draft, mapped, coverage


def write_model(model, path: str, base: BaseModel, n_layers: int, shared_output: bool, paths, head_type: str,
                rank_acc=None, draft=None) -> None:
    from medusa_edge.heads.writer import HeadsMeta, heads_tensors, write_heads_gguf

    res = [[(blk.linear.weight.detach().float().cpu().numpy(), blk.linear.bias.detach().float().cpu().numpy()) for blk in r]
           for r in model.res]
    out = None if shared_output else [o.weight.detach().float().cpu().numpy() for o in model.out]
    meta = HeadsMeta(len(res), n_layers, base.n_embd, base.n_vocab, shared_output, [list(p) for p in paths] or None,
                     base.vocab_hash, None if rank_acc is None else np.asarray(rank_acc).tolist(), model.root_input,
                     None if draft is None else [int(t) for t in draft])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_heads_gguf(path, meta, heads_tensors(res, out), head_type)


def measure_tokens_per_step(base: BaseModel, heads_path: str, prompts: list, args, n_threads: int) -> dict:
    """Greedy decoding of ``prompts`` with the new heads and their default tree: mean tokens per step."""
    from medusa_edge.core.engine import Engine, SamplingParams, Stats

    eng = Engine(args.base, heads_path, n_ctx=base.n_ctx, n_threads=n_threads, n_gpu_layers=args.gpu_layers)
    tok = steps = 0
    for p in prompts:
        st = Stats()
        for _ in eng.generate(base.prompt_tokens(p, args.max_prompt_tokens), SamplingParams(temperature=0.0),
                              args.gen_tokens, stats=st):
            pass
        tok += sum((k + 1) * c for k, c in st.accepted_hist.items())
        steps += st.steps
    return {"prompts": len(prompts), "tree_nodes": eng.tree.n_nodes, "tokens_per_step": round(tok / steps, 3) if steps else 0.0}


def format_summary(s: dict) -> str:
    lines = [
        "",
        "== Medusa heads training: summary ==",
        f"heads file       {s['output']}",
        f"data             {s['sequences']} sequences, {s['positions']} positions "
        f"({s['train_positions']} train / {s['heldout_positions']} held-out)",
        f"data cache       {s['cache']} ({s['cache_mb']} MB; delete it when done, keep it to train again)"
        + (f", generated at {s['generation_tok_s']} tokens/s" if s.get("generation_tok_s") else ""),
        f"steps            {s['steps']} on {s['device']} (data {s['time_data_s']:.1f} s, training {s['time_train_s']:.1f} s, "
        f"total {s['time_total_s']:.1f} s)",
        f"train loss       {s['loss_first']} -> {s['loss_last']}",
        f"held-out loss    {s['heldout_loss_before']} -> {s['heldout_loss_after']}",
        "held-out top-1   " + "  ".join(f"h{i}:{a:.3f}" for i, a in enumerate(s["heldout_top1"])),
        "held-out top-5   " + "  ".join(f"h{i}:{a:.3f}" for i, a in enumerate(s["heldout_top5"])),
        f"default tree     {len(s['tree']) + 1} nodes {s['tree']}",
        f"expected tokens/step (from accuracies) {s['expected_tokens_per_step']}",
    ]
    if s.get("draft_vocab"):
        lines.insert(-3, f"draft vocabulary {s['draft_vocab']} tokens, {s['draft_coverage']} of the held-out targets")
    if s.get("measured_tokens_per_step"):
        m = s["measured_tokens_per_step"]
        lines.append(f"measured tokens/step {m['tokens_per_step']} (greedy, {m['prompts']} held-out prompts, default tree)")
    lines.append(f"checkpoint       {s['checkpoint']}")
    return "\n".join(lines)


def parse_restrict_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medusa_edge.training.train restrict",
        description="Restrict an existing heads file to a draft vocabulary: the N most frequent tokens of the base's "
                    "answers to PROMPTS (generated as the trainer generates its data, and cached: the cache the heads "
                    "were trained from, with the same prompts and settings, is reused without generating). No "
                    "retraining: the kept rows are the original ones.")
    p.add_argument("heads", help="heads GGUF to restrict")
    p.add_argument("base", help="the base model GGUF")
    p.add_argument("--draft-vocab", type=int, required=True, metavar="N", help="tokens to keep")
    p.add_argument("--data", required=True, help="prompts, JSONL (as for training; never a benchmark's questions)")
    p.add_argument("-o", "--output", required=True, help="heads GGUF to write")
    p.add_argument("--cache", help="data cache directory (default: OUTPUT without .gguf, plus .data)")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--parallel", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def token_counts(args, log=print) -> np.ndarray:
    """[n_vocab] occurrences of each token in the base's answers to ``args.data`` (cached)."""
    prompts = load_prompts(args.data)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    n_threads = args.threads or os.cpu_count() or 1
    base = BaseModel(args.base, args.max_prompt_tokens + args.gen_tokens + 8, n_threads, args.gpu_layers, args.chat)
    out_stem = args.output[:-5] if args.output.endswith(".gguf") else args.output
    cache = DataCache(args.cache or out_stem + ".data", data_identity(args, base))
    cache.use_prompts(prompts)
    generate_data(base, prompts, cache, gen_tokens=args.gen_tokens, temperature=args.temp, seed=args.seed,
                  max_prompt_tokens=args.max_prompt_tokens, n_parallel=args.parallel, log=log, progress=not args.quiet)
    _, tokens, _, _ = cache.load()
    return np.bincount(tokens, minlength=base.n_vocab)


def restrict(args, log=print) -> dict:
    from medusa_edge.heads.writer import draft_vocab_from_counts, restrict_heads_file

    counts = token_counts(args, log)
    draft = draft_vocab_from_counts(counts, args.draft_vocab)
    info = restrict_heads_file(args.heads, args.output, draft)
    share = float(counts[draft].sum() / max(1, counts.sum()))
    log(f"wrote {args.output}: {info['n_draft']} of {info['n_vocab']} tokens, holding {share:.4f} of the "
        f"{int(counts.sum())} tokens of the base's answers")
    return {"output": args.output, "n_draft": info["n_draft"], "coverage": share}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["restrict"]:
            restrict(parse_restrict_args(argv[1:]))
            return 0
        args = parse_args(argv)
        train(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun with --resume to continue (the data cache is kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
