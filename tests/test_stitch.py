"""Stitch and blend on the real embedded model: the exact endpoints, misses, reuse in any order, fallbacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tiny import LLAMA3_ROPE, tiny_model

from kv_rag import AttentionSelection, BlendView, CacheStatus, Engine, InputError, Mode, Prefill, Selector
from kv_rag.options import PRIMING_TEXT
from kv_rag.prompt import Prompt, Segment

QUESTION = "Which statement is described first? Answer briefly."
TOL = 1e-4


@pytest.fixture(scope="module")
def texts(corpus_dir: Path) -> list[str]:
    """Three short real documents (the first paragraphs of three corpus sections)."""
    out = []
    for name in ("for-statement.md", "with-statement.md", "raise-statement.md"):
        text = (corpus_dir / name).read_text()
        out.append(text[:700])
    return out


def _layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]


def test_one_document_stitch_equals_exact(engine: Engine, texts: list[str]) -> None:
    prompt = engine.prompt(QUESTION, texts[:1])
    ref = engine.reference_logits(engine.tokenize(prompt).ids)
    cold = engine.generate(prompt, mode="stitch", max_new_tokens=16)  # miss: computed after the prefix, stored
    assert [d.cache for d in cold.documents] == [CacheStatus.MISS]
    assert cold.documents[0].key == engine.document_key(texts[0])
    warm = engine.generate(prompt, mode="stitch", max_new_tokens=16)
    assert [d.cache for d in warm.documents] == [CacheStatus.HIT]
    assert warm.mode is Mode.STITCH
    exact = engine.generate(prompt, mode="exact", max_new_tokens=16)
    assert [d.cache for d in exact.documents] == [CacheStatus.HIT]  # the same artifact serves both modes
    assert cold.token_ids == warm.token_ids == exact.token_ids
    pre = engine.prefill(prompt, mode="stitch")
    assert pre.logits is not None
    assert float((pre.logits - ref).abs().max()) <= TOL


def test_blend_endpoints(engine: Engine, texts: list[str]) -> None:
    prompt = engine.prompt(QUESTION, texts)
    ids = engine.tokenize(prompt).ids
    ref = engine.reference_logits(ids)
    engine.publish(texts)

    stitched = engine.prefill(prompt, mode="stitch")
    assert stitched.mode is Mode.STITCH
    assert [s.cache for s in stitched.segments if s.document] == [CacheStatus.HIT] * 3
    doc_tokens = sum(s.tokens for s in stitched.segments if s.document)
    assert stitched.cached_tokens >= doc_tokens
    assert stitched.logits is not None
    # documents 2 and 3 lost their attention to earlier documents: the logits differ from a full prefill
    assert float((stitched.logits - ref).abs().max()) > 1e-2

    b0 = engine.prefill(prompt, mode="blend", recompute=0.0)
    assert b0.recomputed_tokens == 0
    assert b0.logits is not None and torch.equal(b0.logits, stitched.logits)
    for (k0, v0), (k1, v1) in zip(_layers(b0.cache), _layers(stitched.cache), strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)

    b1 = engine.prefill(prompt, mode="blend", recompute=1.0)
    assert b1.recomputed_tokens == doc_tokens
    assert b1.logits is not None
    assert float((b1.logits - ref).abs().max()) <= TOL
    full = engine.prefill(prompt, use_cache=False)
    for (k1, v1), (kf, vf) in zip(_layers(b1.cache), _layers(full.cache), strict=True):
        assert float((k1 - kf).abs().max()) <= TOL and float((v1 - vf).abs().max()) <= TOL

    half = engine.prefill(prompt, mode="blend", recompute=0.5)
    assert half.recomputed_tokens == round(0.5 * doc_tokens)
    assert half.cached_tokens < stitched.cached_tokens

    g_full = engine.generate(prompt, use_cache=False, max_new_tokens=16)
    g_b1 = engine.generate(prompt, mode="blend", recompute=1.0, max_new_tokens=16)
    g_b0 = engine.generate(prompt, mode="blend", recompute=0.0, max_new_tokens=16)
    g_st = engine.generate(prompt, mode="stitch", max_new_tokens=16)
    assert g_b1.token_ids == g_full.token_ids
    assert g_b0.token_ids == g_st.token_ids
    assert g_b1.recomputed_tokens == doc_tokens and g_b1.to_dict()["recomputed_tokens"] == doc_tokens


def test_documents_reused_in_any_order_and_misses_are_stored(engine: Engine, texts: list[str]) -> None:
    a, b, c = texts
    first = engine.generate(engine.prompt(QUESTION, [a, b]), mode="stitch", max_new_tokens=4)
    assert [d.cache for d in first.documents] == [CacheStatus.MISS, CacheStatus.MISS]
    assert first.stored_tokens > 0 and first.text
    # another combination and order: the stored documents are moved to their new positions
    again = engine.generate(engine.prompt(QUESTION, [c, b, a]), mode="stitch", max_new_tokens=4)
    assert [d.cache for d in again.documents] == [CacheStatus.MISS, CacheStatus.HIT, CacheStatus.HIT]
    assert again.cached_tokens >= sum(d.tokens for d in again.documents[1:])
    keys = {d.source: d.key for d in again.documents}
    assert sorted(keys.values()) == sorted(engine.document_key(t) for t in (a, b, c))


def test_prompt_ending_with_a_document(engine: Engine, texts: list[str]) -> None:
    prompt = Prompt((Segment("Notes:\n"), Segment(texts[0], True, "a"), Segment("\n"), Segment(texts[1], True, "b")))
    engine.publish(texts[:2])
    pre = engine.prefill(prompt, mode="stitch")
    assert pre.logits is not None and pre.prompt_tokens == len(engine.tokenize(prompt))
    b1 = engine.prefill(prompt, mode="blend", recompute=1.0)
    assert b1.logits is not None
    ref = engine.reference_logits(engine.tokenize(prompt).ids)
    assert float((b1.logits - ref).abs().max()) <= TOL


def test_recompute_is_checked(engine: Engine, texts: list[str]) -> None:
    with pytest.raises(InputError, match="between 0 and 1"):
        engine.prefill(engine.prompt(QUESTION, texts[:1]), mode="blend", recompute=1.5)
    with pytest.raises(InputError, match="blend"):
        engine.prefill(engine.prompt(QUESTION, texts[:1]), mode="stitch", recompute=0.2)
    with pytest.raises(ValueError, match="exact, stitch, blend"):
        engine.prefill(engine.prompt(QUESTION, texts[:1]), mode="glue")


def test_tiny_llama3_blend_endpoints(tmp_path: Path, texts: list[str]) -> None:
    model, tok = tiny_model("llama", num_hidden_layers=3, rope_parameters=LLAMA3_ROPE)
    engine = Engine(model, tokenizer=tok, store=tmp_path / "store")
    prompt = engine.prompt(QUESTION, texts)
    ref = engine.reference_logits(engine.tokenize(prompt).ids)
    st = engine.prefill(prompt, mode="stitch")
    b0 = engine.prefill(prompt, mode="blend", recompute=0.0)
    b1 = engine.prefill(prompt, mode="blend", recompute=1.0)
    bh = engine.prefill(prompt, mode="blend", recompute=0.3)
    assert st.logits is not None and b0.logits is not None and b1.logits is not None and bh.logits is not None
    assert torch.equal(st.logits, b0.logits)
    assert float((b1.logits - ref).abs().max()) <= TOL
    assert bh.mode is Mode.BLEND and bh.recomputed_tokens > 0


def test_sliding_window_falls_back_to_exact_with_one_warning(tmp_path: Path, texts: list[str]) -> None:
    model, tok = tiny_model("mistral", sliding_window=64)
    engine = Engine(model, tokenizer=tok, store=tmp_path / "store")
    prompt = engine.prompt(QUESTION, texts[:2])
    plain = engine.generate(prompt, use_cache=False, max_new_tokens=8)
    with pytest.warns(UserWarning, match="sliding-window"):
        gen = engine.generate(prompt, mode="stitch", max_new_tokens=8)
    assert gen.mode is Mode.EXACT
    assert gen.token_ids == plain.token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model, not on every request
        again = engine.generate(prompt, mode="blend", max_new_tokens=8)
    assert again.mode is Mode.EXACT and again.token_ids == plain.token_ids


def test_model_without_rope_falls_back(tmp_path: Path, texts: list[str], embedded: object) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = embedded.tokenizer  # type: ignore[attr-defined]
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=2048)
    model = AutoModelForCausalLM.from_config(config)
    engine = Engine(model, tokenizer=tok, store=tmp_path / "store")
    prompt = engine.prompt(QUESTION, texts[:2])
    with pytest.warns(UserWarning, match="no rotary position embedding"):
        gen = engine.generate(prompt, mode="stitch", max_new_tokens=4)
    assert gen.mode is Mode.EXACT


def test_cli_ask_modes(capsys: pytest.CaptureFixture[str], embedded: object, tmp_path: Path, corpus_dir: Path) -> None:
    import json

    from kv_rag.cli import main

    store = str(tmp_path / "store")
    q = "What does the else clause of a for loop do?"
    base = [
        "ask",
        q,
        "--docs",
        str(corpus_dir),
        "--json",
        "--store",
        store,
        "--max-new-tokens",
        "4",
        "--chunk-tokens",
        "200",
    ]
    assert main([*base, "--k", "2"]) == 0
    default_multi = json.loads(capsys.readouterr().out)
    assert default_multi["mode"] == "exact" and len(default_multi["docs"]) == 2
    assert main([*base, "--k", "2", "--mode", "stitch"]) == 0
    st = json.loads(capsys.readouterr().out)
    # exact mode stored the chain: the first document is its own per-document artifact, the second is not
    assert st["mode"] == "stitch" and [d["cache"] for d in st["docs"]] == ["hit", "miss"]
    assert main([*base, "--k", "2", "--mode", "stitch"]) == 0
    assert [d["cache"] for d in json.loads(capsys.readouterr().out)["docs"]] == ["hit", "hit"]
    assert main([*base, "--k", "2", "--mode", "blend", "--recompute", "1"]) == 0
    b1 = json.loads(capsys.readouterr().out)
    assert b1["recomputed_tokens"] == sum(d["tokens"] for d in b1["docs"])
    assert main([*base, "--k", "2", "--mode", "blend", "--recompute", "0.2", "--selection", "leading"]) == 0
    lead = json.loads(capsys.readouterr().out)
    assert lead["options"] == {
        "mode": "blend",
        "recompute": 0.2,
        "priming": False,
        "selection": "leading",
        "use_cache": True,
    }
    assert 0 < lead["recomputed_tokens"] <= lead["docs"][1]["tokens"]  # only the moved (second) document
    assert main([*base, "--k", "2", "--mode", "blend", "--selection", "best"]) == 2
    assert "selection must be one of attention, deviation, leading" in capsys.readouterr().err
    assert main([*base, "--mode", "stitch", "--recompute", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "recompute=0.2 applies to mode 'blend' only" in err and "kv-rag ask: error" in err


class _Fixed:
    """A selector of the test's own: these positions, in order."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        return self.positions[:n]


