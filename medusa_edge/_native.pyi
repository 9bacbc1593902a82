"""Types and contracts of medusa_edge._native (native/bindings.cpp), one line per binding.

Import it through medusa_edge._loader (llama_cpp must be loaded first). Errors: ValueError for a bad
argument or file, IndexError for an id or row out of range, RuntimeError for a llama.cpp/ggml failure,
KeyboardInterrupt for Ctrl-C during a decode.
"""

from typing import Optional

import numpy as np
import numpy.typing as npt

def set_verbose(v: bool) -> None:
    """Pass llama.cpp's log through to stderr (errors are always kept for exceptions)."""
def max_parallel_sequences() -> int:
    """The most seq ids a llama.cpp context can hold (the upper bound of Context's n_seq_max)."""
def supports_gpu_offload() -> bool:
    """Whether llama.cpp has a GPU of this machine to offload layers to (RPC servers do not count)."""
def supports_rpc() -> bool:
    """Whether this llama.cpp build has its RPC backend (built with GGML_RPC=on)."""
def rpc_protocol() -> tuple[int, int, int]:
    """(major, minor, patch) of the RPC protocol this llama.cpp speaks: a server must have the same major and a minor no newer."""
def rpc_in_use(endpoint: str) -> bool:
    """Whether a Model or Heads of this process holds RPC endpoint `endpoint` (and so maybe its one connection)."""
def system_info() -> str:
    """llama.cpp's system line: the CPU features and backends it was built with."""
def gguf_metadata(path: str, what: str = "GGUF file") -> dict:
    """A GGUF file's key/values and tensor table (no tensor data); ValueError naming the file for anything unreadable."""

class Model:
    def __init__(self, path: str, n_gpu_layers: int = 0, vocab_only: bool = False, *, use_extra_bufts: bool,
                 rpc_servers: list[str] = ...) -> None:
        """Load a GGUF model with n_gpu_layers offloaded (rpc_servers: "host:port" of llama.cpp RPC servers, whose devices come first in the split, then the local GPUs; each must answer, or llama.cpp aborts); RuntimeError when llama.cpp cannot load it or has no RPC backend."""
    @property
    def rpc_servers(self) -> list[str]:
        """The RPC servers the model was loaded over ([] without)."""
    @property
    def devices(self) -> list[str]:
        """Loaded over RPC: the devices the offloaded layers split over, 'NAME (description)' in llama.cpp's order; [] otherwise."""
    @property
    def output_device(self) -> str:
        """Loaded over RPC: the device of the output layer ('CPU' when not offloaded); '' otherwise."""
    @property
    def n_vocab(self) -> int:
        """Tokens in the vocabulary."""
    @property
    def n_embd(self) -> int:
        """Width of the hidden state the model outputs (what the heads read)."""
    @property
    def n_params(self) -> int:
        """The model's parameter count."""
    @property
    def size_bytes(self) -> int:
        """Bytes of the model's weight tensors."""
    @property
    def is_recurrent(self) -> bool:
        """Whether the architecture is recurrent or hybrid (a Context refuses such a model)."""
    @property
    def bos(self) -> int:
        """The BOS token id, -1 when the vocabulary has none."""
    @property
    def eos(self) -> int:
        """The EOS token id, -1 when the vocabulary has none."""
    @property
    def add_bos(self) -> bool:
        """Whether tokenizing with add_special puts BOS first."""
    def is_eog(self, t: int) -> bool:
        """Whether token `t` ends generation (EOS, EOT and the like)."""
    def vocab_fingerprint(self) -> int:
        """FNV-1a 64 over every token's text plus a NUL: the base fingerprint a heads file records."""
    def meta(self, key: str) -> str:
        """The GGUF metadata value of `key` as a string, '' when absent."""
    def chat_template(self) -> str:
        """The model's default chat template, '' when it has none."""
    def description(self) -> str:
        """llama.cpp's one-line description of the model (architecture, size, weight type)."""
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (add_special: BOS/EOS as the model adds them; parse_special: special-token text becomes special tokens)."""
    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of `token` (special: special tokens as their text); IndexError outside the vocabulary."""

class TreeShape:
    def __init__(self, depth: list[int], seq_sets: list[list[int]]) -> None:
        """A tree's fixed shape: each node's depth and seq ids, node 0 the root carrying every leaf's seq id; ValueError otherwise."""
    @property
    def n_nodes(self) -> int:
        """Nodes in the tree, root included."""
    @property
    def n_leaves(self) -> int:
        """Leaves of the tree: one more than the largest seq id."""

