"""Guards for llama.cpp paths known to break: on some machines, or on some files (docs/design.md section 4).

AMX: on Intel CPUs with AMX (Sapphire Rapids and later), llama.cpp 0c1e570 (llama-cpp-python
0.3.36) segfaults in ``ggml_backend_amx_mul_mat`` on the first decode of a quantized model
(llama.cpp issue #20824; llama.cpp PR #16315 also reports wrong results for Q4_0/Q4_1). The AMX weight buffer
is one of llama.cpp's "extra buffer types"; loading with ``use_extra_bufts = false`` avoids it. That
also turns off the CPU repacking buffers (a real speed-up elsewhere), so the guard applies only
where AMX is both compiled into ggml and present in the CPU.

Every model load in this package (engine, trainer, converter check, benchmarks, test baselines)
takes its ``use_extra_bufts`` from :func:`use_extra_bufts` or loads through :func:`llama_cpp_llama`.
``MEDUSA_EDGE_EXTRA_BUFTS=0|1`` overrides the decision (``1`` re-enables the crashing path: tests
use it to show the guard is what keeps the process alive).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from typing import Sequence

ENV_OVERRIDE = "MEDUSA_EDGE_EXTRA_BUFTS"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx() -> bool:
    return "amx_tile" in cpu_flags() and ("amx_int8" in cpu_flags() or "amx_bf16" in cpu_flags())


@functools.lru_cache(maxsize=1)
def ggml_has_amx() -> bool:
    """Whether the loaded ggml CPU backend was compiled with AMX (its system info says AMX_INT8 = 1)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" in info


def use_extra_bufts() -> bool:
    """Whether model loads may use llama.cpp's extra buffer types (weight repacking, AMX)."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if sys.platform.startswith("linux") and cpu_has_amx() and ggml_has_amx():
        return False
    return True


_patch_lock = threading.Lock()


@contextlib.contextmanager
def _guarded_default_params():
    """llama-cpp-python's ``Llama`` takes its model params from ``llama_model_default_params()``
    and exposes no ``use_extra_bufts`` argument: apply the guard to that factory while it loads."""
    import llama_cpp.llama_cpp as C

    with _patch_lock:
        orig = C.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = False
            return p

        C.llama_model_default_params = params
        try:
            yield
        finally:
            C.llama_model_default_params = orig


def llama_cpp_llama(model_path: str, **kwargs):
    """``llama_cpp.Llama(model_path, **kwargs)`` with the guard applied: the llama-cpp-python
    baseline that tests, benchmarks and the trainer compare against."""
    import llama_cpp

    if use_extra_bufts():
        return llama_cpp.Llama(model_path, **kwargs)
    with _guarded_default_params():
        return llama_cpp.Llama(model_path, **kwargs)


def load_model(model_path: str, n_gpu_layers: int = 0, vocab_only: bool = False, checked: bool = False,
               rpc_servers: Sequence[str] = ()):
    """A native ``Model``, the only way this package loads one: the file is first checked for the
    damage llama.cpp aborts on (gguf_file.check_model_file raises ValueError; ``checked=True``
    skips it for a file just checked), then loaded with the AMX guard applied. ``rpc_servers``:
    "host:port" of llama.cpp RPC servers the offloaded layers also split over, already checked
    (core.rpc.check_servers: llama.cpp aborts the process on one that does not answer)."""
    from medusa_edge.guards import gguf_file
    from medusa_edge._loader import native

    if not checked:
        gguf_file.check_model_file(model_path)
    return native.Model(model_path, n_gpu_layers, vocab_only, use_extra_bufts=use_extra_bufts(), rpc_servers=list(rpc_servers))
