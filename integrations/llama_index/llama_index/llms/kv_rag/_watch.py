"""Register what LlamaIndex retrievers return, so that KVRagLLM finds those nodes in later prompts.

One event handler on LlamaIndex's root instrumentation dispatcher (added once per process, when
the first watching KVRagLLM is constructed) forwards every ``RetrievalEndEvent`` to the live
watching LLMs. The LLMs are held weakly: an LLM that is gone stops receiving events.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent

if TYPE_CHECKING:
    from .base import KVRagLLM


class _RetrievalWatcher(BaseEventHandler):
    """Forwards retrieved nodes to every live watching KVRagLLM."""

    @classmethod
    def class_name(cls) -> str:
        """Name of this handler."""
        return "KVRagRetrievalWatcher"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        """Register the nodes of a finished retrieval with each watching LLM."""
        if isinstance(event, RetrievalEndEvent) and event.nodes:
            with _LOCK:
                llms = [ref() for ref in _LLMS.values()]
            for llm in llms:
                if llm is not None:
                    llm.register_nodes(event.nodes)


_LLMS: dict[int, weakref.ReferenceType[KVRagLLM]] = {}  # by id(): pydantic models are unhashable
_LOCK = threading.RLock()  # re-entrant: a weakref callback may run while it is held
_HANDLER: list[_RetrievalWatcher] = []


def watch_retrievals(llm: KVRagLLM) -> None:
    """Make ``llm`` learn the nodes that any retriever in this process returns from now on."""
    with _LOCK:
        if not _HANDLER:
            handler = _RetrievalWatcher()
            get_dispatcher().add_event_handler(handler)
            _HANDLER.append(handler)
        key = id(llm)
        _LLMS[key] = weakref.ref(llm, lambda _ref: _forget(key, _ref))


def _forget(key: int, ref: weakref.ReferenceType[KVRagLLM]) -> None:
    with _LOCK:
        if _LLMS.get(key) is ref:
            del _LLMS[key]
