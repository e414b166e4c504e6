"""Finding known documents in a prompt's text: one pass over the prompt gives what a search per document gives."""

from __future__ import annotations

import random
import string

import pytest

from kv_rag.docindex import ANCHOR_CHARS, SCAN_FROM_DOCUMENTS, DocumentIndex
from kv_rag.prompt import locate


def _reference(text: str, known: dict[str, str]) -> list[tuple[str, bool, str]]:
    """The search-per-document split: longer documents first, left to right, no overlaps."""
    spans: list[tuple[int, int, str]] = []
    for doc in sorted((d for d in known if d.strip()), key=len, reverse=True):
        start = text.find(doc)
        while start != -1:
            end = start + len(doc)
            if all(end <= s or start >= e for s, e, _ in spans):
                spans.append((start, end, doc))
            start = text.find(doc, end)
    out, pos = [], 0
    for s, e, doc in sorted(spans):
        if s > pos:
            out.append((text[pos:s], False, ""))
        out.append((doc, True, known[doc]))
        pos = e
    if pos < len(text):
        out.append((text[pos:], False, ""))
    return out


def _split(text: str, documents: object, extra: object = None) -> list[tuple[str, bool, str]]:
    return [(s.text, s.document, s.source) for s in locate(text, documents, extra).segments]  # type: ignore[arg-type]


@pytest.mark.parametrize("n_docs", [8, SCAN_FROM_DOCUMENTS * 3])
def test_index_finds_what_a_search_per_document_finds(n_docs: int) -> None:
    rng = random.Random(n_docs)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(300)]
    docs = [" ".join(rng.choices(words, k=rng.randint(3, 40))) for _ in range(n_docs)]
    docs += ["tiny", docs[0][: ANCHOR_CHARS - 1]]  # shorter than an anchor; a prefix of another document
    docs.append(docs[1] + " and more")  # a longer document that contains another one
    known = {d: f"s{i}" for i, d in enumerate(dict.fromkeys(docs))}
    for trial in range(20):
        picked = rng.sample(list(known), 5)
        parts = ["System: answer from the documents.\n"]
        for d in picked + picked[:1]:  # one document twice
            parts += [d, rng.choice(["\n\n", " ", "\n---\n"])]
        parts.append("Question: tiny?")
        text = "".join(parts)
        index = DocumentIndex(known.items())
        assert _split(text, index) == _reference(text, known), trial
        assert _split(text, known) == _reference(text, known), trial


def test_forgotten_documents_are_not_found_and_extra_sources_win() -> None:
    docs = [f"document number {i} " + "x" * 40 for i in range(SCAN_FROM_DOCUMENTS + 5)]
    index = DocumentIndex()
    index.remember(((d, f"s{i}") for i, d in enumerate(docs)), max_chars=10**9)
    text = f"A {docs[0]} B {docs[-1]} C"
    assert [s.source for s in locate(text, index).segments if s.document] == ["s0", f"s{len(docs) - 1}"]
    index.remember([(docs[-1], "again")], max_chars=len(docs[-1]) * (len(docs) - 1))  # docs[0] is the oldest
    assert docs[0] not in index and index[docs[-1]] == f"s{len(docs) - 1}"  # a known text keeps its source
    assert [s.source for s in locate(text, index).segments if s.document] == [f"s{len(docs) - 1}"]
    assert [s.source for s in locate(text, index, {docs[0]: "extra", docs[-1]: "mine"}).segments if s.document] == [
        "extra",
        "mine",
    ]
    assert index.chars == sum(len(d) for d in index)


def test_reports_name_documents_by_the_source_they_were_published_with() -> None:
    from tiny import tiny_model

    from kv_rag import Engine

    model, tok = tiny_model("llama", num_hidden_layers=2)
    engine = Engine(model, tokenizer=tok, store="memory")
    engine.publish(["The ferry leaves from pier 7."], sources=["ferry.txt"])
    gen = engine.generate("Which pier?", ["The ferry leaves from pier 7.", "Unpublished text."], max_new_tokens=2)
    assert [(d.source, d.cache.value) for d in gen.documents] == [("ferry.txt", "hit"), ("doc1", "miss")]
    mine = engine.prompt("Which pier?", ["The ferry leaves from pier 7."], sources=["mine"])
    named = engine.generate(mine, max_new_tokens=2)
    assert named.documents[0].source == "mine"  # given sources win
