"""ChatKVRag: a LangChain chat model that reuses documents' KV caches."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.base import LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from kv_rag import Generation, Prompt
from kv_rag.errors import InputError
from kv_rag.tools import JSON_OBJECT_GRAMMAR, check_choice, closed_schema, parse_tool_calls

from ._base import KVRagParams, Request, response_metadata, usage_metadata

#: LangChain message types -> chat-template roles.
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "developer": "system", "tool": "tool"}
#: Content blocks a text-only model cannot read.
_MEDIA_BLOCKS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "file", "video", "document"})


class ChatKVRag(KVRagParams, BaseChatModel):
    """A local chat model that loads retrieved documents' KV caches instead of prefilling them.

    Drop-in for any RAG chain: the messages are rendered with the model's chat template and split at
    every verbatim occurrence of a known document (one published in this process, e.g. through
    :class:`~langchain_kv_rag.KVCacheRetriever`, or passed as ``documents=[...]`` to the call). The
    longest chain of cached segments is loaded and only the rest is prefilled; what was new is stored
    for the next request. A prompt with no known document is prefilled as usual.

    ``usage_metadata`` reports ``input_tokens`` (the whole prompt), ``output_tokens`` and
    ``input_token_details``: ``cache_read`` (prompt tokens loaded from the store) and
    ``cache_creation`` (prompt tokens prefilled and stored). ``response_metadata["kv_rag"]`` has the
    per-document report (``hit`` / ``miss`` / ``none``), TTFT and prefill time.

    Tools and structured output: :meth:`bind_tools` renders the tools with the model's chat template
    (or, when the template takes none, lists them in the system message) and parses calls from the
    answer into ``AIMessage.tool_calls``; a required or named ``tool_choice`` decodes under the JSON
    schema of a valid call, so even a small model emits one. :meth:`with_structured_output` decodes
    under the schema itself (``method="json_schema"``, the default), so the answer always parses and
    validates. Both need ``pip install 'kv-rag[structured]'`` (llguidance) when decoding is constrained.

    Example:
        .. code-block:: python

            from langchain_kv_rag import ChatKVRag

            chat = ChatKVRag(max_tokens=64)          # embedded SmolLM2-135M-Instruct, loads on first use
            msg = chat.invoke("What does a for loop's else clause do?")
            print(msg.content, msg.usage_metadata)
    """

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Serializable with ``langchain_core.load.dumpd`` (a ``Store`` object in ``store`` is not)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """``["langchain_kv_rag", "chat_models"]``."""
        return ["langchain_kv_rag", "chat_models"]

    @property
    def _llm_type(self) -> str:
        return "kv-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.mode, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_model_type="chat")
        params.update(self.ls_params(stop, kwargs))  # type: ignore[typeddict-item]
        return params

    # ------------------------------------------------------------------ tools and structured output
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with ``tools`` offered on every call.

        ``tool_choice``: ``None`` or ``"auto"`` (the model decides; calls are parsed from its answer),
        ``"none"`` (tools not shown), ``"any"`` / ``"required"`` (one call of any tool) or a tool's name
        (one call of that tool). The last two decode under the JSON schema of a valid call.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        check_choice(formatted, tool_choice)  # a bad choice fails here, not at the first call
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable whose output is ``schema``'s instance (a pydantic class) or a dict (a TypedDict or a
        JSON-schema dict).

        ``method="json_schema"`` (default): the answer is decoded under ``schema``'s JSON schema, so it
        always parses and validates. ``"function_calling"``: a forced call of a tool named after
        ``schema`` (LangChain's default implementation on :meth:`bind_tools`). ``"json_mode"``: any flat
        JSON object (:data:`kv_rag.tools.JSON_OBJECT_GRAMMAR`; say in the prompt which keys you want).
        Strings without ``maxLength`` are capped at :data:`kv_rag.tools.MAX_STRING_CHARS` characters and
        objects closed to their listed fields (:func:`kv_rag.tools.closed_schema`), so that the answer ends
        inside the token budget. ``include_raw``: ``{"raw", "parsed", "parsing_error"}``. ``strict`` is
        accepted and ignored: constrained decoding is always strict.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw)
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"method must be json_schema, function_calling or json_mode; got {method!r}")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        constraint = (
            {"json_schema": closed_schema(convert_to_json_schema(schema))}
            if method == "json_schema"
            else {"grammar": JSON_OBJECT_GRAMMAR}
        )
        llm = self.bind(
            **constraint,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            if pydantic
            else JsonOutputParser()
        )
        if not include_raw:
            return llm | parser
        assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | assign.with_fallbacks([fallback], exception_key="parsing_error")

    # ------------------------------------------------------------------ plumbing
    def _prompt(self, req: Request, messages: Sequence[BaseMessage]) -> Prompt:
        return req.engine.prompt_from_messages(to_chat_dicts(messages), req.documents, req.tools)

    def _message(self, gen: Generation, req: Request) -> AIMessage:
        content, calls = parse_tool_calls(gen.text) if req.tools else (gen.text, [])
        return AIMessage(
            content=content,
            tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in calls],
            usage_metadata=usage_metadata(gen),
            response_metadata=response_metadata(gen, req.model_name),
        )

    def _result(self, gen: Generation, req: Request) -> ChatResult:
        return ChatResult(
            generations=[
                ChatGeneration(message=self._message(gen, req), generation_info={"finish_reason": gen.finish_reason})
            ],
            llm_output={"model_name": req.model_name},
        )

    def _last_chunk(self, gen: Generation, req: Request) -> ChatGenerationChunk:
        message = AIMessageChunk(
            content="",
            usage_metadata=usage_metadata(gen),
            response_metadata=response_metadata(gen, req.model_name),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": gen.finish_reason})

    def _chunks(self, gen: Generation, req: Request) -> list[ChatGenerationChunk]:
        """With tools, the whole answer at the end: its text and its calls, then the usage."""
        content, calls = parse_tool_calls(gen.text)
        chunks = [
            tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id, index=i)
            for i, c in enumerate(calls)
        ]
        return [
            ChatGenerationChunk(message=AIMessageChunk(content=content, tool_call_chunks=chunks)),
            self._last_chunk(gen, req),
        ]

    # ------------------------------------------------------------------ LangChain hooks
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        req = self.request(stop, kwargs)
        return self._result(req.generate(self._prompt(req, messages)), req)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        req = self.request(stop, kwargs)
        for item in req.stream(self._prompt(req, messages)):
            if isinstance(item, Generation):
                yield from self._chunks(item, req) if req.tools else [self._last_chunk(item, req)]
                return
            if req.tools:  # a call is parsed from the whole answer
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager:
                run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        req = self.request(stop, kwargs)
        prompt = await asyncio.to_thread(self._prompt, req, messages)
        return self._result(await req.agenerate(prompt), req)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        req = self.request(stop, kwargs)
        prompt = await asyncio.to_thread(self._prompt, req, messages)
        async for item in req.astream(prompt):
            if isinstance(item, Generation):
                for last in self._chunks(item, req) if req.tools else [self._last_chunk(item, req)]:
                    yield last
                return
            if req.tools:  # a call is parsed from the whole answer
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager:
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as chat-template dicts: ``role``/``content`` (text only), an AI message's
    ``tool_calls`` (OpenAI style) and a tool message's ``tool_call_id`` and ``name``."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type, m.type)
        d: dict[str, Any] = {"role": role, "content": _text(m, i)}
        if isinstance(m, AIMessage) and m.tool_calls:
            d["tool_calls"] = [
                {"id": c.get("id"), "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                for c in m.tool_calls
            ]
        if isinstance(m, ToolMessage):
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


def _text(message: BaseMessage, index: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in _MEDIA_BLOCKS:
            raise InputError(
                f"messages[{index}] has a {kind!r} content block, but ChatKVRag's models read text only: "
                "pass the text (for example a transcript or a caption) instead"
            )
        # tool calls, reasoning and other non-text blocks carry no text for a text-only model
    return "".join(parts)
