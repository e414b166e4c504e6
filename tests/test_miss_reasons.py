"""Every miss says why (issue 17, part 6): absent, evicted, damaged, stored after other text, after a gap.

On the embedded model; each request is a real prefill of the missing pieces.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from kv_rag import Engine, MissReason
from kv_rag.models import LoadedModel
from kv_rag.store import DiskTier, MemoryTier, Store

Q = "What is the code word?"
DOCS = [f"Note {i}. The code word of note {i} is {w}. " * 3 for i, w in enumerate(("amber", "birch", "cobalt"))]


def reasons(eng: Engine, docs: list[str]) -> list[tuple[str, str | None]]:
    gen = eng.generate(Q, docs, max_new_tokens=1)
    return [(d.cache.value, d.reason) for d in gen.documents]


def test_absent_other_context_and_after_miss(embedded: LoadedModel, tmp_path: Path) -> None:
    eng = Engine(None, store=Store([MemoryTier()]), device="cpu", dtype="float32")
    assert reasons(eng, [DOCS[0]]) == [("miss", "absent")]
    eng.publish(DOCS)  # each document after the system prompt alone
    # the second document follows the first here, but was stored after the system prompt
    got = reasons(eng, [DOCS[1], DOCS[2]])
    assert got == [("hit", None), ("miss", "other_context")]
    report = eng.generate(Q, [DOCS[1], DOCS[2]], max_new_tokens=1).to_dict()
    assert [d.get("reason") for d in report["docs"]] == [None, None]  # both stored by now: hits
    # the chain [0, 1] stored, then its first piece removed: the second is stored but follows a gap
    reasons(eng, [DOCS[0], DOCS[1]])
    eng.store.delete(eng.document_key(DOCS[0]))
    assert reasons(eng, [DOCS[0], DOCS[1]]) == [("miss", "absent"), ("miss", "after_miss")]
    assert MissReason("after_miss") is MissReason.AFTER_MISS


def test_evicted(embedded: LoadedModel) -> None:
    probe = Engine(None, store=Store([MemoryTier()]), device="cpu", dtype="float32")
    probe.publish([DOCS[0]])
    one = probe.store.tiers[0].nbytes
    eng = Engine(None, store=Store([MemoryTier(int(one * 1.5))]), device="cpu", dtype="float32")
    eng.publish([DOCS[0]])
    eng.publish([DOCS[1]])  # room for one: the first goes
    assert reasons(eng, [DOCS[0]]) == [("miss", "evicted")]


def test_damaged(embedded: LoadedModel, tmp_path: Path) -> None:
    eng = Engine(None, store=Store([DiskTier(tmp_path / "s")]), device="cpu", dtype="float32")
    eng.publish([DOCS[2]])
    disk = eng.store.tiers[0]
    assert isinstance(disk, DiskTier)
    path = disk.path_of(eng.document_key(DOCS[2]))
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = reasons(eng, [DOCS[2]])
    assert got == [("miss", "damaged")]
    assert reasons(eng, [DOCS[2]]) == [("hit", None)]  # recomputed and stored again
