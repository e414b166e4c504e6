"""Decoding after a prefill: the token loop, and the stream of text pieces callers iterate."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator

import torch

from .assemble import Prefill
from .decode import Sampler, TextStream
from .models import LoadedModel
from .options import RequestOptions
from .results import Generation


def decode(loaded: LoadedModel, pre: Prefill, options: RequestOptions, t0: float) -> Generator[str, None, Generation]:
    """Text pieces of the answer after ``pre`` (decoding on its cache), then the :class:`Generation`.

    Each step takes the model's lock; ``t0`` is when the request started (TTFT is measured from it).
    """
    settings = options.generation
    budget = min(settings.max_new_tokens, loaded.context_window - pre.prompt_tokens)
    eos = loaded.eos_ids
    sampler = Sampler(settings, loaded.device)
    text = TextStream(loaded.tokenizer, settings.stop)
    logits = pre.logits
    if logits is None:
        raise ValueError("decode needs a prefill made with need_logits=True")
    runtime = loaded.runtime
    ids: list[int] = []
    ttft = 0.0
    finish = "length"
    pos = pre.prompt_tokens
    for step in range(budget):
        tid = sampler(logits)
        if step == 0:
            ttft = time.perf_counter() - t0
        if tid in eos:
            finish = "stop"
            break
        ids.append(tid)
        piece = text.push(tid)
        if piece:
            yield piece
        if text.stopped:
            finish = "stop"
            break
        if step == budget - 1:
            break
        with loaded.lock, torch.inference_mode():
            step_ids = torch.tensor([[tid]], dtype=torch.long, device=loaded.device)
            logits = runtime.forward(step_ids, pre.cache, pos)[-1]
        pos += 1
    tail = text.finish()
    if tail:
        yield tail
    return Generation(
        text=text.text,
        token_ids=ids,
        finish_reason=finish,
        mode=pre.mode,
        prompt_tokens=pre.prompt_tokens,
        cached_tokens=pre.cached_tokens,
        prefilled_tokens=pre.prefilled_tokens,
        stored_tokens=pre.stored_tokens,
        ttft_s=ttft,
        total_s=time.perf_counter() - t0,
        prefill_s=pre.seconds,
        segments=pre.segments,
        recomputed_tokens=pre.recomputed_tokens,
        options=options.describe(),
    )


class Stream(Iterator[str]):
    """An iterator of text pieces; after it is exhausted, :attr:`result` holds the :class:`Generation`."""

    def __init__(self, gen: Generator[str, None, Generation]) -> None:
        self._gen = gen
        self.result: Generation | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self) -> None:
        """Stop generating early (no result is recorded)."""
        self._gen.close()
