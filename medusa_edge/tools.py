"""Tools / function calling for chat completions, in OpenAI's shapes.

Requests: ``tools`` ([{"type": "function", "function": {"name", "description", "parameters"}}])
with ``tool_choice`` ("auto", "none", "required", or {"type": "function", "function": {"name"}}),
or the older ``functions`` with ``function_call`` ("auto", "none", {"name"}).

Prompt: where the chat template (the GGUF's jinja, or one given) mentions ``tools`` it receives them
as transformers' ``apply_chat_template(tools=...)`` passes them (the list of tool dicts), and
assistant messages' ``tool_calls`` with ``function.arguments`` as an object (transformers'
convention; OpenAI sends a JSON string, parsed here). Elsewhere (no template, a named format, or a
template that ignores tools) the fallback is Hermes' format: a system message lists the tools'
signatures in ``<tools></tools>`` and asks for ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``;
earlier calls are rendered the same way in the assistant's text, and tool results as user turns in
``<tool_response></tool_response>``. ``tool_choice: "none"`` leaves the tools out of the prompt and
the reply is text.

Replies: tool calls are parsed out of the generated text in the format the template asks for
(Hermes/Qwen ``<tool_call>`` JSON, Llama 3.1's bare ``{"name": ..., "parameters": ...}`` JSON,
Mistral's ``[TOOL_CALLS] [...]``) into ``message.tool_calls`` with ``finish_reason: "tool_calls"``
(``function_call`` and ``"function_call"`` for a ``functions`` request). Only calls of a function the
request offered count; anything else stays text. ``required`` and a named function are enforced by a
grammar built from the tools' JSON schemas with llama-cpp-python's converter, so the reply is a
valid call in that format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from medusa_edge import grammar as _grammar

#: Most tools one request may offer (OpenAI's limit).
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's function-name rule
#: Call formats: (what opens a call in the text, the arguments' key) as templates ask for them.
FORMATS = ("hermes", "llama3", "mistral")

HERMES_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


@dataclass
class ToolSpec:
    """The tools of one request, checked. ``choice``: "auto", "none", "required" or a function's
    name. ``legacy``: asked with ``functions`` (the reply then uses ``function_call``)."""

    tools: list  # [{"type": "function", "function": {...}}]
    choice: str
    legacy: bool = False

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")


def resolve(tools=None, tool_choice=None, functions=None, function_call=None) -> Optional[ToolSpec]:
    """The request's tools as a ToolSpec (None: no tools), or a ValueError naming the field."""
    if functions is not None or function_call is not None:
        if tools is not None or tool_choice is not None:
            raise ValueError("give tools/tool_choice or the older functions/function_call, not both")
        if functions is None:
            raise ValueError("function_call needs functions")
        if not isinstance(functions, (list, tuple)):
            raise ValueError("functions must be a list of function definitions")
        tools = [{"type": "function", "function": f} for f in functions]
        if isinstance(function_call, dict):
            tool_choice = {"type": "function", "function": function_call}
        else:
            tool_choice = function_call
        field, legacy = "functions", True
    else:
        field, legacy = "tools", False
    if tools is None:
        if tool_choice is not None:
            raise ValueError("tool_choice needs tools")
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{field} must be a list of tool definitions")
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice needs tools")
        return None
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"{field} takes at most {MAX_TOOLS} entries, got {len(tools)}")
    checked = []
    for i, t in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in (c["function"]["name"] for c in checked):
            raise ValueError(f"{where}.function.name {name!r} is given twice")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ValueError(f"{where}.function.description must be a string")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema (an object)")
        extra = [k for k, v in f.items() if k not in ("name", "description", "parameters", "strict") and v is not None]
        if extra:
            raise ValueError(f"{where}.function.{extra[0]} is not supported")
        fn = {"name": name}
        if f.get("description") is not None:
            fn["description"] = f["description"]
        fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
        checked.append({"type": "function", "function": fn})
    names = [c["function"]["name"] for c in checked]
    if tool_choice is None:
        choice = "auto"
    elif tool_choice in ("auto", "none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})")
        choice = name
    else:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}")
    if legacy and choice == "required":
        raise ValueError("function_call must be 'auto', 'none' or {'name': ...}")
    return ToolSpec(checked, choice, legacy)


# -- the prompt ------------------------------------------------------------------------------------
def template_supports_tools(template) -> bool:
    """Whether a jinja chat template renders a ``tools`` variable (transformers' test is the same
    kind: the template's text refers to it)."""
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def call_format(template) -> str:
    """The call format a template teaches the model: Mistral's ``[TOOL_CALLS]``, Llama 3.1's bare
    JSON (its templates speak of ``ipython``/``<|python_tag|>``), else Hermes' ``<tool_call>``."""
    if template_supports_tools(template):
        if "[TOOL_CALLS]" in template:
            return "mistral"
        if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
            return "llama3"
    return "hermes"


