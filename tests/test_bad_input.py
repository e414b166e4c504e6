"""User mistakes get a clear error that says what to do; never a traceback from deep inside."""

from __future__ import annotations

import pytest

from kv_rag import CacheStatus, ContextLengthError, Engine, GenerationSettings, InputError, Mode
from kv_rag.bench import document_of_length
from kv_rag.prompt import Prompt, TokenizedPrompt


def test_empty_question(engine: Engine) -> None:
    with pytest.raises(InputError, match="question is empty"):
        engine.generate("   ", ["some text"])


def test_empty_document(engine: Engine) -> None:
    with pytest.raises(InputError, match=r"documents\[1\] is empty"):
        engine.generate("What?", ["text", "  "])
    with pytest.raises(InputError, match="empty"):
        engine.publish([""])


def test_a_document_the_tokenizer_cannot_cut_out_is_not_published_and_nothing_else_is_lost(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a tokenizer cannot cut a document from the text before it (Gemma 3's tokenizer and a passage
    starting with spaces), the prompt is tokenized whole, without segments: publish warns and reports
    the document unstored instead of failing, and the other documents are published."""
    real = engine.tokenize
    odd = "   Because x and y work together, neither may be left out."

    def tokenize(prompt: Prompt) -> TokenizedPrompt:
        tp = real(prompt)
        return real(Prompt.from_parts(prompt.text, (), "", ())) if odd in prompt.text else tp

    monkeypatch.setattr(engine, "tokenize", tokenize)
    with pytest.warns(UserWarning, match="was not published"):
        reports = engine.publish([odd, "A plain document about ferries."], sources=["odd", "plain"])
    assert [(r.source, r.key, r.cache, r.stored) for r in reports[:1]] == [("odd", "", CacheStatus.NONE, False)]
    assert reports[1].key and reports[1].stored


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
