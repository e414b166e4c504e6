"""Tenants: artifacts keyed with a tenant's secret, so tenants sharing a store never share KV by accident.

A plain artifact key is a sha256 over public inputs (model, tokenizer, the text before, the
document's ids): anyone who can read a shared store can compute the key of a guessed document and
see whether someone used it, and anyone who can write it can plant KV under it. With a
:class:`Tenant`, every key the engine derives is ``HMAC(secret, key)``: another tenant (or someone
without the secret) computes other keys, so one tenant's artifacts are never a hit for another in
any tier (memory, GPU, pinned, disk, Redis), and cannot be looked for from outside.

The tenant is set by the deployment (``Engine(tenant=...)``, the integrations' ``tenant`` field,
``kv-rag --tenant NAME`` with the secret in ``$KV_RAG_TENANT_SECRET``), never by a request's caller.
Documents published with ``public=True`` are shared on purpose: in exact mode, a chain whose
documents are all public keeps its plain keys (the text before them too), so every tenant and
tenant-less engine loads them. Everything after a private document is the tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

from .errors import InputError

#: Environment variable holding the tenant secret for ``Tenant.from_env`` and ``kv-rag --tenant``.
SECRET_ENV = "KV_RAG_TENANT_SECRET"

#: Fewest secret bytes accepted.
MIN_SECRET_BYTES = 16

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Tenant:
    """A tenant: a ``name`` (reports, logs) and a ``secret`` (at least 16 bytes) that keys its artifacts."""

    name: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InputError(f"tenant name must be 1-64 letters, digits, '_', '.' or '-'; got {self.name!r}")
        secret = self.secret.encode() if isinstance(self.secret, str) else self.secret
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise InputError(f"tenant secret must be at least {MIN_SECRET_BYTES} bytes (a random string, say)")
        object.__setattr__(self, "secret", secret)

    @classmethod
    def from_env(cls, name: str, variable: str = SECRET_ENV) -> Tenant:
        """The tenant ``name`` with the secret in the environment variable ``variable``."""
        secret = os.environ.get(variable, "")
        if not secret:
            raise InputError(f"tenant {name!r}: set its secret in ${variable} (at least {MIN_SECRET_BYTES} bytes)")
        return cls(name, secret.encode())

    @property
    def scope(self) -> str:
        """A name for the tenant's own in-process memos (derived from the secret, so unique to it)."""
        return self.derive("memo")[:16]

    def derive(self, key: str) -> str:
        """The tenant's key for the plain artifact key ``key``."""
        msg = f"kv-rag/tenant/1|{self.name}|{key}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()


def tenant_of(value: object) -> Tenant | None:
    """``value`` as a tenant: a :class:`Tenant`, a name (secret from :data:`SECRET_ENV`) or ``None``."""
    if value is None or isinstance(value, Tenant):
        return value
    if isinstance(value, str):
        return Tenant.from_env(value)
    raise InputError(f"tenant must be a kv_rag.Tenant, a tenant name or None; got {type(value).__name__}")
