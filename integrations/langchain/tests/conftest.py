"""Shared settings of the langchain-kv-rag tests: offline, the embedded model, the bundled corpus."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub: the models are local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The bundled corpus of the core package (real text: sections of the Python language reference).
CORPUS = Path(__file__).resolve().parents[3] / "kv_rag" / "corpus"