def _arguments_object(args):
    """OpenAI's ``arguments`` (a JSON string) as the object templates expect; other text as is."""
    if isinstance(args, str):
        try:
            v = json.loads(args)
        except ValueError:
            return args
        return v
    return args


def check_history(messages) -> None:
    """ValueError for tool messages OpenAI refuses: a ``tool`` result must answer, by
    ``tool_call_id``, a call of an earlier assistant message; a ``function`` result must name its
    function; only assistant messages carry ``tool_calls``, each {id, type, function: {name, arguments}}."""
    if not isinstance(messages, (list, tuple)):
        return
    ids = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or tid not in ids:
                raise ValueError(f"messages[{i}]: a 'tool' message must answer a preceding assistant message's "
                                 f"tool call, by its id in 'tool_call_id' (got {tid!r})")
        if m.get("role") == "function" and not isinstance(m.get("name"), str):
            raise ValueError(f"messages[{i}]: a 'function' message must name its function in 'name'")
        calls = m.get("tool_calls")
        if calls in (None, []):
            continue
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise ValueError(f"messages[{i}].tool_calls: only an assistant message carries tool_calls, as a list")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), (str, dict)):
                raise ValueError(f"messages[{i}].tool_calls[{j}] must be {{'id', 'type': 'function', 'function': "
                                 f"{{'name': str, 'arguments': str}}}}")
            if isinstance(c.get("id"), str):
                ids.add(c["id"])


def prepare(messages: Sequence[dict], spec: Optional[ToolSpec], template) -> tuple[list, dict]:
    """(messages, extra template variables) for rendering: the tools and earlier calls in the
    template's own convention where it supports tools, else in the Hermes fallback."""
    if not isinstance(messages, (list, tuple)):
        return messages, {}  # check_messages names the fault
    check_history(messages)
    offer = spec is not None and spec.active
    has_history = any(isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls"))
                      for m in messages)
    if not offer and not has_history:
        return list(messages), {}
    if template_supports_tools(template):
        out = []
        for m in messages:
            if isinstance(m, dict) and m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments_object(
                    c["function"].get("arguments", "{}"))}} for c in m["tool_calls"]]}
            if isinstance(m, dict) and m.get("role") == "function":  # the older API's result message
                m = {**m, "role": "tool"}
            out.append(m)
        return out, ({"tools": spec.tools} if offer else {})
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        if m.get("tool_calls"):
            text = _text(m.get("content"))
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": _arguments_object(
                c["function"].get("arguments", "{}"))}, ensure_ascii=False) + "\n</tool_call>" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif m.get("role") in ("tool", "function"):
            body = "<tool_response>\n" + _text(m.get("content")) + "\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + body}
            else:
                out.append({"role": "user", "content": body, "_tool_results": True})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "_tool_results"} if isinstance(m, dict) else m for m in out]
    if offer:
        desc = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in spec.tools))
        if out and isinstance(out[0], dict) and out[0].get("role") == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + desc}
        else:
            out.insert(0, {"role": "system", "content": desc})
    return out, {}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else str(content)


