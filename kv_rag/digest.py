"""The cryptographic digest a publisher signs: BLAKE3 over an artifact's stored tensor bytes and their layout.

An artifact is stored as safetensors: an 8-byte length, a JSON header (the tensor table and the
metadata), then the data section holding every tensor's bytes. The digest
(``blake3:<hex>``, :func:`of_bytes`) is BLAKE3 over a fixed prefix, the tensor table (each tensor's
name, dtype, shape and byte range, in canonical JSON) and BLAKE3 of the whole data section: it
fixes every byte of every tensor and where each one goes, and leaves out the metadata (which the
signature covers field by field) and the signature itself.

Because it is a hash of the bytes as stored, a tier can compute it while it reads them
(:class:`ReadHasher`, in a second thread, so that on a free core the check adds almost no time
to the load) instead of hashing the decoded tensors afterwards. Needs ``blake3``
(``pip install 'kv-rag[sign]'``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors.torch import save as st_save

from .errors import InputError

__all__ = ["PREFIX", "ReadHasher", "of_bytes", "of_parts", "of_tensors"]

#: What a digest of this kind starts with (``ArtifactMeta.tensor_digest``).
PREFIX = "blake3:"
_DOMAIN = b"kv-rag stored tensors v2\n"
#: Data below this many bytes is hashed in the calling thread.
_THREADED_FROM = 8 << 20


def _blake3() -> Any:
    """The ``blake3`` class, or an :class:`InputError` saying how to install it."""
    try:
        from blake3 import blake3
    except ImportError:
        raise InputError("signed artifacts need blake3: pip install 'kv-rag[sign]' (or blake3)") from None
    return blake3


def _header(data: bytes | bytearray | memoryview) -> tuple[int, dict[str, Any]] | None:
    """Where the data section of safetensors ``data`` starts, and its header; ``None`` when ``data`` is not that."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100 << 20:
        return None
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError:
        return None
    return (8 + n, header) if isinstance(header, dict) else None


def _layout(header: dict[str, Any]) -> bytes:
    """The tensor table of a safetensors header in canonical JSON (the metadata left out)."""
    table = {name: info for name, info in header.items() if name != "__metadata__"}
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode()


def of_parts(header: dict[str, Any], section_hash: bytes) -> str:
    """The digest of an artifact whose safetensors ``header`` and BLAKE3 of the data section are given."""
    h = _blake3()(_DOMAIN)
    h.update(_layout(header))
    h.update(section_hash)
    return PREFIX + h.hexdigest()


def of_bytes(data: bytes | bytearray | memoryview) -> str | None:
    """The digest of stored artifact bytes (safetensors), hashed here (several threads for large data);
    ``None`` when ``data`` is not safetensors (another codec, or damage)."""
    found = _header(data)
    if found is None:
        return None
    start, header = found
    blake3 = _blake3()
    view = memoryview(data)[start:]
    threads = blake3.AUTO if len(view) >= _THREADED_FROM else 1
    return of_parts(header, blake3(view, max_threads=threads).digest())


def of_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest :func:`of_bytes` gives for the safetensors bytes of ``tensors``, without writing them:
    their order in the data section is safetensors' own (read from the header of one-element stand-ins),
    each tensor's bytes follow the last one's, and they are hashed as they are."""
    found = _header(st_save({name: torch.zeros(1, dtype=t.dtype) for name, t in tensors.items()}))
    assert found is not None  # safetensors wrote it
    stand_in = {name: info for name, info in found[1].items() if name != "__metadata__"}
    blake3 = _blake3()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    h = blake3(max_threads=blake3.AUTO if total >= _THREADED_FROM else 1)
    table: dict[str, Any] = {}
    pos = 0
    for name in sorted(stand_in, key=lambda n: stand_in[n]["data_offsets"][0]):
        t = tensors[name].detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        table[name] = {"dtype": stand_in[name]["dtype"], "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        if size:
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        pos += size
    return of_parts(table, h.digest())


class ReadHasher:
    """The digest of artifact bytes computed while they are read into one buffer.

    The reader calls :meth:`advance` with the buffer and how many bytes of it have arrived, after each
    read; the bytes of the data section are hashed in order in one background thread while the next
    read runs. :meth:`result` waits for the hashing and returns the digest (``None`` when the bytes
    are not safetensors). One hasher per read; not for use from several threads.
    """

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self) -> None:
        self._blake3 = _blake3()
        self._hash: Any = None
        self._header: dict[str, Any] | None = None
        self._start = -1  # where the data section starts; -1: header not read yet; -2: not safetensors
        self._done = 0  # bytes handed to the hashing thread
        self._last: Future[Any] | None = None
        #: bytes advanced over so far
        self.seen = 0

    @classmethod
    def _forget_pool(cls) -> None:
        """In a forked child: the parent's hashing thread is not there, so a new pool is started."""
        cls._pool, cls._pool_lock = None, threading.Lock()

    @classmethod
    def _submit(cls, fn: Callable[[], Any]) -> Future[Any]:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-rag-digest")
            return cls._pool.submit(fn)

    def advance(self, buffer: memoryview, got: int) -> None:
        """``buffer[:got]`` has been read (``got`` only grows); hash what is new of the data section."""
        self.seen = got
        if self._start == -1:
            if got < 8:
                return
            n = int.from_bytes(buffer[:8], "little")
            if got < 8 + n:
                if n > 100 << 20:
                    self._start = -2
                return
            found = _header(buffer[:got])
            if found is None:
                self._start = -2
                return
            self._start, self._header = found
            self._hash = self._blake3()
            self._done = self._start
        if self._start < 0 or got <= self._done:
            return
        piece, hasher = buffer[self._done : got], self._hash
        self._done = got
        self._last = self._submit(lambda: hasher.update(piece))  # one worker: pieces are hashed in order

    def result(self) -> str | None:
        """The digest of all bytes advanced over (waits for the hashing thread)."""
        if self._start < 0 or self._header is None:
            return None
        if self._last is not None:
            self._last.result()
        return of_parts(self._header, self._hash.digest())


os.register_at_fork(after_in_child=ReadHasher._forget_pool)
