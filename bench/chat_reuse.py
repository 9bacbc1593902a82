"""The 5th turn of a chat: time to first token and generation tokens/s with KV prefix reuse
against a cold cache, interleaved, median of 4.

    .venv/bin/python bench/chat_reuse.py [MODEL.gguf]"""
import sys, time, statistics
from medusa_edge import Medusa
path = sys.argv[1] if len(sys.argv) > 1 else None
llm = Medusa(path, n_ctx=4096, n_threads=2)
qs = ["Explain how a rainbow forms.", "Now explain it to a five year old.", "What colours are in it?",
      "Why is the sky blue?", "Write a short poem about both."]
msgs = [{"role": "system", "content": "You are a helpful assistant."}]
for q in qs[:4]:
    msgs.append({"role": "user", "content": q})
    r = llm.create_chat_completion(msgs, max_tokens=96, temperature=0)
    msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
msgs.append({"role": "user", "content": qs[4]})
prefix = msgs[:-1]
res = {"reuse": [], "cold": []}
for rep in range(4):
    for mode in ("reuse", "cold"):
        # put the first four turns in the cache as a chat would have, then ask turn 5
        llm.engine.ctx.truncate(0)
        llm.create_chat_completion(msgs[:-2], max_tokens=96, temperature=0)  # turn 4, as the chat ran it
        if mode == "cold":
            llm.engine.ctx.truncate(0)
        t0 = time.perf_counter(); first = None; n = 0
        for c in llm.create_chat_completion(msgs, max_tokens=64, temperature=0, stream=True):
            if first is None and c["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            last = c
        total = time.perf_counter() - t0
        m = last["medusa"]
        res[mode].append((first, m["tokens_per_second"], m["prompt_tokens"], m["prompt_tokens_reused"], total))
for mode, rows in res.items():
    print(mode, "TTFT median %.3f s" % statistics.median(r[0] for r in rows),
          "gen tok/s median %.1f" % statistics.median(r[1] for r in rows),
          "prompt %d reused %d" % (rows[-1][2], rows[-1][3]))
