"""LangChain integration of kv-rag: a chat model, a completion model and a retriever that reuse KV caches.

::

    from langchain_kv_rag import ChatKVRag, KVCacheRetriever

    chat = ChatKVRag(max_tokens=64)                      # embedded SmolLM2-135M-Instruct
    retriever = KVCacheRetriever(retriever=my_retriever, llm=chat)
    chain = retriever | format_docs | prompt | chat | StrOutputParser()   # any RAG chain
"""

from .chat_models import ChatKVRag
from .llms import KVRagLLM
from .retrievers import KVCacheRetriever

__version__ = "0.1.0"

__all__ = ["ChatKVRag", "KVCacheRetriever", "KVRagLLM", "__version__"]
