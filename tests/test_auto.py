"""Calibration and auto mode on the real embedded model: the profile, its binding to the model, the choice."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import kv_rag
from kv_rag import Engine, InputError, Mode, Profile, RequestOptions
from kv_rag.auto import settings_of
from kv_rag.calibration_questions import questions
from kv_rag.cli import main
from kv_rag.profile import Bucket, RecipeStats, Row, profile_path, token_bin, wilson_upper

LOGIT_TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stats(mode: Mode, r: float, loss: float) -> RecipeStats:
    return RecipeStats(mode, r, 50, loss / 2, loss, 0.5, 0.1, 0.5, 0.5)


def _write_profile(engine: Engine, stitch_loss: float, blend: dict[float, float] | None = None) -> Path:
    """A hand-written profile for ``engine``'s model, one bucket covering small prompts."""
    loaded = engine.loaded
    recipes = [_stats(Mode.STITCH, 0.0, stitch_loss)]
    recipes += [_stats(Mode.BLEND, r, loss) for r, loss in sorted((blend or {}).items())]
    profile = Profile(
        model=engine.model_name,
        model_digest=loaded.fingerprint.digest,
        tokenizer_digest=loaded.tokenizer_digest,
        dtype=loaded.fingerprint.dtype,
        settings=settings_of(engine.options.merge(mode="stitch"), engine.system_prompt),
        buckets=(Bucket(8, 4096, 50, 50.0, tuple(recipes)),),
    )
    return profile.save(profile_path(engine.store, loaded.fingerprint.digest, loaded.tokenizer_digest))


def _question(engine: Engine, seed: int = 3) -> dict[str, Any]:
    return questions(engine.tokenizer, 1, 3, seed, 48)[0]


# ---------------------------------------------------------------------------------------------- options
def test_max_loss_is_checked_and_belongs_to_auto() -> None:
    opts = RequestOptions.make(mode="auto")
    assert opts.mode is Mode.AUTO and opts.budget == 1.0
    assert opts.describe()["max_loss"] == 1.0
    assert RequestOptions.make(mode="auto", max_loss=0).budget == 0.0
    assert "max_loss" not in RequestOptions.make(mode="exact").describe()
    for bad in (-1, 101, "1", True, float("nan")):
        with pytest.raises(InputError, match="max_loss must be"):
            RequestOptions.make(mode="auto", max_loss=bad)
    with pytest.raises(InputError, match="max_loss=2 applies to mode 'auto' only"):
        RequestOptions.make(mode="stitch", max_loss=2)
    # leaving auto drops an inherited budget, as leaving blend drops recompute
    assert RequestOptions.make(mode="auto", max_loss=3).merge(mode="exact").max_loss is None
    assert RequestOptions.make(mode="auto", max_loss=3).merge(temperature=0.0).budget == 3.0
    with pytest.raises(InputError, match="mode must be one of exact, stitch, blend, auto"):
        RequestOptions.make(mode="fast")


def test_profile_statistics_and_buckets() -> None:
    assert wilson_upper(0, 0) == 1.0
    assert 0.0 < wilson_upper(0, 100) < 0.02 < wilson_upper(1, 100) < wilson_upper(5, 100) < 0.1
    assert token_bin(1) == 64 and token_bin(1000) == 1024 and token_bin(1024) == 1024 and token_bin(1025) == 2048
    right = {"correct": 1.0, "identical": 1.0, "kl": 0.0, "lp": -1.0, "top1": 1.0}
    wrong = {"correct": 0.0, "identical": 0.0, "kl": 0.3, "lp": -3.0, "top1": 0.0}
    rows = [Row(2, 900, {"full": right, "stitch": wrong if i < 2 else right, "blend r=0.5": right}) for i in range(10)]
    rows.append(Row(3, 1900, {"full": right, "stitch": wrong, "blend r=0.5": right}))
    p = Profile.from_rows(rows, model="m", model_digest="a", tokenizer_digest="b", dtype="float32", settings={})
    assert [(b.moved, b.max_document_tokens, b.prompts) for b in p.buckets] == [(2, 1024, 10), (3, 2048, 1)]
    stitch, blend = p.buckets[0].recipes
    assert stitch.label == "stitch" and blend.label == "blend r=0.5"
    assert stitch.accuracy_drop == pytest.approx(20.0) and stitch.loss_upper > 20.0
    assert stitch.greedy_agreement == pytest.approx(0.8) and stitch.logprob_drop == pytest.approx(0.4)
    assert blend.accuracy_drop == 0.0 and 0.0 < blend.loss_upper < 15.0
    # the smallest bucket that covers the shape; none for more moved documents or tokens than measured
    assert p.choose(1, 500, 15.0) == (blend, p.buckets[0])
    assert p.choose(2, 900, 100.0)[0] == stitch
    assert p.choose(2, 900, 1.0) == (None, p.buckets[0])
    assert p.choose(3, 1500, 100.0)[1] == p.buckets[1]
    assert p.choose(4, 500, 100.0) == (None, None) and p.choose(2, 3000, 100.0) == (None, None)
    assert Profile.from_dict(p.to_dict()) == p


