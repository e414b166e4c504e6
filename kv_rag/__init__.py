"""kv-rag: publish a document's KV cache once, reuse it in every request that retrieves it.

The public API::

    from kv_rag import Engine
    engine = Engine()                      # embedded SmolLM2-135M-Instruct, store in $KV_RAG_HOME
    engine.publish([text])                 # compute and store the document's KV
    gen = engine.generate("Question?", [text])   # loads the KV, prefills only the question
    print(gen.text, gen.cached_tokens, gen.ttft_s)

    kv_rag.calibrate(engine)               # measure stitch and blend against a full prefill, once per model
    engine = Engine(mode="auto", max_loss=1)   # then per request the cheapest assembly within 1 accuracy point
"""

from .artifact import Artifact, ArtifactMeta
from .assemble import Prefill
from .calibration import calibrate
from .decode import GenerationSettings
from .engine import Engine
from .errors import (
    ArtifactError,
    ContextLengthError,
    InputError,
    KVRagError,
    ModelLoadError,
    UnsupportedModelError,
)
from .fingerprint import ModelFingerprint
from .options import Mode, RequestOptions
from .plan import RequestPlan
from .profile import Profile
from .prompt import Prompt, TokenizedPrompt
from .results import AutoChoice, CacheStatus, Generation, MissReason, PublishReport, SegmentReport
from .selection import AttentionSelection, BlendView, DeviationSelection, LeadingSelection, Selector
from .signing import PublisherKey, SigningKey, TrustPolicy
from .store import DiskTier, MemoryTier, Store, Tier
from .streams import AsyncStream, Stream
from .tenancy import Tenant

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactMeta",
    "AsyncStream",
    "AttentionSelection",
    "AutoChoice",
    "BlendView",
    "CacheStatus",
    "ContextLengthError",
    "DeviationSelection",
    "DiskTier",
    "Engine",
    "Generation",
    "GenerationSettings",
    "InputError",
    "KVRagError",
    "LeadingSelection",
    "MemoryTier",
    "MissReason",
    "Mode",
    "ModelFingerprint",
    "ModelLoadError",
    "Prefill",
    "Profile",
    "Prompt",
    "PublishReport",
    "PublisherKey",
    "RequestOptions",
    "RequestPlan",
    "SegmentReport",
    "Selector",
    "SigningKey",
    "Store",
    "Stream",
    "Tenant",
    "Tier",
    "TokenizedPrompt",
    "TrustPolicy",
    "UnsupportedModelError",
    "__version__",
    "calibrate",
]
