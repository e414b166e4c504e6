"""Tools and structured output on the embedded SmolLM2-135M-Instruct: calls and answers that validate."""

from __future__ import annotations

import jsonschema
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from langchain_kv_rag import ChatKVRag

pytest.importorskip("llguidance", reason="constrained decoding needs kv-rag[structured]")


@tool
def get_weather(city: str, days: int) -> str:
    """The weather forecast for a city over the next days."""
    return f"Sunny in {city} for {days} days."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the person's name")
    age: int = Field(description="age in years")


def test_a_named_tool_choice_yields_a_valid_call() -> None:
    chat = ChatKVRag(store="memory", max_tokens=64).bind_tools([get_weather, add], tool_choice="get_weather")
    msg = chat.invoke("What will the weather be in Oslo for the next 3 days?")
    assert isinstance(msg, AIMessage) and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], convert_to_openai_tool(get_weather)["function"]["parameters"])
    assert set(call["args"]) == {"city", "days"}


def test_a_required_call_streams_as_tool_call_chunks() -> None:
    chat = ChatKVRag(store="memory", max_tokens=64).bind_tools([add], tool_choice="required")
    full = None
    for chunk in chat.stream("What is 2 plus 40?"):
        full = chunk if full is None else full + chunk
    assert full is not None and [c["name"] for c in full.tool_calls] == ["add"]
    jsonschema.validate(full.tool_calls[0]["args"], convert_to_openai_tool(add)["function"]["parameters"])


def test_with_structured_output_returns_an_instance() -> None:
    chat = ChatKVRag(store="memory", max_tokens=96)
    person = chat.with_structured_output(Person).invoke("Invent a person: a name and an age.")
    assert isinstance(person, Person)
    raw = chat.with_structured_output(Person.model_json_schema(), include_raw=True).invoke("Invent a person.")
    assert raw["parsing_error"] is None and set(raw["parsed"]) == {"name", "age"}
    called = chat.with_structured_output(Person, method="function_calling").invoke("Invent a person.")
    assert isinstance(called, Person)


def test_a_document_returned_by_a_tool_is_a_cache_hit_on_the_next_request() -> None:
    doc = (
        "The ferry to Blue Island leaves from pier 7 every morning at six. Tickets are sold on board, "
        "and bicycles travel free of charge on the lower deck."
    )
    chat = ChatKVRag(store="memory", max_tokens=8)
    chat.engine.register_documents({doc: "ferry.md"})
    search = {"name": "search", "args": {"query": "ferry"}, "id": "call_1", "type": "tool_call"}
    messages = [
        SystemMessage("Answer from the search results."),
        HumanMessage("When does the ferry leave?"),
        AIMessage(content="", tool_calls=[search]),
        ToolMessage(content=doc, tool_call_id="call_1", name="search"),
    ]
    first = chat.invoke(messages)
    second = chat.invoke(messages)
    docs = [(d["source"], d["cache"]) for d in first.response_metadata["kv_rag"]["docs"]]
    assert docs == [("ferry.md", "miss")]
    docs = [(d["source"], d["cache"]) for d in second.response_metadata["kv_rag"]["docs"]]
    assert docs == [("ferry.md", "hit")]
