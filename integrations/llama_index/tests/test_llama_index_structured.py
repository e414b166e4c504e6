"""Structured prediction on the embedded model: the answer is decoded under the output class's JSON schema."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core import PromptTemplate
from llama_index.core.llms import ChatMessage
from pydantic import BaseModel, Field

from llama_index.llms.kv_rag import KVRagLLM

pytest.importorskip("llguidance", reason="constrained decoding needs kv-rag[structured]")


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the person's name")
    age: int = Field(description="age in years")


def test_structured_predict_returns_a_valid_instance() -> None:
    llm = KVRagLLM(store="memory", max_new_tokens=96)
    person = llm.structured_predict(Person, PromptTemplate("Invent a person who lives in {city}."), city="Oslo")
    assert isinstance(person, Person)
    again = asyncio.run(llm.astructured_predict(Person, PromptTemplate("Invent a person from {city}."), city="Rome"))
    assert isinstance(again, Person)


def test_as_structured_llm_answers_with_the_class() -> None:
    llm = KVRagLLM(store="memory", max_new_tokens=96).as_structured_llm(Person)
    reply = llm.chat([ChatMessage(role="user", content="Invent a person.")])
    assert isinstance(reply.raw, Person)
    assert Person.model_validate_json(reply.message.content or "") == reply.raw


def test_a_json_schema_call_option_constrains_a_completion() -> None:
    llm = KVRagLLM(store="memory", max_new_tokens=64)
    text = llm.complete("Invent a person.", json_schema=Person.model_json_schema()).text
    assert isinstance(Person.model_validate_json(text), Person)


def get_weather(city: str, days: int) -> str:
    """The weather forecast for a city over the next days."""
    return f"Sunny in {city} for {days} days."


def test_a_required_tool_call_is_valid_and_runs() -> None:
    from llama_index.core.tools import FunctionTool

    tool = FunctionTool.from_defaults(fn=get_weather)
    llm = KVRagLLM(store="memory", max_new_tokens=64)
    assert llm.metadata.is_function_calling_model
    response = llm.chat_with_tools([tool], user_msg="Weather in Oslo for 3 days?", tool_required=True)
    calls = llm.get_tool_calls_from_response(response)
    assert [c.tool_name for c in calls] == ["get_weather"]
    assert set(calls[0].tool_kwargs) == {"city", "days"} and isinstance(calls[0].tool_kwargs["days"], int)
    out = llm.predict_and_call([tool], user_msg="Weather in Oslo for 3 days?", tool_required=True)
    assert out.response.startswith("Sunny in ")
