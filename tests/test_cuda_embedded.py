"""The embedded (trained) model on CUDA, in float32: hits from each tier, stitch and blend endpoints.

Each is checked against a from-scratch prefill of the same tokens. Skipped without CUDA (CI has
none); run on a GPU machine with ``pytest tests/test_cuda_embedded.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kv_rag import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUESTION = "Which statement do these sections describe first? Answer in one sentence."
#: float32 on a GPU: a hit and a prefill run different kernels over different shapes
TOL = 1e-3
NEW = 32


@pytest.fixture(scope="module")
def docs(corpus_dir: Path) -> list[str]:
    """Three real documents, about 700 tokens each."""
    return [(corpus_dir / n).read_text()[:2800] for n in ("for-statement.md", "with-statement.md", "try-statement.md")]


def _max_diff(a: torch.Tensor | None, b: torch.Tensor) -> float:
    assert a is not None
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def test_cuda_embedded_hits_from_each_tier_equal_a_full_prefill(tmp_path: Path, docs: list[str]) -> None:
    eng = Engine(None, store=tmp_path / "store", device="cuda", dtype="float32")
    assert [t.name for t in eng.store.tiers] == ["gpu", "pinned", "disk"]
    prompt = eng.prompt(QUESTION, docs)
    ref = eng.reference_logits(eng.tokenize(prompt).ids)
    cold = eng.generate(prompt, use_cache=False, max_new_tokens=NEW)
    eng.publish(docs)
    first = eng.prefill(prompt)  # exact mode: the chain after the first document is prefilled and stored
    assert [s.tier for s in first.segments if s.document] == ["gpu", None, None]
    for i, tier in enumerate(("gpu", "pinned", "disk")):
        for upper in eng.store.tiers[:i]:  # a hit copies up: empty the tiers above the one under test
            upper.clear()  # type: ignore[attr-defined]
        pre = eng.prefill(prompt)
        assert [s.tier for s in pre.segments if s.document] == [tier] * len(docs)
        assert pre.cached_tokens > 0.9 * pre.prompt_tokens
        assert _max_diff(pre.logits, ref) <= TOL, tier
        for upper in eng.store.tiers[:i]:
            upper.clear()  # type: ignore[attr-defined]
        hit = eng.generate(prompt, max_new_tokens=NEW)
        assert [s.tier for s in hit.segments if s.document] == [tier] * len(docs)
        assert hit.token_ids == cold.token_ids, tier


def test_cuda_embedded_stitch_and_blend_endpoints(tmp_path: Path, docs: list[str]) -> None:
    eng = Engine(None, store=tmp_path / "store", device="cuda", dtype="float32")
    one = eng.prompt(QUESTION, docs[:1])
    eng.publish(docs)
    exact_one = eng.generate(one, max_new_tokens=NEW)
    stitch_one = eng.generate(one, mode="stitch", max_new_tokens=NEW)
    assert stitch_one.token_ids == exact_one.token_ids

    prompt = eng.prompt(QUESTION, docs)
    ref = eng.reference_logits(eng.tokenize(prompt).ids)
    stitched = eng.prefill(prompt, mode="stitch")
    assert _max_diff(stitched.logits, ref) > 1e-2  # moved documents did not see each other
    b0 = eng.prefill(prompt, mode="blend", recompute=0.0)
    assert b0.logits is not None and stitched.logits is not None and torch.equal(b0.logits, stitched.logits)
    b1 = eng.prefill(prompt, mode="blend", recompute=1.0)
    assert _max_diff(b1.logits, ref) <= TOL
    full = eng.generate(prompt, use_cache=False, max_new_tokens=NEW)
    assert eng.generate(prompt, mode="blend", recompute=1.0, max_new_tokens=NEW).token_ids == full.token_ids
