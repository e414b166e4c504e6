"""What the chat model and the string LLM share: settings, engines, running a request, usage figures.

Both classes are thin: they build a :class:`kv_rag.Prompt` from LangChain input (chat messages or
a string), hand it to a :class:`kv_rag.Engine`, and translate the :class:`kv_rag.Generation` back.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from kv_rag import Engine, Generation, Mode, Prompt, RequestOptions, Store
from kv_rag.defaults import EMBEDDED_MODEL
from kv_rag.errors import InputError
from kv_rag.models import is_embedded
from kv_rag.tools import call_schema, check_choice

#: Request options a call (``invoke``, ``stream``, ``bind``...) may pass besides ``stop``; the core checks them.
OPTION_ARGUMENTS = frozenset(
    {"max_tokens", "temperature", "top_p", "seed", "mode", "recompute", "max_loss", "priming", "selection", "use_cache"}
    | {"json_schema", "grammar"}
)
#: Every argument a call may pass besides ``stop`` (``tools`` and ``tool_choice`` come from ``bind_tools``).
CALL_ARGUMENTS = OPTION_ARGUMENTS | {"documents", "model", "tools", "tool_choice"}

#: Constructor arguments that other providers need and a local model ignores without a warning
#: (LangChain's standard tests pass them to every chat model).
_IGNORED_QUIETLY = frozenset({"api_key", "timeout", "max_retries"})


class KVRagParams(BaseModel):
    """Settings shared by :class:`~langchain_kv_rag.ChatKVRag` and :class:`~langchain_kv_rag.KVRagLLM`.

    Constructing is cheap: the model loads on the first request and is shared by every instance
    in the process that names the same model, device and dtype.
    """

    model: str = Field(default=EMBEDDED_MODEL)
    """The embedded ``smollm2-135m-instruct`` (default), a local transformers model folder, or a Hugging
    Face hub id (``org/name[@revision]``, from the hub cache)."""
    store: Any = None
    """Where KV caches live: ``None`` (memory in front of ``$KV_RAG_HOME/store``), ``"memory"``,
    a folder for a disk store, or a :class:`kv_rag.Store` (shared with whoever else holds it)."""
    device: str | None = None
    """``"cpu"``, ``"cuda"``...; default: CUDA when present."""
    dtype: str | None = None
    """``"float32"``, ``"bfloat16"``...; default: float32 on CPU, bfloat16 on CUDA."""
    mode: str = Mode.EXACT.value
    """How a request's KV is assembled from the store: ``exact``, ``stitch``, ``blend`` or ``auto`` (the cheapest
    whose calibrated loss fits ``max_loss``; see :class:`kv_rag.Mode`)."""
    recompute: float | None = None
    """Blend: the fraction of document tokens recomputed (default 0.15 in blend mode)."""
    max_loss: float | None = None
    """Auto: the loss budget in accuracy points (default 1; 0 is exact mode)."""
    priming: bool | str = False
    """Stitch/blend: compute moved documents after a filler passage (``True`` or your own text)."""
    selection: Any = None
    """Blend: which document tokens to recompute: ``"attention"`` (default), ``"deviation"``, ``"leading"``,
    or a :class:`kv_rag.Selector` object."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 is greedy decoding."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: kv-rag's default, 128)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (only with ``temperature > 0``)."""
    seed: int | None = None
    """Makes sampling repeatable."""
    stop: list[str] | None = None
    """Stop strings: the answer ends before the first of them."""
    use_cache: bool = True
    """Reuse and store KV caches. ``False`` prefills every prompt from scratch (the reference the
    cached answers are compared with). Not LangChain's response cache (``cache``)."""
    streaming: bool = False
    """Generate through :meth:`stream` even in ``invoke`` (tokens reach ``on_llm_new_token``)."""
    split_special_tokens: bool = True
    """Special-token strings inside documents stay plain text, so a retrieved document cannot open chat
    turns (``False``: they are parsed as the special tokens they spell)."""
    tenant: Any = Field(default=None, exclude=True, repr=False)
    """A :class:`kv_rag.Tenant` (or a tenant name, its secret in ``$KV_RAG_TENANT_SECRET``): artifacts are
    keyed with its secret, so other tenants sharing the store never hit them. Set by the deployment;
    not serialized."""

    _engines: dict[str, Engine] = PrivateAttr(default_factory=dict)
    _engines_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _activity: Activity = PrivateAttr(default_factory=lambda: Activity())

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, values: Any) -> Any:
        if isinstance(values, Mapping):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(k for k in values if k not in known and k not in _IGNORED_QUIETLY)
            if unknown:
                warnings.warn(
                    f"{cls.__name__} ignores unknown argument(s) {', '.join(unknown)}; "
                    "it takes model, store, device, dtype, mode, recompute, max_loss, priming, selection, temperature, "
                    "max_tokens, top_p, seed, stop, use_cache, streaming, split_special_tokens, tenant",
                    UserWarning,
                    stacklevel=4,
                )
        return values

    @field_validator("mode", mode="before")
    @classmethod
    def _check_mode(cls, value: Any) -> str:
        return Mode.parse(value).value

    @model_validator(mode="after")
    def _check_options(self) -> KVRagParams:
        """The store spec and the request options, checked by the core (the same checks and messages as
        every caller's)."""
        Store.check_spec(self.store)
        self.default_options()
        return self

    def default_options(self) -> RequestOptions:
        """This instance's settings as :class:`kv_rag.RequestOptions` (the defaults of every call)."""
        return RequestOptions.make(
            mode=self.mode,
            recompute=self.recompute,
            max_loss=self.max_loss,
            priming=self.priming,
            selection=self.selection,
            use_cache=self.use_cache,
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )

    @field_validator("model", mode="before")
    @classmethod
    def _check_model(cls, value: Any) -> str:
        if value is None:
            return EMBEDDED_MODEL
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError(
                f"model must be {EMBEDDED_MODEL!r}, a local model folder or a Hugging Face hub id; got {value!r}"
            )
        return EMBEDDED_MODEL if is_embedded(str(value)) else str(value)

    # ------------------------------------------------------------------ engines
    @classmethod
    def from_engine(cls, engine: Engine, **kwargs: Any) -> Any:
        """An instance that runs on ``engine`` (a model object you built, say: ``Engine(model,
        tokenizer=tok)``); ``kwargs`` are the other settings. ``model`` becomes the engine's model name."""
        obj = cls(model=engine.model_name, **kwargs)
        obj._engines[obj.model] = engine
        return obj

    @property
    def engine(self) -> Engine:
        """The :class:`kv_rag.Engine` of :attr:`model` (created on first use; the model loads lazily)."""
        return self.engine_for(None)

    def engine_for(self, model: str | None) -> Engine:
        """The engine of ``model`` (a per-call override) or of :attr:`model`; all share one store."""
        name = self._check_model(model) if model is not None else self.model
        with self._engines_lock:
            eng = self._engines.get(name)
            if eng is not None:
                return eng
            main = self._engines.get(self.model)
            if main is None:
                main = self._new_engine(self.model, self.store)
                self._engines[self.model] = main
            if name == self.model:
                return main
            eng = self._new_engine(name, main.store)
            self._engines[name] = eng
            return eng

    def _new_engine(self, model: str, store: Any) -> Engine:
        """An engine of ``model`` on ``store`` whose request defaults are this instance's settings."""
        opts = self.default_options()
        return Engine(
            None if is_embedded(model) else model,
            store=store,
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

    # ------------------------------------------------------------------ requests
    @property
    def activity(self) -> Activity:
        """Requests in flight on this instance (background publishing waits until there are none)."""
        return self._activity

    def request(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> Request:
        """The settings of one call: the instance's fields overridden by the call's arguments."""
        unknown = sorted(k for k in kwargs if k not in CALL_ARGUMENTS and not k.startswith("ls_"))
        if unknown:
            raise InputError(
                f"{type(self).__name__} got unexpected argument(s) {', '.join(unknown)}; "
                f"a call takes stop, {', '.join(sorted(CALL_ARGUMENTS))}"
            )
        model = kwargs.get("model")
        stops = [*(self.stop or ()), *(stop or ())]
        documents = kwargs.get("documents")
        if documents is not None and not isinstance(documents, (Mapping, list, tuple)):
            raise InputError(
                f"documents must be a list of texts or a mapping text -> source; got {type(documents).__name__}"
            )
        overrides = {k: v for k, v in kwargs.items() if k in OPTION_ARGUMENTS and k != "max_tokens"}
        if "max_tokens" in kwargs:
            overrides["max_new_tokens"] = kwargs["max_tokens"]
        tools = list(kwargs.get("tools") or ())
        choice = check_choice(tools, kwargs.get("tool_choice")) if tools else None
        forced = call_schema(tools, choice)
        if forced is not None:  # a call is required: decode under the schema of a valid call
            overrides["json_schema"] = forced
        options = self.default_options().merge(**overrides, stop=tuple(dict.fromkeys(s for s in stops if s)))
        return Request(
            activity=self._activity,
            engine=self.engine_for(model),
            model_name=self._check_model(model) if model is not None else self.model,
            options=options,
            documents=_doc_texts(documents),
            tools=tools if tools and choice != "none" else None,
        )

    def ls_params(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """LangSmith's standard parameters (``ls_*``), honouring per-call overrides."""
        params: dict[str, Any] = {
            "ls_provider": "kv_rag",
            "ls_model_name": str(kwargs.get("model") or self.model),
            "ls_temperature": kwargs.get("temperature", self.temperature),
        }
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params


class Activity:
    """Counts the requests in flight on one model instance, so that background work can wait for a pause.

    Thread-safe. :meth:`running` brackets a request; :meth:`wait_idle` returns once none is running.
    """

    def __init__(self) -> None:
        self._active = 0
        self._cond = threading.Condition()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count a request as running for the duration of the ``with`` block."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is running; ``False`` if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)


@dataclass(frozen=True)
class Request:
    """One call's engine and its request options (checked by the core)."""

    activity: Activity
    engine: Engine
    model_name: str
    options: RequestOptions
    documents: dict[str, str] | list[str] | None
    #: OpenAI-style tools offered to the model (rendered in the prompt; calls parsed from the answer)
    tools: list[dict[str, Any]] | None = None

    def generate(self, prompt: Prompt) -> Generation:
        """The whole answer."""
        with self.activity.running():
            return self.engine.generate(prompt, options=self.options)

    def generate_many(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """The whole answers of several prompts, submitted together (the scheduler decodes them at once)."""
        with self.activity.running():
            streams = [self.engine.stream(p, options=self.options) for p in prompts]
            out: list[Generation] = []
            for st in streams:
                for _ in st:
                    pass
                if st.result is None:
                    raise RuntimeError("the generation ended without a result")
                out.append(st.result)
            return out

    def stream(self, prompt: Prompt) -> Generator[str | Generation, None, None]:
        """Text pieces as they are generated, then the :class:`kv_rag.Generation`."""
        with self.activity.running():
            st = self.engine.stream(prompt, options=self.options)
            try:
                yield from st
            finally:
                st.close()  # the caller stopped early: end the generator (no-op once it is done)
        if st.result is not None:
            yield st.result

    async def agenerate(self, prompt: Prompt) -> Generation:
        """:meth:`generate` for coroutines (the engine's scheduler decodes; no thread waits per token)."""
        with self.activity.running():
            return await self.engine.agenerate(prompt, options=self.options)

    async def astream(self, prompt: Prompt) -> AsyncIterator[str | Generation]:
        """:meth:`stream` for coroutines: pieces reach the event loop from the engine's scheduler."""
        with self.activity.running():
            st = self.engine.astream(prompt, options=self.options)
            try:
                async for piece in st:
                    yield piece
            finally:
                await st.aclose()  # the caller stopped early: stop the request (no-op once it is done)
        if st.result is not None:
            yield st.result


def usage_metadata(gen: Generation) -> UsageMetadata:
    """LangChain usage figures: the whole prompt, the answer, and which prompt tokens hit the store.

    ``cache_read`` counts prompt tokens whose KV was loaded from the store; ``cache_creation`` counts
    tokens that were prefilled and stored for later requests. Their sum never exceeds ``input_tokens``.
    """
    out = len(gen.token_ids)
    return UsageMetadata(
        input_tokens=gen.prompt_tokens,
        output_tokens=out,
        total_tokens=gen.prompt_tokens + out,
        input_token_details=InputTokenDetails(cache_read=gen.cached_tokens, cache_creation=gen.stored_tokens),
    )


def response_metadata(gen: Generation, model_name: str) -> dict[str, Any]:
    """``model_name``, ``finish_reason`` and kv-rag's report of the request (under ``kv_rag``)."""
    report = gen.to_dict()
    report.pop("answer", None)
    return {"model_name": model_name, "finish_reason": gen.finish_reason, "kv_rag": report}


def _doc_texts(documents: Any) -> dict[str, str] | list[str] | None:
    """Extra known documents of a call: texts, ``Document`` objects, or a mapping text -> source."""
    if documents is None:
        return None
    if isinstance(documents, Mapping):
        return {str(k): str(v) for k, v in documents.items()}
    return [d if isinstance(d, str) else str(getattr(d, "page_content", d)) for d in documents]
