"""The embedded model: converted once from the GGUF file to safetensors, with identical logits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kv_rag import models


def test_conversion_is_exact_and_done_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_RAG_HOME", str(tmp_path / "home"))
    path = models.embedded_model_path()
    assert path.is_relative_to(tmp_path / "home" / "models")
    assert (path / "kv_rag_converted.json").is_file()
    assert (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime
    t0 = time.perf_counter()
    assert models.embedded_model_path() == path  # second call: no conversion
    assert time.perf_counter() - t0 < 1.0
    assert (path / "model.safetensors").stat().st_mtime == mtime

    gguf = models.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4119, 314, 253, 1028, 30]])
    with torch.inference_mode():
        assert torch.equal(reference(ids).logits, converted(ids).logits)


def test_engines_share_one_loaded_model() -> None:
    a = models.load(None, "cpu", "float32")
    b = models.load("smollm2", "cpu", torch.float32)
    assert a is b


def test_any_local_model_folder_loads(tmp_path: Path) -> None:
    from tiny import tiny_model

    from kv_rag import Engine

    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    engine = Engine(str(tmp_path / "m"), store="memory", device="cpu")
    gen = engine.generate("Hi?", ["A document."], max_new_tokens=3)
    assert engine.model_name == "m"
    assert len(gen.token_ids) >= 1 or gen.finish_reason == "stop"


def test_known_documents_are_bounded_least_recent_first() -> None:
    from kv_rag.models import LoadedModel

    lm = LoadedModel(model=None, tokenizer=None, name="x", path="x")
    lm.remember_documents([("a" * 10, "1"), ("b" * 10, "2"), ("c" * 10, "3")], max_chars=30)
    assert list(lm.documents) == ["a" * 10, "b" * 10, "c" * 10]
    lm.remember_documents([("a" * 10, "other source"), ("  ", "blank")], max_chars=30)  # a: most recent again
    assert lm.documents["a" * 10] == "1" and list(lm.documents)[-1] == "a" * 10
    lm.remember_documents([("d" * 15, "4")], max_chars=30)  # b and c are the least recent: both go
    assert list(lm.documents) == ["a" * 10, "d" * 15]
    lm.remember_documents([("e" * 50, "5")], max_chars=30)  # one over-long document is still kept
    assert list(lm.documents) == ["e" * 50]
