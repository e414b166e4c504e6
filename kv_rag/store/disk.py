"""Disk tier on diskcache: safetensors bytes in files under one folder, shared by processes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import warnings
from pathlib import Path
from typing import Any, cast

import diskcache
import torch

from .. import codec as _codec
from ..artifact import Artifact
from ..defaults import DISK_TIER_BYTES
from ..errors import ArtifactError

log = logging.getLogger(__name__)


class _CleanDisk(diskcache.Disk):
    """diskcache's file layer, but a write that fails (a full disk) removes its partial file.

    Plain diskcache leaves the half-written file behind, which keeps the disk full for good.
    """

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> int | None:
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise


class DiskTier:
    """Artifacts as safetensors bytes in a diskcache folder.

    Safety: diskcache writes each value to a new file and commits its row in SQLite afterwards,
    so a reader sees either the old entry, the new one or none, never half a file; it is safe for
    threads and for several processes opening the same folder (not across network filesystems).
    Every ``get`` verifies the checksum; a damaged or foreign entry is deleted, a warning is
    issued, and ``None`` is returned. Eviction: least recently stored beyond ``size_limit`` bytes.

    ``codec`` chooses how new entries are written (see :mod:`kv_rag.codec`): ``"none"`` (default,
    plain safetensors), ``"zstd"`` (lossless; smaller files, slower loads on a fast disk) or
    ``"int8"`` (lossy, opt-in: about 0.27x the size, answers may differ from a full prefill).
    ``get`` reads entries written with any codec.
    """

    name = "disk"

    def __init__(self, directory: str | Path, size_limit: int = DISK_TIER_BYTES, codec: str = "none") -> None:
        self.codec = _codec.check_codec(codec)
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(
            str(self.directory),
            size_limit=size_limit,
            eviction_policy="least-recently-stored",
            disk_min_file_size=0,
            disk=_CleanDisk,
        )

    def get(self, key: str) -> Artifact | None:
        """The verified artifact under ``key`` or ``None`` (damaged entries are dropped with a warning)."""
        try:
            data = _read_value(self._cache.get(key, default=None, read=True, retry=True))
        except (OSError, ValueError, sqlite3.Error) as exc:
            self._drop(key, f"unreadable ({exc})")
            return None
        if data is None:
            return None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self._drop(key, f"holds {type(data).__name__}, not artifact bytes")
            return None
        try:
            return _codec.decode(data, expect_key=key)
        except ArtifactError as exc:
            self._drop(key, str(exc))
            return None

    def get_bytes(self, key: str) -> bytes | None:
        """The raw stored bytes under ``key`` (unverified), or ``None``."""
        data = self._cache.get(key, default=None, retry=True)
        return data if isinstance(data, bytes) else None

    def put(self, key: str, artifact: Artifact) -> None:
        """Write ``artifact`` under ``key`` atomically (replacing any entry)."""
        self.put_bytes(key, _codec.encode(artifact, self.codec))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write raw bytes under ``key`` (used by tests and tools; ``get`` still verifies them).

        Raises ``OSError`` when the write fails (a full disk; SQLite errors are re-raised as ``OSError``),
        which :class:`~kv_rag.store.Store` turns into a warning and a skipped tier.
        """
        try:
            self._cache.set(key, data, retry=True)
        except sqlite3.Error as exc:
            raise OSError(f"disk tier write failed: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        self._cache.delete(key, retry=True)

    def path_of(self, key: str) -> Path | None:
        """The file that holds ``key``'s bytes, if the entry exists."""
        with self._cache.transact(retry=True):
            row = self._cache._sql("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        return self.directory / row[0] if row and row[0] else None

    def keys(self) -> list[str]:
        """Every key held."""
        return [k for k in self._cache.iterkeys() if isinstance(k, str)]

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._cache
        except sqlite3.Error as exc:  # an unreadable index holds nothing usable
            log.warning("kv-rag: disk tier could not look up %s (%s)", str(key)[:12], exc)
            return False

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        """Close the SQLite connection (reopened on next use)."""
        self._cache.close()

    def _drop(self, key: str, why: str) -> None:
        warnings.warn(f"kv-rag: dropping stored artifact {key[:12]}…: {why}; it will be recomputed", stacklevel=3)
        log.warning("dropping artifact %s: %s", key, why)
        with contextlib.suppress(OSError, sqlite3.Error):
            self._cache.delete(key, retry=True)


def _read_value(value: Any) -> Any:
    """The bytes of a diskcache value read with ``read=True``.

    A file is read whole, in one call, into an uninitialised buffer and returned as a writable
    ``memoryview``: the artifact's tensors are views of it, so the bytes land in memory once
    (a ``bytearray`` would be zero-filled first, and ``bytes`` would have to be copied into
    tensors). Anything else (a value kept inline in SQLite) is returned as it is.
    """
    if not isinstance(value, io.IOBase):
        return value
    with value as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        view = memoryview(cast(Any, torch.empty(size, dtype=torch.uint8).numpy()))
        got = 0
        while got < size:
            n = os.readv(fd, [view[got:]])
            if not n:
                break
            got += n
    return view[:got]  # a file that shrank under us is checked (and rejected) like any damage
