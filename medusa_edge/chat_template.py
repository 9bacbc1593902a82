"""Chat templates from GGUF files: untrusted code, rendered in jinja2's immutable sandbox.

A GGUF's ``tokenizer.chat_template`` is a jinja2 program written by whoever made the file. Rendered
with a plain ``jinja2.Environment``, a template such as
``{{ cycler.__init__.__globals__.os.popen('id').read() }}`` runs shell commands (the bug class of
CVE-2024-34359 in llama-cpp-python). Here it is rendered in ``ImmutableSandboxedEnvironment``
(no attribute access to internals, no mutation of passed objects), with the helpers that
transformers and llama.cpp templates expect: ``raise_exception``, ``strftime_now``, ``tojson``.
Sizes are bounded: the template's text and the rendered prompt.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional, Sequence

from medusa_edge.errors import ChatTemplateError

#: Templates longer than this are refused (the largest in common GGUFs are about 10 KB).
MAX_TEMPLATE_CHARS = 256 * 1024
#: A rendered prompt longer than this is refused (a loop in a hostile template).
MAX_RENDERED_CHARS = 16 * 1024 * 1024


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' chat-template tojson: no ASCII escaping, otherwise json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_cache: dict[str, object] = {}


def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat template of {len(template)} characters exceeds the limit of {MAX_TEMPLATE_CHARS}")
    t = _cache.get(template)
    if t is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        try:
            t = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from None
        if len(_cache) > 16:
            _cache.clear()
        _cache[template] = t
    return t


def render(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render ``messages`` with ``template`` in the sandbox. Raises ChatTemplateError for a
    template that fails, calls ``raise_exception``, or tries to reach outside the sandbox."""
    import jinja2
    from jinja2.sandbox import SecurityError

    t = _compile(template)
    try:
        out = t.render(messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                       eos_token=eos_token, raise_exception=_raise_exception, strftime_now=_strftime_now, **extra)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError,
            RecursionError, ZeroDivisionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    if len(out) > MAX_RENDERED_CHARS:
        raise ChatTemplateError(f"chat template rendered {len(out)} characters, over the limit of {MAX_RENDERED_CHARS}")
    return out


#: FastChat's vicuna_v1.1 default system message (llama-cpp-python's ``vicuna`` format has it too).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


def vicuna(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """FastChat's vicuna_v1.1 (the template Medusa's Vicuna heads were trained on), as
    llama-cpp-python's ``vicuna`` format renders it: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...
    ASSISTANT:``. A system message replaces the default one, as FastChat's server does (the last
    one wins; llama-cpp-python ignores it); other roles are left out, as both do."""
    system = VICUNA_SYSTEM
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
    turns = [("USER" if m["role"] == "user" else "ASSISTANT", m["content"])
             for m in messages if m["role"] in ("user", "assistant")]
    if add_generation_prompt:
        turns.append(("ASSISTANT", None))
    out, seps = system + " ", (" ", "</s>")
    for i, (role, content) in enumerate(turns):  # FastChat's ADD_COLON_TWO
        out += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
    return out


def chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """ChatML as llama-cpp-python's ``chatml`` format renders it: a system block always (empty
    when there is no system message; the first one is used), then the user and assistant turns."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    turns = [(f"<|im_start|>{m['role']}", m["content"]) for m in messages if m["role"] in ("user", "assistant")]
    if add_generation_prompt:
        turns.append(("<|im_start|>assistant", None))
    out = f"<|im_start|>system\n{system}<|im_end|>\n"
    for role, content in turns:
        out += f"{role}\n{content}<|im_end|>\n" if content else f"{role}\n"
    return out


#: Built-in chat formats for ``Medusa(chat_format=...)``: ``(messages, add_generation_prompt) -> str``,
#: rendered text for text as llama-cpp-python's formats of the same name, and tokenized as it does
#: (special tokens parsed, the model's BOS added).
FORMATS = {"vicuna": vicuna, "chatml": chatml}


def check_messages(messages) -> list[dict]:
    """Validate chat messages at the boundary: a list of {"role": str, "content": str} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        content: Optional[object] = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({**m, "content": content})
    return out
