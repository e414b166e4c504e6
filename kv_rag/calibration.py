"""Calibration: how far stitch and blend stray from a full prefill, for one model, on the user's documents.

:func:`calibrate` answers a sample of questions (the user's own, or made up from the user's documents
or, without any, from Python's documentation: :mod:`kv_rag.calibration_questions`) by a full prefill
(``use_cache=False``) and by stitch and blend at several fractions on the same tokens, and records per
prompt (:class:`~kv_rag.profile.Row`):

- whether the greedy answer holds the expected answer (accuracy), and whether its first tokens equal
  the full prefill's (greedy agreement);
- teacher-forced, the answer's tokens fed after the prompt (after the fact sentence's head for a
  made-up fact, as in ``benchmarks/blend_ceiling``): their log-prob, whether each is the argmax, and
  the mean KL divergence of the first answer tokens' distributions from the full prefill's.

The :class:`~kv_rag.profile.Profile` of those rows is stored beside the store's artifacts, bound to the
model's fingerprint and the tokenizer's digest, where auto mode (:mod:`kv_rag.auto`) finds it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import calibration_questions as cq
from .auto import prompt_shape, settings_of
from .errors import InputError
from .options import Mode, RequestOptions
from .profile import Profile, Row, profile_path

__all__ = ["calibrate", "greedy", "kl_divergence", "measure", "teacher_forced"]

#: Blend fractions calibrated when none are named.
BLEND_FRACTIONS = (0.15, 0.3, 0.5)
#: Answer tokens whose distributions the KL is averaged over (the first ones of the answer).
KL_TOKENS = 4


def teacher_forced(
    loaded: Any, pre: Any, total: int, cont: Sequence[int], span: slice
) -> tuple[float, bool, torch.Tensor]:
    """Feed ``cont`` after the prompt whose KV ``pre`` holds (``total`` tokens; the cache is extended):
    the log-prob of ``cont[span]``, whether every one of them is the argmax, and the probabilities of the
    span's positions (``[span length, vocab]``)."""
    ids = torch.tensor([list(cont)], device=loaded.device)
    logits = loaded.runtime.forward(ids, pre.cache, total, logits_to_keep=len(cont))
    logp = torch.cat([pre.logits.reshape(1, -1).float(), logits[:-1].float()]).log_softmax(-1)
    lp = sum(float(logp[j, cont[j]]) for j in range(span.start, span.stop))
    top = all(int(logp[j].argmax()) == cont[j] for j in range(span.start, span.stop))
    return lp, top, logp[span.start : span.stop].exp()


def greedy(loaded: Any, pre: Any, total: int, max_new: int) -> list[int]:
    """The greedy answer (at most ``max_new`` tokens, stopping at an end token) on top of ``pre``'s cache
    (``total`` prompt tokens; the cache is extended)."""
    out: list[int] = []
    nxt = int(pre.logits.reshape(-1).argmax())
    while nxt not in loaded.eos_ids and len(out) < max_new:
        out.append(nxt)
        step = torch.tensor([[nxt]], device=loaded.device)
        nxt = int(loaded.runtime.forward(step, pre.cache, total + len(out) - 1)[-1].argmax())
    return out


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two probability vectors (or the mean over rows of two ``[n, vocab]`` tensors), in nats."""
    p, q = p.reshape(-1, p.shape[-1]).float(), q.reshape(-1, q.shape[-1]).float()
    return float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1).mean())


def _continuation(tokenizer: Any, q: Mapping[str, Any]) -> tuple[list[int], slice]:
    """The tokens fed after the prompt and the answer's span in them: the fact sentence up to and with the
    answer for a made-up fact (``fact``), else the answer alone."""
    answer = str(q["answer"])
    sentence = str(q.get("fact") or "")
    if answer in sentence:
        upto = sentence[: sentence.rindex(answer) + len(answer)]
        head = len(tokenizer(upto[: upto.rindex(answer)].rstrip(), add_special_tokens=False)["input_ids"])
        cont = tokenizer(upto, add_special_tokens=False)["input_ids"]
        return list(cont), slice(head, len(cont))
    cont = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(cont), slice(0, len(cont))


def measure(engine: Any, q: Mapping[str, Any], recipes: Sequence[tuple[str, Mode, float | None]], max_new: int) -> Row:
    """One calibration prompt: question ``q`` (``question``, ``answer``, ``docs``, optional ``fact``) by a full
    prefill and by each ``(label, mode, recompute)`` of ``recipes``, on the same tokens (see the module)."""
    tok, loaded = engine.tokenizer, engine.loaded
    docs = list(q["docs"])
    engine.publish(docs)
    tp = engine.tokenize(engine.prompt(str(q["question"]), docs))
    total = len(tp)
    moved, doc_tokens = prompt_shape(engine.plan(tp, engine.request_options(mode=Mode.STITCH)))
    cont, span = _continuation(tok, q)
    if span.stop <= span.start:
        raise InputError(f"the answer of question {q['question']!r} is empty")
    measures: dict[str, dict[str, float]] = {}
    full_tokens: list[int] = []
    full_p: torch.Tensor | None = None
    for label, mode, r in (("full", Mode.EXACT, None), *recipes):
        over: dict[str, Any] = {"use_cache": False} if label == "full" else {"mode": mode, "recompute": r}
        with torch.inference_mode():
            pre = engine.prefill(tp, reserve=max_new + len(cont), **over)
            tokens = greedy(loaded, pre, total, max_new)
            for layer in pre.cache.layers:
                layer.truncate(total)
            lp, top, p = teacher_forced(loaded, pre, total, cont, span)
        del pre
        if label == "full":
            full_tokens, full_p = tokens, p
        n_kl = min(KL_TOKENS, len(p))
        measures[label] = {
            "correct": float(cq.correct(str(q["answer"]), tok.decode(tokens, skip_special_tokens=True))),
            "identical": float(tokens == full_tokens),
            "kl": 0.0 if full_p is None else kl_divergence(full_p[:n_kl], p[:n_kl]),
            "lp": lp,
            "top1": float(top),
        }
    return Row(moved, doc_tokens, measures)


def _user_questions(
    engine: Any, questions: Sequence[Mapping[str, Any]], documents: Sequence[str], k: int
) -> list[dict[str, Any]]:
    """The user's questions, each with its ``docs`` (given, or the ``k`` best of ``documents`` by BM25)."""
    from .retrieve import BM25, Document

    index = BM25([Document(d, f"doc{i}") for i, d in enumerate(documents)]) if documents else None
    out = []
    for i, q in enumerate(questions):
        if not isinstance(q, Mapping) or not str(q.get("question", "")).strip() or not str(q.get("answer", "")):
            raise InputError(f"question {i}: each question needs a non-empty 'question' and 'answer'; got {q!r}")
        docs = list(q.get("docs") or ())
        if not docs:
            if index is None:
                raise InputError(f"question {i} has no 'docs' and no documents were given to retrieve them from")
            docs = [d.text for d in index.search(str(q["question"]), k)]
        out.append({**q, "docs": docs})
    return out


