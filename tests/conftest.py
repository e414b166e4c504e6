"""Shared fixtures: the real embedded model (loaded once per session) and engines on temporary stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kv_rag import Engine
from kv_rag import models as kv_models


@pytest.fixture(scope="session")
def embedded() -> kv_models.LoadedModel:
    """The embedded SmolLM2-135M-Instruct, float32 on CPU (shared with every Engine(None) in the process)."""
    return kv_models.load(None, "cpu", "float32")


@pytest.fixture
def engine(embedded: kv_models.LoadedModel, tmp_path: Path) -> Engine:
    """An engine on the embedded model with a fresh memory + disk store under ``tmp_path``."""
    return Engine(None, store=tmp_path / "store", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The bundled sample corpus."""
    return Path(__file__).resolve().parents[1] / "kv_rag" / "corpus"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: small forwards run 10-20x faster on a shared, loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