# -- the grammar for "required" and a named function -----------------------------------------------
def grammar(spec: ToolSpec, fmt: str) -> Optional[str]:
    """GBNF that admits exactly one call of the chosen tool(s) in ``fmt`` (None: no constraint).
    The call's JSON comes from llama-cpp-python's json_schema_to_gbnf of
    {"name": const, <arguments key>: the tool's parameters}."""
    if not spec.forced:
        return None
    key = "parameters" if fmt == "llama3" else "arguments"
    chosen = spec.names if spec.choice == "required" else [spec.choice]
    schemas = []
    for t in spec.tools:
        f = t["function"]
        if f["name"] in chosen:
            schemas.append({"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                            "required": ["name", key]})
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    gbnf = _grammar.schema_to_gbnf(schema)
    if re.search(r"(?m)^tool-call(-[a-z0-9]+)? ::=", gbnf):
        raise ValueError("the tools' schemas use rule names this server reserves (tool-call)")
    body = re.sub(r"(?m)^root ::=", "tool-call-json ::=", gbnf)
    if re.search(r"(?<![-\w])root(?![-\w])", body):
        raise ValueError("a tool's parameters schema refers to its own root ('$ref': '#'), which is not supported")
    head = {"hermes": r'"<tool_call>\n" tool-call-json "\n</tool_call>"',
            "llama3": "tool-call-json",
            "mistral": '"[TOOL_CALLS] [" tool-call-json "]"'}[fmt]
    return f"root ::= {head}\n{body}"


# -- parsing the reply -----------------------------------------------------------------------------
def _call(obj, spec: ToolSpec) -> Optional[dict]:
    if not isinstance(obj, dict) or obj.get("name") not in spec.names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except ValueError:
            return None
        text = args
    else:
        text = json.dumps(args, ensure_ascii=False)
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": text}}


def _loads(s: str):
    try:
        return json.loads(s, strict=False)  # llama.cpp's schema grammar lets strings hold raw controls
    except ValueError:
        return None


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse(text: str, spec: ToolSpec) -> tuple[Optional[str], list]:
    """(content, tool_calls) of a generated reply. All three formats are tried, so a model that
    answers in another template's format than its own is understood too."""
    calls = []
    i = text.find("<tool_call>")
    if i != -1:
        for m in _HERMES.finditer(text, i):
            c = _call(_loads(m.group(1)), spec)
            if c is None:
                calls = []
                break
            calls.append(c)
        if calls:
            return (text[:i].strip() or None), calls
    stripped = text.strip()
    i = stripped.find("[TOOL_CALLS]")
    body = stripped[i + len("[TOOL_CALLS]"):].strip() if i != -1 else stripped
    if body.startswith("["):
        got = _loads(body)
        if isinstance(got, list) and got:
            calls = [_call(o, spec) for o in got]
            if all(calls):
                return (stripped[:i].strip() or None) if i > 0 else None, calls
    body = stripped[len("<|python_tag|>"):].strip() if stripped.startswith("<|python_tag|>") else stripped
    if body.startswith("{"):
        parts = [p for p in re.split(r"\s*;\s*(?=\{)", body)]
        calls = [_call(_loads(p), spec) for p in parts]
        if calls and all(calls):
            return None, calls
    return text, []


# -- responses ---------------------------------------------------------------------------------------
def _message_fields(calls: list, spec: ToolSpec) -> tuple[dict, str]:
    if spec.legacy:
        c = calls[0]["function"]
        return {"function_call": {"name": c["name"], "arguments": c["arguments"]}}, "function_call"
    return {"tool_calls": calls}, "tool_calls"


def chat_response(r: dict, spec: ToolSpec) -> dict:
    """A chat response with the tool calls its text holds moved into ``message.tool_calls``."""
    ch = r["choices"][0]
    content, calls = parse(ch["message"]["content"] or "", spec)
    if not calls:
        return r
    fields, finish = _message_fields(calls, spec)
    msg = {"role": "assistant", "content": content, **fields}
    return {**r, "choices": [{**ch, "message": msg, "finish_reason": finish}]}


#: Text that may open a call, held back in a stream until the call is parsed or ruled out.
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


class _Holdback:
    """Which part of a streamed reply is surely content: text before any call marker, less a tail
    that could still become one. A reply that opens with JSON ('{' or '[') is held whole (Llama
    3.1's and Mistral's calls are bare JSON)."""

    def __init__(self, forced: bool):
        self.forced = forced
        self.text = ""
        self.sent = 0

    def push(self, piece: str) -> str:
        self.text += piece
        if self.forced:
            return ""
        t = self.text
        lead = t.lstrip()
        if not lead or lead[0] in "{[" or any(m.startswith(lead) or lead.startswith(m) for m in _MARKERS):
            return ""
        cut = len(t)
        for m in _MARKERS:
            i = t.find(m)
            if i != -1:
                cut = min(cut, i)
            for n in range(min(len(m) - 1, len(t)), 0, -1):
                if t.endswith(m[:n]):
                    cut = min(cut, len(t) - n)
                    break
        cut = max(cut, self.sent)
        out = t[self.sent:cut]
        self.sent = cut
        return out


def chat_chunks(chunks: Iterator[dict], spec: ToolSpec) -> Iterator[dict]:
    """Chat chunks with tool calls: content deltas while the text is surely content, then, when the
    reply holds calls, one ``tool_calls`` delta per call (index, id, type, name and the whole
    arguments) and ``finish_reason: "tool_calls"``; else the held text as content."""
    hold = _Holdback(spec.forced)
    it = iter(chunks)
    try:
        for c in it:
            ch = c["choices"][0]
            delta = ch.get("delta", {})
            if ch.get("finish_reason") is None:
                if "content" in delta:
                    out = hold.push(delta["content"] or "")
                    if out:
                        yield {**c, "choices": [{**ch, "delta": {"content": out}}]}
                    continue
                yield c
                continue
            content, calls = parse(hold.text, spec)
            rest = hold.text[hold.sent:]
            base = {k: v for k, v in c.items() if k not in ("usage", "medusa")}
            if calls:
                unsent = (content or "")[hold.sent:] if content and len(content) > hold.sent else ""
                if unsent:
                    yield {**base, "choices": [{**ch, "delta": {"content": unsent}, "finish_reason": None}]}
                fields, finish = _message_fields(calls, spec)
                if spec.legacy:
                    yield {**base, "choices": [{**ch, "delta": fields, "finish_reason": None}]}
                else:
                    for k, call in enumerate(calls):
                        yield {**base, "choices": [{**ch, "delta": {"tool_calls": [{"index": k, **call}]},
                                                    "finish_reason": None}]}
                yield {**c, "choices": [{**ch, "finish_reason": finish}]}
                return
            if rest:
                yield {**base, "choices": [{**ch, "delta": {"content": rest}, "finish_reason": None}]}
            yield c
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
