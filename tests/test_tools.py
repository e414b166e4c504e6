"""Tool calling in the core: calls parsed from the common formats, the schema of a forced call, the prompt."""

from __future__ import annotations

import json

import pytest

from kv_rag import InputError
from kv_rag import models as kv_models
from kv_rag.prompt import render_messages
from kv_rag.tools import call_schema, check_choice, fallback_text, parse_tool_calls

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"properties": {"city": {"type": "string"}}}},
}


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',  # Hermes / Qwen
        '{"name": "add", "parameters": {"a": 1, "b": 2}}',  # Llama 3 JSON
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',  # Llama 3 with its tag
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "abc123xyz"}]',  # Mistral
        '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}',  # bare JSON, arguments as a JSON string
        '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```',  # bare JSON in a fence
    ],
)
def test_calls_are_parsed_from_each_format(text: str) -> None:
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert calls[0].id
    if "abc123xyz" in text:
        assert calls[0].id == "abc123xyz"


def test_several_calls_and_text_around_them() -> None:
    text = 'Let me compute.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    text += '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me compute."
    assert [c.name for c in calls] == ["add", "weather"]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", ["The answer is 3.", '{"answer": 3}', "[1, 2]", "<tool_call>not json</tool_call>"])
def test_plain_answers_have_no_calls(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


def test_tool_choice_and_the_schema_of_a_forced_call() -> None:
    tools = [ADD, WEATHER]
    assert check_choice(tools, "required") == "any"
    assert check_choice(tools, {"type": "function", "function": {"name": "add"}}) == "add"
    assert check_choice([ADD], True) == "add"
    with pytest.raises(InputError, match="tool_choice"):
        check_choice(tools, "subtract")
    assert call_schema(tools, "auto") is None and call_schema(tools, None) is None
    one = call_schema(tools, "add")
    assert one is not None and one["properties"]["name"] == {"const": "add"}
    both = call_schema(tools, "any")
    assert both is not None and len(both["anyOf"]) == 2
    assert both["anyOf"][1]["properties"]["arguments"]["type"] == "object"


def test_a_template_without_tools_gets_the_fallback_text(embedded: kv_models.LoadedModel) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
    ]
    text = render_messages(embedded.tokenizer, messages, [ADD])
    assert "Be brief.\n\n" + fallback_text([ADD]) in text and json.dumps(ADD) in text
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in text
    assert "<|im_start|>tool\n3<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
