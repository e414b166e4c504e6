"""A request's prompt as segments: a prefix, the documents in order, and a suffix.

Each segment is tokenized on its own and the ids are concatenated, so a document's tokens are the
same wherever it appears; the from-scratch reference for exactness is a prefill of those same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

_SENTINEL = "\x00KVRAG_USER\x00"
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Prompt:
    """``prefix`` + each of ``documents`` (followed by a blank line) + ``suffix``.

    ``sources`` optionally names each document (file path, URL) for reports.
    """

    prefix: str
    documents: tuple[str, ...]
    suffix: str
    sources: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The whole prompt as one string."""
        return self.prefix + "".join(document_segment(d) for d in self.documents) + self.suffix


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids per segment: ``segments[0]`` is the prefix, then one per document; then the suffix."""

    segments: tuple[tuple[int, ...], ...]
    suffix: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        """All ids in order."""
        out: list[int] = []
        for seg in self.segments:
            out.extend(seg)
        out.extend(self.suffix)
        return out

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments) + len(self.suffix)


def document_segment(document: str) -> str:
    """The text a document occupies in a prompt."""
    return document + DOCUMENT_SEPARATOR


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
    return Prompt(prefix=head, documents=docs, suffix=f"Question: {question}{tail}", sources=tuple(sources))


def tokenize(tokenizer: Any, prompt: Prompt) -> TokenizedPrompt:
    """Tokenize each segment on its own (special tokens only at the very start)."""

    def enc(text: str, first: bool) -> tuple[int, ...]:
        if not text:
            return ()
        return tuple(tokenizer(text, add_special_tokens=first)["input_ids"])

    prefix = enc(prompt.prefix, True)
    segs = [prefix] + [enc(document_segment(d), not prefix and i == 0) for i, d in enumerate(prompt.documents)]
    suffix = enc(prompt.suffix, not any(segs))
    return TokenizedPrompt(segments=tuple(segs), suffix=suffix)
