"""Exactness of cache hits on tiny random-initialised models of several architectures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny import LLAMA3_ROPE, tiny_model

from kv_rag import CacheStatus, Engine

DOC = (Path(__file__).resolve().parents[1] / "kv_rag" / "corpus" / "for-statement.md").read_text()

CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 64}),
]


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_tiny_model_hits_are_exact(arch: str, overrides: dict[str, Any], tmp_path: Path) -> None:
    model, tok = tiny_model(arch, **overrides)
    engine = Engine(model, tokenizer=tok, store=tmp_path / "store")
    prompt = engine.prompt("What does the else clause do?", [DOC])
    ref = engine.reference_logits(engine.tokenize(prompt).ids)

    cold = engine.generate(prompt, max_new_tokens=12)
    warm = engine.generate(prompt, max_new_tokens=12)
    plain = engine.generate(prompt, max_new_tokens=12, use_cache=False)
    assert [d.cache for d in warm.documents] == [CacheStatus.HIT]
    assert warm.cached_tokens > 400
    assert cold.token_ids == warm.token_ids == plain.token_ids

    pre = engine.prefill(prompt)
    assert pre.logits is not None
    assert float((pre.logits - ref).abs().max()) <= 1e-4
