"""The trainer's data: the frozen base continues each prompt, and its hidden states and own next
tokens are cached on disk for the heads to learn from.

The base runs through llama.cpp, the library the engine runs on: ``BaseModel`` gives the
engine's tokenizer, chat format and hidden state (the cross-check), ``BatchedGenerator`` the
multi-sequence batches of llama-cpp-python's low-level API. Each prompt, formatted and tokenized
as the API does at inference (as a user message in the chat format when the GGUF has a chat
template, see ``--chat``), is continued greedily (or sampled with ``--temp``) for
``--gen-tokens`` tokens. ``--parallel`` sequences run at once in one multi-sequence batch, and
the same forward returns every row's hidden state (embeddings on, no pooling). The first
sequence's first row is checked against the engine's own hidden state after its prefill.

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
  with them extends the cache: more data later costs only the new prompts (``training.prompts`` with
  the same seed and a larger ``-n`` gives such a list). Version 1 caches (the prompt hash inside
  the identity) are read and upgraded in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from medusa_edge.core.cache import file_digest
from medusa_edge.training.prompts import prompt_messages, prompt_text

DATA_FORMAT = "medusa-edge-heads-data"
DATA_VERSION = 2


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def base_file_id(path: str) -> dict:
    """Identity of a GGUF file, cheap for multi-GB files (core.cache.file_digest)."""
    size, digest = file_digest(path)
    return {"size": size, "sha256_head_tail": digest}


# -- base model access ---------------------------------------------------------------------------
class BaseModel:
    """The frozen base as the trainer sees it: its tokenizer and chat format (the API's own
    functions), and the engine's hidden state to cross-check the batched generator against."""

    def __init__(self, path: str, n_ctx: int, n_threads: int, n_gpu_layers: int = 0, chat: str = "auto"):
        import llama_cpp  # noqa: F401  (before the engine's native extension: one copy of llama.cpp)

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
            ids = chat_prompt_tokens(self.model, prompt_messages(prompt))
        else:
            ids = prompt_tokens(self.model, prompt_text(prompt))
        if len(ids) > max_tokens:
            ids = ids[-max_tokens:]
        return ids

    def hidden_after_prefill(self, prompt_ids: list[int]) -> np.ndarray:
        """The engine's hidden state at the last prompt position (the data's cross-check)."""
        return self.engine.hidden_state(prompt_ids)


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
        model = self._llm.model  # the llama_model pointer (Llama.model, a public property)
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
