"""1,000 generations through one server instance: its resident memory stays where it was after
the first 50 (within 5%), so a long-running local endpoint does not grow."""

import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from test_server import ServerProcess  # noqa: E402 (the same subprocess harness)

N_WARM, N_TOTAL = 50, 1000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_resident_memory_is_flat_over_1000_generations(tmp_path, capsys):
    srv = ServerProcess(tmp_path / "soak.log", "--tree", "heads").wait_ready()
    try:
        prompts = ["What colour is the sky?", "Tell me a story about a fox.", "Name three animals.", "What is 3 plus 4?"]
        t0 = time.perf_counter()
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for i in range(N_TOTAL):
                body = {"model": "any", "max_tokens": 4, "temperature": 0 if i % 2 else 0.7, "seed": i,
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                if i % 5 == 0:
                    body["stream"] = True
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        assert r.status_code == 200
                        for _ in r.iter_lines():
                            pass
                else:
                    r = c.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                if i + 1 == N_WARM:
                    warm = rss_kib(srv.proc.pid)
        end = rss_kib(srv.proc.pid)
        with capsys.disabled():
            print(f"\n[soak] {N_TOTAL} generations in {time.perf_counter() - t0:.1f} s; resident memory "
                  f"{warm / 1024:.1f} MiB after {N_WARM}, {end / 1024:.1f} MiB after {N_TOTAL} ({(end - warm) / warm:+.1%})")
        assert end <= warm * 1.05
    finally:
        srv.stop()
