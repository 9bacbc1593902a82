"""Constrained output: GBNF grammars and JSON ``response_format``s, resolved to one GBNF text.

The grammar itself runs in llama.cpp's grammar sampler (native ``Sampler``, after the penalties as
in llama-cpp-python); this module only turns what a caller sends into GBNF and checks it at the
boundary. JSON schemas are converted by llama-cpp-python's own converter (``json_schema_to_gbnf``,
llama.cpp's json_schema_to_grammar.py), and ``json_object`` gets its ``JSON_GBNF``: the grammars
llama-cpp-python uses for the same requests, so the constrained text can equal its text.
"""

from __future__ import annotations

import json
import re
from typing import Optional

#: Parenthesised groups nested deeper than this are refused: llama.cpp's GBNF parser recurses once
#: per level on the thread's stack (20,000 levels overflow 8 MiB and kill the process).
MAX_NESTING = 1000
#: GBNF text longer than this is refused (what JSON schemas convert to is a few KiB).
MAX_GBNF_CHARS = 1 << 20


def gbnf_nesting(text: str) -> int:
    """The deepest nesting of ``( )`` groups in GBNF ``text``, outside string literals, character
    classes and comments."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def check_gbnf(text: str) -> str:
    """``text`` if it is GBNF the parser can take without harm (type, size, nesting), else ValueError.
    Whether it parses is llama.cpp's to say (``Engine.check_grammar``)."""
    if not isinstance(text, str):
        raise ValueError(f"grammar must be GBNF text (a string) or a llama_cpp.LlamaGrammar, got {type(text).__name__}")
    if len(text) > MAX_GBNF_CHARS:
        raise ValueError(f"the grammar has {len(text)} characters; at most {MAX_GBNF_CHARS} are taken")
    if gbnf_nesting(text) > MAX_NESTING:
        raise ValueError(f"the grammar nests groups deeper than {MAX_NESTING} levels")
    return text


#: Largest count a schema may ask to repeat (lengths, item counts, a pattern's ``{n,m}``): the
#: converter expands some counts into rules of that many elements (a ``maxLength`` of 10**9 makes
#: an 8 GB grammar), and llama.cpp's parser refuses repetitions past 2,000 anyway.
MAX_REPETITION = 2000
_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
               "maxContains")
_PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _check_schema_counts(schema) -> None:
    stack = [schema]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in _COUNT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_REPETITION:
                    raise ValueError(f"the JSON schema's {k} of {v} is more than the {MAX_REPETITION} a grammar can repeat")
                if k == "pattern" and isinstance(v, str):
                    for m in _PATTERN_COUNT.finditer(v):
                        if any(g and int(g) > MAX_REPETITION for g in m.groups()):
                            raise ValueError(f"the JSON schema's pattern repeats more than {MAX_REPETITION} times")
                if isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(obj, list):
            stack.extend(v for v in obj if isinstance(v, (dict, list)))


def schema_to_gbnf(schema) -> str:
    """GBNF for a JSON schema (a dict, a boolean, or its JSON text), by llama-cpp-python's converter.
    ValueError naming the fault for a schema it cannot convert (remote ``$ref``s are not fetched)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    _check_schema_counts(schema)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise ValueError("the JSON schema is nested too deeply to convert") from None
    except Exception as e:  # the converter raises KeyError, TypeError, AssertionError, ... on bad schemas
        raise ValueError(f"the JSON schema cannot be converted to a grammar: {type(e).__name__}: {e}") from None


def json_object_gbnf() -> str:
    """llama-cpp-python's grammar for ``response_format={"type": "json_object"}``: one JSON object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def resolve(grammar=None, response_format=None, json_schema=None) -> Optional[tuple[str, str]]:
    """(GBNF text, root rule) for what a request asks, or None for free text.

    ``grammar``: GBNF text or a ``llama_cpp.LlamaGrammar`` ("" is none, as llama-server takes it);
    ``response_format``: OpenAI's ``{"type": "text"}``, ``{"type": "json_object"}`` (optionally
    with llama-cpp-python's ``"schema"``) or ``{"type": "json_schema", "json_schema": {"schema":
    ...}}`` (also llama-server's ``"schema"`` beside the type); ``json_schema``: llama-server's
    body field, a schema. At most one of them may constrain the output."""
    asked = []
    if grammar is not None:
        if hasattr(grammar, "_grammar") and not isinstance(grammar, str):  # llama_cpp.LlamaGrammar
            text, root = getattr(grammar, "_grammar"), getattr(grammar, "_root", "root")
            if not isinstance(root, str) or not root:
                raise ValueError("the LlamaGrammar's root rule name must be a non-empty string")
        else:
            text, root = grammar, "root"
        check_gbnf(text)
        if text.strip():
            asked.append(("grammar", text, root))
    if response_format is not None:
        got = _response_format(response_format)
        if got is not None:
            asked.append(("response_format", got, "root"))
    if json_schema is not None:
        asked.append(("json_schema", schema_to_gbnf(json_schema), "root"))
    if len(asked) > 1:
        raise ValueError(f"{' and '.join(a[0] for a in asked)} both constrain the output: give one of them")
    if not asked:
        return None
    _, text, root = asked[0]
    return check_gbnf(text), root


def _response_format(rf) -> Optional[str]:
    if not isinstance(rf, dict):
        raise ValueError(f"response_format must be an object such as {{\"type\": \"json_object\"}}, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        extra = sorted(k for k in rf if k != "type" and rf[k] is not None)
        if extra:
            raise ValueError(f"response_format of type 'text' takes no {', '.join(map(repr, extra))}")
        return None
    if kind == "json_object":
        schema = rf.get("schema")
        return json_object_gbnf() if schema is None else schema_to_gbnf(schema)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if spec is None and "schema" in rf:  # llama-server's spelling
            schema = rf["schema"]
        elif isinstance(spec, dict):
            schema = spec.get("schema")
            if schema is None:
                raise ValueError("response_format.json_schema needs a 'schema'")
        else:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return schema_to_gbnf(schema)
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
