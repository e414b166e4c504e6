"""LlamaIndex integration of kv-rag: an LLM that reuses published document KV caches, and a retriever that warms them.

::

    from llama_index.llms.kv_rag import KVCacheRetriever, KVRagLLM

    llm = KVRagLLM(max_new_tokens=128)                  # embedded SmolLM2-135M-Instruct
    engine = index.as_query_engine(llm=llm)             # retrieved nodes are found in the prompt
"""

from .base import METADATA_KEY, KVRagLLM, usage
from .retriever import KVCacheRetriever

__all__ = ["METADATA_KEY", "KVCacheRetriever", "KVRagLLM", "usage"]