# ---------------------------------------------------------------------------------------------- auto
def test_auto_max_loss_zero_is_exact_token_for_token(engine: Engine) -> None:
    """max_loss=0 is exact mode even where the profile would let stitch through: the same tokens as exact
    mode and as a from-scratch prefill, and the same logits as a use_cache=False prefill."""
    _write_profile(engine, stitch_loss=0.0)
    q = _question(engine)
    engine.publish(q["docs"])
    prompt = engine.prompt(q["question"], q["docs"])
    loose = engine.generate(prompt, mode="auto", max_loss=100, max_new_tokens=2)
    assert loose.mode is Mode.STITCH  # the profile would allow stitch
    auto = engine.generate(prompt, mode="auto", max_loss=0, max_new_tokens=16)
    exact = engine.generate(prompt, mode="exact", max_new_tokens=16)
    plain = engine.generate(prompt, use_cache=False, max_new_tokens=16)
    assert auto.mode is Mode.EXACT and auto.auto is not None
    assert auto.auto.mode is Mode.EXACT and auto.expected_loss == 0.0
    assert auto.to_dict()["auto"]["mode_chosen"] == "exact"
    assert auto.options["mode"] == "auto" and auto.options["max_loss"] == 0.0
    assert len(auto.token_ids) > 0
    assert auto.token_ids == exact.token_ids == plain.token_ids
    pre = engine.prefill(prompt, mode="auto", max_loss=0)
    ref = engine.prefill(prompt, use_cache=False)
    assert pre.mode is Mode.EXACT and pre.recomputed_tokens == 0
    assert pre.auto is not None and pre.auto.reason == "max_loss=0: exact mode"
    assert pre.logits is not None and ref.logits is not None
    assert float((pre.logits - ref.logits).abs().max()) <= LOGIT_TOL
    ids = engine.tokenize(prompt).ids
    assert float((pre.logits - engine.reference_logits(ids)).abs().max()) <= LOGIT_TOL


def test_auto_without_profile_is_exact_and_says_so_once(engine: Engine) -> None:
    auto = Engine(None, store=engine.store, device="cpu", dtype="float32", mode="auto", max_loss=5)
    q = _question(engine, seed=4)
    auto.publish(q["docs"])
    with pytest.warns(UserWarning, match="no calibrated profile"):
        first = auto.generate(q["question"], q["docs"], max_new_tokens=8)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        second = auto.generate(q["question"], q["docs"][::-1], max_new_tokens=8)
    assert not [w for w in later if "no calibrated profile" in str(w.message)]
    plain = engine.generate(q["question"], q["docs"], use_cache=False, max_new_tokens=8)
    for gen in (first, second):
        assert gen.mode is Mode.EXACT and gen.auto is not None
        assert gen.auto.mode is Mode.EXACT and gen.expected_loss is None
        assert "no calibrated profile" in gen.auto.reason
    assert first.token_ids == plain.token_ids


def test_auto_chooses_stitch_or_the_smallest_blend_that_fits(engine: Engine) -> None:
    _write_profile(engine, stitch_loss=12.0, blend={0.15: 6.0, 0.5: 0.5})
    auto = Engine(None, store=engine.store, device="cpu", dtype="float32", mode="auto")
    q = _question(engine, seed=5)
    auto.publish(q["docs"])
    prompt = auto.prompt(q["question"], q["docs"])
    stitch = auto.generate(prompt, max_loss=20, max_new_tokens=4)
    assert stitch.mode is Mode.STITCH and stitch.auto is not None and stitch.expected_loss == 12.0
    assert stitch.auto.to_dict()["mode_chosen"] == "stitch" and "moved document" in stitch.auto.reason
    assert stitch.cached_tokens > 0 and stitch.recomputed_tokens == 0
    blend = auto.generate(prompt, max_loss=7, max_new_tokens=4)
    assert blend.mode is Mode.BLEND and blend.auto is not None and blend.auto.recompute == 0.15
    assert blend.recomputed_tokens > 0 and blend.expected_loss == 6.0
    default = auto.generate(prompt, max_new_tokens=4)  # budget 1 point: blend r=0.5
    assert default.auto is not None and default.auto.recompute == 0.5
    none_fits = auto.generate(prompt, max_loss=0.1, max_new_tokens=4)
    assert none_fits.mode is Mode.EXACT and none_fits.auto is not None and "no assembly fits" in none_fits.auto.reason
    # once the exact chain is cached, loading it is exact and cheapest
    cached = auto.generate(prompt, max_loss=20, max_new_tokens=4)
    assert cached.mode is Mode.EXACT and cached.auto is not None
    assert cached.auto.reason == "the exact chain of every document is cached" and cached.expected_loss == 0.0
    # another blend selection than the profile's: not calibrated, so exact
    other = auto.generate(
        auto.prompt(q["question"], q["docs"][::-1]), max_loss=20, selection="leading", max_new_tokens=2
    )
    assert other.mode is Mode.EXACT and other.auto is not None and "selection" in other.auto.reason


