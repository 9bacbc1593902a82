"""The extension shares llama-cpp-python's llama.cpp: one copy of each library in the process."""

import re
import subprocess
import sys


def test_one_llama_cpp_in_the_process(models):
    code = (
        "import re; from medusa_edge import Engine; "
        f"e = Engine({models['f32'].path!r}, tree='chain:0', n_ctx=256); "
        "import llama_cpp; m = open('/proc/self/maps').read(); "
        "print('\\n'.join(sorted(set(re.findall(r'(/\\S*/lib(?:llama|ggml(?:-base)?)\\.so\\S*)', m)))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    names = {re.sub(r"\.so.*", "", p.rsplit("/", 1)[1]) for p in out}
    assert names == {"libllama", "libggml", "libggml-base"}, out
    assert len(out) == 3, f"more than one copy loaded: {out}"
    assert all("/llama_cpp/lib/" in p for p in out)
