"""Request options, validated once: how the KV is assembled and how the answer is decoded.

One owner for every option a request takes. :class:`RequestOptions` holds the mode, the blend
fraction, auto mode's loss budget, priming, the blend token selection, whether to use the store, and the
:class:`~kv_rag.decode.GenerationSettings`. The engine keeps defaults (``Engine(mode=..., ...)``)
and a request overrides some of them (:meth:`RequestOptions.merge`); the CLI, LangChain and
LlamaIndex pass their arguments through unchanged and get the same checks and the same errors
(:class:`~kv_rag.errors.InputError`, naming the argument, the allowed values and the value received).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from .decode import GenerationSettings
from .defaults import AUTO_MAX_LOSS, BLEND_RECOMPUTE
from .errors import InputError
from .selection import Selector, resolve_selector, selector_name

#: The filler a primed document is computed after (``priming=True``): a neutral passage that ends
#: with the document separator, so that a moved document's first tokens are computed mid-context
#: (as in a full prompt) rather than as the first text after the system part.
PRIMING_TEXT = (
    "The following documents were retrieved from a collection of reference material. Each one is a "
    "self-contained passage that may or may not be relevant to the question asked after them."
)


class Mode(str, Enum):
    """How a request's KV is assembled from the store.

    ``EXACT``: the prefix and documents in order form a chain of artifacts, each cached given
    everything before it; the longest cached chain is loaded and the rest prefilled. Token-exact.

    ``STITCH``: each document's artifact (computed once right after the fixed system prefix) is
    loaded in any combination, its keys rotated to the positions it occupies in this request; the
    text between documents and the question are prefilled on top. Attention between documents is
    lost, so answers can differ from a full prefill.

    ``BLEND``: stitch, then recompute a fraction of the document tokens on top of the stitched KV;
    which ones, a :class:`~kv_rag.selection.Selector` decides (by default the tokens the question
    attends to most in the stitched cache). A fraction of 0 is stitch; 1 is a full prefill of the
    documents.

    ``AUTO``: per request, the cheapest of the three whose calibrated loss for the request's shape fits
    the budget ``max_loss`` (accuracy points): the exact chain where it is cached, else stitch or blend
    at the smallest sufficient fraction, else exact. Without a calibrated profile for the model
    (:mod:`kv_rag.calibration`), exact. See :mod:`kv_rag.auto`.
    """

    EXACT = "exact"
    STITCH = "stitch"
    BLEND = "blend"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        """``Mode`` from its name, with an error that lists the allowed names."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise InputError(f"mode must be one of {allowed}; got {value!r}") from None


@dataclass(frozen=True)
class ApeSettings:
    """APE-style attention on stitched documents (``ape=(T, S)``, stitch mode; see :mod:`kv_rag.assemble.ape`).

    ``temperature`` ``T`` divides the later tokens' attention logits on document tokens inside the
    document block; ``scale`` ``S`` multiplies the block's weight (``log S`` on its logit). Both > 0;
    ``(1, 1)`` is plain stitching. Yang et al. 2025 (APE) use ``T`` and ``S`` below 1.
    """

    temperature: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 100.0 or v != v:
                raise InputError(f"ape {name} must be a number > 0 (and <= 100); got {v!r}")

    @classmethod
    def parse(cls, value: Any) -> ApeSettings:
        """From an :class:`ApeSettings`, a ``(temperature, scale)`` pair or a dict of the two."""
        if isinstance(value, ApeSettings):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        raise InputError(f"ape must be (temperature, scale), a dict of them or an ApeSettings; got {value!r}")


#: Names :meth:`RequestOptions.merge` accepts besides the :class:`GenerationSettings` fields.
OPTION_NAMES = ("mode", "recompute", "max_loss", "priming", "selection", "use_cache", "ape")
#: :class:`GenerationSettings` field names.
GENERATION_NAMES = tuple(f.name for f in fields(GenerationSettings))


