"""Known document texts, and where they occur verbatim in a prompt's text.

``Engine.prompt_from_text`` splits a ready-made prompt (from LangChain, LlamaIndex or a user's own
template) at every document this process has published. With many known documents, searching the
prompt once per document costs documents x prompt length (65 ms for 10,000 documents and a
7,500-character prompt on the 2-core CI machine), so :class:`DocumentIndex` keys each document by its
first :data:`ANCHOR_CHARS` characters and reads the prompt once, looking up every position.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

#: Characters of a document's start that the index keys it by.
ANCHOR_CHARS = 32

#: From this many documents on, one pass over the prompt beats one search per document.
SCAN_FROM_DOCUMENTS = 64

Occurrence = tuple[int, int, str]  # start, end, document text


def document_items(documents: Mapping[str, str] | Sequence[str]) -> list[tuple[str, str]]:
    """``(text, source)`` pairs: a mapping as it is, a sequence of texts named ``doc0``, ``doc1``…"""
    if isinstance(documents, Mapping):
        return [(str(t), str(s)) for t, s in documents.items()]
    return [(str(d), f"doc{i}") for i, d in enumerate(documents)]


class DocumentIndex(Mapping[str, str]):
    """Document text -> source, least recently registered first, bounded by :meth:`remember`.

    Not thread-safe by itself: a loaded model guards its index with the model's lock.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._docs: OrderedDict[str, str] = OrderedDict()
        self._anchors: dict[str, list[str]] = {}
        self._short: set[str] = set()
        self.chars = 0
        for text, src in items:
            if text.strip() and text not in self._docs:
                self._add(text, src)

    def __getitem__(self, text: str) -> str:
        return self._docs[text]

    def __iter__(self) -> Iterator[str]:
        return iter(self._docs)

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, text: object) -> bool:
        return text in self._docs

    def remember(self, items: Iterable[tuple[str, str]], max_chars: int) -> None:
        """Add ``(text, source)`` pairs (a known text keeps its first source and becomes the most
        recent; blank texts are skipped), then forget the least recent until at most ``max_chars``
        characters remain (the most recent document is always kept)."""
        for text, src in items:
            if not text.strip():
                continue
            if text in self._docs:
                self._docs.move_to_end(text)
            else:
                self._add(text, src)
        while self.chars > max_chars and len(self._docs) > 1:
            old, _ = self._docs.popitem(last=False)
            self._drop(old)

    def _add(self, text: str, src: str) -> None:
        self._docs[text] = src
        self.chars += len(text)
        if len(text) >= ANCHOR_CHARS:
            self._anchors.setdefault(text[:ANCHOR_CHARS], []).append(text)
        else:
            self._short.add(text)

    def _drop(self, text: str) -> None:
        self.chars -= len(text)
        if len(text) < ANCHOR_CHARS:
            self._short.discard(text)
            return
        anchor = text[:ANCHOR_CHARS]
        same = self._anchors[anchor]
        same.remove(text)
        if not same:
            del self._anchors[anchor]

    def occurrences(self, text: str) -> list[Occurrence]:
        """Every verbatim occurrence of every known document in ``text`` (overlaps included)."""
        if len(self._docs) < SCAN_FROM_DOCUMENTS:
            return find_occurrences(text, self._docs)
        out = find_occurrences(text, self._short)
        anchors = self._anchors
        for i in range(len(text) - ANCHOR_CHARS + 1):
            same = anchors.get(text[i : i + ANCHOR_CHARS])
            if same:
                out.extend((i, i + len(doc), doc) for doc in same if text.startswith(doc, i))
        return out


def find_occurrences(text: str, documents: Iterable[str]) -> list[Occurrence]:
    """Occurrences of each of ``documents`` in ``text``, searched one document at a time."""
    out: list[Occurrence] = []
    for doc in documents:
        start = text.find(doc)
        while start != -1:
            end = start + len(doc)
            out.append((start, end, doc))
            start = text.find(doc, end)
    return out


def choose(occurrences: Iterable[Occurrence]) -> list[Occurrence]:
    """Non-overlapping occurrences, in text order: longer documents first, then the earlier one."""
    taken: list[Occurrence] = []
    for s, e, doc in sorted(occurrences, key=lambda o: (o[0] - o[1], o[0])):
        if all(e <= ts or s >= te for ts, te, _ in taken):
            taken.append((s, e, doc))
    return sorted(taken)
