"""A prompt's token ids, assembled from remembered documents, equal to a plain tokenization of its text.

Tokenizing a long document costs tens of milliseconds (82 ms for 32k tokens on the 2-core CI
machine), which a cache hit would otherwise pay on every request. :class:`PromptTokenizer` keeps
each document's ids (bounded, least recently used forgotten first) and assembles a prompt's ids
from them, tokenizing only the short text between documents.

Exactness is kept against a *plain* tokenization of the whole prompt text (what a user's own
pipeline would compute), not only against the concatenation of pieces: byte-level BPE tokenizers
split text with a regular expression before merging, so a piece tokenized on its own can differ
from the same piece inside a longer text. Two effects occur at a boundary between two pieces:

* look-ahead: the end of a piece depends on the next characters (``"\\n\\n"`` alone is one token;
  before a word it is two, ``"\\n"`` and ``"\\n"``);
* merging: a pre-token may cross the boundary (``"Context: "`` + ``"Paris"`` is ``" Paris"``).

Text between documents is therefore tokenized *with* the start of the next piece as look-ahead and
cut at the boundary (which must fall between two tokens), and every boundary is checked on a
window of :data:`WINDOW` characters each side: tokenized together, the window must split at the
boundary, the right half into exactly its own tokens (nothing crossed the boundary) and, after a
remembered document, the left half too (the look-ahead changed nothing). A boundary that fails falls back
to a plain tokenization of the whole text, split into pieces wherever a token boundary lies at a
piece boundary (a document that cannot be separated becomes plain text and is not cached as a
document). The window check assumes, as the regular expressions of GPT-2, Llama 3, Qwen and
SmolLM2 do, that how a pre-token is split depends on at most a few characters around it; a
tokenizer without character offsets (a slow tokenizer) always takes the plain path.

Documents are data: a special-token string inside a document (``<|im_end|>``, ``<|im_start|>``) is
tokenized as plain text (``split_special_tokens``), so a retrieved document cannot open chat turns
of its own. A prompt whose documents hold such strings is tokenized piece by piece (the text
between documents as usual, with its special tokens); the cached and uncached paths use these same
ids. ``split_special_tokens=False`` parses them as special tokens instead, as a plain tokenization
of the whole text would.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .defaults import KNOWN_DOCUMENT_TOKENS
from .fingerprint import token_bytes, tokens_digest
from .prompt import Prompt, Segment, TokenizedPrompt

#: Characters each side of a piece boundary that the guard tokenizes together.
WINDOW = 32

#: Boundary checks remembered (pairs of window texts).
_BOUNDARIES = 4096


@dataclass(frozen=True)
class DocumentTokens:
    """A document's ids (tokenized on its own, no special tokens added), their int64 bytes and digest;
    ``specials``: its text holds special-token strings, tokenized as plain text."""

    ids: tuple[int, ...]
    ids_bytes: bytes
    digest: str
    specials: bool = False


class PromptTokenizer:
    """Tokenizes prompts for one tokenizer, remembering document ids. Thread-safe (one lock).

    ``max_tokens`` bounds the remembered document ids (least recently used forgotten first).
    :attr:`stats` counts document ids reused, tokenized, and prompts that took the plain path.
    """

    def __init__(self, tokenizer: Any, max_tokens: int = KNOWN_DOCUMENT_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._docs: OrderedDict[tuple[str, bool, str], DocumentTokens] = OrderedDict()
        self._held = 0
        self._bounds: OrderedDict[tuple[str, str, bool, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"reused": 0, "tokenized": 0, "plain": 0, "pieces": 0}
        self.composable = bool(getattr(tokenizer, "is_fast", False)) and not self._suffix_specials()
        #: the strings the tokenizer reads as special tokens (inside documents they stay text)
        self.specials = special_strings(tokenizer)

    def has_specials(self, text: str) -> bool:
        """Whether ``text`` holds a special-token string."""
        return any(s in text for s in self.specials)

    # ------------------------------------------------------------------ documents
    def document(self, text: str, split_special_tokens: bool = True, scope: str = "") -> DocumentTokens:
        """The ids of ``text`` tokenized on its own (remembered); special-token strings in it stay plain
        text unless ``split_special_tokens`` is false. ``scope``: whose memo (a tenant's own: another
        tenant's request must not find a document already tokenized, a timing signal)."""
        memo = (text, split_special_tokens, scope)
        with self._lock:
            got = self._docs.get(memo)
            if got is not None:
                self._docs.move_to_end(memo)
                self.stats["reused"] += 1
                return got
        specials = self.has_specials(text)
        split = {"split_special_tokens": True} if specials and split_special_tokens else {}
        ids = tuple(self.tokenizer(text, add_special_tokens=False, **split)["input_ids"])
        raw = token_bytes(ids)
        got = DocumentTokens(ids, raw, tokens_digest(raw), specials)
        with self._lock:
            self.stats["tokenized"] += 1
            if memo not in self._docs and len(ids) <= self.max_tokens:
                self._docs[memo] = got
                self._held += len(ids)
                while self._held > self.max_tokens:
                    _, old = self._docs.popitem(last=False)
                    self._held -= len(old.ids)
        return got

    # ------------------------------------------------------------------ prompts
    def tokenize(self, prompt: Prompt, split_special_tokens: bool = True, scope: str = "") -> TokenizedPrompt:
        """Token ids of each segment of ``prompt``; together, a plain tokenization of ``prompt.text`` in
        which special-token strings inside documents are plain text (``split_special_tokens=False``:
        parsed as special tokens, exactly a plain tokenization).

        A document's leading and trailing whitespace is tokenized with the text around it (see
        :func:`trim_documents`): the document's own ids, and so its artifact, are those of its text.
        ``scope``: whose memos are used (see :meth:`document`).
        """
        segs = trim_documents([s for s in prompt.segments if s.text])
        if not segs:
            return _assemble(prompt.segments[:0], [])
        # documents after the first piece: their remembered ids (they also say whether a document holds
        # special-token strings; before the first piece, or without offsets, the text is searched)
        docs = {
            i: self.document(s.text, split_special_tokens, scope)
            for i, s in enumerate(segs)
            if s.document and i > 0 and self.composable
        }
        if split_special_tokens and self.specials:
            data = (
                docs[i].specials if i in docs else s.document and self.has_specials(s.text) for i, s in enumerate(segs)
            )
            if any(data):
                return self.pieces(segs, docs, scope)
        if not self.composable:
            return self.plain(prompt)
        text = "".join(seg.text for seg in segs)
        ends: list[int] = []
        for seg in segs:
            ends.append((ends[-1] if ends else 0) + len(seg.text))
        parts: list[tuple[int, ...]] = []
        known: list[DocumentTokens | None] = []
        for i, seg in enumerate(segs):
            if i in docs:
                doc = docs[i]
                parts.append(doc.ids)
                known.append(doc)
                continue
            got = self._in_context(seg.text, text[ends[i] : ends[i] + WINDOW], first=i == 0)
            if got is None:
                return self.plain(prompt)
            parts.append(got)
            known.append(None)
        for i, b in enumerate(ends[:-1]):  # every piece after the first was tokenized from its own start
            alone = segs[i].document and i > 0
            if not self._clean(text[max(0, b - WINDOW) : b], text[b : b + WINDOW], alone, scope):
                return self.plain(prompt)
        return _assemble(tuple(segs), parts, known)

    def pieces(
        self, segs: Sequence[Segment], docs: dict[int, DocumentTokens] | None = None, scope: str = ""
    ) -> TokenizedPrompt:
        """Each segment tokenized on its own, documents with their special-token strings as plain text
        (the text between documents with the start of the next as look-ahead where offsets allow);
        ``docs``: documents' ids known already, by segment index."""
        with self._lock:
            self.stats["pieces"] += 1
        docs = docs or {}
        parts: list[tuple[int, ...]] = []
        known: list[DocumentTokens | None] = []
        for i, seg in enumerate(segs):
            if seg.document and i > 0:
                doc = docs.get(i) or self.document(seg.text, True, scope)
                parts.append(doc.ids)
                known.append(doc)
                continue
            got = None
            if not seg.document and self.composable:
                nxt = segs[i + 1].text[:WINDOW] if i + 1 < len(segs) else ""
                got = self._in_context(seg.text, nxt, first=i == 0)
            if got is None:
                split = {"split_special_tokens": True} if seg.document else {}
                got = tuple(self.tokenizer(seg.text, add_special_tokens=i == 0, **split)["input_ids"])
            parts.append(got)
            known.append(None)
        return _assemble(tuple(segs), parts, known)

    def plain(self, prompt: Prompt) -> TokenizedPrompt:
        """A plain tokenization of the whole text, cut into the prompt's segments where a token boundary
        lies at a segment boundary; segments that cannot be separated are joined (as plain text)."""
        with self._lock:
            self.stats["plain"] += 1
        segs = trim_documents([s for s in prompt.segments if s.text])
        text = "".join(s.text for s in segs)
        if not getattr(self.tokenizer, "is_fast", False):
            return _assemble((_joined(segs),), [tuple(self.tokenizer(text, add_special_tokens=True)["input_ids"])])
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        groups: list[list[Segment]] = [[segs[0]]]
        cuts: list[int] = []
        pos = len(segs[0].text)
        for seg in segs[1:]:
            cut = _cut(offsets, pos)
            if cut is None:
                groups[-1].append(seg)
            else:
                cuts.append(cut)
                groups.append([seg])
            pos += len(seg.text)
        bounds = [0, *cuts, len(ids)]
        parts = [tuple(ids[a:b]) for a, b in itertools.pairwise(bounds)]
        return _assemble(tuple(_joined(g) for g in groups), parts)

    # ------------------------------------------------------------------ boundaries
    def _in_context(self, text: str, nxt: str, first: bool) -> tuple[int, ...] | None:
        """Ids of ``text`` as it is tokenized when ``nxt`` follows it, or ``None`` if a token crosses the end."""
        enc = self.tokenizer(text + nxt, add_special_tokens=first, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if not nxt:
            return tuple(ids)
        cut = _cut(offsets, len(text))
        return None if cut is None else tuple(ids[:cut])

    def _clean(self, a: str, b: str, left_alone: bool, scope: str = "") -> bool:
        """Whether the window ``a + b`` around a boundary splits at it, ``b`` into exactly its own tokens
        and (``left_alone``) ``a`` into its own too."""
        memo = (a, b, left_alone, scope)
        with self._lock:
            got = self._bounds.get(memo)
            if got is not None:
                self._bounds.move_to_end(memo)
                return got
        enc = self.tokenizer(a + b, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        cut = _cut(offsets, len(a))
        ok = cut is not None and tuple(ids[cut:]) == self._ids(b)
        if ok and left_alone:
            ok = tuple(ids[:cut]) == self._ids(a)
        with self._lock:
            self._bounds[memo] = ok
            while len(self._bounds) > _BOUNDARIES:
                self._bounds.popitem(last=False)
        return ok

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _suffix_specials(self) -> bool:
        """Whether the tokenizer appends special tokens at the end (then pieces cannot be joined)."""
        try:
            with_ = self.tokenizer("a b", add_special_tokens=True)["input_ids"]
            without = self.tokenizer("a b", add_special_tokens=False)["input_ids"]
        except Exception:  # an unusual tokenizer: always take the plain path
            return True
        return list(with_[len(with_) - len(without) :]) != list(without)


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """The strings ``tokenizer`` reads as special tokens (its special tokens and added special tokens)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(getattr(added, "content", "")))
    return tuple(sorted(s for s in found if s))


def trim_documents(segs: Sequence[Segment]) -> list[Segment]:
    """``segs`` with each document's leading and trailing whitespace moved into the text around it.

    Whitespace runs merge across a boundary (a document ending in ``"\\n"`` before ``"\\n\\n"`` is one
    ``"\\n\\n\\n"`` run), so a document that keeps them would rarely split cleanly from its
    neighbours. A single space right before a document that starts with a non-space character
    (its own, or the last one of the text before it) goes with the document: the tokenizer joins it
    to the word that follows (``"Context: "`` + ``"Paris"`` is read ``" Paris"``), so that document is
    cached with its leading space. The prompt's text does not change.
    """
    out: list[Segment] = []

    def plain(text: str) -> None:
        if not text:
            return
        if out and not out[-1].document:
            out[-1] = Segment(out[-1].text + text)
        else:
            out.append(Segment(text))

    for seg in segs:
        if not seg.document:
            plain(seg.text)
            continue
        core = seg.text.strip()
        if not core:
            plain(seg.text)
            continue
        lead = seg.text[: len(seg.text) - len(seg.text.lstrip())]
        if lead.endswith(" "):
            lead, core = lead[:-1], " " + core
        plain(lead)
        if not lead and not core.startswith(" ") and out and not out[-1].document and out[-1].text.endswith(" "):
            # "Context: " + "Paris": the tokenizer reads " Paris"; the document takes that space
            rest = out[-1].text[:-1]
            if rest:
                out[-1] = Segment(rest)
            else:
                out.pop()
            core = " " + core
        out.append(Segment(core, True, seg.source))
        plain(seg.text[len(seg.text.rstrip()) :])
    return out


def _cut(offsets: Sequence[Any], pos: int) -> int | None:
    """Index of the first token at or after character ``pos`` when the tokens meet exactly there (one
    ends at ``pos``, the next starts at it); ``None`` if a token crosses ``pos`` or the offsets leave a
    gap there (tokenizers that trim whitespace from offsets)."""
    prev_end = 0
    for j, (s, e) in enumerate(offsets):
        if j == 0 and s == e == 0:
            continue  # a special token added at the start
        if e <= pos:
            prev_end = e
            continue
        return j if s == pos and prev_end == pos else None
    return len(offsets) if prev_end == pos else None


def _joined(segs: Sequence[Segment]) -> Segment:
    """One segment of ``segs``' text: the segment itself if alone, else plain text."""
    if len(segs) == 1:
        return segs[0]
    return Segment("".join(s.text for s in segs))


def _assemble(
    segs: Sequence[Segment], parts: Sequence[tuple[int, ...]], known: Sequence[DocumentTokens | None] = ()
) -> TokenizedPrompt:
    """A :class:`TokenizedPrompt` of ``segs`` with ids ``parts``: the chain up to the last document, then the
    suffix; known document bytes and digests are carried over."""
    last_doc = max((i for i, s in enumerate(segs) if s.document), default=-1)
    suffix: list[int] = []
    for ids in parts[last_doc + 1 :]:
        suffix.extend(ids)
    tp = TokenizedPrompt(
        segments=tuple(parts[: last_doc + 1]),
        suffix=tuple(suffix),
        is_document=tuple(s.document for s in segs[: last_doc + 1]),
        sources=tuple(s.source for s in segs[: last_doc + 1]),
    )
    for i, doc in enumerate(known[: last_doc + 1]):
        if doc is not None:
            tp.remember(i, doc.ids_bytes, doc.digest)
    return tp