class Context:
    def __init__(self, model: Model, n_ctx: int, n_batch: int, n_threads: int, n_seq_max: int, f32_kv: bool = False,
                 flash_attn: int = -1, n_ubatch: int = 0, n_threads_batch: int = 0, type_k: int = -1, type_v: int = -1,
                 n_outputs_max_per_seq: int = 0) -> None:
        """A context for tree verification (unified KV, n_seq_max seq ids); ValueError for a recurrent, hybrid or encoder-decoder model or a setting out of range."""
    def set_backend_greedy(self, on: bool) -> None:
        """Device-side greedy on every seq id: argmax/argmax_row read llama.cpp's sampled tokens, no raw logits are copied (logits() raises); off copies them again."""
    @property
    def backend_greedy(self) -> bool:
        """Whether device-side greedy is on (set_backend_greedy)."""
    def _logits_buffer_row(self, row: int) -> npt.NDArray[np.float32]:
        """Tests: a copy of llama.cpp's host logits buffer at output row `row`, read without the backend-greedy check."""
    def _poison_logits_buffer(self) -> None:
        """Tests: fill the host logits buffer's rows of the last decode with NaN."""
    @property
    def type_k(self) -> int:
        """The ggml type of the KV cache's keys."""
    @property
    def type_v(self) -> int:
        """The ggml type of the KV cache's values."""
    def synchronize(self) -> None:
        """Wait, with the GIL released, until the backend has finished the last decode."""
    @property
    def n_ubatch(self) -> int:
        """The micro-batch size: llama.cpp computes a decode in pieces of at most this many tokens."""
    @property
    def n_ctx(self) -> int:
        """KV cells of the context (llama.cpp may round the requested size up)."""
    @property
    def flash_attn(self) -> bool:
        """Whether attention runs as flash attention (auto resolved)."""
    @property
    def epoch(self) -> int:
        """A counter that every call changing the KV cache bumps (prefill, decode_tree, commit, truncate)."""
    @property
    def n_batch(self) -> int:
        """The most tokens one decode takes."""
    @property
    def n_seq_max(self) -> int:
        """Seq ids the context holds: the most leaves a tree may have."""
    @property
    def n_threads(self) -> int:
        """Threads of one-token decodes."""
    @property
    def n_threads_batch(self) -> int:
        """Threads of decodes of more than one token."""
    def set_threads(self, n_threads: int, n_threads_batch: int) -> None:
        """Threads of one-token and of larger decodes from the next decode on (each at least 1)."""
    def prefill(self, tokens: list[int], n_past: int, hidden: bool = True) -> None:
        """Decode `tokens` at positions n_past.. on every seq id, the last one output row 0 (hidden: its hidden state readable)."""
    def decode_tree(self, tree: TreeShape, tokens: npt.ArrayLike, n_past: int) -> None:
        """Decode one tree: node i (tokens[i]) at n_past + depth[i] on its seq ids, node i output row i; ValueError when it does not fit."""
    def commit(self, tree: TreeShape, path: list[int], n_past: int) -> None:
        """Keep the accepted `path` (node indices, root first) at positions n_past.. on every seq id, and nothing else beyond n_past."""
    def truncate(self, pos: int) -> None:
        """Drop every KV cell at positions >= pos, in every sequence."""
    def cache_pos_max(self, seq: int) -> int:
        """The largest position sequence `seq` holds in the KV cache, -1 when it holds none."""
    def argmax(self, n_rows: int) -> npt.NDArray[np.int32]:
        """int32 [n_rows]: the argmax of output rows 0..n_rows-1 of the last decode, the lowest id on ties."""
    def argmax_row(self, row: int) -> int:
        """The argmax of output row `row`, the lowest id on ties."""
    def logits(self, row: int) -> npt.NDArray[np.float32]:
        """float32 [n_vocab]: a copy of output row `row`'s logits; RuntimeError while device-side greedy is on."""
    def hidden(self, row: int) -> npt.NDArray[np.float32]:
        """float32 [n_embd]: a copy of output row `row`'s hidden state; RuntimeError for a decode without embeddings."""
    def perf(self) -> dict:
        """llama_perf_context's counters: evals, their ms, and n_reused (decodes that reused the previous compute graph)."""

