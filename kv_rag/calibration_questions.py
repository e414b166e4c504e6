"""Questions whose answers sit in one of several documents: made-up facts inserted into real passages.

The fidelity study's method (``benchmarks/fidelity``), used by :mod:`kv_rag.calibrate` too. A made-up
fact ("The access code for vault 17 is 4821.") is inserted at a paragraph boundary of one of ``k``
passages, and a fact of the same kind with another key and value into each of the others
(distractors), so that the answer needs the right document. The model cannot know the fact
beforehand, so a right answer was read from the documents. Passages are the user's own documents
(:func:`passages_from`) or, when there are none, Python's documentation as shipped with CPython
(``pydoc_data.topics``, :func:`passages`). Everything is seeded: the same arguments give the same
questions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["correct", "passages", "passages_from", "questions"]

NAMES = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Haddad", "Kowalski", "Brennan", "Ishikawa"]
ISLANDS = ["Marrow Isle", "Kestrel Island", "Port Sable", "Gull Rock", "Fernholm", "Tarn Key", "Ashby Cay", "Lorn"]
COLORS = ["red", "blue", "green", "amber", "violet", "silver", "black", "orange", "white", "teal"]
WORDS = ["lantern", "harbor", "quartz", "meadow", "falcon", "cobalt", "juniper", "saffron", "glacier", "thistle"]


def fact(rng: random.Random, kind: int, used: set[str]) -> tuple[str, str, str, str]:
    """(key, fact sentence, question, answer) of one kind (0 to 3), with a key not in ``used`` (added to it)."""
    while True:
        if kind == 0:
            key = str(rng.randint(2, 99))
            ans = str(rng.randint(1000, 9999))
            sentence, q = f"The access code for vault {key} is {ans}.", f"What is the access code for vault {key}?"
        elif kind == 1:
            key = rng.choice(ISLANDS)
            ans = str(rng.randint(10, 99))
            sentence = f"The ferry to {key} leaves from pier {ans}."
            q = f"From which pier does the ferry to {key} leave?"
        elif kind == 2:
            key = rng.choice(NAMES)
            ans = str(rng.randint(100, 999))
            sentence, q = f"Professor {key}'s office is in room {ans}.", f"In which room is Professor {key}'s office?"
        else:
            key = rng.choice(COLORS)
            ans = rng.choice(WORDS)
            sentence, q = f"The password of the {key} server is {ans}.", f"What is the password of the {key} server?"
        if key not in used:
            used.add(key)
            return key, sentence, q, ans


def insert(rng: random.Random, passage: str, sentence: str) -> str:
    """``passage`` with ``sentence`` as a paragraph of its own at a random paragraph boundary."""
    paras = passage.split("\n\n")
    at = rng.randint(1, max(1, len(paras) - 1)) if len(paras) > 1 else 1
    return "\n\n".join([*paras[:at], sentence, *paras[at:]])


def passages(tokenizer: Any, target: int = 500) -> list[str]:
    """Passages of about ``target`` tokens (80% to 100%) from ``pydoc_data.topics`` (topics in name order)."""
    import pydoc_data.topics as topics

    from .retrieve import Document, chunk_documents

    docs = [Document(topics.topics[name], name) for name in sorted(topics.topics)]
    chunks = chunk_documents(docs, tokenizer, target)
    out = []
    for c in chunks:
        n = len(tokenizer(c.text, add_special_tokens=False)["input_ids"])
        if 0.8 * target <= n <= target + 10:
            out.append(c.text)
    return out


def passages_from(texts: Sequence[str], tokenizer: Any, target: int = 500) -> list[str]:
    """The user's documents cut into passages of at most about ``target`` tokens at paragraph boundaries
    (``target=0`` keeps each whole); blank ones are left out."""
    from .retrieve import Document, chunk_documents

    docs = [Document(t, f"doc{i}") for i, t in enumerate(texts)]
    return [c.text for c in chunk_documents(docs, tokenizer, target) if c.text.strip()]


def questions(
    tokenizer: Any, n: int, k: int, seed: int, target: int = 500, pool: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """``n`` questions, each with ``k`` documents, one of which holds the answer.

    Documents are drawn from ``pool`` (default: :func:`passages` of ~``target`` tokens). Each question
    is a dict: ``id``, ``question``, ``answer``, ``docs`` (in prompt order), ``answer_doc`` (the index
    of the document that holds the answer) and ``fact`` (the sentence inserted there).
    """
    rng = random.Random(seed)
    pool = list(pool) if pool is not None else passages(tokenizer, target)
    if len(pool) < k:
        raise ValueError(f"{k} documents per question need at least {k} passages; got {len(pool)}")
    out = []
    for qi in range(n):
        kind = qi % 4
        used: set[str] = set()
        _key, sentence, q, ans = fact(rng, kind, used)
        texts = rng.sample(pool, k)
        where = rng.randrange(k)
        docs = []
        for j, t in enumerate(texts):
            docs.append(insert(rng, t, sentence if j == where else fact(rng, kind, used)[1]))
        out.append({"id": qi, "question": q, "answer": ans, "docs": docs, "answer_doc": where, "fact": sentence})
    return out


def correct(answer: str, text: str) -> bool:
    """Whether ``answer`` appears in ``text`` as a whole word (case-insensitive)."""
    return re.search(rf"\b{re.escape(answer)}\b", text, re.IGNORECASE) is not None