def calibrate(
    engine: Any,
    documents: Sequence[str] = (),
    questions: Sequence[Mapping[str, Any]] = (),
    *,
    n_questions: int = 8,
    docs_per_prompt: Sequence[int] = (4,),
    blend: Sequence[float] = BLEND_FRACTIONS,
    passage_tokens: int = 500,
    max_new_tokens: int = 32,
    seed: int = 0,
    progress: bool = False,
    save: bool = True,
    out: str | Path | None = None,
) -> Profile:
    """Measure stitch and blend (at each fraction of ``blend``) against a full prefill for ``engine``'s
    model and return the :class:`~kv_rag.profile.Profile`; with ``save``, store it beside the store's
    artifacts (where auto mode reads it), and with ``out`` also write it to that file.

    ``questions``: the user's own, dicts with ``question``, ``answer`` (the answer is right when it
    appears in the generated text as a word) and ``docs`` (texts in prompt order; without them the
    ``docs_per_prompt[0]`` best of ``documents`` by BM25). Without questions, ``n_questions`` are made
    up per entry of ``docs_per_prompt`` (documents per prompt): a made-up fact inserted into passages of
    ``documents`` (cut at about ``passage_tokens`` tokens), or of Python's documentation when there are
    none. ``max_new_tokens``: the greedy answer's length (and the agreement's). ``progress``: a bar on
    stderr (tqdm). Raises :class:`~kv_rag.errors.InputError` for unusable arguments.
    """
    fractions = sorted({RequestOptions.make(mode=Mode.BLEND, recompute=r).fraction for r in blend})
    ks = [int(k) for k in docs_per_prompt]
    if not ks or min(ks) < 1:
        raise InputError(f"docs_per_prompt must list numbers of documents of at least 1; got {list(docs_per_prompt)}")
    if max_new_tokens < 1 or n_questions < 1:
        raise InputError(f"max_new_tokens and n_questions must be at least 1; got {max_new_tokens}, {n_questions}")
    tok = engine.tokenizer
    if questions:
        qs = _user_questions(engine, questions, documents, ks[0])
        source = "the user's questions"
    else:
        pool = cq.passages_from(documents, tok, passage_tokens) if documents else cq.passages(tok, passage_tokens)
        if len(pool) < max(ks):
            raise InputError(
                f"{max(ks)} documents per prompt need at least {max(ks)} passages; the documents give {len(pool)} "
                f"(pass more documents, or lower docs_per_prompt)"
            )
        qs = [q for i, k in enumerate(ks) for q in cq.questions(tok, n_questions, k, seed + i, passage_tokens, pool)]
        source = "made-up facts in the user's documents" if documents else "made-up facts in pydoc_data passages"
    recipes = [("stitch", Mode.STITCH, None), *((f"blend r={r:g}", Mode.BLEND, r) for r in fractions if r > 0)]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = [measure(engine, q, recipes, max_new_tokens) for q in _bar(qs, progress)]
    loaded = engine.loaded
    opts = engine.options.merge(mode=Mode.STITCH)
    profile = Profile.from_rows(
        rows,
        model=engine.model_name,
        model_digest=loaded.fingerprint.digest,
        tokenizer_digest=loaded.tokenizer_digest,
        dtype=loaded.fingerprint.dtype,
        settings={**settings_of(opts, engine.system_prompt), "max_new_tokens": max_new_tokens, "questions": source},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={
            "seconds": round(time.perf_counter() - t0, 3),
            "load_1min": [load0, os.getloadavg()[0]],
            "torch_threads": torch.get_num_threads(),
            "device": str(loaded.device),
        },
    )
    if save:
        profile.save(profile_path(engine.store, loaded.fingerprint.digest, loaded.tokenizer_digest))
    if out is not None:
        profile.save(out)
    return profile


def _bar(items: list[Any], show: bool) -> Any:
    """``items``, with a progress bar on stderr when ``show`` and tqdm is installed."""
    if not show:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="calibrating", unit="prompt", file=sys.stderr)
