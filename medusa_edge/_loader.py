"""Load the native extension after llama_cpp, so the process holds one copy of llama.cpp.

llama_cpp's ctypes layer dlopens llama_cpp/lib/libllama.so; the extension's DT_NEEDED entries
(libllama.so.0, libggml*.so.0) then bind by soname to those already-loaded libraries.
"""

import llama_cpp  # noqa: F401  (must come first: see above)

from . import _native as native  # noqa: E402

__all__ = ["native"]
