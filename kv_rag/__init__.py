"""kv-rag: publish a document's KV cache once, reuse it in every request that retrieves it.

The public API::

    from kv_rag import Engine
    engine = Engine()                      # embedded SmolLM2-135M-Instruct, store in $KV_RAG_HOME
    engine.publish([text])                 # compute and store the document's KV
    gen = engine.generate("Question?", [text])   # loads the KV, prefills only the question
    print(gen.text, gen.cached_tokens, gen.ttft_s)
"""

from .artifact import Artifact, ArtifactMeta
from .decode import GenerationSettings
from .engine import Engine, Prefill, Stream
from .errors import (
    ArtifactError,
    ContextLengthError,
    InputError,
    KVRagError,
    ModelLoadError,
    UnsupportedModelError,
)
from .fingerprint import ModelFingerprint
from .prompt import Prompt, TokenizedPrompt
from .results import CacheStatus, Generation, Mode, PublishReport, SegmentReport
from .store import DiskTier, MemoryTier, Store, Tier

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactMeta",
    "CacheStatus",
    "ContextLengthError",
    "DiskTier",
    "Engine",
    "Generation",
    "GenerationSettings",
    "InputError",
    "KVRagError",
    "MemoryTier",
    "Mode",
    "ModelFingerprint",
    "ModelLoadError",
    "Prefill",
    "Prompt",
    "PublishReport",
    "SegmentReport",
    "Store",
    "Stream",
    "Tier",
    "TokenizedPrompt",
    "UnsupportedModelError",
    "__version__",
]
