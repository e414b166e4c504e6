"""User mistakes get a clear error that says what to do; never a traceback from deep inside."""

from __future__ import annotations

import pytest

from kv_rag import ContextLengthError, Engine, GenerationSettings, InputError, Mode
from kv_rag.bench import document_of_length


def test_empty_question(engine: Engine) -> None:
    with pytest.raises(InputError, match="question is empty"):
        engine.generate("   ", ["some text"])


def test_empty_document(engine: Engine) -> None:
    with pytest.raises(InputError, match=r"documents\[1\] is empty"):
        engine.generate("What?", ["text", "  "])
    with pytest.raises(InputError, match="empty"):
        engine.publish([""])


def test_prompt_longer_than_the_context(engine: Engine) -> None:
    doc = document_of_length(engine.tokenizer, engine.context_window + 50)
    with pytest.raises(ContextLengthError, match=r"reads at most 8192.*--k"):
        engine.generate("What?", [doc])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_generation_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(InputError, match=match):
        GenerationSettings(**kwargs)  # type: ignore[arg-type]


def test_unknown_mode_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="mode must be one of exact"):
        Mode.parse("fastest")


def test_missing_model_folder(tmp_path) -> None:
    from kv_rag import ModelLoadError

    with pytest.raises(ModelLoadError, match="neither a local transformers model folder"):
        _ = Engine(str(tmp_path / "nope"), store="memory").loaded
