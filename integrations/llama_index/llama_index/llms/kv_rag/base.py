"""KVRagLLM: a LlamaIndex LLM on a kv-rag engine that reuses the KV of documents found in its prompts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.schema import MetadataMode, NodeWithScore
from llama_index.core.types import PydanticProgramMode

from kv_rag import AsyncStream, Engine, Generation, Mode, Prompt, RequestOptions, Store
from kv_rag.defaults import MAX_NEW_TOKENS
from kv_rag.tools import call_schema, check_choice, closed_schema, parse_tool_calls

from ._watch import watch_retrievals

#: Node metadata key that holds a node's artifact key (excluded from LLM and embedding text).
METADATA_KEY = "kv_rag_key"

#: Request options a call (``complete``, ``chat``...) may pass; the core checks them.
CALL_OPTIONS = (
    "mode",
    "recompute",
    "max_loss",
    "priming",
    "selection",
    "use_cache",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
)
#: Per-call constraints (grammar-constrained decoding, ``pip install 'kv-rag[structured]'``): a JSON schema
#: (dict) or a Lark grammar; :meth:`KVRagLLM.structured_predict` passes the output class's schema.
CONSTRAINT_OPTIONS = ("json_schema", "grammar")


class KVRagLLM(FunctionCallingLLM):
    """A LlamaIndex LLM that reuses the published KV caches of documents found in its prompts.

    Any prompt LlamaIndex builds (any synthesizer, any template) is split at every verbatim
    occurrence of a known document: one published with :meth:`kv_rag.Engine.publish`, warmed by
    :class:`~llama_index.llms.kv_rag.KVCacheRetriever`, or (with ``watch_retrievals``, the default)
    returned by any LlamaIndex retriever in this process. Those documents' KV comes from the store
    when it is there and is stored when it is not; the rest of the prompt is prefilled.

    Constructing is cheap: the model loads on first use and is shared by every instance (and every
    :class:`kv_rag.Engine`) in the process that names the same model, device and dtype.

    Every response carries ``raw["usage"]`` in the OpenAI shape (``prompt_tokens``,
    ``completion_tokens``, ``total_tokens``, ``prompt_tokens_details.cached_tokens``), the same dict
    in ``additional_kwargs``, and the full kv-rag report in ``raw["kv_rag"]`` (TTFT, per-document hits).

    Tools (a :class:`FunctionCallingLLM`): ``chat_with_tools``, ``predict_and_call`` and agents render the
    tools with the model's chat template (or list them in the system message) and parse calls from the
    answer; ``tool_required=True`` (or ``tool_choice="any"`` or a tool's name) decodes under the JSON
    schema of a valid call (``pip install 'kv-rag[structured]'``), and so does ``structured_predict``.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, a local transformers model folder, or a
            Hugging Face hub id (``org/name[@revision]``).
        engine: an existing :class:`kv_rag.Engine` to use (then ``model``, ``store``, ``device``
            and ``dtype`` are ignored).
        store: a :class:`kv_rag.store.Store`, a folder, ``"memory"``, or ``None`` for the default store.
        mode: how a request's KV is assembled (:class:`kv_rag.Mode`: ``"exact"``, ``"stitch"``, ``"blend"``, or
            ``"auto"``: per request the cheapest whose calibrated loss fits ``max_loss``, in accuracy points).
        recompute, priming, selection: blend's fraction, stitch/blend priming and blend's token
            selection (see :class:`kv_rag.RequestOptions`); a call may override each, and the
            retriever publishes documents when the mode reads them.
    """

    model: str | None = Field(default=None, description="Local model folder or hub id; None: the embedded model.")
    store: Any = Field(default=None, exclude=True, description="Store, folder, 'memory' or None (default store).")
    device: str | None = Field(default=None, description="Torch device; default CUDA when present.")
    dtype: str | None = Field(default=None, description="Torch dtype name; default float32 on CPU.")
    mode: str = Field(default=Mode.EXACT.value, description="How the KV is assembled: exact, stitch, blend or auto.")
    recompute: float | None = Field(default=None, description="Blend: fraction of document tokens recomputed.")
    max_loss: float | None = Field(default=None, description="Auto: loss budget in accuracy points (default 1).")
    priming: bool | str = Field(default=False, description="Stitch/blend: compute moved documents after a filler.")
    selection: Any = Field(
        default=None, description="Blend: attention (default), deviation, leading, or a kv_rag.Selector."
    )
    max_new_tokens: int = Field(
        default=MAX_NEW_TOKENS, gt=0, description="Tokens generated at most (metadata.num_output)."
    )
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for sampling.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    use_cache: bool = Field(default=True, description="False: neither read nor write the KV store.")
    tenant: Any = Field(
        default=None, exclude=True, repr=False, description="A kv_rag.Tenant (or name): keys derived with its secret."
    )
    split_special_tokens: bool = Field(
        default=True, description="Special-token strings inside documents stay text (False: parsed as special tokens)."
    )
    is_chat_model: bool = Field(default=True, description="Let LlamaIndex send chat messages (chat template).")
    context_window: int | None = Field(default=None, description="Override; default the model's own window.")
    watch_retrievals: bool = Field(
        default=True, description="Register the LLM text of nodes any LlamaIndex retriever returns in this process."
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More request options for every call (kv_rag.RequestOptions names)."
    )

    _engine: Engine = PrivateAttr()

    def __init__(self, *, engine: Engine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is None:
            opts = self.default_options()
            engine = Engine(
                self.model,
                store=self.store,
                device=self.device,
                dtype=self.dtype,
                mode=opts.mode,
                recompute=opts.recompute,
                max_loss=opts.max_loss,
                priming=opts.priming,
                selection=opts.selection,
                split_special_tokens=self.split_special_tokens,
                tenant=self.tenant,
            )
        self._engine = engine
        if self.watch_retrievals:
            watch_retrievals(self)

    @field_validator("mode", mode="before")
    @classmethod
    def _check_mode(cls, value: Any) -> str:
        return Mode.parse(value).value

    @model_validator(mode="after")
    def _check_options(self) -> KVRagLLM:
        """The store spec and the request options, checked by the core (the same checks and messages as
        every caller's)."""
        Store.check_spec(self.store)
        self.default_options()
        return self

    def default_options(self) -> RequestOptions:
        """This LLM's settings as :class:`kv_rag.RequestOptions` (the defaults of every call)."""
        values = {name: getattr(self, name) for name in CALL_OPTIONS}
        values["stop"] = tuple(self.stop)
        return RequestOptions.make(**values).merge(**self.generate_kwargs)

    @classmethod
    def class_name(cls) -> str:
        """Name used in LlamaIndex serialization."""
        return "KVRagLLM"

    # ----------------------------------------------------------------- properties
    @property
    def engine(self) -> Engine:
        """The kv-rag engine (model, tokenizer, store) this LLM runs on."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        """Context window (the model's own unless overridden), output budget, chat flag and model name."""
        return LLMMetadata(
            context_window=self.context_window or self._engine.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=self.is_chat_model,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's tokenizer (use as ``Settings.tokenizer``)."""
        return list(self._engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ----------------------------------------------------------------- documents
    def register_nodes(self, nodes: Sequence[NodeWithScore]) -> None:
        """Remember the nodes' LLM text (what synthesizers put in prompts) as documents of this model."""
        docs = {n.node.get_content(metadata_mode=MetadataMode.LLM): _source(n) for n in nodes}
        docs = {text: src for text, src in docs.items() if text.strip()}
        if docs:
            self._engine.register_documents(docs)

    # ----------------------------------------------------------------- prompts
    def _completion_prompt(self, prompt: str, formatted: bool) -> Prompt:
        """``formatted`` text is the model input as is; otherwise ``completion_to_prompt`` or the chat template."""
        if formatted:
            return self._engine.prompt_from_text(prompt)
        if self.completion_to_prompt is not None and self.completion_to_prompt is not default_completion_to_prompt:
            return self._engine.prompt_from_text(self.completion_to_prompt(prompt))
        if self.is_chat_model:
            system = self.system_prompt if self.system_prompt is not None else self._engine.system_prompt
            messages = [{"role": "system", "content": system}] if system else []
            return self._engine.prompt_from_messages([*messages, {"role": "user", "content": prompt}])
        return self._engine.prompt_from_text(prompt)

    def _chat_prompt(self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None) -> Prompt:
        return self._engine.prompt_from_messages([_message(m) for m in messages], None, tools)

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``options=`` for the engine: this LLM's settings with the call's request options on top.

        LlamaIndex passes its own keyword arguments through ``**kwargs`` too (``formatted``, callback
        plumbing); only request option names are taken, ``max_tokens`` as ``max_new_tokens``.
        """
        if "max_tokens" in kwargs:  # the OpenAI spelling, which some callers pass
            kwargs = {**kwargs, "max_new_tokens": kwargs.pop("max_tokens")}
        names = (*CALL_OPTIONS, *CONSTRAINT_OPTIONS)
        options = {k: v for k, v in kwargs.items() if k in names}
        tools = kwargs.get("tools")
        if tools:  # from chat_with_tools: a required or named choice decodes under a valid call's schema
            forced = call_schema(tools, check_choice(tools, kwargs.get("tool_choice")))
            if forced is not None:
                options["json_schema"] = forced
        return {"options": self.default_options().merge(**options)}

    # ----------------------------------------------------------------- tools
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments: the messages, the tools as OpenAI dicts, and the choice (``tool_required``:
        ``"any"``)."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                user_msg if isinstance(user_msg, ChatMessage) else ChatMessage(role="user", content=user_msg)
            )
        specs = [t.metadata.to_openai_tool() for t in tools]
        choice = tool_choice if tool_choice is not None else ("any" if tool_required else "auto")
        return {"messages": messages, "tools": specs, "tool_choice": choice, **kwargs}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls parsed from the answer (``additional_kwargs["tool_calls"]``)."""
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls: {response.message.content!r}")
        return [ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"]) for c in calls]

    # ----------------------------------------------------------------- structured output
    def _structured_kwargs(self, output_cls: type[Any], llm_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """``llm_kwargs``, with the output class's JSON schema as the decoding constraint (objects closed to
        their fields, strings capped: :func:`kv_rag.tools.closed_schema`) where LlamaIndex runs its
        text-completion program; its function-calling program (the default) forces a call already."""
        if self.pydantic_program_mode is PydanticProgramMode.DEFAULT:
            return dict(llm_kwargs or {})
        return {"json_schema": closed_schema(output_cls.model_json_schema()), **(llm_kwargs or {})}

    def structured_predict(
        self,
        output_cls: type[Any],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        """An instance of ``output_cls`` (a pydantic class) from ``prompt``, always valid: LlamaIndex's
        function-calling program (a forced call of a tool named after the class), or with another
        ``pydantic_program_mode`` its text-completion program decoded under the class's JSON schema."""
        kwargs = self._structured_kwargs(output_cls, llm_kwargs)
        return super().structured_predict(output_cls, prompt, kwargs, **prompt_args)

    async def astructured_predict(
        self,
        output_cls: type[Any],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        """:meth:`structured_predict` for coroutines."""
        kwargs = self._structured_kwargs(output_cls, llm_kwargs)
        return await super().astructured_predict(output_cls, prompt, kwargs, **prompt_args)

    # ----------------------------------------------------------------- completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """The completion of ``prompt`` (see the class docstring for how the prompt is formed)."""
        gen = self._engine.generate(self._completion_prompt(prompt, formatted), **self._call_kwargs(kwargs))
        return _completion(gen.text, gen.text, gen)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """The completion of ``prompt`` piece by piece; the last response carries the usage."""
        p = self._completion_prompt(prompt, formatted)
        call = self._call_kwargs(kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for delta, result in _with_result(self._engine.stream(p, **call)):
                text += delta
                yield _completion(text, delta, result)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """:meth:`complete` with the model in a worker thread."""
        p = await asyncio.to_thread(self._completion_prompt, prompt, formatted)
        gen = await self._engine.agenerate(p, **self._call_kwargs(kwargs))
        return _completion(gen.text, gen.text, gen)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        """:meth:`stream_complete` as an async generator (the model runs in a worker thread)."""
        p = await asyncio.to_thread(self._completion_prompt, prompt, formatted)
        call = self._call_kwargs(kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for delta, result in _awith_result(self._engine.astream(p, **call)):
                text += delta
                yield _completion(text, delta, result)

        return gen()

    # ----------------------------------------------------------------- chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """The assistant's reply, the messages rendered with the model's chat template."""
        tools = kwargs.get("tools")
        gen = self._engine.generate(self._chat_prompt(messages, tools), **self._call_kwargs(kwargs))
        return _chat(gen.text, gen.text, gen, bool(tools))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """The reply piece by piece; the last response carries the usage."""
        tools = kwargs.get("tools")
        p = self._chat_prompt(messages, tools)
        call = self._call_kwargs(kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for delta, result in _with_result(self._engine.stream(p, **call)):
                text += delta
                yield _chat(text, delta, result, bool(tools))

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` with the model in a worker thread."""
        tools = kwargs.get("tools")
        p = await asyncio.to_thread(self._chat_prompt, messages, tools)
        gen = await self._engine.agenerate(p, **self._call_kwargs(kwargs))
        return _chat(gen.text, gen.text, gen, bool(tools))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """:meth:`stream_chat` as an async generator (the model runs in a worker thread)."""
        tools = kwargs.get("tools")
        p = await asyncio.to_thread(self._chat_prompt, messages, tools)
        call = self._call_kwargs(kwargs)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for delta, result in _awith_result(self._engine.astream(p, **call)):
                text += delta
                yield _chat(text, delta, result, bool(tools))

        return gen()


# --------------------------------------------------------------------- helpers
def usage(gen: Generation) -> dict[str, Any]:
    """OpenAI-shaped usage of one generation (``prompt_tokens_details.cached_tokens`` = KV loaded)."""
    completion = len(gen.token_ids)
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": gen.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


def _raw(gen: Generation | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if gen is None:
        return {}, {}
    u = usage(gen)
    return {"usage": u, "kv_rag": gen.to_dict()}, dict(u)


def _completion(text: str, delta: str, gen: Generation | None) -> CompletionResponse:
    raw, extra = _raw(gen)
    return CompletionResponse(text=text, delta=delta, raw=raw or None, additional_kwargs=extra)


def _chat(text: str, delta: str, gen: Generation | None, tools: bool = False) -> ChatResponse:
    """A chat response; with ``tools``, the last one (``gen`` given) carries the calls parsed from the answer
    in ``additional_kwargs["tool_calls"]`` (``id``, ``name``, ``arguments``) and the text left around them."""
    raw, extra = _raw(gen)
    kwargs: dict[str, Any] = {}
    if tools and gen is not None:
        text, calls = parse_tool_calls(text)
        kwargs["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
    message = ChatMessage(role=MessageRole.ASSISTANT, content=text, additional_kwargs=kwargs)
    return ChatResponse(message=message, delta=delta, raw=raw or None, additional_kwargs=extra)


def _with_result(stream: Any) -> Iterator[tuple[str, Generation | None]]:
    """Pieces of a kv-rag Stream, each paired with None except the last, which gets the Generation."""
    held: str | None = None
    for piece in stream:
        if held is not None:
            yield held, None
        held = piece
    yield held or "", stream.result


async def _awith_result(stream: AsyncStream) -> AsyncIterator[tuple[str, Generation | None]]:
    """:func:`_with_result` for a kv-rag AsyncStream (pieces arrive through the event loop)."""
    held: str | None = None
    async for piece in stream:
        if held is not None:
            yield held, None
        held = piece
    yield held or "", stream.result


def _message(m: ChatMessage) -> dict[str, Any]:
    """A chat-template dict: role and text; an assistant's parsed calls and a tool result's call id."""
    out: dict[str, Any] = {"role": _role(m), "content": m.content or ""}
    calls = m.additional_kwargs.get("tool_calls")
    if calls and isinstance(calls, list):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": "function", "function": {"name": c["name"], "arguments": c.get("arguments")}}
            for c in calls
            if isinstance(c, dict) and "name" in c
        ]
    if m.additional_kwargs.get("tool_call_id"):
        out["tool_call_id"] = m.additional_kwargs["tool_call_id"]
    return out


def _role(message: ChatMessage) -> str:
    role = message.role
    return str(role.value if isinstance(role, MessageRole) else role)


def _source(node: NodeWithScore) -> str:
    meta = node.node.metadata or {}
    return str(meta.get("file_name") or meta.get("source") or node.node.node_id)
