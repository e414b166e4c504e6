"""Serving many requests at once: one scheduler per loaded model runs every live request's step together.

A request is planned in its caller's thread (tokens, keys, where its pieces are), then handed to the
model's :class:`Scheduler`. The scheduler's thread admits new requests between steps (their KV is
assembled, the last few prompt tokens left pending), then runs one step for every live request at
once: pending prompt tokens and decoded tokens alike, each request on its own cache
(:meth:`kv_rag.runtime.ModelRuntime.forward_batch`). Finished requests leave; new ones join at the
next step (continuous batching). Each request's text reaches its caller through a :class:`Sink`:
a thread-safe queue for :class:`Stream`, the event loop for :class:`AsyncStream` (no thread per token).

On CUDA a request's batched steps are bit-identical whichever requests share them and in whichever
arena it runs (the batched graphs always run the same rows, see :mod:`kv_rag.runtime.batch`); a
request that finds no arena slot runs its own forward (``ModelRuntime.batch_paths`` counts them),
whose rounding can differ. A finished request frees its slot at once (:meth:`Job.free`). On the CPU greedy
answers do not depend on the neighbours up to floating-point rounding: the projections of several
requests run as one matrix product, whose rounding can differ from one request's in the last bits
(on the embedded model in float32, logits differ by about 4e-5).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .assemble import Prefill
from .decode import Sampler, TextStream
from .defaults import MAX_BATCH
from .errors import InputError
from .models import LoadedModel
from .options import RequestOptions
from .results import Generation
from .streams import Sink

#: Seconds the scheduler's thread waits for work before it ends (a new request starts it again).
IDLE_S = 5.0


@dataclass
class Job:
    """One request in the scheduler: how to assemble its KV, how to decode, and where its text goes."""

    loaded: LoadedModel
    prepare: Callable[[], Prefill]
    options: RequestOptions
    sink: Sink
    t0: float
    cancelled: bool = False
    #: the request's :class:`~kv_rag.constrain.Guide` (grammar-constrained decoding), or ``None``
    guide: Any = None
    #: its plan found every piece cached but a short tail: admitting it costs little device time, so it
    #: may be admitted while a step runs (see :meth:`Scheduler._iterate`)
    quick: bool = False
    pre: Prefill | None = None
    tokens: list[int] = field(default_factory=list)
    ttft: float = 0.0
    finish: str = "length"
    _sampler: Sampler | None = None
    _text: TextStream | None = None
    _feed: tuple[tuple[int, ...], int] | None = None
    _budget: int = 0
    _told: bool = False

    def free(self) -> None:
        """Let go of the request's cache; its static slot (CUDA) is free for the next request at once."""
        pre, self.pre = self.pre, None
        slot = getattr(pre.cache, "slot", None) if pre is not None else None
        if slot is not None:
            slot.release_from(pre.cache)  # type: ignore[union-attr]

    def fail(self, exc: BaseException) -> None:
        """Tell the caller the request failed (once: a request already told is left alone)."""
        self.free()
        if not self._told:
            self._told = True
            self.sink.failed(exc)

    def admit(self) -> bool:
        """Assemble the KV (in the scheduler's thread, holding the model's lock). ``False``: it failed or
        ended at once (the sink was told)."""
        try:
            pre = self.pre = self.prepare()
        except BaseException as exc:  # the caller gets the error; the scheduler goes on
            self.fail(exc)
            return False
        settings = self.options.generation
        self._sampler = Sampler(settings, self.loaded.device)
        self._text = TextStream(self.loaded.tokenizer, settings.stop)
        self._budget = min(settings.max_new_tokens, self.loaded.context_window - pre.prompt_tokens)
        self._feed = pre.pending
        if pre.logits is not None:
            return self.accept(pre.logits)
        return True

    @property
    def first(self) -> bool:
        """Whether its next step gives its first token (it runs prompt tokens)."""
        return self.ttft == 0.0 and self._feed is not None

    @property
    def step_input(self) -> tuple[tuple[int, ...], Any, int]:
        """``(ids, cache, start)`` of this request's next step."""
        if self._feed is None or self.pre is None:
            raise RuntimeError("the job has no step to run")
        return self._feed[0], self.pre.cache, self._feed[1]

    def accept(self, logits: torch.Tensor, greedy: int | None = None) -> bool:
        """Take the next token from ``logits`` (``greedy``: their argmax, when the step computed it already);
        ``False`` once the request is done (the sink was told)."""
        sampler, text, pre = self._sampler, self._text, self.pre
        if sampler is None or text is None or pre is None:
            raise RuntimeError("accept() before admit()")
        if self._budget <= 0:
            return self._end()
        guide = self.guide
        if guide is None and greedy is not None and sampler.greedy:
            tid = greedy
        else:
            tid = sampler(logits.reshape(-1) if guide is None else guide.mask(logits.reshape(-1)))
        if self.ttft == 0.0:
            self.ttft = time.perf_counter() - self.t0
        if tid in self.loaded.eos_ids:
            self.finish = "stop"
            return self._end()
        self.tokens.append(tid)
        if guide is not None:
            guide.advance(tid)
        piece = text.push(tid)
        if piece:
            self.sink.piece(piece)
        if text.stopped or (guide is not None and guide.finished):  # a finished grammar admits only the end
            self.finish = "stop"
            return self._end()
        if len(self.tokens) >= self._budget:
            return self._end()
        self._feed = ((tid,), pre.prompt_tokens + len(self.tokens) - 1)
        self._store()
        return True

    def _store(self) -> None:
        """Run the store writes the assembly left for after the first token (:attr:`Prefill.stores`).
        A failed write is a warning: the request goes on, the piece is computed again next time."""
        pre = self.pre
        if pre is None or not pre.stores:
            return
        stores, pre.stores = pre.stores, []
        with self.loaded.lock, torch.inference_mode():
            for put in stores:
                try:
                    put()
                except Exception as exc:
                    self.loaded.warn_once(f"storing a computed piece failed ({exc}); it is computed again next time")

    def _end(self) -> bool:
        text, pre = self._text, self.pre
        if text is None or pre is None:
            raise RuntimeError("the job ended before it was admitted")
        self._store()
        kept = self.loaded.conversations
        if pre.token_ids and kept.fits(len(pre.token_ids) + len(self.tokens), pre.cache):
            # exact mode: the next turn of this conversation may start with all of it
            kept.keep(pre.scope, (*pre.token_ids, *self.tokens), pre.cache, len(pre.token_ids))
        self.free()  # before the caller hears: when its call returns, the slot is free
        self._told = True
        tail = text.finish()
        if tail:
            self.sink.piece(tail)
        self.sink.done(
            Generation(
                text=text.text,
                token_ids=list(self.tokens),
                finish_reason=self.finish,
                mode=pre.mode,
                prompt_tokens=pre.prompt_tokens,
                cached_tokens=pre.cached_tokens,
                prefilled_tokens=pre.prefilled_tokens,
                stored_tokens=pre.stored_tokens,
                ttft_s=self.ttft,
                total_s=time.perf_counter() - self.t0,
                prefill_s=pre.seconds,
                segments=pre.segments,
                recomputed_tokens=pre.recomputed_tokens,
                options=self.options.describe(),
                auto=pre.auto,
            )
        )
        return False


