"""KVCacheRetriever: wraps any LlamaIndex retriever and warms the KV caches of what it returns."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle

from .base import METADATA_KEY, KVRagLLM, _source


class KVCacheRetriever(BaseRetriever):
    """Returns what ``retriever`` returns, each node's KV warmed for ``llm`` and its key in the metadata.

    For every node, the text a response synthesizer puts into the prompt
    (``node.get_content(metadata_mode=MetadataMode.LLM)``, which includes the metadata lines) is
    registered with ``llm``'s model, so that ``llm`` finds it in any prompt, and (when publishing)
    its KV is computed once and stored. The key of the artifact a request will load for the node
    (:meth:`kv_rag.Engine.loading_key`: in stitch and blend the node's own artifact, primed when
    ``priming`` is on; in exact mode only when publishing, the published artifact) goes into
    ``node.metadata["kv_rag_key"]``, which is excluded from the LLM and the embedding text, so the
    text is unchanged. The nodes are
    copies: the wrapped retriever's own nodes are not modified.

    Args:
        retriever: any LlamaIndex retriever.
        llm: the :class:`KVRagLLM` that will answer.
        publish: compute and store each node's KV now. ``None`` (default): when ``llm``'s mode reads
            it (the core's decision, :attr:`kv_rag.RequestOptions.publishes_documents`: stitch and
            blend, not exact). In exact mode a document's KV is only valid after the exact text that
            precedes it in the prompt, so the first request over a set of nodes stores the chain and
            later ones load it; a node published on its own would not be read.
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        llm: KVRagLLM,
        *,
        publish: bool | None = None,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(retriever, BaseRetriever):
            raise TypeError(f"retriever must be a LlamaIndex BaseRetriever; got {type(retriever).__name__}")
        if not isinstance(llm, KVRagLLM):
            raise TypeError(f"llm must be a KVRagLLM; got {type(llm).__name__}")
        self.retriever = retriever
        self.llm = llm
        self.publish = llm.default_options().publishes_documents if publish is None else publish
        super().__init__(callback_manager=callback_manager or retriever.callback_manager, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self.warm(self.retriever.retrieve(query_bundle))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = await self.retriever.aretrieve(query_bundle)
        return await asyncio.to_thread(self.warm, nodes)

    def warm(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        """Copies of ``nodes`` with their artifact keys in the metadata; register (and publish) their text."""
        engine = self.llm.engine
        opts = self.llm.default_options()
        keyed = self.publish or opts.publishes_documents
        out: list[NodeWithScore] = []
        texts: dict[str, str] = {}
        for nws in nodes:
            node = _with_hidden_key(nws.node)
            text = node.get_content(metadata_mode=MetadataMode.LLM)
            if text.strip():
                if keyed:
                    node.metadata[METADATA_KEY] = engine.loading_key(text, opts)
                texts.setdefault(text, _source(nws))
            out.append(NodeWithScore(node=node, score=nws.score))
        if texts and self.publish:
            engine.publish(list(texts), sources=list(texts.values()))
        elif texts:
            engine.register_documents(texts)
        return out


def _with_hidden_key(node: BaseNode) -> BaseNode:
    """A copy of ``node`` with metadata and exclusion lists of its own, the key excluded from both texts."""
    copy = node.model_copy()
    copy.metadata = dict(node.metadata)
    copy.excluded_llm_metadata_keys = _plus(node.excluded_llm_metadata_keys, METADATA_KEY)
    copy.excluded_embed_metadata_keys = _plus(node.excluded_embed_metadata_keys, METADATA_KEY)
    return copy


def _plus(keys: list[str], key: str) -> list[str]:
    return list(keys) if key in keys else [*keys, key]
