"""Auto mode: per request, the cheapest assembly whose calibrated loss fits the request's budget.

``Engine(mode="auto", max_loss=1)`` (or a request's ``mode="auto"``) plans each request in one of the
three modes, choosing in this order:

1. exact mode when the budget is 0 (``max_loss=0`` is exact mode, token for token), when the request
   does not use the store, when the prompt has no document or no document moves, or when the exact
   chain of every document is cached (loading it is both the cheapest and exact);
2. otherwise, with a calibrated :class:`~kv_rag.profile.Profile` of this model and tokenizer beside the
   store's artifacts (:mod:`kv_rag.calibration`), the cheapest of stitch and blend at the smallest
   fraction whose upper loss bound, in the profile's smallest bucket that covers the request's shape
   (moved documents, document tokens), is at most the budget;
3. otherwise exact mode: the cached part of the chain is loaded and the rest prefilled.

Without a profile (or with one measured under another blend selection or priming, or without a
bucket for the request's shape) auto behaves as exact mode, and says so once per engine. The choice
and its expected loss are reported in :attr:`~kv_rag.results.Generation.auto`.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import replace
from typing import Any

from .options import Mode, RequestOptions
from .plan import RequestPlan
from .profile import Profile, profile_path
from .prompt import TokenizedPrompt
from .results import AutoChoice
from .selection import selector_name

__all__ = ["AutoMode", "prompt_shape", "settings_of"]


def prompt_shape(plan: RequestPlan) -> tuple[int, int]:
    """A stitch or blend plan's shape, as profiles bucket it: (moved documents, tokens of all documents)."""
    docs = plan.documents
    return sum(d.moved for d in docs), sum(d.piece.length for d in docs)


def settings_of(options: RequestOptions, system_prompt: str) -> dict[str, Any]:
    """What a profile's measurements assume about stitch and blend: blend's token selection, the priming
    filler and the system prompt (documents are computed after it)."""
    return {
        "selection": selector_name(options.selection) or type(options.selection).__name__,
        "priming": options.priming,
        "system_prompt": system_prompt,
    }


class AutoMode:
    """Auto mode for one engine: plans a request in the mode it chooses. Thread-safe.

    ``engine`` is a :class:`~kv_rag.engine.Engine` (its ``loaded``, ``store``, ``planner`` and
    ``system_prompt`` are read). The profile is read from the store's folder on first need and read
    again when its file changes (so a calibration in this process takes effect on the next request).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._cached: tuple[Any, Profile | None] | None = None
        self._warned = False

    def profile(self) -> Profile | None:
        """This model's profile beside the store's artifacts, or ``None`` (none, or another model's)."""
        loaded = self.engine.loaded
        fp, tok = loaded.fingerprint.digest, loaded.tokenizer_digest
        path = profile_path(self.engine.store, fp, tok)
        try:
            stamp: Any = (path, path.stat().st_mtime_ns)
        except OSError:
            stamp = (path, None)
        with self._lock:
            if self._cached is not None and self._cached[0] == stamp:
                return self._cached[1]
        got = Profile.load(path) if stamp[1] is not None else None
        if got is not None and not got.matches(fp, tok):
            got = None
        with self._lock:
            self._cached = (stamp, got)
        return got

    def plan(self, tp: TokenizedPrompt, options: RequestOptions) -> RequestPlan:
        """The plan of ``tp``: in auto mode, in the mode chosen (its :attr:`RequestPlan.choice` says which
        and why); in any other mode, the planner's plan."""
        planner, system = self.engine.planner, self.engine.system_prompt
        if options.mode is not Mode.AUTO:
            return planner.plan(tp, options, system)
        exact = options.merge(mode=Mode.EXACT)

        def chose_exact(loss: float | None, reason: str, plan: RequestPlan | None = None) -> RequestPlan:
            plan = plan or planner.plan(tp, exact, system)
            return replace(plan, choice=AutoChoice(Mode.EXACT, 0.0, loss, reason))

        budget = options.budget
        if budget == 0:
            return chose_exact(0.0, "max_loss=0: exact mode")
        if not options.use_cache:
            return chose_exact(0.0, "use_cache=False: a plain prefill")
        plan = planner.plan(tp, exact, system)
        docs = [p for p in plan.lead.pieces if p.document]
        if not docs:
            return chose_exact(0.0, "no document in the prompt", plan)
        if all(p.tier is not None for p in docs):
            return chose_exact(0.0, "the exact chain of every document is cached", plan)
        stitched = planner.plan(tp, options.merge(mode=Mode.STITCH), system)
        if stitched.mode is Mode.EXACT:
            return chose_exact(0.0, f"stitching refused ({stitched.fallback})", plan)
        moved, tokens = prompt_shape(stitched)
        if moved == 0:
            return chose_exact(0.0, "no document moves", plan)
        profile = self.profile()
        if profile is None:
            self._warn(
                "mode 'auto' found no calibrated profile for this model, tokenizer and dtype beside the store "
                "(run kv-rag calibrate, or kv_rag.calibrate(engine)); answering in exact mode"
            )
            return chose_exact(None, "no calibrated profile for this model: exact mode", plan)
        wanted = settings_of(stitched.options, system)
        differs = sorted(k for k, v in wanted.items() if profile.settings.get(k) != v)
        if differs:
            return chose_exact(None, f"the profile was measured with another {', '.join(differs)}: exact mode", plan)
        recipe, bucket = profile.choose(moved, tokens, budget)
        shape = f"{moved} moved document{'s' * (moved != 1)}, {tokens} document tokens"
        if bucket is None:
            return chose_exact(None, f"no calibrated bucket covers {shape}: exact mode", plan)
        if recipe is None:
            best = min(s.loss_upper for s in bucket.recipes) if bucket.recipes else float("nan")
            why = f"no assembly fits max_loss={budget:g} for {shape} (lowest loss bound {best:.1f} points): exact mode"
            return chose_exact(0.0, why, plan)
        why = (
            f"{recipe.label}: loss bound {recipe.loss_upper:.2f} points <= max_loss={budget:g} for {shape} "
            f"({bucket.prompts} calibration prompts)"
        )
        if recipe.mode is Mode.BLEND:
            stitched = planner.plan(tp, options.merge(mode=Mode.BLEND, recompute=recipe.recompute), system)
        return replace(stitched, choice=AutoChoice(recipe.mode, recipe.recompute, recipe.loss_upper, why))

    def _warn(self, message: str) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        warnings.warn(f"kv-rag: {message}", stacklevel=5)