class Scheduler:
    """The continuous-batching loop of one loaded model. Thread-safe :meth:`submit`.

    One daemon thread runs while there is work (it ends after :data:`IDLE_S` idle seconds). Each
    iteration admits waiting requests (up to ``max_batch`` live), then runs one step for all live
    requests under the model's lock, so other users of the model (publishing, a direct prefill)
    get the lock between steps.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int = MAX_BATCH) -> None:
        self.loaded = loaded
        self.max_batch = max(1, max_batch)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._live: list[Job] = []
        #: jobs taken from the queue and not yet live (being admitted): a failure tells them too
        self._taken: list[Job] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        #: the last step ran only requests waiting for their first token (see :meth:`_to_step`)
        self._first_only = False
        #: steps run and requests stepped, for reports and tests
        self.stats = {"steps": 0, "stepped": 0, "largest_batch": 0}
        _SCHEDULERS.add(self)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread once the step in progress ends (requests still waiting get an error)."""
        with self._cond:
            self._closing = True
            thread = self._thread
            for job in self._waiting:
                job.fail(RuntimeError("kv-rag: the scheduler was closed"))
            self._waiting.clear()
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the next step."""
        with self._cond:
            if self._closing:
                raise RuntimeError("kv-rag: the scheduler is closed (the interpreter is exiting)")
            self._waiting.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kv-rag-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    @property
    def live(self) -> int:
        """Requests being decoded or waiting to start."""
        with self._cond:
            return len(self._live) + len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    for job in self._live:
                        job.fail(RuntimeError("kv-rag: the scheduler was closed"))
                    self._live, self._thread = [], None
                    return
                if not self._live and not self._waiting:
                    self._cond.wait_for(lambda: bool(self._waiting) or self._closing, timeout=IDLE_S)
                    if not self._waiting:
                        self._thread = None
                        return
                new = self._pop_waiting(len(self._live))
            try:
                self._iterate(new)
            except BaseException as exc:  # a broken step fails its requests, never the thread silently
                for job in (*self._live, *self._taken):
                    job.fail(exc)
                self._live, self._taken = [], []

    def _pop_waiting(self, live: int, quick: bool = False, limit: int | None = None) -> list[Job]:
        """Waiting jobs to admit next to ``live`` running ones, in order (``quick``: only up to the first
        that is not :attr:`Job.quick`; at most ``limit``), also kept as :attr:`_taken` until admitted. Call
        holding ``_cond``."""
        new: list[Job] = []
        room = self.max_batch - live if limit is None else min(limit, self.max_batch - live)
        while self._waiting and len(new) < room and (self._waiting[0].quick or not quick):
            new.append(self._waiting.popleft())
        self._taken = new
        return new

    def _admit(self, new: list[Job]) -> list[Job]:
        """Admit ``new`` (assemble their KV): those that go on to the next step."""
        admitted = []
        for job in new:
            if job.cancelled:
                continue
            with self.loaded.lock, torch.inference_mode():
                if job.admit():
                    admitted.append(job)
        return admitted

    def _iterate(self, new: list[Job]) -> None:
        loaded = self.loaded
        self._live.extend(self._admit(new))
        self._taken = []
        for job in self._live:
            if job.cancelled:
                job.free()
        self._live = [j for j in self._live if not j.cancelled]
        if not self._live:
            return
        jobs = list(self._live)
        stepped = self._to_step(jobs)
        with loaded.lock, torch.inference_mode():
            logits = loaded.runtime.forward_batch([j.step_input for j in stepped])
            picks = Picks(logits)
        self.stats["steps"] += 1
        self.stats["stepped"] += len(stepped)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(stepped))
        joined: list[Job] = []
        if logits.is_cuda:
            # the step is still running on the device: cached requests that arrived meanwhile are admitted
            # now, one by one while it runs (host work; their KV copies queue behind the step), so that
            # they join the next step without waiting for this one first. Once the step is done its
            # tokens go out first; the rest are admitted before the next step. A request with more to
            # compute waits: its prefill would hold back the tokens of this step.
            while not picks.ready():
                with self._cond:
                    late = [] if self._closing else self._pop_waiting(len(jobs) + len(joined), quick=True, limit=1)
                if not late:
                    break
                joined += self._admit(late)
                self._live = jobs + joined
                self._taken = []
        self._live = jobs + joined  # a failing accept() fails them all (see _run)
        tids = picks.get()
        going = {id(j) for j, lg, t in zip(stepped, logits, tids, strict=True) if j.accept(lg, t)}
        self._live = [j for j in jobs if id(j) in going or j not in stepped] + joined

    def _to_step(self, jobs: list[Job]) -> list[Job]:
        """The jobs the next step runs: when some wait for their first token while others decode, those
        alone (their first tokens do not wait for a decode step; on the H200 that step of eight 4k
        requests took 8 ms), at most every other step, so decoding never stalls."""
        first = [j for j in jobs if j.first]
        if first and len(first) < len(jobs) and not self._first_only:
            self._first_only = True
            return first
        self._first_only = False
        return jobs


class Picks:
    """The greedy token of every row of a step's logits ``[B, vocab]``, taken in one operation (on CUDA
    queued right after the step and copied to pinned memory without waiting for later work)."""

    def __init__(self, logits: torch.Tensor) -> None:
        best = logits.argmax(dim=-1)
        self._event: torch.cuda.Event | None = None
        if best.is_cuda:
            self._host = torch.empty(best.shape, dtype=best.dtype, pin_memory=True)
            self._host.copy_(best, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(best.device))
        else:
            self._host = best

    def ready(self) -> bool:
        """Whether the step (and its argmax) has finished on the device."""
        return self._event is None or bool(self._event.query())

    def get(self) -> list[int]:
        """The argmax of each row."""
        if self._event is not None:
            self._event.synchronize()
        return [int(t) for t in self._host.tolist()]


def warm_up(loaded: LoadedModel, lengths: Sequence[int], reserve: int) -> float:
    """:meth:`kv_rag.Engine.warm_up`: each of ``lengths`` (prompt tokens) checked, then
    :meth:`~kv_rag.runtime.ModelRuntime.warm_up` under the model's lock; the seconds it took."""
    if isinstance(lengths, (int, str)) or not lengths:
        raise InputError(f"lengths must be a list of prompt lengths in tokens, e.g. [4096]; got {lengths!r}")
    window = loaded.context_window
    for n in lengths:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= window - reserve:
            raise InputError(
                f"lengths: each must be a number of tokens from 1 to {window - reserve} (the context window "
                f"{window} less {reserve} new tokens); got {n!r}"
            )
    t0 = time.perf_counter()
    with loaded.lock, torch.inference_mode():
        for n in lengths:
            loaded.runtime.warm_up(n, reserve)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
    return time.perf_counter() - t0


#: every scheduler, so that their threads stop before the interpreter does (a thread inside a torch call
#: while the interpreter shuts down can abort the process)
_SCHEDULERS: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scheduler in list(_SCHEDULERS):
        scheduler.close()
