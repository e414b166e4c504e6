"""The engine: the facade over a model, its tokenizer and a store; publish, prefill, generate, stream.

It holds the defaults of every request (:class:`~kv_rag.options.RequestOptions`), plans each request
(:mod:`kv_rag.plan`) in the caller's thread and hands it to the model's scheduler
(:mod:`kv_rag.serving`), which assembles its KV (:mod:`kv_rag.assemble`) and decodes it together
with every other live request on the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from . import auto, constrain, models, publishing, serving, signing
from .assemble import Prefill, assemble
from .decode import GenerationSettings
from .defaults import KNOWN_DOCUMENT_CHARS, SYSTEM_PROMPT
from .docindex import DocumentIndex, document_items
from .errors import InputError
from .options import Mode, RequestOptions
from .plan import Planner, RequestPlan
from .prompt import Prompt, TokenizedPrompt, build_prompt, chat_frame, locate, render_messages
from .results import Generation, PublishReport
from .runtime import MAX_FAST_TOKENS
from .selection import Selector
from .spotcheck import first_layer_problem
from .store import Store
from .streams import AsyncStream, Sink, Stream
from .tenancy import Tenant, tenant_of

__all__ = ["AsyncStream", "Engine", "Prefill", "Stream"]


class Engine:
    """Publishes documents' KV caches and answers prompts by reusing them.

    Cheap to construct: the model loads on first use and is shared with every engine in the
    process that names the same model, device and dtype. Calls on one engine (or on engines that
    share a model) are serialized by the model's lock; they may come from any thread.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, a local model folder, a Hugging Face
            hub id (``"org/name"`` or ``"org/name@revision"``: the hub cache, or a download; only the
            cache with ``HF_HUB_OFFLINE=1``), or a loaded transformers model (then pass ``tokenizer`` too).
        tokenizer: the tokenizer, when ``model`` is a model object.
        store: a :class:`~kv_rag.store.Store`, a folder for the disk tier, ``"memory"``, a
            ``redis://`` URL, or ``None`` for memory in front of ``$KV_RAG_HOME/store``.
        device: ``"cpu"``, ``"cuda"``…; default: CUDA when present.
        dtype: default float32 on CPU, bfloat16 on CUDA.
        system_prompt: the system message of prompts built by :meth:`prompt`, and the context documents are
            published after.
        mode, recompute, max_loss, priming, selection: the defaults of every request (see
            :class:`~kv_rag.options.RequestOptions` and, for ``mode="auto"``, :mod:`kv_rag.auto`; a request
            may override each). With ``priming`` (``True`` or a filler text), :meth:`publish` also stores
            each document's primed artifact.
        split_special_tokens: documents are data: a special-token string inside a document
            (``<|im_end|>``, ``<|im_start|>system``…) is tokenized as plain text, so a retrieved
            document cannot open chat turns of its own, cached or not. ``False`` parses such strings as
            the special tokens they spell, as ``apply_chat_template`` followed by a plain tokenization does.
        tenant: a :class:`~kv_rag.tenancy.Tenant` (or a name, the secret in ``$KV_RAG_TENANT_SECRET``):
            every key is derived with its secret, so other tenants sharing the store never hit (or find)
            its artifacts; set by the deployment. Documents published with ``public=True`` are shared on purpose.
        sign_key: a :class:`~kv_rag.signing.SigningKey` or its file: every artifact the engine stores is signed
            (publish and misses alike).
        trust: public keys or their files (a list), or a :class:`~kv_rag.signing.TrustPolicy`: every
            artifact loaded from any tier must be signed by one of them (or by ``sign_key``), intact; any
            other is skipped as a miss (``untrusted``) and recomputed. See docs/store.md.
        spot_check: check every artifact loaded from a tier outside this process (disk, Redis) on first
            use: its first layer's KV against its own token ids (:func:`kv_rag.verify.first_layer_problem`).
    """

    def __init__(
        self,
        model: Any = None,
        *,
        tokenizer: Any = None,
        store: Store | str | Path | None = None,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        system_prompt: str = SYSTEM_PROMPT,
        mode: Mode | str = Mode.EXACT,
        recompute: float | None = None,
        max_loss: float | None = None,
        priming: bool | str = False,
        selection: Selector | str | None = None,
        split_special_tokens: bool = True,
        tenant: Tenant | str | None = None,
        sign_key: Any = None,
        trust: Any = None,
        spot_check: bool = False,
    ) -> None:
        Store.check_spec(store)
        #: signs every artifact this engine stores (``None``: unsigned)
        self.signer = signing.signer_of(sign_key)
        #: whose signatures the artifacts this engine loads must carry (``None``: any artifact, signed or not)
        self.trust = signing.trust_of(trust, self.signer)
        self._inspect = (lambda art: first_layer_problem(self.loaded, art)) if spot_check else None
        #: whose artifacts this engine reads and writes (keys derived with its secret); ``None``: shared keys
        self.tenant = tenant_of(tenant)
        self._scope = self.tenant.scope if self.tenant is not None else ""  # whose conversations it continues
        # a tenant's known documents are its own (the model's index is shared by every engine on the model)
        self._own_documents = DocumentIndex() if self.tenant is not None else None
        if not isinstance(split_special_tokens, bool):
            raise InputError(f"split_special_tokens must be True or False, got {split_special_tokens!r}")
        #: special-token strings inside documents are plain text (``False``: parsed as special tokens)
        self.split_special_tokens = split_special_tokens
        self._model_spec = model
        self._tokenizer_arg = tokenizer
        self._device = device
        self._dtype = dtype
        self._store_spec: str | Path | None = None if isinstance(store, Store) else store
        self._store: Store | None = store if isinstance(store, Store) else None
        if self._store is not None:
            self._store.secure(self.signer, self.trust, self._inspect)
        self.system_prompt = system_prompt
        defaults = {"mode": mode, "recompute": recompute, "max_loss": max_loss, "priming": priming}
        self.options = RequestOptions.make(**defaults, selection=selection)  #: the defaults of every request
        self._auto = auto.AutoMode(self)  # plans requests in auto mode
        self._loaded: models.LoadedModel | None = None
        self._planner: Planner | None = None
        self._init_lock = threading.Lock()

    # ----------------------------------------------------------------- lazy parts
    @property
    def loaded(self) -> models.LoadedModel:
        """The loaded model (loads it on first access)."""
        if self._loaded is None:
            with self._init_lock:
                if self._loaded is None:
                    spec = self._model_spec
                    if spec is not None and not isinstance(spec, (str, Path)):
                        self._loaded = models.wrap(spec, self._tokenizer_arg)
                    else:
                        self._loaded = models.load(spec, self._device, self._dtype)
        return self._loaded

    @property
    def model(self) -> Any:
        """The transformers model."""
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer."""
        return self.loaded.tokenizer

    @property
    def model_name(self) -> str:
        """Short name of the model."""
        if self._loaded is None and (self._model_spec is None or models.is_embedded(str(self._model_spec))):
            return models.EMBEDDED_MODEL
        return self.loaded.name

    @property
    def store(self) -> Store:
        """The store (opened on first access)."""
        if self._store is None:
            device = self._store_device()  # may load the model: outside the (non-reentrant) lock
            with self._init_lock:
                if self._store is None:
                    opened = Store.open(self._store_spec, device=device)
                    opened.secure(self.signer, self.trust, self._inspect)
                    self._store = opened
        return self._store

    def _store_device(self) -> str:
        if self._device is not None:
            return self._device
        if self._model_spec is not None and not isinstance(self._model_spec, (str, Path)):
            return str(self.loaded.device)
        return models.default_device()

    @property
    def planner(self) -> Planner:
        """The request planner of this engine's model and store."""
        if self._planner is None:
            loaded, store = self.loaded, self.store
            with self._init_lock:
                if self._planner is None:
                    split = self.split_special_tokens
                    self._planner = Planner(loaded, store, split_special_tokens=split, tenant=self.tenant)
        return self._planner

    @property
    def context_window(self) -> int:
        """The model's maximum number of positions."""
        return self.loaded.context_window

    @property
    def priming(self) -> str:
        """The filler moved documents are computed after by default (``""``: no priming)."""
        return self.options.priming

    # ----------------------------------------------------------------- prompts
    def prompt(
        self,
        question: str,
        documents: Sequence[str] = (),
        *,
        sources: Sequence[str] = (),
        system: str | None = None,
    ) -> Prompt:
        """A RAG prompt in the model's chat template: system part, documents, question. Without ``sources``,
        a document published (or registered) with a source name is reported under it."""
        if not sources and documents:
            known = self.known_documents
            sources = [known.get(d) or f"doc{i}" if isinstance(d, str) else "" for i, d in enumerate(documents)]
        return build_prompt(
            self.tokenizer, question, documents, self.system_prompt if system is None else system, sources
        )

    def prompt_from_text(self, text: str, documents: Mapping[str, str] | Sequence[str] | None = None) -> Prompt:
        """Split a ready-made prompt at every verbatim occurrence of a known document.

        ``documents`` (text -> source, or texts) adds to the documents this process has published
        for this model (see :meth:`publish` and :meth:`register_documents`).
        """
        with self.loaded.lock:
            return locate(text, self.known_documents, documents)

    def prompt_from_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        documents: Mapping[str, str] | Sequence[str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        """Chat messages rendered with the model's chat template (``tools``: see :mod:`kv_rag.tools`),
        split at known documents (inside tool results too)."""
        return self.prompt_from_text(render_messages(self.tokenizer, messages, tools), documents)

    def register_documents(self, documents: Mapping[str, str] | Sequence[str]) -> None:
        """Remember document texts (-> source) so that prompts containing them are split there."""
        if self._own_documents is None:
            self.loaded.remember_documents(document_items(documents))
            return
        with self.loaded.lock:
            self._own_documents.remember(document_items(documents), KNOWN_DOCUMENT_CHARS)

    @property
    def known_documents(self) -> DocumentIndex:
        """The documents prompts are split at: the model's (shared by its engines), or a tenant's own."""
        return self._own_documents if self._own_documents is not None else self.loaded.documents

    def tokenize(self, prompt: Prompt) -> TokenizedPrompt:
        """Token ids of each segment of ``prompt``."""
        return self.planner.tokenize(prompt)

    def segment_keys(self, tp: TokenizedPrompt) -> list[str]:
        """The chain key of every segment (prefix first): each covers the segment given all before it
        (an empty segment has the key of the chain before it)."""
        n = len(tp.segments)
        chain = self.planner.chain(tp.segments, ["text"] * n, [False] * n, locate=False)
        return list(accumulate((p.key for p in chain.pieces), lambda parent, key: key or parent, initial=""))[1:]

    def document_key(self, document: str, *, system: str | None = None) -> str:
        """Key of ``document``'s artifact right after the system prefix (what :meth:`publish` stores)."""
        head = chat_frame(self.tokenizer, self.system_prompt if system is None else system)[0]
        return self.segment_keys(self.tokenize(Prompt.from_parts(head, (document,), "")))[-1]

    def loading_key(self, document: str, options: RequestOptions | None = None) -> str:
        """Key of the artifact of ``document`` that a request under ``options`` (default: this engine's)
        loads for it: in stitch, blend and auto its own artifact (after the primed context with ``priming``;
        the tenant's key), in exact mode the artifact :meth:`publish` stores, which only a prompt with the
        document right after the system prompt loads (elsewhere the key depends on the text before it: see
        each request's report)."""
        return publishing.loading_key(self, document, options or self.options)

    # ----------------------------------------------------------------- requests
    def request_options(self, options: RequestOptions | None = None, **overrides: Any) -> RequestOptions:
        """``options`` (default: this engine's) with ``overrides`` applied, validated (see
        :meth:`RequestOptions.merge`); raises :class:`~kv_rag.errors.InputError` naming the argument."""
        return (options or self.options).merge(**overrides)

    def plan(self, prompt: Prompt | TokenizedPrompt, options: RequestOptions | None = None) -> RequestPlan:
        """The plan of ``prompt`` under ``options`` (default: this engine's): pieces, keys, where they are."""
        tp = prompt if isinstance(prompt, TokenizedPrompt) else self.tokenize(prompt)
        plan = self._auto.plan(tp, options or self.options)  # auto mode: in the mode it chooses
        if plan.fallback:
            self.loaded.warn_once(f"{plan.fallback}; prefilling the documents instead (exact mode)", stacklevel=3)
        return plan

    def prefill(
        self,
        prompt: Prompt | TokenizedPrompt,
        *,
        options: RequestOptions | None = None,
        need_logits: bool = True,
        reserve: int = 0,
        **overrides: Any,
    ) -> Prefill:
        """KV for the whole prompt, assembled as the mode says (see :class:`Mode`); stores what was new.

        ``exact``: load the longest cached chain and prefill the rest. ``stitch``: load each document's
        artifact wherever it sits, moved to its position. ``blend``: stitch, then recompute the fraction
        ``recompute`` (default 0.15) of document tokens. ``auto``: one of those (:mod:`kv_rag.auto`).
        ``use_cache=False`` is a plain prefill in any mode. ``reserve`` makes room in the cache for that
        many generated tokens without reallocating. ``overrides`` are request options (``mode``,
        ``recompute``, ``max_loss``, ``priming``, ``selection``, ``use_cache``)."""
        opts = self.request_options(options, **overrides)
        t0 = time.perf_counter()
        plan = self.plan(prompt, opts)
        loaded = self.loaded
        with loaded.lock, torch.inference_mode():
            plan = self.planner.refresh(plan, self.system_prompt)  # pieces another call stored meanwhile
            return assemble(
                loaded, self.store, plan, need_logits=need_logits, reserve=reserve, t0=t0, scope=self._scope
            )

    def stream(
        self,
        prompt: Prompt | str,
        documents: Sequence[str] = (),
        *,
        options: RequestOptions | None = None,
        settings: GenerationSettings | None = None,
        **overrides: Any,
    ) -> Stream:
        """Text pieces as they are generated; ``.result`` holds the :class:`Generation` afterwards.

        ``prompt`` is a :class:`Prompt` or a question (then ``documents`` are placed before it).
        ``overrides`` are request options (``mode``, ``recompute``, ``max_loss``, ``priming``, ``selection``,
        ``use_cache``) and :class:`GenerationSettings` fields (``max_new_tokens``, ``temperature``...), all
        checked before anything runs. The request is planned in this thread and decoded by the model's
        scheduler together with every other live request on the model."""
        p = prompt if isinstance(prompt, Prompt) else self.prompt(prompt, documents)
        opts = self.request_options(options, settings=settings, **overrides)
        _ = self.loaded  # load before the clock starts: TTFT excludes model loading
        return Stream(lambda sink: self._submit(p, opts, sink))

    def generate(
        self,
        prompt: Prompt | str,
        documents: Sequence[str] = (),
        *,
        options: RequestOptions | None = None,
        settings: GenerationSettings | None = None,
        **overrides: Any,
    ) -> Generation:
        """The whole answer (see :meth:`stream` for the arguments)."""
        st = self.stream(prompt, documents, options=options, settings=settings, **overrides)
        for _ in st:
            pass
        if st.result is None:
            raise RuntimeError("the generation ended without a result")
        return st.result

    def astream(
        self,
        prompt: Prompt | str,
        documents: Sequence[str] = (),
        *,
        options: RequestOptions | None = None,
        settings: GenerationSettings | None = None,
        **overrides: Any,
    ) -> AsyncStream:
        """:meth:`stream` for coroutines: ``async for piece in engine.astream(...)``; ``.result`` afterwards.

        The request is planned in a worker thread at the first step; its pieces then reach the event
        loop from the scheduler (no thread waits per token). Options are checked here, at once.
        """
        p = prompt if isinstance(prompt, Prompt) else self.prompt(prompt, documents)
        opts = self.request_options(options, settings=settings, **overrides)

        def submit(sink: Sink) -> serving.Job:
            _ = self.loaded
            return self._submit(p, opts, sink)

        return AsyncStream(submit)

    async def agenerate(self, prompt: Prompt | str, documents: Sequence[str] = (), **kwargs: Any) -> Generation:
        """:meth:`generate` for coroutines (see :meth:`astream`)."""
        st = self.astream(prompt, documents, **kwargs)
        async for _ in st:
            pass
        if st.result is None:
            raise RuntimeError("the generation ended without a result")
        return st.result

    @property
    def scheduler(self) -> serving.Scheduler:
        """The model's scheduler (one per loaded model, shared by every engine on it)."""
        loaded = self.loaded
        if loaded.scheduler is None:
            with loaded.lock:
                if loaded.scheduler is None:
                    loaded.scheduler = serving.Scheduler(loaded)
        return loaded.scheduler

    def _submit(self, prompt: Prompt, options: RequestOptions, sink: Sink) -> serving.Job:
        """Plan ``prompt`` here (errors raise here) and queue it on the scheduler."""
        t0 = time.perf_counter()
        plan = self.plan(prompt, options)
        loaded, store = self.loaded, self.store
        # the last prompt tokens of an exact hit run in the scheduler's shared step
        defer = MAX_FAST_TOKENS if loaded.runtime.decoder is not None else 0
        reserve = options.generation.max_new_tokens
        guide = constrain.guide(loaded, options.generation)  # a bad schema or grammar raises here

        def prepare() -> Prefill:  # in the scheduler's thread, under the model's lock
            fresh = self.planner.refresh(plan, self.system_prompt)
            return assemble(loaded, store, fresh, reserve=reserve, t0=t0, defer=defer, scope=self._scope)

        job = serving.Job(loaded, prepare, options, sink, t0, guide=guide, quick=plan.quick(defer))
        self.scheduler.submit(job)
        return job

    # ----------------------------------------------------------------- publishing
    def publish(
        self,
        documents: Sequence[str],
        *,
        sources: Sequence[str] = (),
        system: str | None = None,
        progress: bool = False,
        public: bool = False,
    ) -> list[PublishReport]:
        """Compute and store each document's KV (right after the system prefix) unless already stored.

        With priming on (``Engine(priming=...)``) each document's primed artifact is stored too.
        ``public``: under a tenant, the documents are shared on purpose (see :meth:`mark_public`).
        Each report's ``stored`` says whether the store's last tier holds the artifact afterwards.
        """
        return publishing.publish(self, documents, sources, system, progress, public)

    def mark_public(self, documents: Sequence[str], *, system: str | None = None) -> None:
        """Under a tenant, key ``documents`` (in exact mode, placed first) plainly, as every tenant and
        tenant-less engine does: they are shared on purpose. Every engine that should share them says
        so (or publishes them with ``public=True``). Without a tenant, nothing changes."""
        publishing.mark_public(self, documents, system)

    def prefetch(self, documents: Sequence[str], *, system: str | None = None) -> None:
        """Copy the stored artifacts of ``documents`` (their own, and the primed ones when priming is on)
        into the store's faster tiers in the background (e.g. disk into pinned and GPU memory), so that
        the request that follows finds them there. Documents not stored are skipped."""
        publishing.prefetch(self, documents, system)

    def reference_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Last-position float32 logits of a from-scratch prefill of ``ids`` (no store involved)."""
        return self.loaded.reference_logits(ids)

    def warm_up(self, lengths: Sequence[int] = (4096,)) -> float:
        """Capture now (when a server starts) the step graphs and kernels prompts of about ``lengths`` tokens use,
        not in the first requests (seconds on CUDA; the CPU packs its weights); returns the seconds taken."""
        return serving.warm_up(self.loaded, lengths, self.options.generation.max_new_tokens)
