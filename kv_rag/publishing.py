"""Publishing: documents' KV computed and stored ahead of requests, marked public, or prefetched.

The :class:`~kv_rag.engine.Engine` methods of the same names call these.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from .assemble import assemble_chain
from .errors import InputError
from .options import Mode
from .prompt import Prompt, chat_frame
from .results import CacheStatus, PublishReport

#: a :class:`kv_rag.engine.Engine` (the engine imports this module, so it is not imported back)
Engine = Any


def publish(
    engine: Engine,
    documents: Sequence[str],
    sources: Sequence[str] = (),
    system: str | None = None,
    progress: bool = False,
    public: bool = False,
) -> list[PublishReport]:
    """:meth:`Engine.publish`."""
    if isinstance(documents, str):
        documents = [documents]
    if sources and len(sources) != len(documents):
        raise InputError(f"sources has {len(sources)} entries for {len(documents)} documents")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc.strip():
            raise InputError(f"documents[{i}] is empty: drop it or give it text")
    if public:
        mark_public(engine, documents, system)
    sys_prompt = engine.system_prompt if system is None else system
    head = chat_frame(engine.tokenizer, sys_prompt)[0]
    exact = engine.options.merge(mode=Mode.EXACT)
    reports: list[PublishReport] = []
    items = list(enumerate(documents))
    bar: Any = items
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(items, desc="publishing", unit="doc")
    for i, doc in bar:
        src = sources[i] if sources else f"doc{i}"
        t0 = time.perf_counter()
        tp = engine.tokenize(Prompt.from_parts(head, (doc,), "", (src,)))
        if not tp.segments:  # the prompt could not be cut at the document's edges
            engine.loaded.warn_once(
                f"{src} was not published: this tokenizer does not cut its text from the text around it "
                "where it does on its own (e.g. leading whitespace that merges with the text before it), "
                "so its KV would depend on that text; strip its leading and trailing whitespace",
                stacklevel=4,
            )
            reports.append(PublishReport(src, "", 0, CacheStatus.NONE, time.perf_counter() - t0))
            continue
        pre = engine.prefill(tp, options=exact, need_logits=False)
        rep = pre.segments[-1]
        if engine.priming:
            _publish_primed(engine, tp.segments[-1], src, sys_prompt)
        engine.register_documents({doc: src})
        reports.append(PublishReport(src, rep.key or "", rep.tokens, rep.cache, time.perf_counter() - t0))
    return [dataclasses.replace(r, stored=_held(engine, r.key)) for r in reports]


def loading_key(engine: Engine, document: str, options: Any) -> str:
    """What :meth:`Engine.loading_key` returns (``options``: the request's :class:`~kv_rag.options.RequestOptions`)."""
    if options.mode is Mode.EXACT:
        return engine.document_key(document)
    head = chat_frame(engine.tokenizer, engine.system_prompt)[0]
    ids = engine.tokenize(Prompt.from_parts(head, (document,), "")).segments[-1]
    return engine.planner.document_key(ids, engine.planner.context(engine.system_prompt, options.priming))


def mark_public(engine: Engine, documents: Sequence[str], system: str | None = None) -> None:
    """:meth:`Engine.mark_public`: the documents' ids digests (as a request tokenizes them) join the
    planner's public set."""
    planner = engine.planner
    if planner.tenant is None:
        return
    head = chat_frame(engine.tokenizer, engine.system_prompt if system is None else system)[0]
    for doc in documents:
        if isinstance(doc, str) and doc.strip():
            tp = engine.tokenize(Prompt.from_parts(head, (doc,), ""))
            planner.public.update(tp.digest(i) for i in range(len(tp.segments)) if tp.is_document[i])


def _held(engine: Engine, key: str) -> bool:
    """Whether the store's last tier holds ``key`` (one that cannot be asked does not)."""
    try:
        return bool(key) and key in engine.store.durable
    except OSError:
        return False


def prefetch(engine: Engine, documents: Sequence[str], system: str | None = None) -> None:
    """:meth:`Engine.prefetch`."""
    texts = [d for d in documents if isinstance(d, str) and d.strip()]
    keys = [engine.document_key(d, system=system) for d in texts]
    if engine.priming:
        planner = engine.planner
        context = planner.context(engine.system_prompt if system is None else system, engine.priming)
        ids = engine.loaded.prompt_tokenizer
        split = engine.split_special_tokens
        scope = planner.tenant.scope if planner.tenant is not None else ""
        keys += [planner.document_key(ids.document(d.strip(), split, scope).ids, context) for d in texts]
    if keys:
        engine.store.prefetch(keys)


def _publish_primed(engine: Engine, doc_ids: tuple[int, ...], source: str, system: str) -> None:
    """Store the document's primed artifact (computed after the primed context) unless stored."""
    planner = engine.planner
    context = planner.context(system, engine.priming)
    n = len(context.pieces)
    chain = planner.chain(
        (*(p.ids for p in context.pieces), doc_ids), ("text",) * n + (source,), (False,) * n + (True,), shared=False
    )
    loaded = engine.loaded
    with loaded.lock, torch.inference_mode():
        assemble_chain(loaded, engine.store, chain, need_logits=False)
