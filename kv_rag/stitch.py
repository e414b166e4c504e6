"""Stitch and blend: a request's KV assembled from per-document artifacts moved to their positions.

Layout of the cache being built (storage index = position in the prompt):

- the leading text before the first document (usually BOS + the chat template's system part): the
  exact chain, loaded or prefilled as in exact mode;
- each document: its per-document artifact, computed once right after the engine's fixed prefix
  (what :meth:`Engine.publish` stores, key :meth:`Engine.document_key`), keys rotated by
  ``position - len(fixed prefix)``; on a miss the document is computed that way now and stored;
- the text between documents and the suffix (question + generation prompt): zero placeholders.

Then one forward pass runs the tokens still to compute (text between documents, the suffix, and in
blend mode the chosen document tokens) at their true positions, with a mask that lets each attend
to every valid cached token and every computed token before it; their KV is then moved into their
slots. A blend-selected token's stale stitched KV is masked out, so r = 1 is a full prefill of
everything after the leading text and r = 0 is plain stitching.

Blend's choice of tokens. Only tokens of *moved* documents are candidates: a document that directly
follows exactly the fixed prefix it was computed after (usually the first) already has the full
prefill's KV. Among those, the default (:class:`Selection`, ``method="attention"``) recomputes the
tokens the question attends to most: the glue and suffix are run on top of the stitched cache (as
stitch mode would), the suffix's queries are read at every layer, and each candidate is scored by
the softmax attention it receives from them, summed over heads, suffix tokens and layers. The
answer is computed from those tokens' KV, so that is where a stale (context-free) KV costs the most;
the score costs one pass of the few suffix tokens, not of the documents. CacheBlend's criterion
(Yao et al. 2024: the tokens whose KV at an early layer deviates most from a fresh computation)
stays available as ``method="deviation"``: it needs a pass of every document token through the
probe layers and, on the embedded model, did no better than stitching (README, "Fidelity").
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._compat import build_cache, cache_layers, forward, forward_at
from .errors import UnsupportedModelError
from .fingerprint import chain_key_of_digest
from .prompt import Prompt, TokenizedPrompt, chat_frame
from .results import CacheStatus, Mode, SegmentReport
from .rope import RotaryShift, rotary_shift, window_refusal

if TYPE_CHECKING:
    from .engine import Engine, Prefill

_SHIFT_STATE = "rotary_shift"
_WARNED_STATE = "stitch_warnings"
#: layer whose KV deviation picks blend's tokens (0-based: the first layer whose KV depends on context)
PROBE_LAYER = 1


@dataclass(frozen=True)
class Selection:
    """How blend picks the document tokens it recomputes.

    ``method``: ``"attention"`` (the tokens the question attends to most in the stitched cache),
    ``"deviation"`` (CacheBlend: the tokens whose KV deviates most from a fresh computation) or
    ``"leading"`` (the first tokens of every moved document, as EPIC's attention-sink fix). ``layers``:
    the layers scored (empty: every layer for attention, :data:`PROBE_LAYER` for deviation).
    ``sink``: this many leading tokens of every moved document are always recomputed, the rest of
    the budget by ``method``. ``span``: recompute windows of this many tokens on either side of the
    best-scored tokens (best first, within their document) instead of single tokens, up to the same
    budget. ``balanced``: the budget is split evenly over the moved documents, each taking its own
    best-scored tokens (instead of the best-scored overall). Attention falls back to deviation where
    there is no suffix to score with or the model's attention modules have no ``q_proj``.
    """

    method: str = "attention"
    layers: tuple[int, ...] = ()
    sink: int = 0
    span: int = 0
    balanced: bool = False


#: the selection blend uses (``benchmarks/blend_selection.py`` compares the alternatives)
SELECTION = Selection()

#: the filler a primed document is computed after (``Engine(priming=True)``): a neutral passage that
#: ends with the document separator, so that a moved document's first tokens are computed mid-context
#: (as in a full prompt) rather than as the first text after the system part
PRIMING_TEXT = (
    "The following documents were retrieved from a collection of reference material. Each one is a "
    "self-contained passage that may or may not be relevant to the question asked after them."
)


class _StopProbe(Exception):
    """Raised by a hook to end a forward pass after the probe layer."""


@dataclass
class _DocKV:
    """One document's KV for this request, already on the device and at its position."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    report: SegmentReport
    stored: int


def shifter_for(engine: Engine) -> RotaryShift:
    """The model's :class:`RotaryShift`, computed and checked once per loaded model.

    Raises :class:`UnsupportedModelError` (also remembered) when keys cannot be moved exactly.
    """
    state = engine.loaded.state
    got = state.get(_SHIFT_STATE)
    if got is None:
        try:
            got = rotary_shift(engine.model)
        except UnsupportedModelError as exc:
            got = exc
        state[_SHIFT_STATE] = got
    if isinstance(got, UnsupportedModelError):
        raise got
    return got


def primed_prefix(engine: Engine, system: str | None = None) -> tuple[tuple[tuple[int, ...], ...], str]:
    """Segments (fixed prefix, ``engine.priming`` filler, separator) and chain key a moved document is
    computed after when priming is on."""
    head = chat_frame(engine.tokenizer, engine.system_prompt if system is None else system)[0]
    tp = engine.tokenize(Prompt.from_parts(head, (engine.priming, "x"), ""))
    segs = tp.segments[:-1]
    return segs, engine.segment_keys(TokenizedPrompt(segs, ()))[-1]


def publish_primed(engine: Engine, document: str, source: str, system: str | None = None) -> int:
    """Compute and store ``document``'s primed artifact (after :func:`primed_prefix`) unless stored.

    Returns the tokens stored (0 on a hit). Takes the model's lock.
    """
    head = chat_frame(engine.tokenizer, engine.system_prompt if system is None else system)[0]
    doc_ids = engine.tokenize(Prompt.from_parts(head, (document,), "")).segments[1]
    segs, _ = primed_prefix(engine, system)
    n = len(segs)
    sub = TokenizedPrompt((*segs, doc_ids), (), (False,) * n + (True,), ("text",) * n + (source,))
    with engine.loaded.lock, torch.inference_mode():
        return engine._prefill_locked(sub, True, False, 0, time.perf_counter()).stored_tokens


def fixed_prefix(engine: Engine) -> tuple[tuple[int, ...], str]:
    """Token ids and chain key of the fixed prefix that per-document artifacts are computed after."""
    head = chat_frame(engine.tokenizer, engine.system_prompt)[0]
    tp = engine.tokenize(Prompt.from_parts(head, ("x",), ""))
    ids = tp.segments[0] if len(tp.segments) == 2 else ()
    key = engine.segment_keys(TokenizedPrompt((ids,), ()))[0] if ids else ""
    return ids, key


def warn_once(engine: Engine, message: str) -> None:
    """A :class:`UserWarning` with ``message``, at most once per loaded model."""
    seen: set[str] = engine.loaded.state.setdefault(_WARNED_STATE, set())
    if message not in seen:
        seen.add(message)
        warnings.warn(f"kv-rag: {message}; prefilling the documents instead (exact mode)", stacklevel=4)


def prefill_stitched(
    engine: Engine, tp: TokenizedPrompt, mode: Mode, recompute: float, need_logits: bool, reserve: int, t0: float
) -> Prefill:
    """KV of ``tp`` in stitch or blend mode (call with the model's lock held, in inference mode).

    Falls back to exact mode (with a warning, once) where keys cannot be moved exactly.
    """
    docs = [i for i in range(len(tp.segments)) if tp.document(i)]
    if not docs:
        return engine._prefill_locked(tp, True, need_logits, reserve, t0)
    try:
        shifter = shifter_for(engine)
        why = window_refusal(engine.model, len(tp))
        if why:
            raise UnsupportedModelError(why)
    except UnsupportedModelError as exc:
        warn_once(engine, str(exc))
        return engine._prefill_locked(tp, True, need_logits, reserve, t0)
    return _Assembler(engine, tp, shifter, mode, recompute, need_logits, reserve, t0).run()


class _Assembler:
    """Builds one request's stitched (and blended) cache."""

    def __init__(
        self,
        engine: Engine,
        tp: TokenizedPrompt,
        shifter: RotaryShift,
        mode: Mode,
        recompute: float,
        need_logits: bool,
        reserve: int,
        t0: float,
    ) -> None:
        self.engine = engine
        self.loaded = engine.loaded
        self.device = self.loaded.device
        self.tp = tp
        self.shifter = shifter
        self.recompute = recompute if mode is Mode.BLEND else 0.0
        self.mode = mode
        self.need_logits = need_logits
        self.reserve = reserve
        self.t0 = t0
        self.total = len(tp)
        self.n_seg = len(tp.segments)
        self.first_doc = next(i for i in range(self.n_seg) if tp.document(i))
        self.starts: list[int] = []
        pos = 0
        for seg in tp.segments:
            self.starts.append(pos)
            pos += len(seg)
        self.chain_end = pos  # end of the last document
        self.n_lead = self.starts[self.first_doc]

    # ------------------------------------------------------------------ steps
    def run(self) -> Prefill:
        from .engine import Prefill

        tp, total = self.tp, self.total
        doc_positions = torch.cat(
            [
                torch.arange(self.starts[i], self.starts[i] + len(tp.segments[i]))
                for i in range(self.first_doc, self.n_seg)
                if tp.document(i)
            ]
        )
        n_doc = int(doc_positions.numel())
        n_sel = n_doc if self.recompute >= 1 else round(self.recompute * n_doc)
        todo = self._plain_positions()
        if self.need_logits and (total - 1) not in set(todo.tolist()):
            todo = torch.cat([todo, torch.tensor([total - 1])])  # prompt ends with a document
        extra = int(todo.numel()) + n_sel
        capacity = total + extra + self.reserve

        # 1. the leading text: exact chain (loaded or prefilled and stored)
        lead_tp = TokenizedPrompt(
            tp.segments[: self.first_doc],
            (),
            tp.is_document[: self.first_doc],
            tp.sources[: self.first_doc],
        )
        lead = self.engine._prefill_locked(lead_tp, True, False, capacity - self.n_lead, self.t0)
        cache = lead.cache
        reports = list(lead.segments)
        stored = lead.stored_tokens
        cached = lead.cached_tokens

        # 2. documents at their positions, placeholders for the text between them and the suffix
        layers = cache.layers
        hit_positions: list[torch.Tensor] = []
        for i in range(self.first_doc, self.n_seg):
            seg = tp.segments[i]
            if not seg:
                reports.append(SegmentReport(tp.source(i), 0, CacheStatus.NONE, None, None, tp.document(i)))
                continue
            if tp.document(i):
                kv = self._document(i)
                for layer, k, v in zip(layers, kv.keys, kv.values, strict=True):
                    layer.update(k, v)
                reports.append(kv.report)
                stored += kv.stored
                if kv.report.cache is CacheStatus.HIT:
                    cached += len(seg)
                    hit_positions.append(torch.arange(self.starts[i], self.starts[i] + len(seg)))
            else:
                self._placeholder(layers, len(seg))
                reports.append(SegmentReport(tp.source(i), len(seg), CacheStatus.NONE, None, None, False))
        self._placeholder(layers, len(tp.suffix))

        # 3. blend: choose the document tokens to recompute
        if n_sel >= n_doc:
            selected = doc_positions
        elif n_sel > 0:
            selected = self._choose(cache, doc_positions, n_sel)
        else:
            selected = doc_positions[:0]
        if hit_positions and selected.numel():
            cached -= int(torch.isin(selected, torch.cat(hit_positions)).sum())

        # 4. compute the rest on top
        logits = self._compute(cache, todo, selected)
        return Prefill(
            cache=cache,
            logits=logits,
            prompt_tokens=total,
            cached_tokens=cached,
            prefilled_tokens=total - cached,
            stored_tokens=stored,
            seconds=time.perf_counter() - self.t0,
            segments=reports,
            mode=self.mode,
            recomputed_tokens=int(selected.numel()),
        )

    def _plain_positions(self) -> torch.Tensor:
        """Positions of the text after the first document that is not a document (glue and suffix)."""
        parts = [
            torch.arange(self.starts[i], self.starts[i] + len(self.tp.segments[i]))
            for i in range(self.first_doc, self.n_seg)
            if not self.tp.document(i)
        ]
        parts.append(torch.arange(self.chain_end, self.total))
        return torch.cat(parts)

    def _placeholder(self, layers: list[Any], n: int) -> None:
        if n <= 0:
            return
        for layer in layers:
            k, v = layer.keys, layer.values
            shape_k = (k.shape[0], k.shape[1], n, k.shape[-1])
            shape_v = (v.shape[0], v.shape[1], n, v.shape[-1])
            layer.update(k.new_zeros(shape_k), v.new_zeros(shape_v))

    def _document(self, i: int) -> _DocKV:
        """Segment ``i``'s per-document KV (loaded, or computed after the fixed prefix and stored), moved."""
        engine, tp = self.engine, self.tp
        seg = tp.segments[i]
        head_ids, head_key = fixed_prefix(engine)
        dst = self.starts[i]
        head_segs: tuple[tuple[int, ...], ...] = (head_ids,)
        if engine.priming and not (dst == len(head_ids) and tuple(tp.ids[:dst]) == tuple(head_ids)):
            head_segs, head_key = primed_prefix(engine)
        fp, tok = self.loaded.fingerprint.digest, self.loaded.tokenizer_digest
        key = chain_key_of_digest(head_key, fp, tok, tp.digest(i))
        src_start = sum(len(h) for h in head_segs)
        hit = engine.store.get(key, accept=engine._acceptor(tp, i, src_start))
        stored = 0
        if hit is not None:
            keys = [k.to(self.device, non_blocking=True).unsqueeze(0) for k in hit.artifact.keys]
            values = [v.to(self.device, non_blocking=True).unsqueeze(0) for v in hit.artifact.values]
            report = SegmentReport(tp.source(i), len(seg), CacheStatus.HIT, key, hit.tier, True)
        else:
            n_h = len(head_segs)
            sub = TokenizedPrompt((*head_segs, seg), (), (False,) * n_h + (True,), ("text",) * n_h + (tp.source(i),))
            pre = engine._prefill_locked(sub, True, False, 0, self.t0)
            keys = [k[:, :, src_start:, :] for k, _ in cache_layers(pre.cache)]
            values = [v[:, :, src_start:, :] for _, v in cache_layers(pre.cache)]
            stored = pre.stored_tokens
            report = SegmentReport(tp.source(i), len(seg), CacheStatus.MISS, key, None, True)
        if dst != src_start:
            rot = self.shifter.rotation(src_start, dst, len(seg), self.device)
            keys = [self.shifter.shift(k, src_start, dst, rot) for k in keys]
        return _DocKV(keys, values, report, stored)

    def _mask(self, query_pos: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask: query ``j`` sees valid cached slots at positions <= its own, and new tokens before it."""
        q = query_pos.to(self.device)
        slots = torch.arange(self.total, device=self.device)
        see_cached = valid.to(self.device)[None, :] & (slots[None, :] <= q[:, None])
        see_new = q[None, :] <= q[:, None]
        allowed = torch.cat([see_cached, see_new], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]

    def _valid(self, exclude: torch.Tensor) -> torch.Tensor:
        """Slots holding usable KV: the leading text and the documents, minus ``exclude``."""
        valid = torch.zeros(self.total, dtype=torch.bool)
        valid[: self.n_lead] = True
        for i in range(self.first_doc, self.n_seg):
            if self.tp.document(i):
                valid[self.starts[i] : self.starts[i] + len(self.tp.segments[i])] = True
        if exclude.numel():
            valid[exclude] = False
        return valid

    def _compute(self, cache: Any, todo: torch.Tensor, selected: torch.Tensor) -> torch.Tensor | None:
        """Run the plain text (and ``selected`` document tokens) on top of the stitched cache; settle the cache."""
        model = self.loaded.model
        ids_all = torch.tensor(self.tp.ids, dtype=torch.long)
        positions = torch.unique(torch.cat([todo, selected]))  # sorted
        tail = self.total - int(positions.numel())
        if not selected.numel() and torch.equal(positions, torch.arange(tail, self.total)):
            # only a contiguous tail (one document, or documents back to back): a plain causal forward
            for layer in cache.layers:
                layer.truncate(tail)
            ids = ids_all[tail:].unsqueeze(0).to(self.device)
            return forward(model, ids, cache, tail)
        dtype = next(model.parameters()).dtype
        mask = self._mask(positions, self._valid(positions), dtype)
        ids = ids_all[positions].unsqueeze(0).to(self.device)
        logits = forward_at(model, ids, cache, positions, mask)
        index = positions.to(self.device)
        for layer in cache.layers:
            layer.settle(self.total, index)
        return logits if self.need_logits else None

    def _choose(self, cache: Any, doc_positions: torch.Tensor, n_sel: int) -> torch.Tensor:
        """The ``n_sel`` document positions to recompute, by :data:`SELECTION` (sorted)."""
        sel = SELECTION
        n_layers = len(cache.layers)
        moved = self._moved(doc_positions)
        cand = doc_positions[moved] if int(moved.sum()) >= n_sel else doc_positions
        forced = cand[:0]
        if sel.sink > 0:
            forced = self._leading(cand, min(sel.sink, n_sel // max(1, len(self._doc_ranges(cand)))))
        rest = cand[~torch.isin(cand, forced)]
        need = n_sel - int(forced.numel())
        if need <= 0 or not rest.numel():
            picked = rest[:0]
        elif sel.method == "leading":
            per = -(-need // max(1, len(self._doc_ranges(rest))))
            picked = self._leading(rest, per)[:need]
        else:
            scores = None
            if sel.method == "attention":
                layers = sel.layers or tuple(range(n_layers))
                scores = self._attention_scores(cache, rest, [min(i, n_layers - 1) for i in layers])
            if scores is None:  # deviation, or no question to score with
                layers = sel.layers if sel.method == "deviation" and sel.layers else (PROBE_LAYER,)
                scores = self._deviation_scores(cache, rest, [min(i, n_layers - 1) for i in layers])
            if sel.balanced:
                picked = self._balanced(rest, scores.cpu(), need)
            elif sel.span > 0:
                picked = _spans(rest, scores.cpu(), need, sel.span)
            else:
                picked = rest[torch.topk(scores.cpu(), min(need, int(rest.numel()))).indices]
        out = torch.cat([forced, picked])
        if out.numel() < n_sel:  # fewer moved tokens than asked for: fill with the others in order
            others = doc_positions[~torch.isin(doc_positions, out)]
            out = torch.cat([out, others[: n_sel - int(out.numel())]])
        return torch.sort(out).values

    def _balanced(self, positions: torch.Tensor, scores: torch.Tensor, need: int) -> torch.Tensor:
        """``need`` of ``positions``: an even share per document, each document's best-scored first."""
        ranges = self._doc_ranges(positions)
        parts = []
        left = need
        for n, (a, b) in enumerate(ranges):
            inside = (positions >= a) & (positions < b)
            share = min(int(inside.sum()), left // (len(ranges) - n))
            idx = torch.nonzero(inside).flatten()
            parts.append(positions[idx[torch.topk(scores[idx], share).indices]])
            left -= share
        return torch.cat(parts) if parts else positions[:0]

    def _doc_ranges(self, positions: torch.Tensor) -> list[tuple[int, int]]:
        """(start, end) of every document segment that holds one of ``positions``."""
        out = []
        for i in range(self.first_doc, self.n_seg):
            if self.tp.document(i) and self.tp.segments[i]:
                a, b = self.starts[i], self.starts[i] + len(self.tp.segments[i])
                if bool(((positions >= a) & (positions < b)).any()):
                    out.append((a, b))
        return out

    def _leading(self, positions: torch.Tensor, per_doc: int) -> torch.Tensor:
        """The first ``per_doc`` of ``positions`` in each document."""
        parts = []
        for a, b in self._doc_ranges(positions):
            inside = positions[(positions >= a) & (positions < b)]
            parts.append(inside[:per_doc])
        return torch.cat(parts) if parts else positions[:0]

    def _moved(self, doc_positions: torch.Tensor) -> torch.Tensor:
        """Mask over ``doc_positions``: tokens whose stitched KV can differ from a full prefill's.

        A document that directly follows exactly the fixed prefix it was computed after has the
        full prefill's KV already; recomputing its tokens would change nothing.
        """
        head_ids, _ = fixed_prefix(self.engine)
        moved = torch.ones(doc_positions.numel(), dtype=torch.bool)
        ids = self.tp.ids
        for i in range(self.first_doc, self.n_seg):
            if not self.tp.document(i) or not self.tp.segments[i]:
                continue
            a = self.starts[i]
            if a == len(head_ids) and tuple(ids[:a]) == tuple(head_ids):
                moved &= ~((doc_positions >= a) & (doc_positions < a + len(self.tp.segments[i])))
        return moved

    def _attention_scores(self, cache: Any, positions: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
        """Attention the question pays to each of ``positions`` in the stitched cache, summed over ``layers``.

        Runs the text to compute (glue and suffix) on top of the stitched cache up to the last of
        ``layers``, captures the suffix's queries there, and sums their softmax attention (over
        every valid slot, as the model computes it) on ``positions`` across heads, queries and
        layers. The cache is left as it was. ``None`` where there is no suffix or the model's
        attention has no ``q_proj`` to read queries from.
        """
        model = self.loaded.model
        n_layers = len(cache.layers)
        n_suf = self.total - self.chain_end
        decoder = _decoder_layers(model, n_layers)
        if n_suf <= 0 or decoder is None:
            return None
        found = [getattr(decoder[i], "self_attn", None) for i in layers]
        attns = [a for a in found if a is not None and hasattr(a, "q_proj")]
        if len(attns) != len(layers):
            return None
        todo = self._plain_positions()
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for li, attn in zip(layers, attns, strict=True):

            def grab(_m: Any, _inp: Any, out: torch.Tensor, li: int = li) -> None:
                captured[li] = out[0, -n_suf:].detach()

            handles.append(attn.q_proj.register_forward_hook(grab))
        last = max(layers)
        if last + 1 < len(decoder):

            def stop(*_: Any) -> None:
                raise _StopProbe

            handles.append(decoder[last + 1].register_forward_pre_hook(stop))
        dtype = next(model.parameters()).dtype
        valid = self._valid(todo)
        ids = torch.tensor(self.tp.ids, dtype=torch.long)[todo].unsqueeze(0).to(self.device)
        try:
            forward_at(model, ids, cache, todo, self._mask(todo, valid, dtype))
        except _StopProbe:
            pass
        finally:
            for h in handles:
                h.remove()
        n_todo = int(todo.numel())
        slots = positions.to(self.device)
        suf_pos = torch.arange(self.chain_end, self.total, device=self.device)
        see = torch.cat(
            [valid.to(self.device)[None, :].expand(n_suf, -1), todo.to(self.device)[None, :] <= suf_pos[:, None]], dim=1
        )
        angles = self.shifter.angles(self.chain_end, n_suf).double()
        rot = (angles.cos().to(self.device), angles.sin().to(self.device))
        total = torch.zeros(int(positions.numel()), dtype=torch.float32, device=self.device)
        for li, attn in zip(layers, attns, strict=True):
            layer = cache.layers[li]
            k = layer.keys[0, :, : self.total + n_todo].float()  # [kv, slots, d]
            kv_heads, _, d = k.shape
            q = captured[li].view(n_suf, -1, int(getattr(attn, "head_dim", d)))
            norm = getattr(attn, "q_norm", None)
            if norm is not None:
                q = norm(q)
            q = q.transpose(0, 1).float()  # [heads, n_suf, d]
            q = self.shifter.shift(q, 0, self.chain_end, rot)  # query j rotated to position chain_end + j
            q = q.view(kv_heads, -1, n_suf, d)
            scale = float(getattr(attn, "scaling", d**-0.5))
            scores = torch.einsum("kgqd,ksd->kgqs", q, k) * scale
            scores = scores.masked_fill(~see[None, None], float("-inf")).softmax(-1)
            total += scores.index_select(-1, slots).sum(dim=(0, 1, 2))
        for layer in cache.layers:
            layer.truncate(self.total)
        return total

    def _deviation_scores(self, cache: Any, positions: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """How far each of ``positions``' stitched KV is from a fresh computation, summed over ``layers``.

        The fresh KV comes from a plain causal prefill of everything after the leading text, on a
        separate cache holding only the leading text, stopped after the last of ``layers``. Per
        layer: relative squared error of keys plus values, summed over heads (CacheBlend).
        """
        model = self.loaded.model
        n_layers = len(cache.layers)
        layer_idx = max(layers)
        lead_k = [
            [layer.keys[..., : self.n_lead, :]] if self.n_lead and i <= layer_idx else []
            for i, layer in enumerate(cache.layers)
        ]
        lead_v = [
            [layer.values[..., : self.n_lead, :]] if self.n_lead and i <= layer_idx else []
            for i, layer in enumerate(cache.layers)
        ]
        probe = build_cache(lead_k, lead_v, n_layers, self.chain_end)
        ids = torch.tensor(self.tp.ids[self.n_lead : self.chain_end], dtype=torch.long).unsqueeze(0).to(self.device)
        decoder = _decoder_layers(model, n_layers)
        handle = None
        if decoder is not None and layer_idx + 1 < len(decoder):

            def stop(*_: Any) -> None:
                raise _StopProbe

            handle = decoder[layer_idx + 1].register_forward_pre_hook(stop)
        try:
            forward(model, ids, probe, self.n_lead)
        except _StopProbe:
            pass
        finally:
            if handle is not None:
                handle.remove()
        slots = positions.to(self.device)
        total = torch.zeros(int(positions.numel()), dtype=torch.float32, device=self.device)
        for li in layers:
            fresh_layer: Any = probe.layers[li]
            old_layer: Any = cache.layers[li]
            fresh_k = fresh_layer.keys[0].index_select(1, slots).float()
            fresh_v = fresh_layer.values[0].index_select(1, slots).float()
            old_k = old_layer.keys[0].index_select(1, slots).float()
            old_v = old_layer.values[0].index_select(1, slots).float()
            dk = (fresh_k - old_k).pow(2).sum(dim=(0, 2)) / fresh_k.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
            dv = (fresh_v - old_v).pow(2).sum(dim=(0, 2)) / fresh_v.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
            total += dk + dv
        return total


def _spans(positions: torch.Tensor, scores: torch.Tensor, need: int, span: int) -> torch.Tensor:
    """Up to ``need`` of ``positions``: windows of ``span`` tokens either side of the best-scored ones.

    Seeds are taken best first; each adds the candidate positions within ``span`` of it (a window
    stops at a gap in ``positions``, i.e. at a document's edge), nearest first, until ``need``.
    """
    pos = positions.tolist()
    index = {p: j for j, p in enumerate(pos)}
    taken = torch.zeros(len(pos), dtype=torch.bool)
    count = 0
    for j in torch.argsort(scores, descending=True).tolist():
        if count >= need:
            break
        if taken[j]:
            continue
        p = pos[j]
        for d in range(span + 1):
            for q in (p - d, p + d) if d else (p,):
                k = index.get(q)
                if k is not None and not taken[k] and count < need and _same_run(pos, j, k):
                    taken[k] = True
                    count += 1
    return positions[taken]


def _same_run(pos: list[int], a: int, b: int) -> bool:
    """Whether candidates ``a`` and ``b`` are joined by consecutive positions (no gap between them)."""
    lo, hi = min(a, b), max(a, b)
    return pos[hi] - pos[lo] == hi - lo


def _decoder_layers(model: Any, num_layers: int) -> Any:
    """The model's list of decoder layers (the first ``ModuleList`` with one entry per layer), or ``None``."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    return None
