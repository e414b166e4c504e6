"""The hot path: kv-rag's cache layers, the forward step, the CUDA fast path and its kernels.

- :mod:`~kv_rag.runtime.cache`: :class:`KVCache` of :class:`PreallocatedLayer` (buffers allocated
  once with room, appended in place), built from loaded KV pieces;
- :mod:`~kv_rag.runtime.model`: :class:`ModelRuntime`, one per loaded model: the forward step
  (:meth:`~ModelRuntime.forward`, :meth:`~ModelRuntime.forward_at`) and new caches;
- :mod:`~kv_rag.runtime.decoder`: :class:`FastDecoder`, short steps of Llama-family models with
  fewer launches, and its per-layer CUDA graphs (:class:`LayerGraphs`);
- :mod:`~kv_rag.runtime.pool`: the :class:`StaticPool` of fixed-address KV buffers and the
  whole-step CUDA graphs (:class:`StepGraph`) that run on them;
- :mod:`~kv_rag.runtime.batch`: the pool's :class:`Arena` (slots of one capacity in one tensor) and
  its batched decode graph (:class:`BatchStep`: every live request's next token at once);
- :mod:`~kv_rag.runtime.kernels`: the decoder layer as plain functions for ``torch.compile``
  (:class:`Kernels`), split-KV attention's pack and merge;
- :mod:`~kv_rag.runtime.attention`: grouped-head SDPA under a mask on CPU (:func:`use_grouped_sdpa`).

Nothing here knows about the store, prompts or the engine.
"""

from .attention import use_grouped_sdpa
from .batch import Arena, BatchStep, batch_slots
from .cache import KVCache, PreallocatedLayer, build_cache, cache_layers, fill_static, lend_cache, pieces_of
from .decoder import MAX_FAST_TOKENS, FastDecoder, LayerGraphs, fast_path_enabled
from .kernels import Kernels
from .model import ModelRuntime, cache_kwarg
from .pool import StaticPool, StaticSlot, StepGraph

__all__ = [
    "MAX_FAST_TOKENS",
    "Arena",
    "BatchStep",
    "FastDecoder",
    "KVCache",
    "Kernels",
    "LayerGraphs",
    "ModelRuntime",
    "PreallocatedLayer",
    "StaticPool",
    "StaticSlot",
    "StepGraph",
    "batch_slots",
    "build_cache",
    "cache_kwarg",
    "cache_layers",
    "fast_path_enabled",
    "fill_static",
    "lend_cache",
    "pieces_of",
    "use_grouped_sdpa",
]
