"""Spot-checking untrusted artifacts: honest ones pass, tampered ones are caught at the documented rate."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from kv_rag import Artifact, Engine
from kv_rag.bench import document_of_length
from kv_rag.cli import main
from kv_rag.verify import detection_probability, plan_windows, verify_artifact

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tamper(art: Artifact, layer: int, start: int, length: int, scale: float, part: str = "values") -> Artifact:
    """A re-sealed copy (a dishonest publisher fixes the checksum) with one span of one layer scaled."""
    tensors = list(getattr(art, part))
    t = tensors[layer].clone()
    t[:, start : start + length] *= scale
    tensors[layer] = t
    return dataclasses.replace(art, **{part: tuple(tensors)}, meta=dataclasses.replace(art.meta, checksum="")).sealed()


@pytest.fixture(scope="module")
def tiny_engine() -> Engine:
    model, tok = tiny_model("llama", num_hidden_layers=4)
    return Engine(model, tokenizer=tok, store="memory")


def _published(engine: Engine, tokens: int) -> Artifact:
    doc = document_of_length(engine.tokenizer, tokens)
    key = engine.publish([doc])[0].key
    hit = engine.store.get(key)
    assert hit is not None
    return hit.artifact


def test_window_plan_and_bound() -> None:
    wins = plan_windows(320, 0.1, 16, random.Random(0))
    assert len(wins) == 2 and all(b - a == 16 and a % 16 == 0 for a, b in wins)
    assert plan_windows(10, 0.01, 16, random.Random(0)) == [(0, 10)]
    assert detection_probability(320, 16, 2, 16) == pytest.approx(0.1)
    assert detection_probability(320, 16, 2, 48) == pytest.approx(1 - (17 * 16) / (20 * 19))
    assert detection_probability(320, 16, 20, 1) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        plan_windows(100, 0.0, 16, random.Random(0))


def test_honest_artifacts_pass(tiny_engine: Engine) -> None:
    art = _published(tiny_engine, 320)
    reps = [verify_artifact(tiny_engine, art, fraction=0.1, seed=s) for s in range(30)]
    assert all(r.ok for r in reps), [r.reason for r in reps if not r.ok]
    full = verify_artifact(tiny_engine, art, fraction=1.0, seed=0)
    assert full.ok and full.windows_checked == 20 and full.context_tokens == art.meta.start > 0
    assert max(c.rel_diff for c in full.windows) < 1e-4


TRIALS = 200


@pytest.mark.parametrize(
    ("layer", "span", "scale", "exact"),
    [
        (-1, 16, 1.5, True),  # last layer: only the windows holding the span can see it: the bound is exact
        (-1, 40, 0.9, False),  # unaligned span: overlaps 3 or 4 windows
        (0, 16, 1.2, False),  # first layer: later windows see it too, so the rate is above the bound
    ],
)
def test_tampered_spans_are_caught_at_the_documented_rate(
    tiny_engine: Engine, layer: int, span: int, scale: float, exact: bool
) -> None:
    art = _published(tiny_engine, 320)
    n = art.meta.num_tokens
    rng = random.Random(1)
    layer = layer % art.num_layers
    caught = 0
    for trial in range(TRIALS):
        start = rng.randrange(0, n - span + 1) if not exact else 16 * rng.randrange(n // 16)
        bad = tamper(art, layer, start, span, scale)
        caught += not verify_artifact(tiny_engine, bad, fraction=0.1, seed=trial).ok
    bound = detection_probability(n, 16, 2, span)
    rate = caught / TRIALS
    sd = (bound * (1 - bound) / TRIALS) ** 0.5
    assert rate >= bound - 4 * sd, (rate, bound)
    if exact:
        assert abs(rate - bound) <= 4 * sd, (rate, bound)


def test_real_model_honest_tampered_and_foreign(engine: Engine, tmp_path: Path) -> None:
    art = _published(engine, 160)
    ok = verify_artifact(engine, art, fraction=0.3, seed=0)
    assert ok.ok and ok.context_tokens == art.meta.start, ok.reason
    assert max(c.rel_diff for c in ok.windows) < 1e-4
    bad = tamper(art, 7, 40, 8, 1.05, part="keys")  # 5 % on 8 tokens of one layer's keys
    rep = verify_artifact(engine, bad, fraction=1.0)
    assert not rep.ok and "tokens 32-48" in rep.reason
    # an artifact of another model: refused on its fingerprint before any compute
    model, tok = tiny_model("qwen2")
    other = _published(Engine(model, tokenizer=tok, store="memory"), 40)
    rep = verify_artifact(engine, other)
    assert not rep.ok and "another model" in rep.reason and not rep.windows
    # CLI: a key in the store (exit 0), a tampered file (exit 1), garbage (exit 2, one line)
    store = str(tmp_path / "store")
    Engine(None, store=store).store.put(art.meta.key, art)
    assert main(["verify", art.meta.key, "--store", store, "--fraction", "0.2", "--seed", "1"]) == 0
    f = tmp_path / "bad.kv"
    f.write_bytes(bad.to_bytes())
    assert main(["verify", str(f), "--store", store, "--fraction", "1", "--json"]) == 1
    g = tmp_path / "junk.kv"
    g.write_bytes(b"not an artifact at all")
    assert main(["verify", str(g), "--store", store]) == 2
    assert main(["verify", "0" * 64, "--store", store]) == 2


def test_cli_json_report(engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = _published(engine, 64)
    f = tmp_path / "a.kv"
    f.write_bytes(art.to_bytes())
    assert main(["verify", str(f), "--store", "memory", "--json", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["windows_total"] == 4 and out["windows_checked"] == 1
    assert 0 < out["cost_fraction"] < 1 and out["detects_16_token_span"] == pytest.approx(0.25)
    assert torch.equal(art.token_ids, Artifact.from_bytes(f.read_bytes()).token_ids)


def _rolled(art: Artifact, shift: int = 1) -> Artifact:
    """A re-sealed forgery: the same token ids with every layer's KV moved along by ``shift`` tokens
    (each token carries another token's KV, as when one document's KV is sold under another's ids)."""
    keys = tuple(torch.roll(k, shift, dims=1) for k in art.keys)
    values = tuple(torch.roll(v, shift, dims=1) for v in art.values)
    meta = dataclasses.replace(art.meta, checksum="")
    return dataclasses.replace(art, keys=keys, values=values, meta=meta).sealed()


def test_the_first_layer_is_checked_at_every_position(engine: Engine) -> None:
    """Honest: matches. KV of other tokens, or scaled first-layer values: caught with certainty, at a
    1% window fraction. Tampering confined to a deeper layer is not the first layer's to see."""
    from kv_rag.spotcheck import first_layer_problem

    art = _published(engine, 160)
    assert first_layer_problem(engine.loaded, art) is None
    ok = verify_artifact(engine, art, fraction=0.01, seed=0)
    assert ok.ok and ok.first_layer.startswith(f"matches at all {art.meta.num_tokens} positions")
    assert list(ok.catches().values())[:2] == [1.0, 1.0] and "this check catches" in ok.summary()
    for bad in (_rolled(art), tamper(art, 0, 0, art.meta.num_tokens, 1.01)):
        rep = verify_artifact(engine, bad, fraction=0.01, seed=0)
        assert not rep.ok and rep.reason.startswith("first layer:") and not rep.windows
    assert first_layer_problem(engine.loaded, tamper(art, 5, 40, 8, 1.05)) is None


def test_engine_spot_check_refuses_a_forgery_from_disk(engine: Engine, tmp_path: Path) -> None:
    """Engine(spot_check=True): a forged artifact in the disk tier is a miss (damaged) on first use, and
    the answer is a full prefill's; without it the forgery loads."""
    from kv_rag.store import DiskTier, MemoryTier, Store

    doc = "The ferry to the island leaves from pier 7 at noon. " * 6
    q = "Which pier does the ferry leave from?"
    folder = tmp_path / "shared"
    Engine(None, store=Store([DiskTier(folder)])).publish([doc])
    disk = DiskTier(folder)
    key = engine.document_key(doc)
    art = disk.get(key)
    assert art is not None
    disk.put_bytes(key, _rolled(art).to_bytes())

    def ask(spot: bool) -> tuple[str, str | None, list[int]]:
        eng = Engine(None, store=Store([MemoryTier(), DiskTier(folder)]), spot_check=spot)
        with pytest.warns(UserWarning) if spot else contextlib.nullcontext():
            gen = eng.generate(q, [doc], max_new_tokens=8)
        return gen.documents[0].cache.value, gen.documents[0].reason, gen.token_ids

    assert ask(False)[:2] == ("hit", None)  # unchecked: the forgery is used
    cache, reason, tokens = ask(True)
    ref = engine.generate(q, [doc], max_new_tokens=8, use_cache=False).token_ids
    assert (cache, reason) == ("miss", "damaged") and tokens == ref
