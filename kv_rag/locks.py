"""A re-entrant lock that serves waiting threads in the order they came.

A loaded model is used by the scheduler's decode loop, which takes the model's lock once per step
and takes it again right after, and by other threads (publishing, a direct prefill). Python's own
locks do not queue waiters: the thread that just released usually takes the lock again before a
woken waiter runs, so a busy decode loop could keep a publish waiting for as long as it runs.
:class:`FairLock` hands the lock to the longest-waiting thread.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FairLock:
    """Re-entrant, first come first served. Thread-safe; not for use across processes."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[int] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (again, if this thread holds it); waiters are served in arrival order.

        Returns ``False`` when ``blocking`` is false and the lock is taken, or ``timeout`` seconds
        (if >= 0) passed first.
        """
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._queue:
                self._owner, self._depth = me, 1
                return True
            if not blocking:
                return False
            self._queue.append(me)
            try:
                ok = self._cond.wait_for(
                    lambda: self._owner is None and self._queue[0] == me, None if timeout < 0 else timeout
                )
            finally:
                self._queue.remove(me)
                if self._owner is None:
                    self._cond.notify_all()  # the next waiter may be first now
            if ok:
                self._owner, self._depth = me, 1
            return ok

    def release(self) -> None:
        """Give the lock back (once per :meth:`acquire`); the longest-waiting thread gets it next."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Threads waiting for the lock."""
        with self._cond:
            return len(self._queue)

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