def test_partial_blend_merges_exactly(engine: Engine, texts: list[str]) -> None:
    """Recomputing exactly the documents that lost context (all but the first) gives the full prefill."""
    prompt = engine.prompt(QUESTION, texts)
    tp = engine.tokenize(prompt)
    engine.publish(texts)
    starts = [0]
    for seg in tp.segments:
        starts.append(starts[-1] + len(seg))
    docs = [i for i in range(len(tp.segments)) if tp.document(i)]
    later = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in docs[1:]])
    n_doc = sum(len(tp.segments[i]) for i in docs)
    assert isinstance(_Fixed(later), Selector)
    pre = engine.prefill(prompt, mode="blend", recompute=len(later) / n_doc, selection=_Fixed(later))
    assert pre.recomputed_tokens == len(later) and list(pre.recomputed_positions) == later.tolist()
    assert pre.logits is not None
    assert float((pre.logits - engine.reference_logits(tp.ids)).abs().max()) <= TOL


@pytest.mark.parametrize(
    ("arch", "overrides"), [("llama", {"rope_parameters": LLAMA3_ROPE}), ("qwen3", {"num_hidden_layers": 3})]
)
def test_blend_attention_scores_match_the_models_attention(
    tmp_path: Path, texts: list[str], arch: str, overrides: dict[str, object]
) -> None:
    """The question's attention that blend ranks tokens by is the model's own (one document: stitched == full)."""
    model, tok = tiny_model(arch, **overrides)
    engine = Engine(model, tokenizer=tok, store=tmp_path / "store")
    prompt = engine.prompt(QUESTION, texts[:1])
    tp = engine.tokenize(prompt)
    n_layers = model.config.num_hidden_layers
    got: dict[str, torch.Tensor] = {}

    class Spy:
        def select(self, view: BlendView, n: int) -> torch.Tensor:
            positions = view.document_positions
            got["positions"] = positions
            scores = view.attention_scores(positions, list(range(n_layers)))
            assert scores is not None
            got["scores"] = scores
            return positions[:n]

    pre = engine.prefill(prompt, mode="blend", recompute=0.5, selection=Spy())
    ref = engine.reference_logits(tp.ids)
    assert pre.logits is not None and float((pre.logits - ref).abs().max()) <= TOL  # the probe left the cache intact

    n_suffix = len(tp.suffix)
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([tp.ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    want = sum(a[0, :, -n_suffix:, :].sum(dim=(0, 1)) for a in out.attentions)[got["positions"]]
    # a random tiny model attends almost uniformly: the tolerance is well below the spread between tokens
    assert float(want.max() - want.min()) > 50 * 1e-4
    assert torch.allclose(got["scores"], want, atol=1e-4, rtol=0)


def _blend_choice(engine: Engine, prompt: Prompt, selection: Selector | None = None) -> tuple[Prefill, torch.Tensor]:
    """Blend at r=0.2 (with ``selection`` instead of the default, if given): the prefill and the
    positions it recomputed."""
    pre = engine.prefill(prompt, mode="blend", recompute=0.2, selection=selection)
    return pre, torch.tensor(pre.recomputed_positions, dtype=torch.long)


def test_blend_recomputes_only_moved_documents(engine: Engine, texts: list[str]) -> None:
    """The first document sits right after the prefix it was computed after: its KV is exact, never recomputed."""
    prompt = engine.prompt(QUESTION, texts)
    tp = engine.tokenize(prompt)
    engine.publish(texts)
    first = next(i for i in range(len(tp.segments)) if tp.document(i))
    start = sum(len(s) for s in tp.segments[:first])
    end = start + len(tp.segments[first])
    pre, chosen = _blend_choice(engine, prompt)
    assert pre.recomputed_tokens == chosen.numel() > 0
    assert not bool(((chosen >= start) & (chosen < end)).any())


def test_priming_moves_primed_kv_and_keeps_the_endpoints(embedded: object, tmp_path: Path, texts: list[str]) -> None:
    """Primed stitching: the first document stays exact, a moved one is its KV computed after the filler, moved."""
    from kv_rag.prompt import TokenizedPrompt

    with pytest.raises(InputError, match="priming"):
        Engine(None, store="memory", priming=" ")
    eng = Engine(None, store=tmp_path / "primed", device="cpu", dtype="float32", priming=True)
    assert eng.priming == PRIMING_TEXT
    one = eng.prompt(QUESTION, texts[:1])
    pre1 = eng.prefill(one, mode="stitch")
    assert pre1.logits is not None
    assert float((pre1.logits - eng.reference_logits(eng.tokenize(one).ids)).abs().max()) <= TOL

    eng.publish(texts[:2])  # stores the plain and the primed artifact of each
    prompt = eng.prompt(QUESTION, texts[:2])
    tp = eng.tokenize(prompt)
    st = eng.prefill(prompt, mode="stitch")
    docs = [s for s in st.segments if s.document]
    assert [d.cache for d in docs] == [CacheStatus.HIT, CacheStatus.HIT]
    assert docs[0].key == eng.document_key(texts[0])
    assert docs[1].key != eng.document_key(texts[1])  # the primed artifact, not the plain one

    # the moved document's KV is a prefill of prefix + filler + separator + document, keys moved
    i = [j for j in range(len(tp.segments)) if tp.document(j)][1]
    doc_ids = tp.segments[i]
    dst, n = sum(len(s) for s in tp.segments[:i]), len(doc_ids)
    segs = [p.ids for p in eng.planner.context(eng.system_prompt, eng.priming).pieces]
    lead = [t for s in segs for t in s]
    direct = eng.prefill(TokenizedPrompt((tuple(lead) + doc_ids,), ()), use_cache=False)
    src = len(lead)
    assert src > len(segs[0])  # computed after the filler, not right after the prefix
    shifter = eng.loaded.rotary
    rot = shifter.rotation(src, dst, n)
    for (k, v), (dk, dv) in zip(_layers(st.cache), _layers(direct.cache), strict=True):
        want_k = shifter.shift(dk[:, :, src : src + n], src, dst, rot)
        assert float((k[:, :, dst : dst + n] - want_k).abs().max()) <= TOL
        assert float((v[:, :, dst : dst + n] - dv[:, :, src : src + n]).abs().max()) <= TOL

    # other KV than unprimed stitching; blend r=1 is still the full prefill
    plain = Engine(None, store="memory", device="cpu", dtype="float32")
    unprimed = plain.prefill(prompt, mode="stitch")
    assert st.logits is not None and unprimed.logits is not None
    assert float((st.logits - unprimed.logits).abs().max()) > 1e-3
    b1 = eng.prefill(prompt, mode="blend", recompute=1.0)
    assert b1.logits is not None
    assert float((b1.logits - eng.reference_logits(tp.ids)).abs().max()) <= TOL


def test_cli_ask_priming(
    capsys: pytest.CaptureFixture[str], embedded: object, tmp_path: Path, corpus_dir: Path
) -> None:
    import json

    from kv_rag.cli import main

    base = ["ask", "What does the else clause of a for loop do?", "--docs", str(corpus_dir), "--json"]
    base += ["--store", str(tmp_path / "store"), "--max-new-tokens", "2", "--chunk-tokens", "200", "--k", "2"]
    assert main([*base, "--mode", "stitch"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--mode", "stitch", "--priming"]) == 0
    primed = json.loads(capsys.readouterr().out)
    assert primed["mode"] == "stitch"
    assert [d["cache"] for d in primed["docs"]] == ["hit", "miss"]  # the moved document's primed artifact is new
    assert primed["docs"][0]["key"] == plain["docs"][0]["key"] and primed["docs"][1]["key"] != plain["docs"][1]["key"]


def test_span_selection_takes_windows_within_documents() -> None:
    from kv_rag.selection import spans as _spans

    positions = torch.tensor([1, 2, 3, 4, 5, 10, 11, 12, 13])
    scores = torch.tensor([0.0, 0, 5, 0, 0, 0, 0, 0, 9])
    # best seed 13: window 11..13 (no 14, 15); then seed 3: 3 and its nearest neighbours until the budget
    assert _spans(positions, scores, 5, 2).tolist() == [2, 3, 11, 12, 13]
    assert _spans(positions, scores, 9, 1).tolist() == positions.tolist()


def test_balanced_selection_splits_the_budget_over_moved_documents(engine: Engine, texts: list[str]) -> None:

    prompt = engine.prompt(QUESTION, texts)
    tp = engine.tokenize(prompt)
    engine.publish(texts)
    pre, chosen = _blend_choice(engine, prompt, AttentionSelection(balanced=True))
    assert pre.recomputed_tokens == chosen.numel() > 0
    docs = [i for i in range(len(tp.segments)) if tp.document(i)]
    starts = [sum(len(s) for s in tp.segments[:i]) for i in docs]
    counts = [
        int(((chosen >= a) & (chosen < a + len(tp.segments[i]))).sum()) for a, i in zip(starts, docs, strict=True)
    ]
    assert counts[0] == 0  # the first document is not moved
    assert abs(counts[1] - counts[2]) <= 1 and counts[1] + counts[2] == chosen.numel()