class Sampler:
    def __init__(self, n_vocab: int, seed: int, temp: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                 penalty_last_n: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0, typical_p: float = 1.0,
                 *, model: Optional[Model] = None, grammar: str = "", grammar_root: str = "root",
                 logit_bias: list[tuple[int, float]] = ...) -> None:
        """A llama.cpp sampler chain in llama-cpp-python's order (logit bias, penalties, grammar, then greedy or the truncations and dist); ValueError for a bad grammar or bias."""
    def sample(self, ctx: Context, row: int) -> int:
        """Draw a token from output row `row` of ctx's last decode and accept it into the chain; ValueError when the grammar allows no token."""

class Embedder:
    def __init__(self, model: Model, n_batch: int, n_threads: int, flash_attn: int = -1, pooling_type: int = -1) -> None:
        """Embeddings on a llama.cpp context of their own (pooling_type -1: the model's); ValueError for a reranking model or a setting out of range."""
    @property
    def n_batch(self) -> int:
        """The most tokens of one embed() call."""
    @property
    def n_seq_max(self) -> int:
        """The most sequences of one embed() call."""
    @property
    def pooling_type(self) -> int:
        """The llama_pooling_type in use: 0 none, 1 mean, 2 cls, 3 last."""
    def embed(self, seqs: list[list[int]]) -> list[npt.NDArray[np.float32]]:
        """One float32 array per token sequence: [n_tokens, n_embd] without pooling, else [n_embd]; ValueError for too many."""

def heads_metadata(path: str) -> dict:
    """The heads file's metadata as Heads validates it (schema_version, n_heads, n_layers, n_embd, n_vocab, n_draft, shared_output, root_input, draft_vocab or None); ValueError naming the file otherwise."""
def heads_schema_version() -> int:
    """The newest heads schema this build reads."""
class Heads:
    def __init__(self, path: str, model_path: str, n_threads: int, use_gpu: bool = False, top_k: int = 0,
                 output_of: Optional["Model"] = None) -> None:
        """Medusa heads from heads file `path` (and model file `model_path` where they share its tensors), on the first GPU with use_gpu, else the CPU; with `output_of` (a Model loaded over RPC) on its output layer's device; ValueError naming the file for anything invalid. top_k > 0 builds that graph at load."""
    @property
    def n_heads(self) -> int:
        """Heads in the file."""
    @property
    def n_layers(self) -> int:
        """ResBlocks per head."""
    @property
    def n_embd(self) -> int:
        """Width of the hidden state the heads read."""
    @property
    def n_vocab(self) -> int:
        """The base model's vocabulary size."""
    @property
    def shared_output(self) -> bool:
        """Whether the heads share the base model's lm_head."""
    @property
    def root_input(self) -> bool:
        """Whether the first ResBlock reads the root token's embedding too (propose needs `root`)."""
    @property
    def n_draft(self) -> int:
        """Rows the heads score: the draft vocabulary's size, n_vocab without one."""
    @property
    def draft_vocab(self) -> npt.NDArray[np.int32]:
        """The draft vocabulary's full ids (empty without one)."""
    @property
    def stacked_output(self) -> bool:
        """Whether the heads' own output matrices are one stacked tensor (one batched product)."""
    @property
    def backend(self) -> str:
        """The ggml backend the heads run on, with the reason when they fell back to the CPU."""
    @property
    def n_graph_builds(self) -> int:
        """Tests: heads graphs built so far."""
    @property
    def n_uploads(self) -> int:
        """Tests: host-to-device input writes so far, one per pass."""
    @property
    def n_reads(self) -> int:
        """Tests: device-to-host output reads so far, one per pass."""
    @property
    def n_syncs(self) -> int:
        """Tests: waits for the backend so far, one per pass."""
    @property
    def on_fallback(self) -> bool:
        """Whether the heads run on the CPU because the first backend lacked an op of their graph."""
    def propose(self, ctx: Context, row: int, top_k: int, n_heads_used: int = -1, root: int = -1,
                logp: bool = True) -> tuple[npt.NDArray[np.int32], Optional[npt.NDArray[np.float32]]]:
        """(ids [n_used, top_k] best first, log-probs or None without logp) of the heads at output row `row`."""
    def propose_hidden(self, hidden: npt.ArrayLike, top_k: int, n_heads_used: int = -1, root: int = -1,
                       logp: bool = True) -> tuple[npt.NDArray[np.int32], Optional[npt.NDArray[np.float32]]]:
        """propose() for a hidden state given as a vector."""
    def graph_ops(self, top_k: int, n_heads_used: int = -1, logp: bool = True) -> list[str]:
        """The op names of the heads graph of that shape, in order."""