@dataclass(frozen=True)
class RequestOptions:
    """Everything a request may set, validated; build with :meth:`make` or :meth:`merge`.

    ``recompute`` is the blend fraction (``None``: :data:`~kv_rag.defaults.BLEND_RECOMPUTE` in blend
    mode); ``max_loss`` auto mode's budget in accuracy points, ``1`` meaning 1% of questions (``None``:
    :data:`~kv_rag.defaults.AUTO_MAX_LOSS` in auto mode; ``0`` is exact mode, token for token); ``priming``
    the filler text moved documents are computed after (``""``: none); ``selection`` the blend
    :class:`~kv_rag.selection.Selector`; ``ape`` APE-style attention on the documents in stitch mode
    (:class:`ApeSettings`, ``None``: off).
    """

    mode: Mode = Mode.EXACT
    recompute: float | None = None
    max_loss: float | None = None
    priming: str = ""
    selection: Selector = field(default_factory=lambda: resolve_selector(None))
    use_cache: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    ape: ApeSettings | None = None

    @classmethod
    def make(cls, **options: Any) -> RequestOptions:
        """Options from keyword arguments (see :meth:`merge`), the rest at their defaults."""
        return cls().merge(**options)

    def merge(self, **options: Any) -> RequestOptions:
        """These options with ``options`` applied on top, checked.

        Takes ``mode``, ``recompute``, ``max_loss``, ``priming``, ``selection``, ``use_cache``, ``ape``, ``settings``
        (a :class:`GenerationSettings` replacing the current one) and any :class:`GenerationSettings`
        field (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``). A value of ``None``
        keeps the current one. Changing ``mode`` away from blend drops an inherited ``recompute`` (away
        from auto, an inherited ``max_loss``). Raises :class:`~kv_rag.errors.InputError` naming the argument.
        """
        unknown = sorted(set(options) - set(OPTION_NAMES) - set(GENERATION_NAMES) - {"settings"})
        if unknown:
            raise InputError(
                f"unknown option(s) {', '.join(unknown)}; a request takes "
                f"{', '.join(OPTION_NAMES + GENERATION_NAMES)} and settings"
            )
        given = {k: v for k, v in options.items() if v is not None}
        mode = Mode.parse(given["mode"]) if "mode" in given else self.mode
        recompute = self.recompute if mode is Mode.BLEND or "recompute" in given else None
        if "recompute" in given:
            recompute = _fraction(given["recompute"])
        if recompute and mode is not Mode.BLEND:
            raise InputError(f"recompute={recompute} applies to mode 'blend' only; got mode {mode.value!r}")
        max_loss = self.max_loss if mode is Mode.AUTO or "max_loss" in given else None
        if "max_loss" in given:
            max_loss = _points(given["max_loss"])
        if max_loss is not None and mode is not Mode.AUTO:
            raise InputError(f"max_loss={max_loss:g} applies to mode 'auto' only; got mode {mode.value!r}")
        ape = self.ape if mode is Mode.STITCH or "ape" in given else None
        if "ape" in given:
            ape = ApeSettings.parse(given["ape"])
        if ape is not None and mode is not Mode.STITCH:
            raise InputError(f"ape applies to mode 'stitch' only; got mode {mode.value!r}")
        use_cache = given.get("use_cache", self.use_cache)
        if not isinstance(use_cache, bool):
            raise InputError(f"use_cache must be True or False; got {use_cache!r}")
        generation = given.get("settings", self.generation)
        if not isinstance(generation, GenerationSettings):
            raise InputError(f"settings must be a kv_rag.GenerationSettings; got {type(generation).__name__}")
        gen_over = {k: v for k, v in given.items() if k in GENERATION_NAMES}
        if gen_over:
            generation = replace(generation, **gen_over)
        return RequestOptions(
            mode=mode,
            recompute=recompute,
            max_loss=max_loss,
            priming=priming_text(given["priming"]) if "priming" in given else self.priming,
            selection=resolve_selector(given["selection"]) if "selection" in given else self.selection,
            use_cache=use_cache,
            generation=generation,
            ape=ape,
        )

    @property
    def fraction(self) -> float:
        """The blend fraction in effect: ``recompute``, or the default in blend mode, else 0."""
        if self.mode is not Mode.BLEND:
            return 0.0
        return BLEND_RECOMPUTE if self.recompute is None else self.recompute

    @property
    def budget(self) -> float:
        """Auto mode's loss budget in effect, in accuracy points: ``max_loss``, or the default (0 in other modes)."""
        if self.mode is not Mode.AUTO:
            return 0.0
        return AUTO_MAX_LOSS if self.max_loss is None else self.max_loss

    @property
    def publishes_documents(self) -> bool:
        """Whether a retrieved document's own artifact (computed right after the system prefix) is read
        in this mode, so that publishing it ahead pays: in stitch, blend and auto (which may stitch), any
        document is loaded wherever it sits; in exact mode only a chain of the whole preceding text is, so the first
        request over a set of documents stores the chain and later ones load it."""
        return self.mode is not Mode.EXACT

    def describe(self) -> dict[str, Any]:
        """Plain values for reports and JSON (a selector of the caller's own shows as its class name;
        ``max_loss`` only in auto mode)."""
        return (
            {
                "mode": self.mode.value,
                "recompute": self.fraction,
                "priming": bool(self.priming),
                "selection": selector_name(self.selection) or type(self.selection).__name__,
                "use_cache": self.use_cache,
            }
            | ({"max_loss": self.budget} if self.mode is Mode.AUTO else {})
            | ({"ape": [self.ape.temperature, self.ape.scale]} if self.ape is not None else {})
        )


def priming_text(priming: bool | str) -> str:
    """The filler of ``priming=...``: ``True`` is :data:`PRIMING_TEXT`, ``False`` or ``""`` none, other text itself."""
    if priming is True:
        return PRIMING_TEXT
    if priming is False or priming == "":
        return ""
    if not isinstance(priming, str) or not priming.strip():
        raise InputError(f"priming must be True, False or a non-empty filler text; got {priming!r}")
    return priming


def _fraction(recompute: Any) -> float:
    if isinstance(recompute, bool) or not isinstance(recompute, (int, float)) or not 0.0 <= float(recompute) <= 1.0:
        raise InputError(f"recompute must be a fraction between 0 and 1 (of document tokens); got {recompute!r}")
    return float(recompute)


def _points(max_loss: Any) -> float:
    if isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or not 0.0 <= float(max_loss) <= 100.0:
        raise InputError(
            f"max_loss must be a number of accuracy points between 0 and 100 (1 is 1% of questions; 0 is exact "
            f"mode); got {max_loss!r}"
        )
    return float(max_loss)
