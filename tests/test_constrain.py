"""Grammar-constrained decoding on the real embedded model: answers that always parse and validate."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kv_rag import Engine, GenerationSettings, InputError

pytest.importorskip("llguidance", reason="constrained decoding needs kv-rag[structured]")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
ASK = "Describe a person as JSON with a name, an age and a favourite color."


def _valid(value: object) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the check by hand
        assert isinstance(value, dict) and set(value) == {"name", "age", "color"}
        assert isinstance(value["name"], str) and type(value["age"]) is int
        assert value["color"] in ("red", "green", "blue")
        return
    jsonschema.validate(value, SCHEMA)


@pytest.fixture
def eng(embedded: object, tmp_path: Path) -> Engine:
    return Engine(None, store=tmp_path / "store", device="cpu", dtype="float32")


def test_a_json_schema_answer_parses_and_validates(eng: Engine) -> None:
    gen = eng.generate(ASK, json_schema=SCHEMA, max_new_tokens=64)
    assert gen.finish_reason == "stop"
    _valid(json.loads(gen.text))
    sampled = eng.generate(ASK, json_schema=json.dumps(SCHEMA), max_new_tokens=64, temperature=1.0, seed=3)
    _valid(json.loads(sampled.text))


def test_a_lark_grammar_answer_matches_it(eng: Engine) -> None:
    gen = eng.generate("Is the sky blue? Answer yes or no.", grammar='start: "yes" | "no"', max_new_tokens=8)
    assert gen.text in ("yes", "no") and gen.finish_reason == "stop"


def test_bad_constraints_raise_input_errors(eng: Engine) -> None:
    with pytest.raises(InputError, match="json_schema"):
        GenerationSettings(json_schema=[1, 2])
    with pytest.raises(InputError, match="not both"):
        GenerationSettings(json_schema=SCHEMA, grammar='start: "a"')
    with pytest.raises(InputError, match="grammar"):
        eng.generate(ASK, grammar="start: (", max_new_tokens=4)


def test_constrained_and_plain_requests_share_the_scheduler(eng: Engine) -> None:
    plain_q = "What is the capital of France?"
    alone = eng.generate(plain_q, max_new_tokens=24).token_ids
    before = dict(eng.scheduler.stats)
    got: dict[str, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(kind: str) -> None:
        try:
            barrier.wait()
            if kind == "json":
                got[kind] = eng.generate(ASK, json_schema=SCHEMA, max_new_tokens=64)
            else:
                got[kind] = eng.generate(plain_q, max_new_tokens=24)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("json", "plain")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _valid(json.loads(got["json"].text))  # type: ignore[attr-defined]
    assert got["plain"].token_ids == alone  # type: ignore[attr-defined]
    assert eng.scheduler.stats["largest_batch"] >= 2
    assert eng.scheduler.stats["stepped"] - before["stepped"] > eng.scheduler.stats["steps"] - before["steps"]


def test_a_missing_llguidance_names_the_extra(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(InputError, match=r"kv-rag\[structured\]"):
        eng.generate(ASK, json_schema=SCHEMA, max_new_tokens=4)
