"""Reading text files, cutting them into token-bounded chunks, and BM25 retrieval."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".text"})


@dataclass(frozen=True)
class Document:
    """A text and where it came from (``path`` or ``path#chunkN``)."""

    text: str
    source: str


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Every text/markdown file under ``paths`` (files or folders), sorted, as documents.

    Raises :class:`InputError` for a missing path, a file that is not UTF-8, or no text at all.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"no such file or folder: {raw}")
    docs: list[Document] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{f} is not UTF-8 text (byte {exc.start}): convert it, e.g. `iconv -f latin1 -t utf-8`"
            ) from None
        if text.strip():
            docs.append(Document(text, str(f)))
    if not docs:
        raise InputError(
            f"no text found in {', '.join(map(str, paths)) or 'the given paths'}: "
            f"pass non-empty files or folders with {', '.join(sorted(TEXT_SUFFIXES))} files"
        )
    return docs


_PARAGRAPH = re.compile(r"\n\s*\n")


def chunk_documents(docs: Sequence[Document], tokenizer: Any, chunk_tokens: int) -> list[Document]:
    """Split each document into chunks of at most about ``chunk_tokens`` tokens at paragraph boundaries.

    ``chunk_tokens == 0`` keeps each document whole. A paragraph longer than the limit is cut at
    line, then word boundaries.
    """
    if chunk_tokens < 0:
        raise InputError(f"--chunk-tokens must be >= 0 (0 keeps whole files), got {chunk_tokens}")
    if chunk_tokens == 0:
        return list(docs)
    out: list[Document] = []
    for doc in docs:
        pieces = _split(doc.text, tokenizer, chunk_tokens)
        if len(pieces) == 1:
            out.append(Document(pieces[0], doc.source))
        else:
            out.extend(Document(p, f"{doc.source}#chunk{i}") for i, p in enumerate(pieces))
    return out


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _split(text: str, tokenizer: Any, limit: int) -> list[str]:
    units: list[str] = []
    for para in _PARAGRAPH.split(text.strip()):
        if not para.strip():
            continue
        if _count(tokenizer, para) <= limit:
            units.append(para)
            continue
        for line in para.split("\n"):
            if _count(tokenizer, line) <= limit:
                units.append(line)
            else:
                words = line.split(" ")
                step = max(1, len(words) * limit // max(1, _count(tokenizer, line)))
                units.extend(" ".join(words[i : i + step]) for i in range(0, len(words), step))
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for u in units:
        n = _count(tokenizer, u) + 1
        if current and size + n > limit:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(u)
        size += n
    if current:
        chunks.append("\n\n".join(current))
    return chunks


_WORD = re.compile(r"[A-Za-z0-9_]+")


def _terms(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class BM25:
    """Okapi BM25 over a fixed list of documents (k1 = 1.5, b = 0.75)."""

    def __init__(self, docs: Sequence[Document], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = list(docs)
        self.k1, self.b = k1, b
        self._tf = [Counter(_terms(d.text)) for d in self.docs]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / max(1, len(self._len))
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(self.docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        """BM25 score of every document for ``query``."""
        q = _terms(query)
        out = []
        for tf, length in zip(self._tf, self._len, strict=True):
            s = 0.0
            for t in q:
                f = tf.get(t, 0)
                if f:
                    s += self._idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * length / self._avg))
            out.append(s)
        return out

    def search(self, query: str, k: int) -> list[Document]:
        """The ``k`` best documents, best first (ties keep corpus order)."""
        if k < 1:
            raise InputError(f"--k must be >= 1, got {k}")
        scores = self.scores(query)
        order = sorted(range(len(self.docs)), key=lambda i: (-scores[i], i))
        return [self.docs[i] for i in order[:k]]
