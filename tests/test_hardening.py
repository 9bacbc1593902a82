"""Every CPU, untrusted GGUFs, many callers. The AMX guard, sandboxed chat templates,
no doubled BOS, one instance used from several threads, stale streams, seed chaining."""

import os
import subprocess
import sys
import threading

import pytest

from medusa_edge import Medusa
from medusa_edge.guards import hw as hwguard
from medusa_edge.default_model import demo_model_path
from medusa_edge.errors import BusyError, ChatTemplateError
from medusa_edge.core.exactness import llama_cpp_baseline
from medusa_edge.guards.hw import llama_cpp_llama
from medusa_edge.testing import write_llama_gguf

HAS_AMX = hwguard.cpu_has_amx() and hwguard.ggml_has_amx()

# -- the AMX guard ---------------------------------------------------------------------------------

_DECODE = """
import sys
from medusa_edge import Medusa
from medusa_edge.default_model import demo_model_path
from medusa_edge.core.exactness import llama_cpp_baseline
m = Medusa(demo_model_path(), n_ctx=256, verbose=False)
prompt = 'USER: What colour is the sky?\\nASSISTANT:'
a = m.create_completion(prompt, max_tokens=12, temperature=0)['choices'][0]['text']
b = llama_cpp_baseline(m.engine, n_ctx=256).create_completion(prompt, max_tokens=12, temperature=0)['choices'][0]['text']
print(repr(a), repr(b))
sys.exit(0 if a == b and 'blue' in a else 3)
"""


def _run(code, **env):
    e = dict(os.environ)
    e.pop(hwguard.ENV_OVERRIDE, None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_guard_decision_follows_cpu_and_build(monkeypatch):
    monkeypatch.delenv(hwguard.ENV_OVERRIDE, raising=False)
    assert hwguard.use_extra_bufts() == (not (sys.platform.startswith("linux") and HAS_AMX))
    monkeypatch.setenv(hwguard.ENV_OVERRIDE, "1")
    assert hwguard.use_extra_bufts()
    monkeypatch.setenv(hwguard.ENV_OVERRIDE, "0")
    assert not hwguard.use_extra_bufts()


def test_quantized_model_decodes_with_engine_and_llama_cpp_python():
    """The Q8_0 demo model through the engine and through the guarded llama-cpp-python baseline.
    On a CPU with AMX this process dies (SIGILL/SIGSEGV in ggml_backend_amx_mul_mat) unless the guard
    holds; on other CPUs it is a plain decode check."""
    p = _run(_DECODE)
    assert p.returncode == 0, f"rc={p.returncode} (AMX CPU: {HAS_AMX})\n{p.stdout}\n{p.stderr[-2000:]}"


@pytest.mark.skipif(not HAS_AMX, reason="needs a CPU with AMX and a ggml built with it")
def test_upstream_amx_bug_still_present_canary():
    """Canary: with the guard forced off, this llama.cpp still crashes on AMX (upstream #20824).
    When this fails, the upstream bug is fixed and the guard can go (on that version)."""
    p = _run(_DECODE, **{hwguard.ENV_OVERRIDE: "1"})
    assert p.returncode != 0


# -- chat templates are untrusted ------------------------------------------------------------------

EVIL = [
    "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch PWNED') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'x'}) }}",  # the immutable sandbox refuses mutation
    "{% for m in messages %}{{ raise_exception('roles must alternate') }}{% endfor %}",
    "{{ undefined_function() }}",
    "{% for i in range(10**9) %}x{% endfor %}",
]


@pytest.mark.parametrize("tmpl", EVIL)
def test_malicious_chat_template_is_contained(tmp_path, tmpl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_llama_gguf(str(tmp_path / "evil.gguf"), seed=0, chat_template=tmpl).path
    llm = Medusa(path, n_ctx=128)
    with pytest.raises(ChatTemplateError):
        llm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert not (tmp_path / "PWNED").exists()


def test_template_helpers_match_transformers(tmp_path):
    tmpl = "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    llm = Medusa(write_llama_gguf(str(tmp_path / "t.gguf"), seed=0, chat_template=tmpl).path, n_ctx=128)
    out = llm.apply_chat_template([{"role": "user", "content": "é"}, {"role": "user", "content": "b"}])
    year, js, first = out.split("|")
    assert len(year) == 4 and '"é"' in js and first == "é"


# -- no doubled BOS --------------------------------------------------------------------------------

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")


def _lcp_chat_prompt_tokens(path, messages):
    """The token ids llama-cpp-python's create_chat_completion feeds the model for ``messages``."""
    import llama_cpp

    llm = llama_cpp_llama(path, n_ctx=256, verbose=False)
    seen = []
    orig = llama_cpp.Llama.create_completion

    def spy(self, prompt, *a, **k):
        seen.append(list(prompt))
        return orig(self, prompt, *a, **{**k, "max_tokens": 1})

    llama_cpp.Llama.create_completion = spy
    try:
        llm.create_chat_completion(messages, max_tokens=1, temperature=0)
    finally:
        llama_cpp.Llama.create_completion = orig
    return seen[0]


def test_template_with_bos_gets_one_bos_like_llama_cpp_python(tmp_path):
    from medusa_edge.api import prompt_tokens

    path = write_llama_gguf(str(tmp_path / "bos.gguf"), seed=0, chat_template=BOS_TEMPLATE).path
    llm = Medusa(path, n_ctx=256)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the water is old"}]
    ours = prompt_tokens(llm.engine.model, llm.apply_chat_template(msgs))
    bos = llm.token_bos()
    assert ours[0] == bos and ours[1] != bos
    assert ours == _lcp_chat_prompt_tokens(path, msgs)


def test_plain_prompt_still_gets_bos(tmp_path):
    from medusa_edge.api import prompt_tokens

    llm = Medusa(write_llama_gguf(str(tmp_path / "p.gguf"), seed=0).path, n_ctx=128)
    ids = prompt_tokens(llm.engine.model, "the water")
    assert ids[0] == llm.token_bos() and ids[1] != llm.token_bos()


# -- one instance, many callers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return Medusa(demo_model_path(), n_ctx=512, n_threads=1)


QUESTIONS = ["What colour is the sky?", "What sound does a cow make?", "What is 2 plus 2?", "Name a fruit."]


def _ask(llm, q, **kw):
    return llm.create_completion(f"USER: {q}\nASSISTANT:", max_tokens=24, temperature=0, **kw)["choices"][0]["text"]


def test_threads_share_one_instance(demo):
    want = {q: _ask(demo, q) for q in QUESTIONS}
    got, errors = {}, []

    def worker(i):
        try:
            for r in range(3):
                q = QUESTIONS[(i + r) % len(QUESTIONS)]
                got.setdefault(q, set()).add(_ask(demo, q))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert {q: s for q, s in got.items()} == {q: {want[q]} for q in got}


def test_stale_stream_raises_and_leaves_the_other_call_intact(demo):
    want = _ask(demo, QUESTIONS[1])
    stale = demo.create_completion(f"USER: {QUESTIONS[0]}\nASSISTANT:", max_tokens=24, temperature=0, stream=True)
    next(stale)
    assert _ask(demo, QUESTIONS[1]) == want  # the new call takes the cache
    with pytest.raises(BusyError):
        for _ in stale:
            pass
    assert _ask(demo, QUESTIONS[1]) == want


def test_stream_in_another_thread_waits_for_the_running_one(demo):
    want = _ask(demo, QUESTIONS[2])
    first = demo.create_completion(f"USER: {QUESTIONS[0]}\nASSISTANT:", max_tokens=24, temperature=0, stream=True)
    text = [next(first)["choices"][0]["text"]]
    out = []
    t = threading.Thread(target=lambda: out.append(_ask(demo, QUESTIONS[2])))
    t.start()
    t.join(timeout=0.5)
    assert t.is_alive()  # waiting for the open generation of this thread
    text += [c["choices"][0]["text"] for c in first]
    t.join(timeout=60)
    assert out == [want] and "blue" in "".join(text)


# -- seeds chain as in llama-cpp-python ---------------------------------------------------------------


def test_seed_none_advances_per_call_like_llama_cpp_python(demo):
    prompt = "USER: Tell me a story.\nASSISTANT:"
    a = Medusa(demo_model_path(), n_ctx=512, n_threads=1, seed=1234)
    b = llama_cpp_baseline(a.engine, n_ctx=512, n_threads=1, seed=1234)
    ours = [a.create_completion(prompt, max_tokens=24, temperature=0.9)["choices"][0]["text"] for _ in range(3)]
    theirs = [b.create_completion(prompt, max_tokens=24, temperature=0.9)["choices"][0]["text"] for _ in range(3)]
    assert len(set(ours)) > 1  # not the same text every call
    assert ours == theirs
    # an explicit seed repeats
    assert len({a.create_completion(prompt, max_tokens=24, temperature=0.9, seed=7)["choices"][0]["text"] for _ in range(2)}) == 1
