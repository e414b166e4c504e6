"""The store: an ordered list of tiers, fastest first; a hit in a lower tier is copied up."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifact import Artifact
from ..codec import decode
from ..defaults import MEMORY_TIER_BYTES, default_store_dir
from ..errors import ArtifactError, InputError
from ..estimates import Speeds
from . import admin, gone
from .base import Tier
from .device import GpuTier, PinnedTier
from .disk import DiskTier
from .memory import MemoryTier


@dataclass(frozen=True)
class Hit:
    """A found artifact, the name of the tier it came from, and whether its KV may be lent.

    ``lendable``: the artifact was found in a tier that keeps long artifacts in cache-shaped blocks
    (the GPU tier, ``lends_blocks``), not copied up into it just now, so a request may use the block
    as its cache instead of copying the KV (see :meth:`kv_rag.runtime.ModelRuntime.new_cache`).
    Right after a copy-up the block is new and would need new step graphs, which costs more than
    one copy.
    """

    artifact: Artifact
    tier: str
    lendable: bool = False


class Store:
    """Tiers behind one interface. Thread- and process-safety are those of the tiers.

    ``get`` walks the tiers in order and copies a hit into the faster tiers above it; ``put``
    writes through to every tier. ``accept`` (optional) is asked about every found artifact: an
    artifact it rejects is deleted from the tier it came from and the walk goes on (a miss).

    ``signer`` (a :class:`~kv_rag.signing.SigningKey`) signs every artifact ``put`` stores; with
    ``trust`` (a :class:`~kv_rag.signing.TrustPolicy`) every artifact ``get`` finds must pass it: one
    that does not is skipped, *not* deleted (other consumers of a shared tier may trust its
    publisher), and the walk goes on. In-process tiers (memory, pinned, GPU) hold only what this
    store checked or computed: there the signature is checked, the tensors are not hashed again.
    With ``trust`` and no ``signer`` nothing is stored (it would be refused on the next read).
    """

    def __init__(self, tiers: Sequence[Tier], *, signer: Any = None, trust: Any = None) -> None:
        if not tiers:
            raise InputError("a Store needs at least one tier")
        self.tiers: list[Tier] = list(tiers)
        #: signs every artifact :meth:`put` stores (``None``: stored unsigned)
        self.signer = signer
        #: what every artifact :meth:`get` finds must pass (``None``: unsigned artifacts load too)
        self.trust = trust
        #: a check of artifacts found outside the in-process tiers (an engine's ``spot_check``):
        #: returns a reason to drop one, or ``None``
        self.spot_check: Callable[[Artifact], str | None] | None = None
        #: measured load speed of each tier (bytes per second, including checks and copies up)
        self.speeds = Speeds()
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetch_lock = threading.Lock()

    def secure(self, signer: Any = None, trust: Any = None, spot_check: Any = None) -> None:
        """Sign what is stored with ``signer`` and require ``trust`` of what is loaded (an engine's
        ``sign_key`` and ``trust``; ``None`` leaves each as it is). Raises :class:`InputError` when
        this store already signs or trusts otherwise: engines that differ need stores of their own."""
        for name, value in (("signer", signer), ("trust", trust)):
            held = getattr(self, name)
            if value is not None and held is not None and held != value:
                raise InputError(
                    f"this Store already has another {name} (an engine's sign_key/trust): give each engine "
                    "that signs or trusts differently a Store of its own"
                )
        self.signer = signer if signer is not None else self.signer
        self.trust = trust if trust is not None else self.trust
        self.spot_check = spot_check if spot_check is not None else self.spot_check

    @staticmethod
    def check_spec(store: object) -> None:
        """Raise :class:`InputError` naming ``store`` unless it is a Store, a folder, 'memory', a URL or ``None``."""
        if not (store is None or isinstance(store, (Store, str, Path))):
            raise InputError(
                "store must be a kv_rag.Store, a folder, 'memory', a redis:// URL or None (the default store); "
                f"got {type(store).__name__}"
            )

    @classmethod
    def open(
        cls, spec: str | Path | None = None, memory_bytes: int = MEMORY_TIER_BYTES, device: str | None = None
    ) -> Store:
        """A store from a short spec.

        ``None``: memory in front of the default disk folder (``$KV_RAG_HOME/store``);
        ``"memory"``: memory only; ``"redis://host:port/db"`` (or ``rediss://``; ``redis+cluster://host:port``
        for a Redis Cluster, any node): memory, then the
        default disk folder, then that shared Redis (see :class:`~kv_rag.store.redis.RedisTier`);
        any other string or path: memory in front of that disk folder.
        With a CUDA ``device``, "memory" is a :class:`GpuTier` in front of a :class:`PinnedTier`.
        """
        front: list[Tier] = (
            [GpuTier(device=device), PinnedTier()]
            if device is not None and device.startswith("cuda")
            else [MemoryTier(memory_bytes)]
        )
        if spec is not None and str(spec) == "memory":
            return cls(front)
        if isinstance(spec, str) and spec.startswith(
            ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")
        ):
            from .redis import RedisTier

            return cls([*front, DiskTier(default_store_dir()), RedisTier(spec)])
        directory = Path(spec) if spec is not None else default_store_dir()
        if directory.exists() and not directory.is_dir():
            raise InputError(f"--store must be a folder (or 'memory'), got the file {directory}")
        return cls([*front, DiskTier(directory)])

    def get(self, key: str, accept: Callable[[Artifact], str | None] | None = None) -> Hit | None:
        """The first acceptable artifact under ``key``, or ``None``.

        ``accept`` returns ``None`` to accept or a reason string to reject.
        """
        refused = False
        for i, tier in enumerate(self.tiers):
            t0 = time.perf_counter()
            digested = self.trust is not None and hasattr(tier, "get_digested")
            try:  # under trust, the digest a signature covers is taken while the bytes are read
                art, stored = tier.get_digested(key) if digested else (tier.get(key), None)  # type: ignore[attr-defined]
            except OSError as exc:
                _warn_skip(tier, "read", key, exc)
                continue
            if art is None:
                continue
            if self.trust is not None:
                why = self.trust.check(art, tensors=not isinstance(tier, MemoryTier), stored_digest=stored)
                if why is not None and stored is not None and art.checksum() != art.meta.checksum:
                    self._damaged(tier, key, "its tensors fail their checksum")  # damage, not forgery
                    continue
                if why is not None:  # kept: another consumer may trust its publisher
                    refused = True
                    warnings.warn(
                        f"kv-rag: skipping artifact {key[:12]}… in the {tier.name} tier: {why}; it will be recomputed",
                        stacklevel=2,
                    )
                    continue
            if accept is not None:
                why = accept(art)
                if why is None and self.spot_check is not None and not isinstance(tier, MemoryTier):
                    why = self.spot_check(art)  # first use from a tier outside this process
                if why is not None:
                    self._damaged(tier, key, why)
                    continue
            # copy up nearest first; in-process tiers hand on their own copy (pinned -> GPU), and the
            # caller gets the top tier's copy, so nothing is moved twice
            for upper in reversed(self.tiers[:i]):
                self._put_into(upper, key, art)
                if isinstance(upper, MemoryTier):
                    art = upper.get(key) or art
            if i:  # the top tier lends what it holds: nothing to measure
                self.speeds.loaded(tier.name, art.nbytes, time.perf_counter() - t0)
            return Hit(art, tier.name, lendable=bool(getattr(tier, "lends_blocks", False)))
        if refused:
            gone.record(key, "untrusted")
        return None

    def _damaged(self, tier: Tier, key: str, why: str) -> None:
        """Drop ``key`` from ``tier`` as damaged, with a warning."""
        gone.record(key, "damaged")
        warnings.warn(
            f"kv-rag: dropping artifact {key[:12]}… from the {tier.name} tier: {why}; it will be recomputed",
            stacklevel=3,
        )
        self._delete_from(tier, key)

    def prefetch(self, keys: Sequence[str]) -> Future[int]:
        """Copy ``keys`` up into the faster tiers in a background thread (one per store), so that a request
        that comes later finds them there; returns a future of how many were found. Keys in the top
        tier already are skipped; a failure is a warning, as in :meth:`get`."""
        with self._prefetch_lock:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-rag-prefetch")
            return self._prefetcher.submit(self._prefetch, list(keys))

    def _prefetch(self, keys: list[str]) -> int:
        found = 0
        for key in keys:
            if key in self.tiers[0] or self.get(key) is not None:
                found += 1
        return found

    def inspect(self, key: str) -> tuple[Artifact, str]:
        """The artifact under ``key`` in the first tier holding it, and where it was found, read without
        the tiers' own dropping of damaged entries: a damaged artifact raises
        :class:`~kv_rag.errors.ArtifactError` (shown, not deleted); an absent key raises
        :class:`~kv_rag.errors.InputError`. For tools (``kv-rag inspect``), not for requests."""
        for tier in self.tiers:
            raw = getattr(tier, "get_bytes", None)
            if raw is not None:
                data = raw(key)
                if data is None:
                    continue
                try:
                    return decode(data, expect_key=key), f"{tier.name} tier (key)"
                except ArtifactError as exc:
                    raise ArtifactError(
                        f"the artifact in the {tier.name} tier is damaged and would be recomputed: {exc}"
                    ) from exc
            art = tier.get(key)
            if art is not None:
                return art, f"{tier.name} tier (key)"
        names = ", ".join(t.name for t in self.tiers)
        raise InputError(
            f"{key!r} is neither a file nor a key in the store (tiers: {names}); pass --store to choose one"
        )

    def locate(self, key: str) -> str | None:
        """Name of the first tier holding an entry under ``key``, without reading or verifying it
        (``None``: no tier has it). Side-effect free: nothing is copied up. A tier that cannot be
        asked (``OSError``) counts as not holding it."""
        for tier in self.tiers:
            try:
                if key in tier:
                    return tier.name
            except OSError:
                continue
        return None

    def why_missing(self, key: str) -> str:
        """Why no tier holds ``key`` (a :class:`~kv_rag.results.MissReason` value): ``evicted``,
        ``damaged`` or ``untrusted`` when this process saw a tier drop it or this store refuse it
        (see :mod:`kv_rag.store.gone`), else ``absent``."""
        return gone.why(key) or "absent"

    def put(self, key: str, artifact: Artifact, above: str | None = None) -> None:
        """Write ``artifact`` (sealed with its checksum) to every tier, or (``above``) to the tiers in
        front of the tier of that name (one that holds it already: the faster tiers get a copy).

        A tier whose write fails with ``OSError`` (full disk, lost connection) is skipped with a
        warning: the artifact stays in the other tiers and the request goes on. A read-only tier
        (``writable`` false) is skipped silently. With a ``signer`` the artifact is signed first;
        with ``trust`` and no ``signer`` nothing is written (see the class docstring).
        """
        art = artifact if artifact.meta.checksum else artifact.sealed()
        if self.signer is not None:
            art = self.signer.sign(art)
        elif self.trust is not None:
            return
        gone.forget(key)
        for tier in self.tiers:
            if tier.name == above:
                break
            self._put_into(tier, key, art)

    def delete(self, key: str) -> None:
        """Remove ``key`` from every tier (a tier that fails is skipped with a warning)."""
        for tier in self.tiers:
            self._delete_from(tier, key)

    @staticmethod
    def _put_into(tier: Tier, key: str, art: Artifact) -> None:
        if not getattr(tier, "writable", True):  # a read-only folder (it warned once, when opened)
            return
        try:
            tier.put(key, art)
        except OSError as exc:
            _warn_skip(tier, "write", key, exc)

    @staticmethod
    def _delete_from(tier: Tier, key: str) -> None:
        try:
            tier.delete(key)
        except OSError as exc:
            _warn_skip(tier, "delete", key, exc)

    def __contains__(self, key: object) -> bool:
        return any(key in tier for tier in self.tiers)

    # ----------------------------------------------------------------- management (see kv_rag.store.admin)
    def entries(self) -> list[admin.Entry]:
        """Every stored artifact of every tier that can list itself (in-process tiers: this process's), newest first."""
        return admin.entries(self.tiers)

    def usage(self) -> list[admin.TierUsage]:
        """Entries, bytes and the byte limit of each tier."""
        return admin.usage(self.tiers)

    def pin(self, key: str, on: bool = True) -> list[str]:
        """Keep ``key`` from eviction in every tier that holds it (``on=False``: let it go again); returns
        the names of those tiers. Disk pins hold for every process; memory tiers' for this one; Redis
        pins take the key off its TTL."""
        return admin.pin(self.tiers, key, on)

    def prune(self, older_than_s: float) -> int:
        """Delete what was stored more than ``older_than_s`` seconds ago (never a pinned entry); returns
        how many entries went."""
        return admin.prune(self.tiers, older_than_s)

    def clear(self) -> int:
        """Delete everything in every tier; returns how many entries there were."""
        return admin.clear(self.tiers)

    @property
    def durable(self) -> Tier:
        """The last tier: the one that keeps artifacts longest (disk or Redis; memory for a memory-only store)."""
        return self.tiers[-1]

    def tier(self, name: str) -> Tier:
        """The tier called ``name``."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r}; tiers: {[t.name for t in self.tiers]}")


def _warn_skip(tier: Tier, op: str, key: str, exc: OSError) -> None:
    warnings.warn(
        f"kv-rag: the {tier.name} tier could not {op} {key[:12]}… ({type(exc).__name__}: {exc}); skipped it",
        stacklevel=4,
    )