def test_profile_of_another_fingerprint_is_ignored(engine: Engine) -> None:
    path = _write_profile(engine, stitch_loss=0.0)
    q = _question(engine, seed=6)
    bf16 = Engine(None, store=engine.store, device="cpu", dtype="bfloat16", mode="auto", max_loss=100)
    assert bf16.loaded.fingerprint.digest != engine.loaded.fingerprint.digest
    with pytest.warns(UserWarning, match="no calibrated profile"):
        gen = bf16.generate(q["question"], q["docs"], max_new_tokens=2)
    assert gen.mode is Mode.EXACT and gen.auto is not None and gen.expected_loss is None
    # a file under the right name that names another model is ignored too
    data = path.read_text().replace(engine.loaded.fingerprint.digest, "0" * 32)
    path.write_text(data)
    auto = Engine(None, store=engine.store, device="cpu", dtype="float32", mode="auto", max_loss=100)
    with pytest.warns(UserWarning, match="no calibrated profile"):
        gen = auto.generate(q["question"], q["docs"], max_new_tokens=2)
    assert gen.mode is Mode.EXACT


# ---------------------------------------------------------------------------------------------- calibrate
def test_tiny_calibration_is_stored_beside_the_store_and_read_by_auto(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "copy.json"
    profile = kv_rag.calibrate(
        engine, n_questions=2, docs_per_prompt=(2,), passage_tokens=48, max_new_tokens=4, blend=(0.5,), out=out
    )
    loaded = engine.loaded
    path = profile_path(engine.store, loaded.fingerprint.digest, loaded.tokenizer_digest)
    assert path.parent == tmp_path / "store" / "profiles"
    assert Profile.load(path) == profile == Profile.load(out)
    assert profile.dtype == "float32" and len(profile.rows) == 2
    assert profile.settings["selection"] == "attention" and profile.extra["seconds"] > 0
    assert sum(b.prompts for b in profile.buckets) == 2
    for b in profile.buckets:
        assert [s.label for s in b.recipes] == ["stitch", "blend r=0.5"]
        for s in b.recipes:
            assert s.prompts == b.prompts and 0.0 <= s.greedy_agreement <= 1.0 and s.kl_first_answer_tokens >= 0.0
            assert 0.0 < s.loss_upper <= 100.0  # two prompts prove little
    for row in profile.rows:
        assert row.measures["full"]["identical"] == 1.0 and row.measures["full"]["kl"] == 0.0
    auto = Engine(None, store=engine.store, device="cpu", dtype="float32", mode="auto", max_loss=100)
    assert auto._auto.profile() == profile


def test_calibration_with_the_users_questions(engine: Engine) -> None:
    q = _question(engine, seed=7)
    mine = [{"question": q["question"], "answer": q["answer"]}]
    profile = kv_rag.calibrate(engine, q["docs"], mine, docs_per_prompt=(2,), max_new_tokens=2, blend=(), save=False)
    assert profile.settings["questions"] == "the user's questions" and len(profile.rows) == 1
    assert [s.label for s in profile.buckets[0].recipes] == ["stitch"]
    with pytest.raises(InputError, match="'question' and 'answer'"):
        kv_rag.calibrate(engine, q["docs"], [{"question": "x"}], save=False)
    with pytest.raises(InputError, match="recompute must be a fraction"):
        kv_rag.calibrate(engine, blend=(2.0,), save=False)
    with pytest.raises(InputError, match="need at least 5 passages"):
        kv_rag.calibrate(engine, ["one short text"], docs_per_prompt=(5,), save=False)


def test_generation_reports_nothing_auto_outside_auto(engine: Engine) -> None:
    gen = engine.generate("What is 2+2?", max_new_tokens=2)
    assert gen.auto is None and gen.expected_loss is None and "auto" not in gen.to_dict()
    assert torch.get_num_threads() == 1


def test_cli_calibrate_then_ask_in_auto_mode(
    engine: Engine, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    tiny = ["--questions", "1", "--docs-per-prompt", "2", "--passage-tokens", "48", "--max-new-tokens", "2"]
    assert main(["calibrate", str(corpus_dir), *tiny, "--blend", "0.5", "--store", store, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert Path(made["profile"]).is_file() and made["settings"]["questions"] == "made-up facts in the user's documents"
    assert [s["mode"] for s in made["buckets"][0]["recipes"]] == ["stitch", "blend"]
    question = "What does the else clause of a for loop do?"
    ask = ["ask", question, "--docs", str(corpus_dir), "--k", "2", "--store", store, "--max-new-tokens", "4"]
    assert main([*ask, "--mode", "auto", "--max-loss", "100", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["options"]["mode"] == "auto" and got["options"]["max_loss"] == 100.0
    assert got["auto"]["mode_chosen"] == got["mode"] and got["auto"]["reason"]
    assert main([*ask, "--mode", "auto", "--max-loss", "0"]) == 0
    assert "[auto] max_loss=0: exact mode" in capsys.readouterr().err
