"""The engine: a model, its tokenizer and a store; publish, load, prefill, decode, stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import models
from ._compat import build_cache, cache_layers, forward
from .artifact import Artifact, ArtifactMeta
from .decode import GenerationSettings, Sampler, TextStream
from .defaults import BLEND_RECOMPUTE, SYSTEM_PROMPT
from .docindex import document_items
from .errors import ContextLengthError, InputError
from .fingerprint import chain_key_of_digest, token_bytes, tokens_digest
from .prompt import Prompt, TokenizedPrompt, build_prompt, chat_frame, locate, render_messages, tokenize
from .results import CacheStatus, Generation, Mode, PublishReport, SegmentReport
from .store import Store


@dataclass
class Prefill:
    """The KV of a whole prompt, ready for decoding, and how it was obtained."""

    cache: Any
    logits: torch.Tensor | None
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    stored_tokens: int
    seconds: float
    segments: list[SegmentReport]
    #: how the KV was assembled (exact where stitching was refused or there was nothing to stitch)
    mode: Mode = Mode.EXACT
    #: document tokens recomputed by blend mode
    recomputed_tokens: int = 0


class Engine:
    """Publishes documents' KV caches and answers prompts by reusing them.

    Cheap to construct: the model loads on first use and is shared with every engine in the
    process that names the same model, device and dtype. Calls on one engine (or on engines that
    share a model) are serialized by the model's lock; they may come from any thread.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, a local model folder, or a loaded
            transformers model (then pass ``tokenizer`` too).
        tokenizer: the tokenizer, when ``model`` is a model object.
        store: a :class:`~kv_rag.store.Store`, a folder for the disk tier, ``"memory"``, or
            ``None`` for memory in front of ``$KV_RAG_HOME/store``.
        device: ``"cpu"``, ``"cuda"``…; default: CUDA when present.
        dtype: default float32 on CPU, bfloat16 on CUDA.
        system_prompt: the system message of prompts built by :meth:`prompt`.
        priming: stitch and blend modes compute every document that does not directly follow the
            system part after a fixed filler passage (``True``: :data:`kv_rag.stitch.PRIMING_TEXT`, or
            your own text) rather than right after the system part, so that its first tokens are
            computed mid-context; :meth:`publish` then stores both artifacts (README, "Fidelity").
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
        priming: bool | str = False,
    ) -> None:
        self._model_spec = model
        self._tokenizer_arg = tokenizer
        self._device = device
        self._dtype = dtype
        self._store_spec: str | Path | None = None if isinstance(store, Store) else store
        self._store: Store | None = store if isinstance(store, Store) else None
        self.system_prompt = system_prompt
        self.priming = _priming_text(priming)
        self._loaded: models.LoadedModel | None = None
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
                    self._store = Store.open(self._store_spec, device=device)
        return self._store

    def _store_device(self) -> str:
        if self._device is not None:
            return self._device
        if self._model_spec is not None and not isinstance(self._model_spec, (str, Path)):
            return str(self.loaded.device)
        return models.default_device()

    @property
    def context_window(self) -> int:
        """The model's maximum number of positions."""
        return self.loaded.context_window

    # ----------------------------------------------------------------- prompts
    def prompt(
        self,
        question: str,
        documents: Sequence[str] = (),
        *,
        sources: Sequence[str] = (),
        system: str | None = None,
    ) -> Prompt:
        """A RAG prompt in the model's chat template: system part, documents, question."""
        return build_prompt(
            self.tokenizer, question, documents, self.system_prompt if system is None else system, sources
        )

    def prompt_from_text(self, text: str, documents: Mapping[str, str] | Sequence[str] | None = None) -> Prompt:
        """Split a ready-made prompt at every verbatim occurrence of a known document.

        ``documents`` (text -> source, or texts) adds to the documents this process has published
        for this model (see :meth:`publish` and :meth:`register_documents`).
        """
        loaded = self.loaded
        with loaded.lock:
            return locate(text, loaded.documents, documents)

    def prompt_from_messages(
        self, messages: Sequence[Mapping[str, str]], documents: Mapping[str, str] | Sequence[str] | None = None
    ) -> Prompt:
        """Chat messages rendered with the model's chat template, split at known documents."""
        return self.prompt_from_text(render_messages(self.tokenizer, messages), documents)

    def register_documents(self, documents: Mapping[str, str] | Sequence[str]) -> None:
        """Remember document texts (-> source) so that prompts containing them are split there."""
        self.loaded.remember_documents(document_items(documents))

    def tokenize(self, prompt: Prompt) -> TokenizedPrompt:
        """Token ids of each segment of ``prompt``."""
        return tokenize(self.tokenizer, prompt)

    def segment_keys(self, tp: TokenizedPrompt) -> list[str]:
        """The chain key of every segment (prefix first): each covers the segment given all before it."""
        fp, tok = self.loaded.fingerprint.digest, self.loaded.tokenizer_digest
        keys: list[str] = []
        parent = ""
        for i, seg in enumerate(tp.segments):
            parent = chain_key_of_digest(parent, fp, tok, tp.digest(i)) if seg else parent
            keys.append(parent)
        return keys

    def document_key(self, document: str, *, system: str | None = None) -> str:
        """Key of ``document``'s artifact right after the system prefix (what :meth:`publish` stores)."""
        head = chat_frame(self.tokenizer, self.system_prompt if system is None else system)[0]
        return self.segment_keys(self.tokenize(Prompt.from_parts(head, (document,), "")))[-1]

    # ----------------------------------------------------------------- prefill
    def prefill(
        self,
        prompt: Prompt | TokenizedPrompt,
        *,
        use_cache: bool = True,
        mode: Mode | str = Mode.EXACT,
        recompute: float | None = None,
        need_logits: bool = True,
        reserve: int = 0,
    ) -> Prefill:
        """KV for the whole prompt, assembled as ``mode`` says (see :class:`Mode`); stores what was new.

        ``exact``: load the longest cached chain and prefill the rest. ``stitch``: load each document's
        artifact wherever it sits, moved to its position. ``blend``: stitch, then recompute the fraction
        ``recompute`` (default 0.15) of document tokens. ``use_cache=False`` is a plain prefill in any
        mode. ``reserve`` makes room in the cache for that many generated tokens without reallocating.
        """
        m = Mode.parse(mode)
        r = _recompute_fraction(m, recompute)
        tp = prompt if isinstance(prompt, TokenizedPrompt) else self.tokenize(prompt)
        loaded = self.loaded
        total = len(tp)
        if total == 0:
            raise InputError("the prompt is empty: nothing to prefill")
        if total >= loaded.context_window:
            raise ContextLengthError(
                f"the prompt has {total} tokens but {loaded.name} reads at most {loaded.context_window}: "
                "retrieve fewer or shorter documents (--k, --chunk-tokens) or shorten the question"
            )
        t0 = time.perf_counter()
        with loaded.lock, torch.inference_mode():
            if m is Mode.EXACT or not use_cache:
                return self._prefill_locked(tp, use_cache, need_logits, reserve, t0)
            from .stitch import prefill_stitched

            return prefill_stitched(self, tp, m, r, need_logits, reserve, t0)

    def _prefill_locked(
        self, tp: TokenizedPrompt, use_cache: bool, need_logits: bool, reserve: int, t0: float
    ) -> Prefill:
        loaded = self.loaded
        keys = self.segment_keys(tp) if use_cache else [""] * len(tp.segments)
        n_seg = len(tp.segments)

        def report(i: int, status: CacheStatus, tier: str | None = None) -> SegmentReport:
            key = keys[i] if status is not CacheStatus.NONE else None
            return SegmentReport(tp.source(i), len(tp.segments[i]), status, key, tier, tp.document(i))

        # 1. the longest cached chain
        reports: list[SegmentReport] = []
        hits: list[Artifact] = []
        last_tier: str | None = None
        pos = 0
        first_uncached = n_seg
        for i, seg in enumerate(tp.segments):
            hit = self.store.get(keys[i], accept=self._acceptor(tp, i, pos)) if use_cache and seg else None
            if seg and hit is None:
                first_uncached = i
                break
            if hit is not None:
                hits.append(hit.artifact)
                last_tier = hit.tier
            reports.append(report(i, CacheStatus.HIT if hit else CacheStatus.NONE, hit.tier if hit else None))
            pos += len(seg)
        # 2. prefill the rest on top of it
        rest: list[int] = [t for seg in tp.segments[first_uncached:] for t in seg] + list(tp.suffix)
        drop_last = not rest and need_logits  # all cached but logits wanted: recompute the last token
        # the ids go to the device before the KV copies are queued (a pageable copy waits for the stream)
        ids = torch.tensor([rest or tp.ids[-1:]], dtype=torch.long, device=loaded.device)
        cache = _cache_from_artifacts(
            hits,
            loaded.device,
            loaded.num_layers,
            len(tp) + reserve,
            drop_last=drop_last,
            model=loaded.model,
            # the last hit's rows are never rewritten, so the GPU tier may lend its block; not right
            # after a copy-up: a new block needs new step graphs (~50 ms), while copying is cheaper once
            adopt=not drop_last and last_tier == "gpu",
        )
        if drop_last:
            rest = tp.ids[-1:]
        logits: torch.Tensor | None = None
        if rest:
            logits = forward(loaded.model, ids, cache, pos - 1 if drop_last else pos)[-1]
        # 3. store the newly computed chain segments
        stored = 0
        start = pos
        for i in range(first_uncached, n_seg):
            seg = tp.segments[i]
            if use_cache and seg:
                self.store.put(
                    keys[i], self._artifact(cache, start, seg, keys[i], keys[i - 1] if i else "", tp.source(i))
                )
                stored += len(seg)
            reports.append(report(i, CacheStatus.MISS if use_cache and seg else CacheStatus.NONE))
            start += len(seg)
        return Prefill(
            cache=cache,
            logits=logits,
            prompt_tokens=len(tp),
            cached_tokens=pos,
            prefilled_tokens=len(tp) - pos,
            stored_tokens=stored,
            seconds=time.perf_counter() - t0,
            segments=reports,
        )

    def _acceptor(self, tp: TokenizedPrompt, i: int, start: int) -> Callable[[Artifact], str | None]:
        """A check that a stored artifact holds chain segment ``i`` of ``tp`` at ``start`` for this model
        and tokenizer (the ids compared exactly, as the int64 bytes ``tp`` converts once)."""
        seg = tp.segments[i]
        loaded = self.loaded
        fp = loaded.fingerprint
        n_layers = loaded.num_layers

        def accept(art: Artifact) -> str | None:
            m = art.meta
            if m.model_digest != fp.digest:
                return f"computed by another model ({m.model.get('architecture')}, {m.dtype})"
            if m.tokenizer_digest != loaded.tokenizer_digest:
                return "made with another tokenizer"
            if m.start != start or m.num_tokens != len(seg) or art.num_layers != n_layers:
                return "position, length or layer count differ from this request"
            if token_bytes(art.token_ids) != tp.token_bytes(i):
                return "token ids differ from this request"
            return None

        return accept

    def _artifact(self, cache: Any, start: int, seg: Sequence[int], key: str, parent: str, source: str) -> Artifact:
        fp = self.loaded.fingerprint
        end = start + len(seg)
        ks, vs = [], []
        for k, v in cache_layers(cache):
            ks.append(k[0, :, start:end, :].to("cpu", copy=True).contiguous())
            vs.append(v[0, :, start:end, :].to("cpu", copy=True).contiguous())
        meta = ArtifactMeta(
            key=key,
            model_digest=fp.digest,
            tokenizer_digest=self.loaded.tokenizer_digest,
            tokens_digest=tokens_digest(seg),
            num_tokens=len(seg),
            start=start,
            parent=parent,
            dtype=fp.dtype,
            model=fp.to_dict(),
            rope=fp.rope,
            source=source,
        )
        return Artifact(tuple(ks), tuple(vs), torch.tensor(list(seg), dtype=torch.int32), meta).sealed()

    # ----------------------------------------------------------------- generation
    def stream(
        self,
        prompt: Prompt | str,
        documents: Sequence[str] = (),
        *,
        settings: GenerationSettings | None = None,
        use_cache: bool = True,
        mode: Mode | str = Mode.EXACT,
        recompute: float | None = None,
        **settings_kwargs: Any,
    ) -> Stream:
        """Text pieces as they are generated; ``.result`` holds the :class:`Generation` afterwards.

        ``prompt`` is a :class:`Prompt` or a question (then ``documents`` are placed before it).
        ``mode`` and ``recompute`` are as in :meth:`prefill`. Keyword arguments not named here are
        :class:`GenerationSettings` fields.
        """
        p = prompt if isinstance(prompt, Prompt) else self.prompt(prompt, documents)
        s = settings or GenerationSettings(**settings_kwargs)
        m = Mode.parse(mode)
        r = _recompute_fraction(m, recompute)
        _ = self.loaded  # load before the clock starts: TTFT excludes model loading
        return Stream(self._generate(p, s, use_cache, m, r))

    def generate(
        self,
        prompt: Prompt | str,
        documents: Sequence[str] = (),
        *,
        settings: GenerationSettings | None = None,
        use_cache: bool = True,
        mode: Mode | str = Mode.EXACT,
        recompute: float | None = None,
        **settings_kwargs: Any,
    ) -> Generation:
        """The whole answer (see :meth:`stream` for the arguments)."""
        st = self.stream(
            prompt, documents, settings=settings, use_cache=use_cache, mode=mode, recompute=recompute, **settings_kwargs
        )
        for _ in st:
            pass
        assert st.result is not None  # set by the generator's return
        return st.result

    async def agenerate(self, prompt: Prompt | str, documents: Sequence[str] = (), **kwargs: Any) -> Generation:
        """:meth:`generate` in a worker thread."""
        return await asyncio.to_thread(self.generate, prompt, documents, **kwargs)

    async def astream(self, prompt: Prompt | str, documents: Sequence[str] = (), **kwargs: Any) -> AsyncIterator[str]:
        """:meth:`stream` as an async iterator (the model runs in a worker thread)."""
        st = await asyncio.to_thread(self.stream, prompt, documents, **kwargs)
        sentinel = object()
        while True:
            piece = await asyncio.to_thread(next, st, sentinel)
            if piece is sentinel:
                return
            yield str(piece)

    def _generate(
        self, prompt: Prompt, settings: GenerationSettings, use_cache: bool, mode: Mode, recompute: float
    ) -> Generator[str, None, Generation]:
        t0 = time.perf_counter()
        loaded = self.loaded
        pre = self.prefill(prompt, use_cache=use_cache, mode=mode, recompute=recompute, reserve=settings.max_new_tokens)
        budget = min(settings.max_new_tokens, loaded.context_window - pre.prompt_tokens)
        eos = _eos_ids(loaded)
        sampler = Sampler(settings, loaded.device)
        text = TextStream(loaded.tokenizer, settings.stop)
        logits = pre.logits
        assert logits is not None
        ids: list[int] = []
        ttft = 0.0
        finish = "length"
        pos = pre.prompt_tokens
        for step in range(budget):
            tid = sampler(logits)
            if step == 0:
                ttft = time.perf_counter() - t0
            if tid in eos:
                finish = "stop"
                break
            ids.append(tid)
            piece = text.push(tid)
            if piece:
                yield piece
            if text.stopped:
                finish = "stop"
                break
            if step == budget - 1:
                break
            with loaded.lock, torch.inference_mode():
                step_ids = torch.tensor([[tid]], dtype=torch.long, device=loaded.device)
                logits = forward(loaded.model, step_ids, pre.cache, pos)[-1]
            pos += 1
        tail = text.finish()
        if tail:
            yield tail
        return Generation(
            text=text.text,
            token_ids=ids,
            finish_reason=finish,
            mode=pre.mode,
            prompt_tokens=pre.prompt_tokens,
            cached_tokens=pre.cached_tokens,
            prefilled_tokens=pre.prefilled_tokens,
            stored_tokens=pre.stored_tokens,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            prefill_s=pre.seconds,
            segments=pre.segments,
            recomputed_tokens=pre.recomputed_tokens,
        )

    # ----------------------------------------------------------------- publishing
    def publish(
        self,
        documents: Sequence[str],
        *,
        sources: Sequence[str] = (),
        system: str | None = None,
        progress: bool = False,
    ) -> list[PublishReport]:
        """Compute and store each document's KV (right after the system prefix) unless already stored."""
        if isinstance(documents, str):
            documents = [documents]
        if sources and len(sources) != len(documents):
            raise InputError(f"sources has {len(sources)} entries for {len(documents)} documents")
        head = chat_frame(self.tokenizer, self.system_prompt if system is None else system)[0]
        reports: list[PublishReport] = []
        items = list(enumerate(documents))
        bar: Any = items
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(items, desc="publishing", unit="doc")
        for i, doc in bar:
            if not isinstance(doc, str) or not doc.strip():
                raise InputError(f"documents[{i}] is empty: drop it or give it text")
            src = sources[i] if sources else f"doc{i}"
            t0 = time.perf_counter()
            pre = self.prefill(Prompt.from_parts(head, (doc,), "", (src,)), need_logits=False)
            rep = pre.segments[-1]
            if self.priming:
                from .stitch import publish_primed

                publish_primed(self, doc, src, system)
            self.register_documents({doc: src})
            reports.append(PublishReport(src, rep.key or "", rep.tokens, rep.cache, time.perf_counter() - t0))
        return reports

    # ----------------------------------------------------------------- reference
    def reference_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Last-position float32 logits of a from-scratch prefill of ``ids`` (no store involved)."""
        loaded = self.loaded
        with loaded.lock, torch.inference_mode():
            t = torch.tensor([list(ids)], dtype=torch.long, device=loaded.device)
            out = loaded.model(input_ids=t, use_cache=False, logits_to_keep=1)
            return out.logits[0, -1].float()


class Stream(Iterator[str]):
    """An iterator of text pieces; after it is exhausted, :attr:`result` holds the :class:`Generation`."""

    def __init__(self, gen: Generator[str, None, Generation]) -> None:
        self._gen = gen
        self.result: Generation | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self) -> None:
        """Stop generating early (no result is recorded)."""
        self._gen.close()


def _priming_text(priming: bool | str) -> str:
    """The filler of ``Engine(priming=...)``: ``True`` is :data:`kv_rag.stitch.PRIMING_TEXT`, ``False`` none."""
    if priming is True:
        from .stitch import PRIMING_TEXT

        return PRIMING_TEXT
    if priming is False:
        return ""
    if not isinstance(priming, str) or not priming.strip():
        raise InputError(f"priming must be True, False or a non-empty filler text, got {priming!r}")
    return priming


def _recompute_fraction(mode: Mode, recompute: float | None) -> float:
    """The blend fraction to use: ``recompute`` checked to lie in [0, 1], or the default for blend."""
    if recompute is None:
        return BLEND_RECOMPUTE if mode is Mode.BLEND else 0.0
    if not isinstance(recompute, (int, float)) or not 0.0 <= float(recompute) <= 1.0:
        raise InputError(f"recompute must be a fraction between 0 and 1 (of document tokens), got {recompute!r}")
    if mode is not Mode.BLEND and recompute:
        raise InputError(f"recompute={recompute} applies to mode 'blend' only; got mode {mode.value!r}")
    return float(recompute)


def _cache_from_artifacts(
    arts: Sequence[Artifact],
    device: torch.device,
    num_layers: int,
    capacity: int,
    drop_last: bool = False,
    model: Any = None,
    adopt: bool = False,
) -> Any:
    """A cache holding the artifacts' KV in order (each copied once, to ``device``; ``model``, ``adopt``:
    see ``build_cache``)."""
    if not arts:
        return build_cache(None, None, num_layers, capacity, model=model)
    end = -1 if drop_last else None
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    for layer in range(num_layers):
        ks = [a.keys[layer].to(device, non_blocking=True).unsqueeze(0) for a in arts]
        vs = [a.values[layer].to(device, non_blocking=True).unsqueeze(0) for a in arts]
        if drop_last:
            ks[-1], vs[-1] = ks[-1][..., :end, :], vs[-1][..., :end, :]
        keys.append(ks)
        values.append(vs)
    return build_cache(keys, values, num_layers, capacity, model=model, adopt=adopt)


def _eos_ids(loaded: models.LoadedModel) -> set[int]:
    ids: set[int] = set()
    tok_eos = loaded.tokenizer.eos_token_id
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen_cfg = getattr(loaded.model, "generation_config", None)
    g = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(g, int):
        ids.add(g)
    elif isinstance(g, (list, tuple)):
        ids.update(int(x) for x in g)
    return ids
