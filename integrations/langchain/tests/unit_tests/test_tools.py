"""Tool calls in LangChain terms, without a model: answers in each common format become AIMessage.tool_calls,
and tool turns become chat-template dicts."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from kv_rag import Generation, InputError, Mode
from langchain_kv_rag import ChatKVRag
from langchain_kv_rag.chat_models import to_chat_dicts

ARGS = {"a": 1, "b": 2}


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _message(text: str, tools: bool = True) -> AIMessage:
    chat = ChatKVRag(store="memory")
    req = chat.request(None, {"tools": [convert_to_openai_tool(add)]} if tools else {})
    gen = Generation(text, [], "stop", Mode.EXACT, 1, 0, 1, 0, 0.0, 0.0, 0.0)
    return chat._message(gen, req)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',  # Hermes / Qwen
        '{"name": "add", "parameters": {"a": 1, "b": 2}}',  # Llama 3
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]',  # Mistral
        '{"name": "add", "arguments": {"a": 1, "b": 2}}',  # bare JSON
    ],
)
def test_each_format_becomes_tool_calls(text: str) -> None:
    msg = _message(text)
    assert msg.content == ""
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("add", ARGS)]
    assert msg.tool_calls[0]["id"]


def test_without_tools_the_text_stays_text() -> None:
    text = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    msg = _message(text, tools=False)
    assert msg.content == text and msg.tool_calls == []


def test_tool_turns_become_template_dicts() -> None:
    call = {"name": "add", "args": ARGS, "id": "call_9", "type": "tool_call"}
    dicts = to_chat_dicts(
        [HumanMessage("1+2?"), AIMessage(content="", tool_calls=[call]), ToolMessage("3", tool_call_id="call_9")]
    )
    assert dicts[1]["tool_calls"] == [
        {"id": "call_9", "type": "function", "function": {"name": "add", "arguments": ARGS}}
    ]
    assert dicts[2] == {"role": "tool", "content": "3", "tool_call_id": "call_9"}


def test_a_bad_tool_choice_fails_at_bind_time() -> None:
    with pytest.raises(InputError, match="tool_choice"):
        ChatKVRag(store="memory").bind_tools([add], tool_choice="subtract")
