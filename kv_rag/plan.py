"""Planning a request, without tensors: which pieces it has, their keys, and where the store holds them.

The split follows vLLM's KV connector: the scheduler side matches a request against the store
without moving data, the worker side loads. Here :class:`Planner` turns a tokenized prompt and
its :class:`~kv_rag.options.RequestOptions` into a :class:`RequestPlan` (segments, chain keys,
the fixed and primed contexts computed once, which documents moved, which tier holds each
piece); :mod:`kv_rag.assemble` executes it. A plan is what the store held when it was made: a
piece that is gone or rejected by the time it is loaded is computed instead (a miss is never an
error).

Words: a *chain* is a run of segments from position 0, each cached given everything before it
(its key covers the whole chain before it); a *context* is the chain a document's own artifact is
computed after (the system part, plus a filler when priming); a document *moved* when it does
not sit right after exactly that context, so its stitched KV can differ from a full prefill's.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import ContextLengthError, InputError, UnsupportedModelError
from .estimates import MARGIN, recompute_reason
from .fingerprint import chain_key_of_digest, token_bytes, tokens_digest
from .misses import MissExplainer
from .models import LoadedModel
from .options import Mode, RequestOptions
from .prompt import Prompt, TokenizedPrompt, chat_frame
from .results import AutoChoice
from .rope import window_refusal
from .store import Store
from .tenancy import Tenant

#: Contexts remembered per planner (one per system prompt and priming text in use).
_CONTEXTS = 16


@dataclass(frozen=True)
class Piece:
    """One segment of a request: its tokens, where it sits, and the key of its artifact.

    ``key`` is empty when the piece is not cached (an empty segment, caching off, or text between
    documents in stitch mode); ``tier`` is the tier that held ``key`` when the plan was made
    (``None``: none did, or it was not looked up); ``recompute`` says why a piece the store holds is
    computed instead of loaded (empty: it is loaded).
    """

    ids: tuple[int, ...]
    ids_bytes: bytes
    start: int
    key: str
    parent: str
    source: str
    document: bool
    tier: str | None = None
    recompute: str = ""
    #: why the store did not hold ``key`` when the plan was made (a :mod:`kv_rag.misses` code; empty: it did)
    missing: str = ""

    @property
    def length(self) -> int:
        """Number of tokens."""
        return len(self.ids)

    @property
    def end(self) -> int:
        """Position after the last token."""
        return self.start + len(self.ids)


@dataclass(frozen=True)
class Chain:
    """An exact chain: ``pieces`` from position 0 in order, then ``suffix`` (always prefilled, never stored).

    ``located``: the pieces' ``tier`` says what the store held when the plan was made (a piece with
    none is not looked up again); otherwise every keyed piece is looked up when the chain is loaded.
    """

    pieces: tuple[Piece, ...]
    suffix: tuple[int, ...] = ()
    located: bool = False

    @property
    def length(self) -> int:
        """Tokens in the pieces."""
        return self.pieces[-1].end if self.pieces else 0

    @property
    def total(self) -> int:
        """Tokens in the pieces and the suffix."""
        return self.length + len(self.suffix)

    @functools.cached_property
    def ids(self) -> list[int]:
        """Every token id in order (made once; do not change the list)."""
        return list(itertools.chain.from_iterable((*(p.ids for p in self.pieces), self.suffix)))

    @property
    def key(self) -> str:
        """Chain key of the last cached piece ("" if none)."""
        return next((p.key for p in reversed(self.pieces) if p.key), "")


@dataclass(frozen=True)
class DocumentPlan:
    """A document in stitch or blend mode: its own artifact, computed after ``context``, moved to ``piece``.

    ``piece.key`` is the document artifact's key (``context`` + the document's ids) and
    ``piece.tier`` where the store held it; ``origin`` is the position its KV was computed at (the
    context's length); ``moved`` whether its KV can differ from a full prefill's here.
    ``miss`` is the chain that computes and stores the artifact when it is not found.
    """

    piece: Piece
    origin: int
    moved: bool
    miss: Chain


@dataclass(frozen=True)
class RequestPlan:
    """What to do for one request (no tensors).

    ``mode`` is the mode in effect: exact when stitching was refused (``fallback`` says why) or
    there is no document. In exact mode ``lead`` is the whole chain (and the suffix) and ``parts`` is
    empty; in stitch and blend ``lead`` is the chain before the first document and ``parts`` every
    segment from the first document on (a :class:`DocumentPlan` or a plain :class:`Piece`), the
    question and generation prompt being ``suffix``.
    """

    options: RequestOptions
    mode: Mode
    prompt: TokenizedPrompt
    lead: Chain
    parts: tuple[DocumentPlan | Piece, ...] = ()
    suffix: tuple[int, ...] = ()
    fallback: str | None = None
    #: in auto mode, the mode it chose and why (``options`` are then the chosen mode's; see :mod:`kv_rag.auto`)
    choice: AutoChoice | None = None

    @property
    def total(self) -> int:
        """Prompt tokens."""
        return len(self.prompt)

    @functools.cached_property
    def ids(self) -> tuple[int, ...]:
        """Every prompt token id, in order (built on first use: long prompts make it cost)."""
        return tuple(self.prompt.ids)

    @property
    def documents(self) -> tuple[DocumentPlan, ...]:
        """The stitched documents, in order."""
        return tuple(p for p in self.parts if isinstance(p, DocumentPlan))

    def quick(self, tail: int) -> bool:
        """Whether, as planned, assembling this request loads cached pieces and leaves at most ``tail``
        tokens to compute (exact mode, the store held the chain's pieces but the last few tokens)."""
        if self.parts or not self.options.use_cache or not self.lead.located:
            return False
        end = 0
        for p in self.lead.pieces:
            if p.key and p.tier is not None and not p.recompute:
                end = p.end
            elif p.length:
                break
        return 0 < self.total - end <= tail

    @property
    def misses(self) -> bool:
        """Whether a piece with a key was found in no tier when the plan was made (another request may
        have stored it since: see :meth:`Planner.refresh`)."""
        pieces = [*self.lead.pieces, *(d.piece for d in self.documents)]
        return any(p.key and p.tier is None for p in pieces)


class Planner:
    """Plans requests for one loaded model and store. Thread-safe (contexts are memoized under the model's lock)."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: Store,
        split_special_tokens: bool = True,
        tenant: Tenant | None = None,
    ) -> None:
        self.loaded = loaded
        self.store = store
        #: whose keys these are (``None``: plain keys, shared by every engine on the store)
        self.tenant = tenant
        #: digests of the documents published as public (shared on purpose under a tenant, exact mode)
        self.public: set[str] = set()
        #: special-token strings inside documents are plain text (see :mod:`kv_rag.tokens`)
        self.split_special_tokens = split_special_tokens
        self._contexts: OrderedDict[tuple[str, str], Chain] = OrderedDict()
        #: reason codes for misses
        self.misses = MissExplainer(store)

    def refresh(self, plan: RequestPlan, system_prompt: str) -> RequestPlan:
        """``plan`` made again where it had misses, so that pieces stored meanwhile (by a request on the same
        documents that ran first) are loaded rather than computed and stored a second time."""
        if not plan.misses or not plan.options.use_cache:
            return plan
        return replace(self.plan(plan.prompt, plan.options, system_prompt), choice=plan.choice)

    # ------------------------------------------------------------------ tokens and keys
    def tokenize(self, prompt: Prompt) -> TokenizedPrompt:
        """Token ids of each segment of ``prompt`` (together: a plain tokenization of its text; documents'
        ids remembered, see :mod:`kv_rag.tokens`)."""
        scope = self.tenant.scope if self.tenant is not None else ""
        return self.loaded.prompt_tokenizer.tokenize(prompt, self.split_special_tokens, scope)

    def chain(
        self,
        segments: Sequence[tuple[int, ...]],
        sources: Sequence[str],
        documents: Sequence[bool],
        suffix: Sequence[int] = (),
        *,
        cached: bool = True,
        locate: bool = True,
        digests: Sequence[tuple[bytes, str] | None] = (),
        shared: bool = True,
    ) -> Chain:
        """The chain of ``segments`` from position 0, with keys.

        ``cached=False`` gives no keys (a plain prefill). ``locate``: ask the store which tier holds
        each piece, up to the first it does not hold (a chain is loaded up to its first gap).
        ``digests``: segments' int64 bytes and digest where known already (else computed here).
        ``shared=False``: under a tenant, every key is the tenant's even where the documents are public
        (the artifacts of stitch and blend, looked up by :meth:`document_key`).
        """
        fp, tok = self.loaded.fingerprint.digest, self.loaded.tokenizer_digest
        pieces: list[Piece] = []
        pos, parent = 0, ""
        looking = locate and cached
        spans: list[tuple[bytes, str]] = []
        for i, seg in enumerate(segments):
            got = digests[i] if i < len(digests) else None
            raw, digest = got if got is not None else (token_bytes(seg), "")
            spans.append((raw, tokens_digest(raw) if cached and seg and not digest else digest))
        plain = self._shared_pieces([d for _, d in spans], documents) if shared else 0
        for i, (seg, src, doc) in enumerate(zip(segments, sources, documents, strict=True)):
            raw, digest = spans[i]
            key = chain_key_of_digest(parent, fp, tok, digest) if cached and seg else ""
            if key and self.tenant is not None and i >= plain:
                key = self.tenant.derive(key)
            tier, missing = None, ""
            if key and doc:
                self.misses.seen(digest, key)
            if locate and key:
                tier = self.store.locate(key) if looking else None
                missing = "" if tier else self.misses.explain(key, digest, doc, after_gap=not looking)
                looking = tier is not None
            pieces.append(Piece(tuple(seg), raw, pos, key, parent if key else "", src, doc, tier, missing=missing))
            parent = key or parent
            pos += len(seg)
        if locate and cached:
            pieces = self._load_or_compute(pieces)
        return Chain(tuple(pieces), tuple(suffix), located=locate and cached)

    def _shared_pieces(self, digests: Sequence[str], documents: Sequence[bool]) -> int:
        """How many leading pieces keep plain keys under a tenant: up to the last of the leading documents
        that were all published as public (none: 0, every key is the tenant's)."""
        if self.tenant is None:
            return len(digests)
        shared = 0
        for i, (digest, doc) in enumerate(zip(digests, documents, strict=True)):
            if doc:
                if digest not in self.public:
                    break
                shared = i + 1
        return shared

    def _load_or_compute(self, pieces: list[Piece]) -> list[Piece]:
        """Recompute the stored pieces from the one on where loading them (and the rest of the chain) is
        estimated slower than computing them, by the measured speeds (:mod:`kv_rag.estimates`)."""
        model, tiers = self.loaded.speeds, self.store.speeds
        found = [j for j, p in enumerate(pieces) if p.tier is not None]  # the loadable start of the chain
        if not found or model.prefill_s(1) is None:
            return pieces
        per_token = self.loaded.kv_bytes_per_token
        end = pieces[-1].end
        loads = [tiers.load_s(pieces[j].tier or "", pieces[j].length * per_token) or 0.0 for j in found]
        starts = [pieces[j].start for j in found] + [pieces[found[-1]].end]
        # loading the first k stored pieces, computing from starts[k] to the end of the chain
        costs = [sum(loads[:k]) + (model.prefill_s(end - starts[k]) or 0.0) for k in range(len(found) + 1)]
        best = min(range(len(costs)), key=lambda k: (costs[k], -k))
        if costs[-1] <= MARGIN * costs[best]:
            return pieces
        first = pieces[found[best]]
        load_ms = 1000 * sum(loads[best:])
        compute_ms = 1000 * (model.prefill_s(starts[-1] - starts[best]) or 0.0)
        reason = (
            f"faster than loading from the {first.tier} tier "
            f"(estimated {load_ms:.0f} ms to load, {compute_ms:.0f} ms to compute)"
        )
        out = list(pieces)
        for n, j in enumerate(found[best:]):
            out[j] = replace(out[j], recompute=reason if n == 0 else "computed with the stored piece before it")
        return out

    def context(self, system: str, priming: str = "") -> Chain:
        """The chain a document's own artifact is computed after: the chat template's system part for
        ``system``, then (when ``priming``) the filler and the document separator. Computed once."""
        memo = (system, priming)
        with self.loaded.lock:
            got = self._contexts.get(memo)
            if got is not None:
                self._contexts.move_to_end(memo)
                return got
        head = chat_frame(self.loaded.tokenizer, system)[0]
        texts = (priming, "x") if priming else ("x",)
        tp = self.tokenize(Prompt.from_parts(head, texts, ""))
        segs = tp.segments[:-1]  # without the stand-in document
        n = len(segs)
        got = self.chain(segs, ("text",) * n, (False,) * n, locate=False)
        with self.loaded.lock:
            self._contexts[memo] = got
            while len(self._contexts) > _CONTEXTS:
                self._contexts.popitem(last=False)
        return got

    def document_key(self, ids: Sequence[int], context: Chain) -> str:
        """Key of the artifact of a document with ``ids`` computed after ``context`` (stitch and blend; under
        a tenant, the tenant's: ``context`` is the tenant's too)."""
        fp, tok = self.loaded.fingerprint.digest, self.loaded.tokenizer_digest
        key = chain_key_of_digest(context.key, fp, tok, tokens_digest(token_bytes(ids)))
        return self.tenant.derive(key) if self.tenant is not None else key

    # ------------------------------------------------------------------ plans
    def plan(self, tp: TokenizedPrompt, options: RequestOptions, system: str) -> RequestPlan:
        """The plan of ``tp`` under ``options``; ``system`` is the system prompt documents are cached after.

        Raises :class:`~kv_rag.errors.InputError` for an empty prompt and
        :class:`~kv_rag.errors.ContextLengthError` for one longer than the model reads.
        """
        total = len(tp)
        if total == 0:
            raise InputError("the prompt is empty: nothing to prefill")
        if total >= self.loaded.context_window:
            raise ContextLengthError(
                f"the prompt has {total} tokens but {self.loaded.name} reads at most {self.loaded.context_window}: "
                "retrieve fewer or shorter documents (--k, --chunk-tokens) or shorten the question"
            )
        if options.mode is Mode.AUTO:
            raise InputError("mode 'auto' is planned by kv_rag.auto.AutoMode (Engine.plan), not by the Planner")
        n = len(tp.segments)
        sources = [tp.source(i) for i in range(n)]
        docs = [tp.document(i) for i in range(n)]
        digests = [(tp.token_bytes(i), tp.digest(i)) for i in range(n)]
        mode, fallback = options.mode, None
        first = next((i for i in range(n) if docs[i]), None)
        if mode is not Mode.EXACT and (first is None or not options.use_cache):
            mode = Mode.EXACT
        elif mode is not Mode.EXACT:
            fallback = self._stitch_refusal(total)
            if fallback:
                mode = Mode.EXACT
        if mode is Mode.EXACT or first is None:
            lead = self.chain(tp.segments, sources, docs, tp.suffix, cached=options.use_cache, digests=digests)
            return RequestPlan(options, mode, tp, lead, (), tp.suffix, fallback)
        lead = self.chain(tp.segments[:first], sources[:first], docs[:first], digests=digests[:first])
        fixed = self.context(system)
        primed = self.context(system, options.priming) if options.priming else fixed
        ids = tuple(tp.ids)
        parts: list[DocumentPlan | Piece] = []
        pos = lead.length
        for i in range(first, n):
            seg = tp.segments[i]
            if docs[i] and seg:
                parts.append(self._document(seg, digests[i], sources[i], pos, ids, fixed, primed))
            else:
                parts.append(Piece(seg, digests[i][0], pos, "", "", sources[i], docs[i]))
            pos += len(seg)
        return RequestPlan(options, mode, tp, lead, tuple(parts), tp.suffix, None)

    def _document(
        self,
        seg: tuple[int, ...],
        digest: tuple[bytes, str],
        source: str,
        start: int,
        ids: tuple[int, ...],
        fixed: Chain,
        primed: Chain,
    ) -> DocumentPlan:
        """A document at ``start``: its own artifact after the fixed context (where it sits right after it)
        or after the primed one."""
        moved = not (start == fixed.length and ids[:start] == tuple(fixed.ids))
        context = primed if moved else fixed
        miss = self.chain(
            (*(p.ids for p in context.pieces), seg),
            (*(p.source for p in context.pieces), source),
            (*(False for _ in context.pieces), True),
            locate=False,
            digests=(*((p.ids_bytes, "") for p in context.pieces), digest),
            shared=False,
        )
        doc = miss.pieces[-1]
        tier = self.store.locate(doc.key)
        if tier is None:
            doc = replace(doc, missing=self.misses.explain(doc.key, digest[1] or "", True, after_gap=False))
        why = ""
        if tier is not None:
            why = (
                recompute_reason(
                    self.store.speeds, self.loaded.speeds, tier, len(seg) * self.loaded.kv_bytes_per_token, len(seg)
                )
                or ""
            )
        piece = Piece(seg, doc.ids_bytes, start, doc.key, doc.parent, source, True, tier, why, doc.missing)
        if why:  # computed after its context, then copied into the tiers in front of the one holding it
            miss = replace(miss, pieces=(*miss.pieces[:-1], replace(doc, tier=tier, recompute=why)))
        return DocumentPlan(piece, context.length, moved, miss)

    def _stitch_refusal(self, total: int) -> str | None:
        """Why keys cannot be moved exactly for this model and prompt length, or ``None``."""
        try:
            _ = self.loaded.rotary
        except UnsupportedModelError as exc:
            return str(exc)
        return window_refusal(self.loaded.model, total)
