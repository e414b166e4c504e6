"""Tool calling for any chat model: tools in the prompt, a constraint for a forced call, calls parsed back.

Framework-free: tools are OpenAI-style dicts (``{"type": "function", "function": {"name", "description",
"parameters"}}``), as LangChain's ``convert_to_openai_tool`` and LlamaIndex's ``to_openai_tool`` make them.

- :func:`render_tools` puts the tools in the prompt: through the model's own chat template when it takes
  ``tools`` (Qwen, Llama 3, Mistral, Hermes...), otherwise as :func:`fallback_text` appended to the system
  message, which lists the tools as JSON and asks for ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``.
- :func:`call_schema` is the JSON schema of one valid call (of a named tool, or of any tool): decoding
  under it (``GenerationSettings(json_schema=...)``) yields a call that parses and whose arguments
  validate, whatever the model's size.
- :func:`parse_tool_calls` finds calls in an answer, in the common formats: Hermes/Qwen
  ``<tool_call>{...}</tool_call>``, Mistral ``[TOOL_CALLS] [...]``, Llama 3 ``{"name", "parameters"}``
  (optionally after ``<|python_tag|>``), and a bare JSON object (or list) with ``name``/``arguments``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

#: How the fallback prompt asks the model to call a tool.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
#: The default cap on strings without ``maxLength`` in forced calls and structured output (characters):
#: a small model's repetitive string then ends inside the token budget, so the answer completes.
MAX_STRING_CHARS = 160
#: "Any JSON object" for JSON mode, as a Lark grammar (llguidance's syntax): flat values, keys of at most 40
#: plain characters, strings capped as :func:`closed_schema` caps them (a small model's answer then ends).
JSON_OBJECT_GRAMMAR = f"""
start: "{{" (pair ("," pair){{0,7}})? "}}"
pair: KEY ":" value
KEY: /"[A-Za-z0-9_ .-]{{1,40}}"/
value: %json {{"type": ["string", "number", "boolean", "null"], "maxLength": {MAX_STRING_CHARS}}}
"""
#: ``tool_choice`` values besides a tool's name.
CHOICES = ("auto", "none", "any", "required")

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's ``name``, its ``arguments`` and an ``id`` (the model's, or a new one)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def tool_name(tool: Mapping[str, Any]) -> str:
    """The name of an OpenAI-style tool dict."""
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InputError(f"a tool must be an OpenAI-style dict with function.name; got {dict(tool)!r}")
    return name


def check_choice(tools: Sequence[Mapping[str, Any]], choice: Any) -> str | None:
    """``tool_choice`` as ``None``, ``"auto"``, ``"none"``, ``"any"`` or a tool's name (``"required"``
    is ``"any"``; ``True`` is the only tool; an OpenAI ``{"function": {"name": ...}}`` dict its name)."""
    names = [tool_name(t) for t in tools]
    if isinstance(choice, Mapping):
        fn = choice.get("function", choice)
        choice = fn.get("name") if isinstance(fn, Mapping) else None
    if choice is True and len(names) == 1:
        return names[0]
    if choice is None or choice is False:
        return None
    if choice == "required":
        return "any"
    if isinstance(choice, str) and (choice in CHOICES or choice in names):
        return choice
    raise InputError(f"tool_choice must be one of {', '.join(CHOICES)} or a tool name ({names}); got {choice!r}")


def arguments_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of a tool's arguments (an object; empty when the tool takes none)."""
    fn = tool.get("function", tool)
    params = dict(fn.get("parameters") or {}) if isinstance(fn, Mapping) else {}
    params.setdefault("type", "object")
    params.setdefault("properties", {})
    return params


def closed_schema(schema: Mapping[str, Any], max_chars: int | None = MAX_STRING_CHARS) -> dict[str, Any]:
    """``schema`` with ``additionalProperties: false`` on every object that lists ``properties`` and does
    not say otherwise, and ``maxLength: max_chars`` on every string type without a ``maxLength`` (``None``:
    no cap), ``$defs`` included. A constrained answer then holds only the named fields and ends inside a
    token budget; a valid answer of the closed schema is a valid answer of ``schema``."""

    def close(node: Any) -> Any:
        if isinstance(node, list):
            return [close(n) for n in node]
        if not isinstance(node, Mapping):
            return node
        out = {k: close(v) for k, v in node.items()}
        if isinstance(out.get("properties"), Mapping) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if max_chars is not None and out.get("type") == "string" and not {"maxLength", "enum", "const"} & set(out):
            out["maxLength"] = max_chars
        return out

    return dict(close(schema))


def call_schema(
    tools: Sequence[Mapping[str, Any]], choice: str | None, max_chars: int | None = MAX_STRING_CHARS
) -> dict[str, Any] | None:
    """JSON schema of one call (``{"name": ..., "arguments": {...}}``) of the tool named ``choice``, or of
    any tool for ``"any"``; ``None`` when the model may answer in text (``None``, ``"auto"``, ``"none"``).
    The arguments' schema is :func:`closed_schema` (``max_chars`` caps its strings)."""
    if choice is None or choice in ("auto", "none") or not tools:
        return None
    chosen = [t for t in tools if choice == "any" or tool_name(t) == choice]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool_name(t)}, "arguments": closed_schema(arguments_schema(t), max_chars)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` argument."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def fallback_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools and the call format, for a chat template that does not take tools."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You can call these tools (JSON descriptions):\n"
        f"{listed}\n"
        "To call a tool, answer with only "
        f'{CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}{CALL_CLOSE}. '
        "Otherwise answer in plain text."
    )


def call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the fallback format writes it (for an assistant turn in the history)."""
    return CALL_OPEN + json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False) + CALL_CLOSE


def with_fallback_tools(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with :func:`fallback_text` added to the system message (a new one first if none), and
    assistant tool calls written out as :func:`call_text` (the template reads content only)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if calls:
            written = [call_text(c["function"]["name"], _arguments(c["function"].get("arguments"))) for c in calls]
            m["content"] = "".join([str(m.get("content") or ""), *written])
        out.append(m)
    if tools:
        text = fallback_text(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The calls in ``text`` and the text left around them (``""`` when the answer is only calls)."""
    tagged = _TAGGED.findall(text)
    if tagged:
        calls = [c for body in tagged for c in _calls(_loads(body))]
        if calls:
            return _TAGGED.sub("", text).strip(), calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        calls = _calls(_loads(stripped.removeprefix("[TOOL_CALLS]")))
        if calls:
            return "", calls
    body = stripped.removeprefix("<|python_tag|>").strip()
    fenced = _FENCE.match(body)
    calls = _calls(_loads(fenced.group(1) if fenced else body))
    return ("", calls) if calls else (text, [])


def _loads(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:  # a call followed by more text: the first JSON value
        return json.JSONDecoder().raw_decode(text)[0]
    except ValueError:
        return None


def _calls(value: Any) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCall] = []
    for item in items:
        if not isinstance(item, Mapping):
            return []
        inner = item.get("function")
        fn: Mapping[str, Any] = inner if isinstance(inner, Mapping) else item
        name = fn.get("name")
        args = fn.get("arguments", fn.get("parameters", {}))
        parsed = _arguments(args)
        if not isinstance(name, str) or not name or parsed is None:
            return []
        given = item.get("id")
        calls.append(ToolCall(name, parsed, given) if isinstance(given, str) and given else ToolCall(name, parsed))
    return calls


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        args = _loads(args) if args.strip() else {}
    return dict(args) if isinstance(args, Mapping) else ({} if args is None else None)
