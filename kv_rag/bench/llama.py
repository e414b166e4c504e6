"""The peer in the benchmark: llama.cpp (through ``llama-cpp-python``) on the same GGUF file.

Optional: ``pip install 'kv-rag[bench]'`` (or ``make bench``) compiles it. The state is saved and
restored with llama.cpp's own calls (``llama_state_get_data`` / ``llama_state_set_data`` in memory,
``llama_state_save_file`` / ``llama_state_load_file`` on disk), not through ``Llama.save_state``,
whose Python wrapper also copies a ``n_batch x vocab`` float32 score buffer; that wrapper's restore
is timed separately (``restore_py``) so both figures are visible.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def available() -> bool:
    """Whether ``llama_cpp`` can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


class LlamaPeer:
    """One llama.cpp context on ``gguf``: full prefill, state save and restore, greedy decoding."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int, n_batch: int = 512) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.threads = threads
        self.version = str(getattr(llama_cpp, "__version__", "?"))
        self.n_vocab = int(self.llm.n_vocab())

    @property
    def _ctx(self) -> Any:
        return self.llm._ctx.ctx

    def _last_logits(self) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _greedy(self, first: np.ndarray, n_new: int) -> list[int]:
        out = [int(first.argmax())]
        for _ in range(n_new - 1):
            self.llm.eval([out[-1]])
            out.append(int(self._last_logits().argmax()))
        return out

    def full(self, ids: Sequence[int], n_new: int = 1) -> tuple[float, np.ndarray, list[int]]:
        """Full prefill of ``ids`` from an empty cache: ``(ttft_s, first logits, greedy tokens)``."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        self.llm.eval(list(ids))
        logits = self._last_logits()
        first = int(logits.argmax())
        ttft = time.perf_counter() - t0
        toks = self._greedy(logits, n_new) if n_new > 1 else [first]
        return ttft, logits, toks

    def publish(self, prefix: Sequence[int], file: Path | None = None) -> tuple[float, bytes]:
        """Prefill ``prefix`` and save the state (to memory, and to ``file`` with llama.cpp's own call)."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        self.llm.eval(list(prefix))
        size = self._lc.llama_state_get_size(self._ctx)
        buf = (ctypes.c_uint8 * size)()
        n = self._lc.llama_state_get_data(self._ctx, buf, size)
        state = bytes(memoryview(buf)[:n])
        seconds = time.perf_counter() - t0
        if file is not None:
            toks = (self._lc.llama_token * len(prefix))(*prefix)
            if not self._lc.llama_state_save_file(self._ctx, str(file).encode(), toks, len(prefix)):
                raise RuntimeError(f"llama_state_save_file failed for {file}")
        self.py_state = self.llm.save_state()
        return seconds, state

    def restore(
        self, state: bytes, prefix: Sequence[int], suffix: Sequence[int], n_new: int = 1
    ) -> tuple[float, np.ndarray, list[int]]:
        """Restore a state held in memory, prefill ``suffix``: ``(ttft_s, first logits, greedy tokens)``."""
        t0 = time.perf_counter()
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._lc.llama_state_set_data(self._ctx, buf, len(state)) != len(state):
            raise RuntimeError("llama_state_set_data failed")
        return self._after_restore(t0, prefix, suffix, n_new)

    def restore_file(
        self, file: Path, prefix: Sequence[int], suffix: Sequence[int], n_new: int = 1
    ) -> tuple[float, np.ndarray, list[int]]:
        """Restore from a state file (llama.cpp's own format), prefill ``suffix``."""
        t0 = time.perf_counter()
        cap = len(prefix) + 16
        toks = (self._lc.llama_token * cap)()
        count = ctypes.c_size_t(0)
        if not self._lc.llama_state_load_file(self._ctx, str(file).encode(), toks, cap, ctypes.byref(count)):
            raise RuntimeError(f"llama_state_load_file failed for {file}")
        return self._after_restore(t0, prefix, suffix, n_new)

    def restore_py(self, suffix: Sequence[int]) -> float:
        """TTFT through the Python wrapper's ``Llama.load_state`` (the state saved by :meth:`publish`)."""
        t0 = time.perf_counter()
        self.llm.load_state(self.py_state)
        self.llm.eval(list(suffix))
        int(self._last_logits().argmax())
        return time.perf_counter() - t0

    def _after_restore(
        self, t0: float, prefix: Sequence[int], suffix: Sequence[int], n_new: int
    ) -> tuple[float, np.ndarray, list[int]]:
        n = len(prefix)
        self.llm.n_tokens = n
        self.llm.input_ids[:n] = prefix
        self.llm.eval(list(suffix))
        logits = self._last_logits()
        first = int(logits.argmax())
        ttft = time.perf_counter() - t0
        toks = self._greedy(logits, n_new) if n_new > 1 else [first]
        return ttft, logits, toks
