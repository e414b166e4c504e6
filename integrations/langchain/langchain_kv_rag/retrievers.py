"""KVCacheRetriever: wraps any retriever and makes sure the documents it returns have their KV published."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import Field, PrivateAttr

from kv_rag import Engine, PublishReport

from ._base import KVRagParams

logger = logging.getLogger(__name__)

#: Longest time a background publish waits for the model to be idle before it runs anyway.
_MAX_WAIT_S = 60.0

#: ``Document.metadata`` entries this retriever adds.
KEY_FIELD = "kv_rag_key"
SOURCE_FIELD = "kv_rag_source"


class KVCacheRetriever(BaseRetriever):
    """Any LangChain retriever, plus: the KV of every document it returns is published for ``llm``.

    For each returned document the retriever

    * registers its text with ``llm``'s model, so that :class:`~langchain_kv_rag.ChatKVRag` and
      :class:`~langchain_kv_rag.KVRagLLM` find it inside whatever prompt the chain builds;
    * when publishing (see ``publish``), publishes its KV (computes and stores it unless already
      stored), by default in a background thread that waits until ``llm`` has no request running,
      so that publishing never delays the answer the chain is about to ask for (a pause of
      ``grace_s`` lets that request start first);
    * records the key of the artifact a request will load for the document in
      ``metadata["kv_rag_key"]`` (:meth:`kv_rag.Engine.loading_key`: in stitch and blend its own
      artifact, primed when ``priming`` is on; in exact mode only when publishing, the published
      artifact) and the source name in ``metadata["kv_rag_source"]``. ``page_content`` is not
      changed, and the wrapped retriever's documents are not modified (the returned documents are copies).

    In ``exact`` mode a chain reuses the KV of its whole prompt prefix (template text and documents
    in order) from the second question on the same documents: a document's own artifact would not
    be read, so it is not published unless asked. The position-independent modes (``stitch``,
    ``blend``) load the published artifacts from the first question on.

    Args:
        retriever: the retriever to wrap.
        llm: the :class:`~langchain_kv_rag.ChatKVRag` or :class:`~langchain_kv_rag.KVRagLLM` that
            will read the documents (its model and store are used).
        k: return at most this many documents; the wrapped retriever's ``k`` (or
            ``search_kwargs["k"]``) is set to it when it has one. A call may pass ``k=`` too.
        publish: compute and store each document's KV. ``None`` (default): when ``llm``'s mode reads
            it (the core's decision, :attr:`kv_rag.RequestOptions.publishes_documents`: stitch and
            blend, not exact).
        background: publish in a worker thread (``True``) or before returning (``False``).
        grace_s: how long the worker lets the chain's next request start before it checks for a pause.
    """

    retriever: BaseRetriever
    llm: KVRagParams
    k: int | None = Field(default=None, ge=1)
    publish: bool | None = None
    background: bool = True
    grace_s: float = Field(default=0.25, ge=0.0)
    source_key: str = "source"
    """Metadata entry used as a document's source name when it has one (else its id, else ``doc<i>``)."""

    _pool: ThreadPoolExecutor | None = PrivateAttr(default=None)
    _pending: dict[str, Future[PublishReport | None]] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def engine(self) -> Engine:
        """The engine of ``llm`` (its model, store and known documents)."""
        return self.llm.engine

    @property
    def publishes(self) -> bool:
        """Whether returned documents are published (``publish``, or the core's decision for ``llm``'s mode)."""
        return self.publish if self.publish is not None else self.llm.default_options().publishes_documents

    # ------------------------------------------------------------------ retrieval
    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k = kwargs.pop("k", self.k)
        docs = _with_k(self.retriever, k).invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        return self._publish(docs[:k] if k else docs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        import asyncio

        k = kwargs.pop("k", self.k)
        docs = await _with_k(self.retriever, k).ainvoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        return await asyncio.to_thread(self._publish, docs[:k] if k else docs)

    # ------------------------------------------------------------------ publishing
    def _publish(self, docs: Sequence[Document]) -> list[Document]:
        engine = self.engine
        opts = self.llm.default_options()
        keyed = self.publishes or opts.publishes_documents
        out: list[Document] = []
        todo: list[tuple[str, str, str]] = []
        for i, doc in enumerate(docs):
            text = doc.page_content
            if not text.strip():
                out.append(doc)
                continue
            src = str(doc.metadata.get(self.source_key) or doc.id or f"doc{i}")
            key = engine.loading_key(text, opts) if keyed else ""
            meta = {**doc.metadata, SOURCE_FIELD: src} | ({KEY_FIELD: key} if key else {})
            out.append(Document(page_content=text, metadata=meta, id=doc.id))
            todo.append((text, src, key))
        engine.register_documents({text: src for text, src, _ in todo})
        if not self.publishes:
            return out
        for text, src, key in todo:
            if self.background:
                self._submit(text, src, key)
            else:
                _publish_one(engine, text, src, key)
        return out

    def _submit(self, text: str, src: str, key: str) -> None:
        with self._lock:
            if key in self._pending and not self._pending[key].done():
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-rag-publish")
            fut = self._pool.submit(self._publish_when_idle, text, src, key)
            self._pending[key] = fut
            fut.add_done_callback(functools.partial(self._forget, key))

    def _publish_when_idle(self, text: str, src: str, key: str) -> PublishReport | None:
        time.sleep(self.grace_s)
        self.llm.activity.wait_idle(timeout=_MAX_WAIT_S)
        return _publish_one(self.engine, text, src, key)

    def _forget(self, key: str, fut: Future[PublishReport | None]) -> None:
        with self._lock:
            if self._pending.get(key) is fut:
                del self._pending[key]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the documents returned so far are published; ``False`` if ``timeout`` ran out."""
        with self._lock:
            futures = list(self._pending.values())
        if not futures:
            return True
        _, not_done = wait(futures, timeout=timeout)
        return not not_done

    def close(self) -> None:
        """Finish pending publishes and stop the worker thread (a later call starts a new one)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _publish_one(engine: Engine, text: str, src: str, key: str) -> PublishReport | None:
    """Publish one document unless the store has it (then prefetch it into the faster tiers); a failure is
    logged (the chat model will prefill it)."""
    try:
        if key in engine.store:  # stored already (maybe on disk only): copy it up into the faster tiers
            engine.store.prefetch([key])
            return None
        return engine.publish([text], sources=[src])[0]
    except Exception:  # a failed publish is a miss later, never an error in the chain
        logger.warning("kv-rag: publishing %s failed; it will be prefilled when used", src, exc_info=True)
        return None


def _with_k(retriever: BaseRetriever, k: int | None) -> BaseRetriever:
    """A copy of ``retriever`` that returns ``k`` documents, when it has a ``k`` setting; else itself."""
    if k is None:
        return retriever
    fields = type(retriever).model_fields
    if "k" in fields:
        return retriever.model_copy(update={"k": k})
    if "search_kwargs" in fields and isinstance(getattr(retriever, "search_kwargs", None), dict):
        return retriever.model_copy(update={"search_kwargs": {**retriever.search_kwargs, "k": k}})  # type: ignore[attr-defined]
    return retriever
