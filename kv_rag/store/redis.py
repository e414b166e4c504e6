"""Shared tier on Redis: artifacts split into chunks, published by flipping a small manifest.

Layout (``prefix`` defaults to ``kvrag:``)::

    {prefix}m:{key}                 manifest: JSON {"v": version, "n": chunks, "size": bytes, "xxh": xxh3-128}
    {prefix}c:{key}:{version}:{i}   chunk i of that version's bytes (at most ``chunk_bytes`` each)

Writes never expose half an artifact: the chunks go under a fresh random version first, and only
then is the manifest replaced with one ``SET`` (atomic in Redis). A reader fetches the manifest,
then that version's chunks with one ``MGET``, and checks the size and the xxh3 of the joined bytes
before :meth:`Artifact.from_bytes` verifies the artifact's own checksum and key. The chunks of a
replaced version are kept for ``grace_s`` seconds so that a reader that fetched the old manifest
still finds them. A missing chunk (evicted, expired) or a mismatch is a miss: the manifest is
dropped with a warning and the artifact is recomputed by the caller.

Expiry and eviction: every key gets the TTL ``ttl_s`` (default 7 days, ``None`` for none), and a
hit renews it, so artifacts nobody reads expire. Memory limits are the server's: run Redis with
``maxmemory`` and ``maxmemory-policy allkeys-lru`` (or ``volatile-lru``); if it evicts a chunk,
the artifact becomes a miss and is republished by the next request that needs it.

Faults: any Redis or socket error opens a circuit breaker. While open (``retry_s`` seconds) the
tier answers every ``get`` with a miss and skips every ``put`` without touching the network, so
requests answer from the local tiers or by prefill; a warning says so once per outage. After
``retry_s`` the next call tries Redis again; on success the tier is used again (logged).

Safety: thread-safe (the client's connection pool) and shared by any number of processes and
machines; concurrent ``put`` of the same key is last-writer-wins, each writer's artifact whole.

Redis Cluster (``redis+cluster://host:port``, any node; redis-py's cluster client): an artifact's
manifest and chunks carry the artifact key as a hash tag (``{prefix}m:{{key}}``,
``{prefix}c:{{key}}:{version}:{i}``), so they live in one slot, on one node: the ``MGET`` and the
pipelines above stay single-node, and a reader never mixes versions. Artifacts spread over the
nodes by key. A node that fails is a miss for the artifacts it held (the breaker opens for the tier,
as for a single server), never a wrong answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import warnings
from typing import Any

import xxhash

from .. import digest as _digest
from ..artifact import Artifact
from ..errors import ArtifactError, InputError
from . import gone

log = logging.getLogger(__name__)

#: Default size of one chunk (Redis strings may be 512 MB; small chunks keep each command short). 64 bytes
#: under 4 MiB: a value of exactly 4 MiB takes jemalloc's next size class, 5 MiB (docs/scaling.md).
CHUNK_BYTES = 4 * 1024**2 - 64
#: Default time to live of an artifact, renewed by every hit.
TTL_S = 7 * 24 * 3600
#: How long the chunks of a replaced version stay readable.
GRACE_S = 60
#: Seconds the breaker stays open after a failure before Redis is tried again.
RETRY_S = 5.0


class RedisTier:
    """Artifacts in Redis, chunked, published atomically by a manifest; see the module docstring."""

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "kvrag:",
        chunk_bytes: int = CHUNK_BYTES,
        ttl_s: int | None = TTL_S,
        grace_s: int = GRACE_S,
        retry_s: float = RETRY_S,
        timeout_s: float = 2.0,
        client: Any = None,
    ) -> None:
        if chunk_bytes < 1:
            raise InputError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if ttl_s is not None and ttl_s < 1:
            raise InputError(f"ttl_s must be >= 1 second or None, got {ttl_s}")
        #: a Redis Cluster (``redis+cluster://``): keys carry hash tags, the client is redis-py's cluster client
        self.cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
        self.url = url
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.retry_s = retry_s
        self._timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False
        self.failures = 0

    # ----------------------------------------------------------------- connection and breaker
    @property
    def client(self) -> Any:
        """The ``redis.Redis`` client (created on first use)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        import redis
                    except ImportError as exc:  # pragma: no cover - depends on the install
                        raise InputError(
                            "a redis:// store needs the redis client: pip install 'kv-rag[redis]'"
                        ) from exc
                    opts = {"socket_timeout": self._timeout_s, "socket_connect_timeout": self._timeout_s}
                    if self.cluster:
                        from redis.cluster import RedisCluster

                        plain = self.url.replace("+cluster://", "://", 1)
                        self._client = RedisCluster.from_url(plain, **opts)
                    else:
                        self._client = redis.Redis.from_url(self.url, retry_on_timeout=False, **opts)
        return self._client

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis failed less than ``retry_s`` seconds ago)."""
        return not self._down or time.monotonic() >= self._down_until

    def _fail(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            first = not self._down
            self._down = True
            self._down_until = time.monotonic() + self.retry_s
        if first:
            warnings.warn(
                f"kv-rag: Redis at {_redact(self.url)} failed during {op} ({type(exc).__name__}: {exc}); "
                f"answering from the local tiers or by prefill, retrying every {self.retry_s:g} s",
                stacklevel=4,
            )
        log.warning("redis %s failed: %s", op, exc)

    def _ok(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.warning("redis at %s is reachable again", _redact(self.url))

    def _errors(self) -> tuple[type[BaseException], ...]:
        import redis

        return (redis.RedisError, redis.exceptions.RedisClusterException, OSError)

    # ----------------------------------------------------------------- keys
    def _tag(self, key: str) -> str:
        return f"{{{key}}}" if self.cluster else key

    def _mkey(self, key: str) -> str:
        return f"{self.prefix}m:{self._tag(key)}"

    def _ckey(self, key: str, version: str, i: int) -> str:
        return f"{self.prefix}c:{self._tag(key)}:{version}:{i}"

    # ----------------------------------------------------------------- Tier protocol
    def get(self, key: str) -> Artifact | None:
        """The verified artifact under ``key``, or ``None`` (miss, damage, or Redis down)."""
        return self._get(key, digested=False)[0]

    def get_digested(self, key: str) -> tuple[Artifact | None, str | None]:
        """The artifact under ``key`` (or ``None``) and the digest of its stored bytes (:mod:`kv_rag.digest`);
        the artifact's own checksum is left to the caller, who checks that digest against a signature."""
        return self._get(key, digested=True)

    def _get(self, key: str, digested: bool) -> tuple[Artifact | None, str | None]:
        data = self.get_bytes(key)
        if data is None:
            return None, None
        found = _digest.of_bytes(data) if digested else None
        try:
            return Artifact.from_bytes(data, expect_key=key, checksum=found is None), found
        except ArtifactError as exc:
            self._drop(key, str(exc))
            return None, None

    def get_bytes(self, key: str) -> bytes | None:
        """The artifact bytes under ``key`` with their size and xxh3 checked against the manifest."""
        if not self.available:
            return None
        try:
            raw = self.client.get(self._mkey(key))
            if raw is None:
                self._ok()
                return None
            try:
                man = json.loads(raw)
                version, n, size, digest = str(man["v"]), int(man["n"]), int(man["size"]), str(man["xxh"])
            except (ValueError, KeyError, TypeError):
                self._ok()
                self._drop(key, "manifest unreadable")
                return None
            names = [self._ckey(key, version, i) for i in range(n)]
            chunks = self.client.mget(names) if names else []
            if self.ttl_s is not None and not man.get("pin"):
                self._renew(key, raw, names)
        except self._errors() as exc:
            self._fail("get", exc)
            return None
        self._ok()
        if any(c is None for c in chunks):
            self._drop(key, "a chunk is missing (evicted or expired)")
            return None
        data = b"".join(chunks)
        if len(data) != size or xxhash.xxh3_128(data).hexdigest() != digest:
            self._drop(key, "chunks do not match the manifest's size or checksum")
            return None
        return data

    def put(self, key: str, artifact: Artifact) -> None:
        """Store ``artifact`` under ``key``: chunks under a new version, then the manifest (skipped if down)."""
        self.put_bytes(key, artifact.to_bytes())

    def put_bytes(self, key: str, data: bytes) -> None:
        """Publish raw bytes under ``key`` (``get`` still verifies them)."""
        if not self.available:
            return
        version = uuid.uuid4().hex[:16]
        step = self.chunk_bytes
        parts = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        digest = xxhash.xxh3_128(data).hexdigest()
        man = json.dumps({"v": version, "n": len(parts), "size": len(data), "xxh": digest, "t": round(time.time(), 3)})
        try:
            pipe = self.client.pipeline(transaction=False)
            for i, part in enumerate(parts):
                pipe.set(self._ckey(key, version, i), part, ex=self.ttl_s)
            pipe.execute()
            old = self.client.set(self._mkey(key), man, ex=self.ttl_s, get=True)
            if old is not None:
                self._expire_version(key, old)
                if _pinned(old):  # a pinned artifact stays pinned when it is replaced
                    self.pin(key)
        except self._errors() as exc:
            self._fail("put", exc)
            return
        self._ok()

    def delete(self, key: str) -> None:
        """Remove ``key`` (its manifest now, its chunks after the grace period)."""
        if not self.available:
            return
        try:
            old = self.client.getdel(self._mkey(key))
            if old is not None:
                self._expire_version(key, old)
        except self._errors() as exc:
            self._fail("delete", exc)
            return
        self._ok()

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or not self.available:
            return False
        try:
            found = bool(self.client.exists(self._mkey(key)))
        except self._errors() as exc:
            self._fail("exists", exc)
            return False
        self._ok()
        return found

    def pin(self, key: str, on: bool = True) -> bool:
        """Take ``key``'s manifest and chunks off the TTL (``on=False``: back on it); ``False`` when the
        tier does not hold it. Pinned keys have no TTL, so a server with ``maxmemory-policy volatile-lru``
        (or ``volatile-*``) never evicts them; an ``allkeys-*`` policy still may."""
        try:
            raw = self.client.get(self._mkey(key))
            if raw is None:
                return False
            try:
                man = dict(json.loads(raw))
                n, version = int(man["n"]), str(man["v"])
            except (ValueError, KeyError, TypeError):
                return False
            man["pin"] = bool(on)
            names = [self._mkey(key)] + [self._ckey(key, version, i) for i in range(n)]
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self._mkey(key), json.dumps(man), keepttl=True)
            for name in names:
                if on or self.ttl_s is None:
                    pipe.persist(name)
                else:
                    pipe.expire(name, self.ttl_s)
            pipe.execute()
        except self._errors() as exc:
            self._fail("pin", exc)
            return False
        self._ok()
        return True

    def pinned_keys(self) -> set[str]:
        """The pinned keys (scans the manifests)."""
        return {k for k in self.keys() if (self.manifest(k) or {}).get("pin")}

    # ----------------------------------------------------------------- tools
    def keys(self) -> list[str]:
        """Every artifact key with a manifest (scans; for tools and tests)."""
        pat = f"{self.prefix}m:*"
        start = len(self.prefix) + 2
        keys = [k.decode()[start:] for k in self.client.scan_iter(match=pat, count=1000)]
        return [k[1:-1] for k in keys] if self.cluster else keys

    def chunk_keys(self) -> list[str]:
        """Every chunk key (for consistency checks in tests)."""
        return [k.decode() for k in self.client.scan_iter(match=f"{self.prefix}c:*", count=1000)]

    def entries(self) -> list[tuple[str, int, float | None]]:
        """``(key, bytes, stored at as Unix time; None for manifests written before it was recorded)``."""
        out: list[tuple[str, int, float | None]] = []
        for key in self.keys():
            man = self.manifest(key)
            if man is not None:
                t = man.get("t")
                out.append((key, int(man.get("size", 0)), float(t) if t is not None else None))
        return out

    def clear(self) -> None:
        """Remove every artifact under this tier's prefix (manifests, then chunks)."""
        for key in self.keys():
            self.delete(key)
        names = [k.encode() for k in self.chunk_keys()]
        for i in range(0, len(names), 1000):
            self.client.delete(*names[i : i + 1000])

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of ``key`` as a dict, or ``None``."""
        raw = self.client.get(self._mkey(key))
        return None if raw is None else dict(json.loads(raw))

    def _renew(self, key: str, raw_manifest: bytes, names: list[str]) -> None:
        """Extend the TTL of a read artifact, without reviving a version a writer replaced meanwhile.

        The renewal and a second read of the manifest go in one pipeline, executed in order; if
        the manifest changed (a concurrent ``put`` or ``delete``), that writer has shortened or
        is about to shorten these chunks to the grace period, and the renewal is undone here, so
        a replaced version never outlives its grace period whichever order the two clients ran in.
        """
        pipe = self.client.pipeline(transaction=False)
        for name in [self._mkey(key), *names]:
            pipe.expire(name, self.ttl_s)
        pipe.get(self._mkey(key))
        now = pipe.execute()[-1]
        if now != raw_manifest:
            self._expire_version(key, raw_manifest)

    def _expire_version(self, key: str, raw_manifest: bytes) -> None:
        try:
            man = json.loads(raw_manifest)
            version, n = str(man["v"]), int(man["n"])
        except (ValueError, KeyError, TypeError):
            return
        pipe = self.client.pipeline(transaction=False)
        for i in range(n):
            pipe.expire(self._ckey(key, version, i), max(1, self.grace_s))
        pipe.execute()

    def _drop(self, key: str, why: str) -> None:
        warnings.warn(f"kv-rag: dropping Redis artifact {key[:12]}…: {why}; it will be recomputed", stacklevel=4)
        log.warning("dropping redis artifact %s: %s", key, why)
        gone.record(key, "damaged")
        try:
            self.delete(key)
        except self._errors():  # pragma: no cover - delete already guards
            pass


def _pinned(raw_manifest: bytes) -> bool:
    """Whether a raw manifest says its artifact is pinned."""
    try:
        return bool(json.loads(raw_manifest).get("pin"))
    except (ValueError, AttributeError):
        return False


def _redact(url: str) -> str:
    """``url`` without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
