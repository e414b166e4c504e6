"""Executing a request plan: the KV of a prompt, assembled as its mode says.

Each strategy receives the loaded model, the store and the :class:`~kv_rag.plan.RequestPlan`,
never the engine: :mod:`~kv_rag.assemble.exact` (the longest cached chain, then prefill),
:mod:`~kv_rag.assemble.stitch` (documents' own artifacts moved to their positions) and blend (stitch
plus a recomputed fraction of document tokens, chosen by a :class:`~kv_rag.selection.Selector` from a
:class:`~kv_rag.assemble.blend.BlendRequest`).
"""

from __future__ import annotations

import time

from ..models import LoadedModel
from ..options import Mode
from ..plan import RequestPlan
from ..store import Store
from .base import Prefill, acceptor, artifact_of
from .blend import BlendRequest
from .exact import assemble_chain
from .stitch import assemble_stitched

__all__ = ["BlendRequest", "Prefill", "acceptor", "artifact_of", "assemble", "assemble_chain", "assemble_stitched"]


def assemble(
    loaded: LoadedModel,
    store: Store,
    plan: RequestPlan,
    *,
    need_logits: bool = True,
    reserve: int = 0,
    t0: float | None = None,
    defer: int = 0,
    scope: str = "",
) -> Prefill:
    """The KV of ``plan``'s prompt (call with the model's lock held, in inference mode).

    ``need_logits``: return the last token's logits; ``reserve``: room for that many generated
    tokens in the cache without reallocating; ``t0``: when the request started (for ``seconds``);
    ``defer``: in exact mode, leave up to that many final tokens to the caller (:attr:`Prefill.pending`).
    ``scope``: whose conversations an exact-mode request with caching on may continue (a tenant's scope).
    """
    t0 = time.perf_counter() if t0 is None else t0
    if plan.mode is Mode.EXACT:
        turns = scope if plan.options.use_cache and need_logits else None
        pre = assemble_chain(
            loaded, store, plan.lead, need_logits=need_logits, reserve=reserve, t0=t0, defer=defer, conversation=turns
        )
        pre.mode = Mode.EXACT
    else:
        pre = assemble_stitched(loaded, store, plan, need_logits=need_logits, reserve=reserve, t0=t0)
    pre.auto = plan.choice
    return pre
