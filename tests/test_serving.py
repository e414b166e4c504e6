"""The scheduler on the real embedded model: requests decoded together, each answer as when served alone."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from kv_rag import ContextLengthError, Engine, InputError, serving
from kv_rag.locks import FairLock

QUESTION = "Where does the ferry leave from, and when?"
DOCS = [
    "The ferry to Blue Island leaves from pier 7 every morning at six. Tickets are sold on board.",
    "Professor Lind's office is in room 204, next to the library. Office hours are on Tuesdays.",
    "The password of the staging server is kestrel. It changes on the first day of every month.",
    "The access code for vault 12 is 4471. Only the night guard may open the vault alone.",
]
NEW = 12


@pytest.fixture
def eng(embedded: object, tmp_path: Path) -> Engine:
    engine = Engine(None, store=tmp_path / "store", device="cpu", dtype="float32")
    engine.publish(DOCS)
    return engine


def _alone(engine: Engine) -> list[list[int]]:
    """Each request served alone, one after another (the reference)."""
    return [engine.generate(QUESTION, [d], max_new_tokens=NEW).token_ids for d in DOCS]


def test_concurrent_requests_are_decoded_together_with_the_same_greedy_tokens(eng: Engine) -> None:
    alone = _alone(eng)
    before, paths = dict(eng.scheduler.stats), dict(eng.loaded.runtime.batch_paths)
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(DOCS))

    def run(i: int) -> None:
        try:
            barrier.wait()
            got[i] = eng.generate(QUESTION, [DOCS[i]], max_new_tokens=NEW).token_ids
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(DOCS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [got[i] for i in range(len(DOCS))] == alone
    stats = eng.scheduler.stats
    assert stats["largest_batch"] >= 2  # at least some steps ran several requests at once
    assert stats["stepped"] - before["stepped"] > stats["steps"] - before["steps"]
    ran = eng.loaded.runtime.batch_paths  # shared steps ran the CPU's ragged step; the report counts them
    assert ran["ragged"] - paths.get("ragged", 0) >= 2 and not any(k.startswith("graph") for k in ran)


def test_async_requests_share_steps_and_stream_their_text(eng: Engine) -> None:
    alone = _alone(eng)

    async def main() -> tuple[list[list[int]], str, str]:
        gens = await asyncio.gather(*(eng.agenerate(QUESTION, [d], max_new_tokens=NEW) for d in DOCS))
        st = eng.astream(QUESTION, [DOCS[0]], max_new_tokens=NEW)
        pieces = [p async for p in st]
        assert st.result is not None
        return [g.token_ids for g in gens], "".join(pieces), st.result.text

    tokens, streamed, text = asyncio.run(main())
    assert tokens == alone
    assert streamed == text and streamed.strip()


def test_modes_mix_in_one_batch(eng: Engine) -> None:
    """Stitch requests (first token from their own prefill) and exact hits (pending tokens) share steps."""
    alone = [eng.generate(QUESTION, DOCS[:2], max_new_tokens=NEW, mode=m).token_ids for m in ("exact", "stitch")]
    out: dict[str, list[int]] = {}

    def run(mode: str) -> None:
        out[mode] = eng.generate(QUESTION, DOCS[:2], max_new_tokens=NEW, mode=mode).token_ids

    threads = [threading.Thread(target=run, args=(m,)) for m in ("exact", "stitch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out["exact"], out["stitch"]] == alone


def test_closing_a_stream_frees_its_place(eng: Engine) -> None:
    st = eng.stream(QUESTION, [DOCS[0]], max_new_tokens=200)
    next(st)
    st.close()
    with pytest.raises(StopIteration):
        next(st)
    eng.generate(QUESTION, [DOCS[1]], max_new_tokens=2)  # runs after the closed one left
    deadline = time.monotonic() + 10
    while eng.scheduler.live and time.monotonic() < deadline:  # the loop drops finished requests after their step
        time.sleep(0.01)
    assert eng.scheduler.live == 0


def test_errors_reach_the_caller(eng: Engine) -> None:
    with pytest.raises(ContextLengthError):
        eng.generate(QUESTION, ["word " * 9000], max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        eng.stream(QUESTION, [DOCS[0]], max_new_tokens=0)

    async def bad() -> None:
        await eng.agenerate(QUESTION, ["word " * 9000], max_new_tokens=2)

    with pytest.raises(ContextLengthError):
        asyncio.run(bad())
    assert eng.generate(QUESTION, [DOCS[0]], max_new_tokens=2).token_ids  # the scheduler goes on


def test_a_failure_while_admitting_reaches_every_caller_taken_from_the_queue(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in the scheduler's loop itself (not in one request's assembly) after it took requests
    from the queue tells each of them, instead of leaving their callers waiting forever."""
    eng.generate(QUESTION, [DOCS[0]], max_new_tokens=1)  # the scheduler's thread is running
    real = serving.Scheduler._admit

    def broken(self: serving.Scheduler, new: list[serving.Job]) -> list[serving.Job]:
        raise RuntimeError("admission broke")

    monkeypatch.setattr(serving.Scheduler, "_admit", broken)
    outcomes: list[BaseException | None] = []

    def ask(doc: str) -> None:
        try:
            eng.generate(QUESTION, [doc], max_new_tokens=2)
            outcomes.append(None)
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=ask, args=(d,), daemon=True) for d in DOCS[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller was never told"
    assert len(outcomes) == 2 and all(isinstance(e, RuntimeError) and "admission broke" in str(e) for e in outcomes)
    monkeypatch.setattr(serving.Scheduler, "_admit", real)
    assert eng.generate(QUESTION, [DOCS[1]], max_new_tokens=2).token_ids  # the scheduler goes on


def test_a_miss_is_stored_after_its_first_token_and_a_failed_write_only_warns(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the scheduler a computed piece is written to the store after the request's first token
    (not before it), still before the request ends; a write that fails warns and loses nothing else."""
    doc = "The night ferry to Gull Rock leaves from pier 2 at eleven. It carries no cars."
    events: list[str] = []
    real_put = eng.store.put

    def put(key: str, artifact: object, **kwargs: object) -> None:
        events.append("put")
        real_put(key, artifact, **kwargs)  # type: ignore[arg-type]

    accept = serving.Job.accept

    def token(job: serving.Job, logits: object, *args: object) -> bool:
        events.append("token")  # in the scheduler's thread, before the token is taken
        return accept(job, logits, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(eng.store, "put", put)
    monkeypatch.setattr(serving.Job, "accept", token)
    got = eng.generate(QUESTION, [doc], max_new_tokens=4)
    assert got.documents[0].cache.value == "miss"
    assert events[0] == "token" and "put" in events  # the first token came before any write
    assert eng.generate(QUESTION, [doc], max_new_tokens=2).documents[0].cache.value == "hit"

    def broken(key: str, artifact: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(eng.store, "put", broken)
    other = "Room 301 holds the archive of the harbour office. It opens at nine."
    with pytest.warns(UserWarning, match="storing a computed piece failed"):
        got = eng.generate(QUESTION, [other], max_new_tokens=3)
    assert got.token_ids and got.documents[0].cache.value == "miss"
    monkeypatch.setattr(eng.store, "put", real_put)
    assert eng.generate(QUESTION, [other], max_new_tokens=2).documents[0].cache.value == "miss"


def test_fair_lock_serves_waiters_in_order() -> None:
    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    ready = threading.Event()

    def waiter(i: int) -> None:
        with lock:
            order.append(i)

    threads = []
    for i in range(3):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        while lock.waiting <= i:  # wait until this thread queues
            ready.wait(0.001)
    lock.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 2]
    with lock, lock:  # re-entrant
        assert lock.held()
    assert not lock.held()


def test_a_document_asked_about_by_several_threads_at_once_is_computed_once(eng: Engine) -> None:
    """Each request is planned in its caller's thread, so four threads asking about a new document at the
    same moment all plan a miss; when the scheduler admits them (one at a time, under the model's lock)
    the later ones plan again and load what the first stored: one computation, four identical answers."""
    for round_ in range(3):
        doc = f"Round {round_}. The ferry to Blue Island leaves from pier {round_ + 4} every morning at six."
        plan = eng.plan(eng.prompt("Which pier?", [doc]))
        assert plan.misses  # nothing stored yet
        barrier = threading.Barrier(4)
        out: list[object] = []

        def ask(doc: str = doc, barrier: threading.Barrier = barrier, out: list[object] = out) -> None:
            barrier.wait()
            out.append(eng.generate("Which pier?", [doc], max_new_tokens=4))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        caches = sorted(g.documents[0].cache.value for g in out)  # type: ignore[attr-defined]
        assert caches == ["hit", "hit", "hit", "miss"], caches
        assert len({tuple(g.token_ids) for g in out}) == 1  # type: ignore[attr-defined]
        assert not eng.planner.refresh(plan, eng.system_prompt).misses  # the stale plan, made again: all found


def test_only_a_cached_request_with_a_short_tail_counts_as_quick_to_admit(eng: Engine) -> None:
    """:meth:`RequestPlan.quick` decides which requests the scheduler admits while a CUDA step runs."""

    def plan(docs: list[str], **overrides: object) -> object:
        return eng.plan(eng.prompt(QUESTION, docs), eng.request_options(**overrides))

    cached = plan(DOCS[:1])
    assert cached.quick(512)  # type: ignore[attr-defined]
    assert not cached.quick(2)  # type: ignore[attr-defined]  # the question is longer than that
    unpublished = " ".join(f"The tram to stop {i} leaves from the old mill." for i in range(80))  # > 512 tokens
    assert not plan([unpublished]).quick(512)  # type: ignore[attr-defined]
    assert not plan(DOCS[:1], use_cache=False).quick(512)  # type: ignore[attr-defined]
    assert not plan(DOCS[:2], mode="stitch").quick(512)  # type: ignore[attr-defined]


def test_warm_up_checks_its_lengths_and_starts_packing_on_the_cpu(eng: Engine) -> None:
    with pytest.raises(InputError, match="lengths"):
        eng.warm_up(4096)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="lengths"):
        eng.warm_up([0])
    with pytest.raises(InputError, match="lengths"):
        eng.warm_up([10**9])
    assert eng.warm_up([256]) >= 0.0
    dec = eng.loaded.runtime.decoder
    assert dec is not None and dec._packing is not None  # the batched step's weights are being packed
    assert eng.generate(QUESTION, DOCS[:1], max_new_tokens=4).token_ids  # requests go on as before


def test_picks_takes_the_first_greedy_token_of_every_row() -> None:
    """The scheduler's one argmax per step: each row's index of its largest logit, the first one on a
    tie (as a per-row ``torch.argmax`` picks), in row order."""
    import torch

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    logits[2, 17] = logits[2, 250] = logits[2].max() + 1.0  # a tie: the first index wins
    picks = serving.Picks(logits)
    assert picks.ready()  # on the CPU there is nothing to wait for
    assert picks.get() == [int(torch.argmax(row)) for row in logits]
    assert picks.get()[2] == 17


def test_requests_waiting_for_their_first_token_step_alone_at_most_every_other_step(eng: Engine) -> None:
    """When some live requests wait for their first token and others decode, the next step runs the waiting
    ones alone (their first token does not wait for a decode step), and the step after it runs everyone,
    so that decoding never stalls while requests keep arriving."""
    from types import SimpleNamespace

    sched = serving.Scheduler(eng.loaded)
    new, old = SimpleNamespace(first=True), SimpleNamespace(first=False)
    jobs: list = [old, new]
    assert sched._to_step(jobs) == [new]
    assert sched._to_step(jobs) == jobs  # every other step: all of them
    assert sched._to_step(jobs) == [new]
    assert sched._to_step([old]) == [old] and sched._to_step([new]) == [new]
