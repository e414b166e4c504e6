"""A request's prompt as segments: plain text and documents, in order.

A prompt's ids are those of a plain tokenization of its whole text, assembled per segment by
:class:`kv_rag.tokens.PromptTokenizer` (documents' ids remembered, boundaries checked). The segments
up to and including the last document form the cacheable chain; what follows (the question and the
generation prompt) is always prefilled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .docindex import DocumentIndex, choose, document_items, find_occurrences
from .errors import InputError
from .tools import template_takes_tools, with_fallback_tools

_SENTINEL = "\x00KVRAG_USER\x00"
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Segment:
    """A run of prompt text; ``document`` marks a retrieved document (named by ``source``)."""

    text: str
    document: bool = False
    source: str = ""


@dataclass(frozen=True)
class Prompt:
    """An ordered tuple of :class:`Segment`."""

    segments: tuple[Segment, ...]

    @classmethod
    def from_parts(
        cls,
        prefix: str,
        documents: Sequence[str],
        suffix: str,
        sources: Sequence[str] = (),
        separator: str = DOCUMENT_SEPARATOR,
    ) -> Prompt:
        """``prefix``, each document followed by ``separator``, then ``suffix``."""
        segs = [Segment(prefix)]
        for i, doc in enumerate(documents):
            segs.append(Segment(doc, True, sources[i] if i < len(sources) else f"doc{i}"))
            segs.append(Segment(separator))
        segs.append(Segment(suffix))
        return cls(tuple(s for s in segs if s.text))

    @property
    def documents(self) -> tuple[str, ...]:
        """The document texts, in order."""
        return tuple(s.text for s in self.segments if s.document)

    @property
    def sources(self) -> tuple[str, ...]:
        """The document sources, in order."""
        return tuple(s.source for s in self.segments if s.document)

    @property
    def text(self) -> str:
        """The whole prompt as one string."""
        return "".join(s.text for s in self.segments)


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids of the chain segments (up to the last document) and of the suffix after them."""

    segments: tuple[tuple[int, ...], ...]
    suffix: tuple[int, ...]
    is_document: tuple[bool, ...] = ()
    sources: tuple[str, ...] = ()
    _memo: dict[tuple[str, int], Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def remember(self, i: int, ids_bytes: bytes, digest: str) -> None:
        """Record chain segment ``i``'s int64 bytes and digest, known already (a remembered document)."""
        self._memo[("bytes", i)] = ids_bytes
        self._memo[("digest", i)] = digest

    def token_bytes(self, i: int) -> bytes:
        """Chain segment ``i``'s ids as :func:`~kv_rag.fingerprint.token_bytes`, converted once."""
        got = self._memo.get(("bytes", i))
        if got is None:
            from .fingerprint import token_bytes

            got = self._memo[("bytes", i)] = token_bytes(self.segments[i])
        return got

    def digest(self, i: int) -> str:
        """Digest of chain segment ``i``'s ids (:func:`~kv_rag.fingerprint.tokens_digest`), computed once."""
        got = self._memo.get(("digest", i))
        if got is None:
            from .fingerprint import tokens_digest

            got = self._memo[("digest", i)] = tokens_digest(self.token_bytes(i))
        return got

    @property
    def ids(self) -> list[int]:
        """All ids in order."""
        out: list[int] = []
        for seg in self.segments:
            out.extend(seg)
        out.extend(self.suffix)
        return out

    def source(self, i: int) -> str:
        """Name of chain segment ``i`` (its document source, or ``text``)."""
        return self.sources[i] if i < len(self.sources) and self.sources[i] else "text"

    def document(self, i: int) -> bool:
        """Whether chain segment ``i`` is a document."""
        return i < len(self.is_document) and self.is_document[i]

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments) + len(self.suffix)


def chat_frame(tokenizer: Any, system: str) -> tuple[str, str]:
    """Text before and after the user's message in the tokenizer's chat template.

    Without a chat template: ``system`` + blank line before, and ``"\\nAnswer:"`` after.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(rendered, str) and rendered.count(_SENTINEL) == 1:
            head, tail = rendered.split(_SENTINEL)
            return head, tail
    return (system + "\n\n" if system else ""), "\nAnswer:"


def render_messages(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """Chat messages (``role``/``content``, and ``tool_calls``, ``tool_call_id``, ``name`` where given) as
    prompt text, ending with the assistant's generation prompt.

    ``tools`` (OpenAI-style dicts) go through the chat template when it takes them; otherwise they are
    listed in the system message and calls in the history written out (:func:`kv_rag.tools.with_fallback_tools`).
    Without a chat template: ``role: content`` lines and a final ``assistant:``.
    """
    if not messages:
        raise InputError("messages is empty: pass at least one message with role and content")
    msgs = [_message(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        if template_takes_tools(tokenizer):
            extra = {"tools": list(tools)} if tools else {}
            return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra))
        msgs = with_fallback_tools(msgs, tools or ())
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    msgs = with_fallback_tools(msgs, tools or ())
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def _message(m: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": str(m["role"]), "content": str(m.get("content") or "")}
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def build_prompt(
    tokenizer: Any,
    question: str,
    documents: Sequence[str] = (),
    system: str = "",
    sources: Sequence[str] = (),
) -> Prompt:
    """A RAG prompt: the chat template's system part, the documents, then the question."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("question is empty: pass the text to answer, e.g. 'What does assert do?'")
    docs = tuple(documents)
    for i, doc in enumerate(docs):
        if not isinstance(doc, str) or not doc.strip():
            raise InputError(f"documents[{i}] is empty: drop it or give it text")
    if sources and len(sources) != len(docs):
        raise InputError(f"sources has {len(sources)} entries for {len(docs)} documents")
    head, tail = chat_frame(tokenizer, system)
    return Prompt.from_parts(head, docs, f"Question: {question}{tail}", sources)


def locate(
    text: str,
    documents: Mapping[str, str] | Sequence[str],
    extra: Mapping[str, str] | Sequence[str] | None = None,
) -> Prompt:
    """Split ``text`` at every verbatim occurrence of a known document.

    ``documents`` maps document text to its source (or is a sequence of texts, or a
    :class:`~kv_rag.docindex.DocumentIndex`); ``extra`` adds more (its sources win). Occurrences
    are taken longer documents first where they overlap, then left to right; each document text
    may occur several times. A text with no known document is one plain segment.
    """
    if not isinstance(text, str) or not text:
        raise InputError("the prompt is empty: pass the text to complete")
    index = documents if isinstance(documents, DocumentIndex) else DocumentIndex(document_items(documents))
    more = dict(document_items(extra)) if extra is not None else {}
    found = index.occurrences(text)
    found += find_occurrences(text, (d for d in more if d.strip() and d not in index))
    segs: list[Segment] = []
    pos = 0
    for s, e, doc in choose(found):
        if s > pos:
            segs.append(Segment(text[pos:s]))
        segs.append(Segment(doc, True, more[doc] if doc in more else index[doc]))
        pos = e
    if pos < len(text):
        segs.append(Segment(text[pos:]))
    return Prompt(tuple(segs))
