"""LangChain's standard integration tests, run against the embedded SmolLM2-135M-Instruct on the CPU.

Every test passes or is an expected failure whose reason is a limitation of a small local
text-only model. Tool calls and structured answers always parse and validate (decoding is constrained
to their schema); the tests marked below need a judgment the 135M model lacks (the right value, calling
a tool unprompted, every key of a free-form JSON answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from transformers import AutoConfig, AutoModelForCausalLM

from kv_rag import models as kv_models
from langchain_kv_rag import ChatKVRag, KVCacheRetriever

from .conftest import bm25_retriever, corpus_chunks

#: Tests that decode a whole tool call or structured answer: they run with room for it (the suite's 10
#: tokens keep the plain-text tests fast; a call such as {"name":"magic_function","arguments":{"input":3}}
#: alone is ~20 tokens, and a constrained answer cut short does not parse).
ROOMY = frozenset(
    {
        "test_tool_calling",
        "test_tool_calling_async",
        "test_bind_runnables_as_tools",
        "test_tool_message_histories_string_content",
        "test_tool_message_histories_list_content",
        "test_tool_choice",
        "test_tool_calling_with_no_arguments",
        "test_tool_message_error_status",
        "test_structured_few_shot_examples",
        "test_agent_loop",
        "test_unicode_tool_call_integration",
        "test_structured_output",
        "test_structured_output_async",
        "test_structured_output_pydantic_2_v1",
        "test_structured_output_optional_param",
        "test_json_mode",
    }
)
ROOMY_TOKENS = 128
WRONG_VALUE = (
    "SmolLM2-135M emits a valid magic_function call (decoding is forced to the call's schema) but not the "
    "value the question names (input=100 for 'magic_function(3)')"
)
NO_AUTO_CALL = (
    "SmolLM2-135M does not call a tool with tool_choice='auto' (it answers in text; a named tool_choice calls)"
)
JSON_MODE_KEYS = (
    "json_mode constrains the answer to any JSON object, and SmolLM2-135M writes only the first of the keys the "
    "prompt asks for (method='json_schema', the default, constrains the keys)"
)
NO_NETWORK = "needs {what} input (fetched over the network by the test); SmolLM2-135M-Instruct reads text only"

#: Documents for the cache-read checks, invoke and stream (real text from the bundled corpus).
_DOC_SOURCES = {False: "for-statement.md#0", True: "try-statement.md#0"}


def _tiny_model_dir(path: Path) -> str:
    """A 2-layer random llama with the embedded tokenizer, saved as a model folder (for model override)."""
    tok = kv_models.load(None, "cpu", "float32").tokenizer
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=len(tok),
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


class TestChatKVRagIntegration(ChatModelIntegrationTests):
    _override_dir: str | None = None

    _asked: dict[bool, tuple[AIMessage, AIMessage]]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _tiny_override(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        cls._override_dir = _tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))

    @property
    def chat_model_class(self) -> type[ChatKVRag]:
        return ChatKVRag

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # few new tokens: the suite generates ~40 answers on a 2-core CPU
        return {"max_tokens": 10, "store": "memory"}

    @property
    def model_override_value(self) -> str | None:
        return self._override_dir

    @property
    def has_tool_calling(self) -> bool:
        return True  # bind_tools renders tools through the chat template; forced calls decode constrained

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[Any, list[Any]]:
        return {
            "invoke": ["cache_read_input", "cache_creation_input"],
            "stream": ["cache_read_input", "cache_creation_input"],
        }

    # ------------------------------------------------------------------ usage details
    def _ask_twice(self, *, stream: bool) -> tuple[AIMessage, AIMessage]:
        """The same question on the same document twice: the first stores the prompt's KV, the second reads it."""
        if not hasattr(self, "_asked"):
            self._asked = {}
        if stream not in self._asked:
            self._asked[stream] = self._ask_twice_now(stream)
        return self._asked[stream]

    def _ask_twice_now(self, stream: bool) -> tuple[AIMessage, AIMessage]:
        chat = ChatKVRag(max_tokens=2, store="memory")
        # the invoke and stream pairs read different documents: the model keeps a finished exact-mode prompt's KV
        # for the next turn of a conversation (docs/concepts.md#conversations), so a prompt that starts as the
        # other pair's did would read that KV instead of creating it
        source = _DOC_SOURCES[stream]
        doc = next(d.page_content for d in corpus_chunks() if d.metadata["source"] == source)
        question = "What does else do?"
        messages = [SystemMessage(f"Answer from this document:\n\n{doc}"), HumanMessage(question)]

        def ask() -> AIMessage:
            if not stream:
                return chat.invoke(messages, documents=[doc])  # type: ignore[return-value]
            full = None
            for chunk in chat.stream(messages, documents=[doc]):
                full = chunk if full is None else full + chunk
            assert full is not None
            return AIMessage(content=full.content, usage_metadata=full.usage_metadata)

        return ask(), ask()

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        _, second = self._ask_twice(stream=stream)
        details = second.usage_metadata["input_token_details"]  # type: ignore[index]
        assert details["cache_read"] > 0 and details["cache_creation"] == 0
        return second

    def invoke_with_cache_creation_input(self, *, stream: bool = False) -> AIMessage:
        first, _ = self._ask_twice(stream=stream)
        details = first.usage_metadata["input_token_details"]  # type: ignore[index]
        assert details["cache_creation"] > 0 and details["cache_read"] == 0
        return first

    # ------------------------------------------------------------------ tools and structured output
    @pytest.fixture
    def model(self, request: Any) -> BaseChatModel:  # type: ignore[override]
        """The suite's model; tool and structured-output tests get room for a whole call (see ROOMY)."""
        extra = getattr(request, "param", None) or {}
        params = {**self.standard_chat_model_params, **self.chat_model_params, **extra}
        if request.node.originalname in ROOMY:
            params["max_tokens"] = ROOMY_TOKENS
        return self.chat_model_class(**params)

    # ------------------------------------------------------------------ the model's judgment
    @pytest.mark.xfail(reason=WRONG_VALUE, raises=AssertionError, strict=False)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=WRONG_VALUE, raises=AssertionError, strict=False)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=NO_AUTO_CALL, raises=AssertionError, strict=False)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=JSON_MODE_KEYS, raises=OutputParserException, strict=False)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=NO_NETWORK.format(what="PDF"), run=False)
    def test_pdf_inputs(self, model: BaseChatModel) -> None:
        super().test_pdf_inputs(model)

    @pytest.mark.xfail(reason=NO_NETWORK.format(what="audio"), run=False)
    def test_audio_inputs(self, model: BaseChatModel) -> None:
        super().test_audio_inputs(model)

    @pytest.mark.xfail(reason=NO_NETWORK.format(what="image"), run=False)
    def test_image_inputs(self, model: BaseChatModel) -> None:
        super().test_image_inputs(model)

    @pytest.mark.xfail(reason=NO_NETWORK.format(what="image tool-message"), run=False)
    def test_image_tool_message(self, model: BaseChatModel) -> None:
        super().test_image_tool_message(model)

    @pytest.mark.xfail(reason=NO_NETWORK.format(what="PDF tool-message"), run=False)
    def test_pdf_tool_message(self, model: BaseChatModel) -> None:
        super().test_pdf_tool_message(model)

    @pytest.mark.xfail(
        reason="benchmarks replayed HTTP responses (VCR cassettes); a local model makes no HTTP calls", run=False
    )
    def test_stream_time(self, model: BaseChatModel, benchmark: Any, vcr: Any) -> None:
        super().test_stream_time(model, benchmark, vcr)


class TestKVCacheRetrieverIntegration(RetrieversIntegrationTests):
    """The standard retriever tests on KVCacheRetriever wrapping BM25 over the bundled corpus."""

    @property
    def retriever_constructor(self) -> type[BaseRetriever]:
        return KVCacheRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {
            "retriever": bm25_retriever(),
            "llm": ChatKVRag(store="memory"),
            "k": 2,
        }

    @property
    def retriever_query_example(self) -> str:
        return "What does the else clause of a for loop do?"
