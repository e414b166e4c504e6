"""LangChain's standard unit tests for ChatKVRag (construction, parameters, serialization; no generation)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_kv_rag import ChatKVRag


class TestChatKVRagUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKVRag]:
        return ChatKVRag

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"store": "memory"}

    @pytest.mark.xfail(
        reason="a local model has no API key or endpoint to read from the environment "
        "(KV_RAG_HOME moves kv-rag's files; it is not a model attribute)",
        run=False,
    )
    def test_init_from_env(self) -> None:
        super().test_init_from_env()

    @pytest.mark.xfail(
        reason="langchain-core's load(allowed_objects='all') accepts only the partner classes listed in its own "
        "mapping; ChatKVRag loads with allowed_objects=[ChatKVRag] (see test_params.py::test_round_trip)",
        raises=ValueError,
        strict=True,
    )
    def test_serdes(self, model: Any, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)
