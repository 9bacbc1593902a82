"""Wall time and peak RSS of converting a Vicuna-7B-shaped Medusa head set (5 heads, H 4096,
V 32000, bf16, about 1.5 GB, random values) to a q8_0 heads GGUF with ``python -m convert``.

The fixtures (a random 1-layer GGUF base with H 4096 and a 32000-token vocabulary, and the heads
as a bf16 ``medusa_lm_head.pt`` or ``.safetensors``) are written by child processes, so only the
conversion itself is measured, in its own process (``os.wait4`` gives its peak RSS). The baseline
is a process that imports what the converter imports and stops.

    python bench/convert_rss.py [--format pt|safetensors] [--heads-type q8_0] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_HEADS, H, V = 5, 4096, 32000

MAKE_BASE = """
import sys
from medusa_edge.testing import write_llama_gguf
H, V = int(sys.argv[2]), int(sys.argv[3])
write_llama_gguf(sys.argv[1], n_embd=H, n_layer=1, n_head=32, n_head_kv=32, n_ff=128, vocab_size=V, dtype="q8_0")
"""

MAKE_HEADS = """
import json, sys, torch
from collections import OrderedDict
d, fmt, n, H, V = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
sd = OrderedDict()
for i in range(n):
    sd[f"{i}.0.linear.weight"] = (torch.randn(H, H) / H ** 0.5).to(torch.bfloat16)
    sd[f"{i}.0.linear.bias"] = (0.1 * torch.randn(H)).to(torch.bfloat16)
    sd[f"{i}.1.weight"] = (torch.randn(V, H) / H ** 0.5).to(torch.bfloat16)
cfg = {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "medusa_num_heads": 2, "medusa_num_layers": 1}
json.dump(cfg, open(d + "/config.json", "w"))
if fmt == "pt":
    torch.save(sd, d + "/medusa_lm_head.pt")
else:
    from safetensors.torch import save_file
    save_file(dict(sd), d + "/medusa_lm_head.safetensors")
"""

BASELINE = "import numpy, gguf, torch, tqdm, llama_cpp, medusa_edge._loader, medusa_edge.heads.writer, convert.cli, convert.heads, convert.base"


def run_measured(cmd: list[str], env) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of ``cmd`` in a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, ru.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/medusa_convert_rss")
    ap.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    ap.add_argument("--heads-type", default="q8_0", choices=("f32", "f16", "q8_0"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(wd).free
    if free < 5 << 30:
        print(f"need about 3 GB free in {wd}, have {free / 2**30:.1f} GB", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base, heads, out = wd / "base.gguf", wd / "heads", wd / "out"
    heads.mkdir(exist_ok=True)
    try:
        t = time.perf_counter()
        if not base.exists():
            subprocess.run([sys.executable, "-c", MAKE_BASE, str(base), str(H), str(V)], env=env, check=True)
        fn = heads / f"medusa_lm_head.{args.format}"
        if not fn.exists():
            subprocess.run([sys.executable, "-c", MAKE_HEADS, str(heads), args.format, str(N_HEADS), str(H), str(V)],
                           env=env, check=True)
        print(f"fixtures ready in {time.perf_counter() - t:.1f} s: {fn} {fn.stat().st_size / 1e9:.3f} GB")

        rc0, _, base_rss = run_measured([sys.executable, "-c", BASELINE], env)
        assert rc0 == 0
        cmd = [sys.executable, "-m", "convert", str(base), str(heads), "-o", str(out), "--heads-type", args.heads_type]
        rc, wall, rss = run_measured(cmd, env)
        if rc != 0:
            print(f"conversion failed with exit code {rc}", file=sys.stderr)
            return rc
        produced = out / "base.medusa.gguf"
        result = {
            "heads_file": str(fn.name),
            "heads_bytes": fn.stat().st_size,
            "heads_type": args.heads_type,
            "output_bytes": produced.stat().st_size,
            "wall_s": round(wall, 2),
            "peak_rss_mib": round(rss / 2**20, 1),
            "baseline_rss_mib": round(base_rss / 2**20, 1),
            "peak_above_baseline_mib": round((rss - base_rss) / 2**20, 1),
            "throughput_mb_s": round(fn.stat().st_size / 1e6 / wall, 1),
            "command": " ".join(cmd),
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
