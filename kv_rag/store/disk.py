"""Disk tier on diskcache: safetensors bytes in files under one folder, shared by processes."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any, cast

import diskcache
import torch

from .. import codec as _codec
from .. import digest as _digest
from ..artifact import Artifact
from ..defaults import DISK_TIER_BYTES
from ..errors import ArtifactError
from . import gone as removed

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

    Size: ``size_limit`` is lowered to what the filesystem can hold (the tier's own files plus the
    free space, less a small reserve), and a write first evicts the least recently stored entries
    until it fits under the limit (first those that no held entry extends: a chain's head goes
    last, since its documents are unusable without it), so the tier evicts before the disk fills;
    a write that still finds the disk full (something else filled it) lowers the limit, evicts
    room and tries once more.
    A folder that cannot be written (a read-only mount, no permission) is opened read-only, with
    one warning: its artifacts are still hits, nothing new is stored (:attr:`problem` says why).
    Pinned entries (:meth:`pin`, kept in the index, so for every process) are never evicted.
    """

    name = "disk"

    def __init__(self, directory: str | Path, size_limit: int = DISK_TIER_BYTES, codec: str = "none") -> None:
        self.codec = _codec.check_codec(codec)
        self.directory = Path(directory).expanduser()
        #: why the folder cannot be written (``None``: it can); the tier then only reads
        self.problem: str | None = None
        self._reader: _ReadOnlyIndex | None = None
        self._cache: Any = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(
                str(self.directory),
                size_limit=size_limit,
                eviction_policy="least-recently-stored",
                cull_limit=0,  # evicted here, one entry at a time (diskcache culls ten at once: all of a small store)
                tag_index=True,  # tags hold parent keys: eviction takes entries no other one extends first
                disk_min_file_size=0,
                disk=_CleanDisk,
            )
        except (OSError, sqlite3.Error) as exc:
            self.problem = f"{type(exc).__name__}: {exc}"
            self._reader = _ReadOnlyIndex(self.directory)
            held = len(self._reader)
            warnings.warn(
                f"kv-rag: the disk store {self.directory} cannot be written ({self.problem}); "
                f"reading the {held} artifacts it holds, storing nothing new",
                stacklevel=2,
            )
            return
        with self._cache.transact(retry=True):
            self._cache._sql(_PINS)
        fits = self._cache.volume() + _free_bytes(self.directory)
        if fits < size_limit:
            self._cache.reset("size_limit", max(0, fits))
            log.info("disk tier %s: size limit lowered to %d bytes (the filesystem's room)", self.directory, fits)

    @property
    def writable(self) -> bool:
        """Whether new artifacts can be stored here."""
        return self._cache is not None

    @property
    def size_limit(self) -> int:
        """Bytes the tier keeps at most (0 when read-only)."""
        return int(self._cache.size_limit) if self._cache is not None else 0

    def get(self, key: str) -> Artifact | None:
        """The verified artifact under ``key`` or ``None`` (damaged entries are dropped with a warning)."""
        return self._get(key, None)[0]

    def get_digested(self, key: str) -> tuple[Artifact | None, str | None]:
        """The artifact under ``key`` (or ``None``) and the digest of its stored bytes
        (:mod:`kv_rag.digest`), hashed in a second thread while they are read; ``None`` for another
        codec. The checksum is left to the caller, who checks that digest against a signature instead."""
        return self._get(key, _digest.ReadHasher())

    def _get(self, key: str, hasher: _digest.ReadHasher | None) -> tuple[Artifact | None, str | None]:
        if self._cache is None:
            data = self._reader.get(key) if self._reader is not None else None
            try:
                return _decoded(data, key, hasher) if data is not None else (None, None)
            except ArtifactError as exc:
                warnings.warn(f"kv-rag: stored artifact {key[:12]}… is unusable ({exc}); recomputing", stacklevel=3)
                removed.record(key, "damaged")
                return None, None
        try:
            data = _read_value(self._cache.get(key, default=None, read=True, retry=True), hasher)
        except (OSError, ValueError, sqlite3.Error) as exc:
            self._drop(key, f"unreadable ({exc})")
            return None, None
        if data is None:
            return None, None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self._drop(key, f"holds {type(data).__name__}, not artifact bytes")
            return None, None
        try:
            return _decoded(data, key, hasher)
        except ArtifactError as exc:
            self._drop(key, str(exc))
            return None, None

    def get_bytes(self, key: str) -> bytes | None:
        """The raw stored bytes under ``key`` (unverified), or ``None``."""
        if self._cache is None:
            return self._reader.get(key) if self._reader is not None else None
        data = self._cache.get(key, default=None, retry=True)
        return data if isinstance(data, bytes) else None

    def put(self, key: str, artifact: Artifact) -> None:
        """Write ``artifact`` under ``key`` atomically (replacing any entry)."""
        self.put_bytes(key, _codec.encode(artifact, self.codec), parent=artifact.meta.parent)

    def put_bytes(self, key: str, data: bytes, parent: str = "") -> None:
        """Write raw bytes under ``key`` (used by tests and tools; ``get`` still verifies them);
        ``parent``: the key of the artifact this one extends (kept for eviction).

        A full disk first evicts the oldest entries to make room (lowering the size limit to what
        the filesystem holds) and tries once more. Raises ``OSError`` when the write fails all the same
        or the tier is read-only (SQLite errors are re-raised as ``OSError``), which
        :class:`~kv_rag.store.Store` turns into a warning and a skipped tier.
        """
        if self._cache is None:
            raise OSError(f"the disk store {self.directory} is read-only ({self.problem})")
        if len(data) > self._cache.size_limit:
            raise OSError(errno.EFBIG, f"{len(data)} bytes exceed the tier's limit of {self._cache.size_limit}")
        for attempt in range(2):
            try:
                self._evict(int(self._cache.size_limit) - len(data), key)
                if self._cache.volume() + len(data) > self._cache.size_limit and self.pinned_keys():
                    raise OSError(errno.EFBIG, "no room left beside the pinned entries (kv-rag store unpin)")
                self._cache.set(key, data, retry=True, tag=parent or None)
                return
            except (OSError, sqlite3.Error) as exc:
                full = getattr(exc, "errno", None) == errno.ENOSPC or "full" in str(exc)
                if attempt or not full or not self._make_room(len(data)):
                    raise OSError(f"disk tier write failed: {exc}") from exc

    def _evict(self, target: int, keep: str) -> int:
        """Delete the least recently stored entries (never ``keep``; first those no held entry extends)
        until the tier's bytes are at most ``target``; returns how many went."""
        count = 0
        unpinned = " AND key NOT IN (SELECT key FROM KvRagPin)"
        leaf = (
            "SELECT key FROM Cache AS c WHERE NOT (raw = 1 AND key = ?)" + unpinned
            + " AND NOT EXISTS (SELECT 1 FROM Cache AS d WHERE d.tag = c.key) ORDER BY store_time LIMIT 1"
        )  # fmt: skip
        oldest = "SELECT key FROM Cache WHERE NOT (raw = 1 AND key = ?)" + unpinned + " ORDER BY store_time LIMIT 1"
        while self._cache.volume() > max(0, target):
            with self._cache.transact(retry=True):
                row = self._cache._sql(leaf, (keep,)).fetchone() or self._cache._sql(oldest, (keep,)).fetchone()
            if row is None or not self._cache.delete(row[0], retry=True):
                break
            removed.record(row[0], "evicted")
            count += 1
        return count

    def _make_room(self, nbytes: int) -> bool:
        """Lower the size limit to what the filesystem holds (with room for ``nbytes`` more) and evict down
        to it; ``False`` when nothing could be evicted."""
        volume = int(self._cache.volume())
        limit = max(0, min(int(self._cache.size_limit), volume + _free_bytes(self.directory)))
        self._cache.reset("size_limit", limit)
        return self._evict(limit - nbytes, "") > 0

    def delete(self, key: str) -> None:
        """Remove ``key`` if present (and its pin)."""
        if self._cache is not None:
            self._cache.delete(key, retry=True)
            with self._cache.transact(retry=True):
                self._cache._sql("DELETE FROM KvRagPin WHERE key = ?", (key,))

    def pin(self, key: str, on: bool = True) -> bool:
        """Keep ``key`` from eviction (``on=False``: let it go again); ``False`` when the tier does not
        hold it. ``OSError`` when the folder is read-only."""
        if self._cache is None:
            raise OSError(f"the disk store {self.directory} is read-only ({self.problem})")
        if key not in self:
            return False
        sql = "INSERT OR IGNORE INTO KvRagPin (key) VALUES (?)" if on else "DELETE FROM KvRagPin WHERE key = ?"
        with self._cache.transact(retry=True):
            self._cache._sql(sql, (key,))
        return True

    def pinned_keys(self) -> set[str]:
        """The pinned keys."""
        sql = "SELECT key FROM KvRagPin"
        if self._cache is None:
            return {str(k) for (k,) in self._reader._rows(sql)} if self._reader is not None else set()
        with self._cache.transact(retry=True):
            return {str(k) for (k,) in self._cache._sql(sql).fetchall()}

    def path_of(self, key: str) -> Path | None:
        """The file that holds ``key``'s bytes, if the entry exists."""
        if self._cache is None:
            return self._reader.path_of(key) if self._reader is not None else None
        with self._cache.transact(retry=True):
            row = self._cache._sql("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        return self.directory / row[0] if row and row[0] else None

    def keys(self) -> list[str]:
        """Every key held."""
        if self._cache is None:
            return self._reader.keys() if self._reader is not None else []
        return [k for k in self._cache.iterkeys() if isinstance(k, str)]

    def entries(self) -> list[tuple[str, int, float | None]]:
        """``(key, bytes, stored at as Unix time)`` of every entry."""
        sql = "SELECT key, size, store_time FROM Cache WHERE raw = 1"
        if self._cache is None:
            rows = self._reader._rows(sql) if self._reader is not None else []
        else:
            with self._cache.transact(retry=True):
                rows = list(self._cache._sql(sql).fetchall())
        return [(str(k), int(n or 0), float(t) if t is not None else None) for k, n, t in rows if isinstance(k, str)]

    def clear(self) -> None:
        """Remove every entry (``OSError`` when the folder is read-only)."""
        if self._cache is None:
            raise OSError(f"the disk store {self.directory} is read-only ({self.problem})")
        self._cache.clear(retry=True)
        with self._cache.transact(retry=True):
            self._cache._sql("DELETE FROM KvRagPin")

    def __contains__(self, key: object) -> bool:
        if self._cache is None:
            return isinstance(key, str) and self._reader is not None and self._reader.path_of(key) is not None
        try:
            return key in self._cache
        except sqlite3.Error as exc:  # an unreadable index holds nothing usable
            log.warning("kv-rag: disk tier could not look up %s (%s)", str(key)[:12], exc)
            return False

    def __len__(self) -> int:
        if self._cache is None:
            return len(self._reader) if self._reader is not None else 0
        return len(self._cache)

    def close(self) -> None:
        """Close the SQLite connection (reopened on next use)."""
        if self._cache is not None:
            self._cache.close()

    def _drop(self, key: str, why: str) -> None:
        warnings.warn(f"kv-rag: dropping stored artifact {key[:12]}…: {why}; it will be recomputed", stacklevel=3)
        log.warning("dropping artifact %s: %s", key, why)
        removed.record(key, "damaged")
        with contextlib.suppress(OSError, sqlite3.Error):
            self._cache.delete(key, retry=True)


#: pinned keys, in diskcache's index (never evicted)
_PINS = "CREATE TABLE IF NOT EXISTS KvRagPin (key TEXT PRIMARY KEY)"


def _decoded(
    data: bytes | bytearray | memoryview, key: str, hasher: _digest.ReadHasher | None
) -> tuple[Artifact, str | None]:
    """Decode ``data`` (and the digest ``hasher`` took of it; then the checksum is left to the caller)."""
    if hasher is None:
        return _codec.decode(data, expect_key=key), None
    if hasher.seen != len(data):  # not read through the hasher (kept inline in SQLite, or read-only)
        hasher = _digest.ReadHasher()
        hasher.advance(memoryview(data), len(data))
    found = hasher.result() if _codec.codec_of(bytes(data[:4])) == "none" else None
    return _codec.decode(data, expect_key=key, checksum=found is None), found


#: Bytes read per call while a digest is taken (the hashing thread works on one piece while the next is read).
_READ_PIECE = 8 << 20


def _read_value(value: Any, hasher: _digest.ReadHasher | None = None) -> Any:
    """The bytes of a diskcache value read with ``read=True``.

    A file is read whole into an uninitialised buffer and returned as a writable ``memoryview``: the
    artifact's tensors are views of it, so the bytes land in memory once (a ``bytearray`` would be
    zero-filled first, and ``bytes`` would have to be copied into tensors). With ``hasher``, in pieces,
    each handed to it as it arrives. Anything else (a value kept inline in SQLite) is returned as it is.
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
            n = os.readv(fd, [view[got : got + _READ_PIECE] if hasher is not None else view[got:]])
            if not n:
                break
            got += n
            if hasher is not None:
                hasher.advance(view, got)
    return view[:got]  # a file that shrank under us is checked (and rejected) like any damage


#: Bytes of a filesystem the disk tier leaves free (at most; 1/20 of a smaller filesystem).
RESERVE_BYTES = 256 * 1024**2


def _free_bytes(directory: Path) -> int:
    """Free bytes under ``directory`` less a reserve (a very large number when it cannot be asked)."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return 1 << 62
    reserve = min(RESERVE_BYTES, usage.total // 20)
    return max(0, int(usage.free) - reserve)


class _ReadOnlyIndex:
    """diskcache's SQLite index opened read-only, for a folder that cannot be written.

    Only string keys stored as files (how :class:`DiskTier` writes) are found. SQLite opens the
    index with ``mode=ro``, or as ``immutable`` when even that needs a write (a WAL index on a
    read-only mount). A missing or unreadable index holds nothing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        db = directory / "cache.db"
        if not db.is_file():
            return
        for query in ("mode=ro", "mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(f"{db.resolve().as_uri()}?{query}", uri=True, check_same_thread=False)
                conn.execute("SELECT COUNT(*) FROM Cache").fetchone()
            except sqlite3.Error:
                continue
            self._conn = conn
            return

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._conn is None:
            return []
        try:
            with self._lock:
                return list(self._conn.execute(sql, args).fetchall())
        except sqlite3.Error:
            return []

    def path_of(self, key: str) -> Path | None:
        rows = self._rows("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (key,))
        return self.directory / rows[0][0] if rows and rows[0][0] else None

    def get(self, key: str) -> Any:
        path = self.path_of(key)
        if path is None:
            return None
        try:
            return _read_value(open(path, "rb"))  # _read_value closes it
        except OSError:
            return None

    def keys(self) -> list[str]:
        return [k for (k,) in self._rows("SELECT key FROM Cache WHERE raw = 1") if isinstance(k, str)]

    def __len__(self) -> int:
        rows = self._rows("SELECT COUNT(*) FROM Cache")
        return int(rows[0][0]) if rows else 0
