"""KVRagLLM: the plain-string (completion) counterpart of ChatKVRag, for string chains."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult

from kv_rag import Generation

from ._base import KVRagParams, Request, response_metadata, usage_metadata


class KVRagLLM(KVRagParams, BaseLLM):
    """A local completion model that reuses the KV caches of known documents found in the prompt.

    The prompt string is used as it is (no chat template): it is split at every verbatim occurrence
    of a known document, cached segments are loaded and the rest is prefilled, exactly as in
    :class:`~langchain_kv_rag.ChatKVRag`, which shares these settings and this code. Each generation's
    ``generation_info`` holds ``finish_reason``, ``usage_metadata`` (as ChatKVRag reports it),
    ``model_name`` and the ``kv_rag`` report.
    """

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Serializable with ``langchain_core.load.dumpd`` (a ``Store`` object in ``store`` is not)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """``["langchain_kv_rag", "llms"]``."""
        return ["langchain_kv_rag", "llms"]

    @property
    def _llm_type(self) -> str:
        return "kv-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.mode, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_model_type="llm")
        params.update(self.ls_params(stop, kwargs))  # type: ignore[typeddict-item]
        return params

    @staticmethod
    def _info(gen: Generation, req: Request) -> dict[str, Any]:
        return {**response_metadata(gen, req.model_name), "usage_metadata": dict(usage_metadata(gen))}

    def _chunks(
        self, prompt: str, req: Request, run_manager: CallbackManagerForLLMRun | None
    ) -> Iterator[GenerationChunk]:
        """Text chunks, then an empty chunk whose ``generation_info`` reports the request."""
        for item in req.stream(req.engine.prompt_from_text(prompt, req.documents)):
            if isinstance(item, Generation):
                yield GenerationChunk(text="", generation_info=self._info(item, req))
                return
            chunk = GenerationChunk(text=item)
            if run_manager:
                run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk

    def _one(self, prompt: str, req: Request, run_manager: CallbackManagerForLLMRun | None) -> LCGeneration:
        text, info = "", None
        for chunk in self._chunks(prompt, req, run_manager):
            text += chunk.text
            info = chunk.generation_info or info
        return LCGeneration(text=text, generation_info=info)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        req = self.request(stop, kwargs)
        if self.streaming:
            generations = [[self._one(p, req, run_manager)] for p in prompts]
        else:  # every prompt submitted at once: the engine's scheduler decodes them together
            gens = req.generate_many([req.engine.prompt_from_text(p, req.documents) for p in prompts])
            generations = [[LCGeneration(text=g.text, generation_info=self._info(g, req))] for g in gens]
        return LLMResult(generations=generations, llm_output={"model_name": req.model_name})

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if self.streaming:
            generations: list[list[LCGeneration]] = []
            for p in prompts:
                text, info = "", None
                async for chunk in self._astream(p, stop, run_manager, **kwargs):
                    text += chunk.text
                    info = chunk.generation_info or info
                generations.append([LCGeneration(text=text, generation_info=info)])
            return LLMResult(generations=generations, llm_output={"model_name": self.request(stop, kwargs).model_name})
        req = self.request(stop, kwargs)

        async def one(text: str) -> list[LCGeneration]:
            gen = await req.agenerate(await asyncio.to_thread(req.engine.prompt_from_text, text, req.documents))
            return [LCGeneration(text=gen.text, generation_info=self._info(gen, req))]

        return LLMResult(
            generations=list(await asyncio.gather(*(one(p) for p in prompts))),
            llm_output={"model_name": req.model_name},
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        yield from self._chunks(prompt, self.request(stop, kwargs), run_manager)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        req = self.request(stop, kwargs)
        p = await asyncio.to_thread(req.engine.prompt_from_text, prompt, req.documents)
        async for item in req.astream(p):
            if isinstance(item, Generation):
                yield GenerationChunk(text="", generation_info=self._info(item, req))
                return
            chunk = GenerationChunk(text=item)
            if run_manager:
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk
