"""Issue 16 part 3 recipes on the embedded model: APE attention, EPIC's k per document, CacheBlend's narrowing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kv_rag import ApeSettings, DeviationSelection, Engine, InputError, LeadingSelection, NarrowingSelection
from kv_rag.assemble.ape import ApeState, ape_attention

QUESTION = "Which statement is described first? Answer briefly."
TOL = 1e-4


@pytest.fixture(scope="module")
def texts(corpus_dir: Path) -> list[str]:
    return [(corpus_dir / n).read_text()[:700] for n in ("for-statement.md", "with-statement.md", "raise-statement.md")]


def _layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]


def _doc_ranges(engine: Engine, prompt: object) -> list[tuple[int, int]]:
    tp = engine.tokenize(prompt)  # type: ignore[arg-type]
    out, at = [], 0
    for i, seg in enumerate(tp.segments):
        if tp.document(i):
            out.append((at, at + len(seg)))
        at += len(seg)
    return out


def _doc_mask(n: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    for a, b in ranges:
        out[a:b] = True
    return out


def test_ape_attention_is_the_papers_block_formula() -> None:
    """Per-token form == APE's three blocks (prefix, documents at T with log S, the rest), GQA and a causal tail."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    docs = torch.zeros(10, dtype=torch.bool)
    docs[2:6] = True
    T, S = 0.6, 0.4
    got = ape_attention(q, k, v, None, 0.3, ApeState(docs, T, math.log(S)))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * 0.3
    causal = torch.arange(10)[None, :] <= (torch.arange(3)[:, None] + 7)
    s = s.masked_fill(~causal, float("-inf"))
    blocks = [(slice(0, 2), 1.0, 0.0), (slice(2, 6), T, math.log(S)), (slice(6, 10), 1.0, 0.0)]
    lse = torch.stack([torch.logsumexp(s[..., b] / t, -1) * t + ls for b, t, ls in blocks], -1).softmax(-1)
    outs = torch.stack([(s[..., b] / t).softmax(-1) @ vv[..., b, :] for b, t, _ in blocks], -2)
    want = (lse.unsqueeze(-1) * outs).sum(-2).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-5)


def test_ape_changes_only_what_attends_to_the_documents(engine: Engine, texts: list[str]) -> None:
    prompt = engine.prompt(QUESTION, texts)
    engine.publish(texts)
    stitched = engine.prefill(prompt, mode="stitch")
    neutral = engine.prefill(prompt, mode="stitch", ape=(1.0, 1.0))
    tempered = engine.prefill(prompt, mode="stitch", ape=ApeSettings(0.7, 0.5))
    assert stitched.logits is not None and neutral.logits is not None and tempered.logits is not None
    assert float((neutral.logits - stitched.logits).abs().max()) <= TOL  # T = S = 1 is stitching
    assert float((tempered.logits - stitched.logits).abs().max()) > 1e-2
    ranges = _doc_ranges(engine, prompt)
    end = ranges[-1][1]
    kept = torch.cat([torch.arange(0, ranges[0][0])] + [torch.arange(a, b) for a, b in ranges])
    for (k0, v0), (k1, v1) in zip(_layers(stitched.cache), _layers(tempered.cache), strict=True):
        # the documents' own KV (and the text before them) is the stitched one; only computed tokens differ
        assert torch.equal(k0[..., kept, :], k1[..., kept, :]) and torch.equal(v0[..., kept, :], v1[..., kept, :])
    v_st, v_ape = _layers(stitched.cache)[-1][1], _layers(tempered.cache)[-1][1]
    assert float((v_st[..., end:, :] - v_ape[..., end:, :]).abs().max()) > 1e-3
    g = engine.generate(prompt, mode="stitch", ape=(0.7, 0.5), max_new_tokens=4)
    assert g.token_ids and g.mode.value == "stitch"
    assert engine.prefill(prompt, mode="stitch").logits is not None  # an unmarked request is plain stitching again
    again = engine.prefill(prompt, mode="stitch")
    assert again.logits is not None and torch.equal(again.logits, stitched.logits)


def test_ape_settings_are_checked(engine: Engine, texts: list[str]) -> None:
    prompt = engine.prompt(QUESTION, texts[:2])
    with pytest.raises(InputError, match="ape temperature"):
        engine.prefill(prompt, mode="stitch", ape=(0.0, 1.0))
    with pytest.raises(InputError, match="ape scale"):
        ApeSettings(1.0, -2.0)
    with pytest.raises(InputError, match="stitch"):
        engine.prefill(prompt, mode="blend", ape=(0.5, 0.5))
    with pytest.raises(InputError, match="ape must be"):
        engine.prefill(prompt, mode="stitch", ape=0.5)


def test_leading_k_per_document_recomputes_the_first_k_of_every_moved_document(
    engine: Engine, texts: list[str]
) -> None:
    prompt = engine.prompt(QUESTION, texts)
    engine.publish(texts)
    ranges = _doc_ranges(engine, prompt)
    pre = engine.prefill(prompt, mode="blend", recompute=0.5, selection=LeadingSelection(per_document=5))
    want = [p for a, _ in ranges[1:] for p in range(a, a + 5)]  # the first document did not move
    assert list(pre.recomputed_positions) == want
    stitched = engine.prefill(prompt, mode="stitch")
    for (k0, _), (k1, _) in zip(_layers(stitched.cache), _layers(pre.cache), strict=True):
        rest = _doc_mask(k0.shape[-2], ranges)
        rest[want] = False
        assert torch.equal(k0[..., rest, :], k1[..., rest, :])
    with pytest.raises(InputError, match="per_document"):
        LeadingSelection(per_document=-1)
    with pytest.raises(InputError, match="per_document"):
        LeadingSelection(per_document=2.5)  # type: ignore[arg-type]


def test_narrowing_without_narrowing_is_plain_blend(engine: Engine, texts: list[str]) -> None:
    """first == last: the same tokens at every layer, which is blend with CacheBlend's layer-1 choice."""
    prompt = engine.prompt(QUESTION, texts)
    engine.publish(texts)
    flat = engine.prefill(prompt, mode="blend", selection=NarrowingSelection(first=0.2, last=0.2))
    plain = engine.prefill(prompt, mode="blend", recompute=0.2, selection=DeviationSelection())
    assert flat.recomputed_positions == plain.recomputed_positions
    assert flat.logits is not None and plain.logits is not None
    assert float((flat.logits - plain.logits).abs().max()) <= TOL
    for (k0, v0), (k1, v1) in zip(_layers(flat.cache), _layers(plain.cache), strict=True):
        assert float((k0 - k1).abs().max()) <= TOL and float((v0 - v1).abs().max()) <= TOL


def test_narrowing_recomputes_fewer_tokens_at_later_layers(engine: Engine, texts: list[str]) -> None:
    prompt = engine.prompt(QUESTION, texts)
    engine.publish(texts)
    sel = NarrowingSelection(first=0.3, last=0.05)
    pre = engine.prefill(prompt, mode="blend", selection=sel)
    stitched = engine.prefill(prompt, mode="stitch")
    chosen = torch.tensor(pre.recomputed_positions)
    n_doc = sum(b - a for a, b in _doc_ranges(engine, prompt))
    keep = sel.narrowing(n_doc, len(pre.cache.layers))
    assert keep[0] == chosen.numel() == round(0.3 * n_doc) and keep[-1] == round(0.05 * n_doc)
    changed = []
    for (k0, _), (k1, _) in zip(_layers(stitched.cache), _layers(pre.cache), strict=True):
        diff = (k0[0, :, chosen] - k1[0, :, chosen]).abs().amax(dim=(0, 2)) > TOL
        changed.append(int(diff.sum()))
        rest = _doc_mask(k0.shape[-2], _doc_ranges(engine, prompt))
        rest[chosen] = False
        assert torch.equal(k0[..., rest, :], k1[..., rest, :])  # unchosen document tokens keep the stitched KV
    # layer 0's keys depend on the token alone (rotary on the same position): nothing changes there
    assert changed[0] == 0
    for i in range(2, len(changed)):
        assert changed[i] <= keep[i]  # at most the tokens still running at that layer got fresh KV
    assert changed[1] > keep[-1] and changed[-1] <= keep[-1]
    with pytest.raises(InputError, match="last must not exceed first"):
        NarrowingSelection(first=0.1, last=0.2)
    with pytest.raises(InputError, match="first must be"):
        NarrowingSelection(first=0.0)
    with pytest.raises(InputError, match="criterion"):
        NarrowingSelection(criterion="random")
