"""ChatKVRag: a LangChain chat model that reuses documents' KV caches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from kv_rag import Generation, Prompt
from kv_rag.errors import InputError

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

    # ------------------------------------------------------------------ plumbing
    def _prompt(self, req: Request, messages: Sequence[BaseMessage]) -> Prompt:
        return req.engine.prompt_from_messages(to_chat_dicts(messages), req.documents)

    def _result(self, gen: Generation, req: Request) -> ChatResult:
        message = AIMessage(
            content=gen.text,
            usage_metadata=usage_metadata(gen),
            response_metadata=response_metadata(gen, req.model_name),
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={"finish_reason": gen.finish_reason})],
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
                yield self._last_chunk(item, req)
                return
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
                yield self._last_chunk(item, req)
                return
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager:
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``role``/``content`` dicts for the chat template (text only)."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type, m.type)
        out.append({"role": role, "content": _text(m, i)})
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
