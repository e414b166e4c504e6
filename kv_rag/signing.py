"""Signed artifacts: a publisher's Ed25519 signature over what an artifact's KV is, and who is trusted.

A checksum finds damage, not forgery (anyone can re-seal it). A :class:`SigningKey` signs each
artifact a publisher stores; a :class:`TrustPolicy` loads only artifacts signed by a trusted key,
intact. What the signature covers: :func:`signed_message` and :func:`tensor_digest`; key files, the
refusals and what they cost: docs/store.md. Needs ``cryptography`` (``pip install 'kv-rag[sign]'``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import digest
from .artifact import Artifact, ArtifactMeta
from .errors import InputError

__all__ = ["SIGNED_FIELDS", "PublisherKey", "SigningKey", "TrustPolicy", "signed_message", "tensor_digest"]

#: The metadata fields a signature covers (with ``tensor_digest``, the tensors themselves).
SIGNED_FIELDS: tuple[str, ...] = ("key", "parent", "model_digest", "tokenizer_digest", "tokens_digest", "dtype")
SIGNED_FIELDS += ("start", "num_tokens", "tensor_digest")
#: Why :meth:`TrustPolicy.check` refuses an artifact.
UNSIGNED, UNTRUSTED_KEY, TAMPERED = "unsigned", "signed by an untrusted key", "tampered after signing"

_DOMAIN = b"kv-rag artifact signature v1\n"


def _crypto() -> tuple[Any, Any]:
    """cryptography's ``ed25519`` and ``serialization`` modules, or an :class:`InputError` saying how to install it."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise InputError("signed artifacts need cryptography: pip install 'kv-rag[sign]' (or cryptography)") from None
    return ed25519, serialization


def _tensor_sha(item: tuple[str, torch.Tensor]) -> bytes:
    name, t = item
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)  # hashlib releases the GIL on large buffers
    return h.digest()


def _sha256_digest(artifact: Artifact) -> str:
    """The first kind of digest (``sha256:``, kv-rag 0.1 signatures): each tensor's name, dtype, shape
    and bytes hashed alone, then their digests in order. Still verified; no longer written."""
    layers = (("k", artifact.keys), ("v", artifact.values))
    items = [("token_ids", artifact.token_ids), *((f"{n}.{i}", t) for n, ts in layers for i, t in enumerate(ts))]
    n = min(4, os.cpu_count() or 1) if artifact.nbytes >= 8 << 20 else 1
    if n > 1:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="kv-rag-digest") as pool:
            parts = list(pool.map(_tensor_sha, items))
    else:
        parts = [_tensor_sha(item) for item in items]
    return "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()


def tensor_digest(artifact: Artifact) -> str:
    """``blake3:<hex>``: the digest (:mod:`kv_rag.digest`) of ``artifact``'s tensors as they are stored
    (a tier that reads stored bytes computes it while reading)."""
    return digest.of_tensors(artifact.named_tensors())


def _digest_like(artifact: Artifact, recorded: str) -> str:
    """``artifact``'s digest of the kind ``recorded`` is."""
    return _sha256_digest(artifact) if recorded.startswith("sha256:") else tensor_digest(artifact)


def signed_message(meta: ArtifactMeta) -> bytes:
    """The bytes a publisher signs: a fixed prefix and the JSON of :data:`SIGNED_FIELDS` of ``meta``."""
    fields = {name: getattr(meta, name) for name in SIGNED_FIELDS}
    return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _read(path: str | Path) -> tuple[bytes, bytes | None]:
    """A key file's bytes, and the 32 raw key bytes when it holds them in base64."""
    try:
        data = Path(path).read_bytes()
        return data, _raw_b64(data)
    except OSError as exc:
        raise InputError(f"cannot read the key file {path} ({exc.strerror or exc})") from None


def _raw_b64(data: bytes) -> bytes | None:
    """32 raw key bytes from base64 text, or ``None`` when ``data`` is not that."""
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except ValueError:  # binascii.Error
        return None
    return raw if len(raw) == 32 else None


@dataclass(frozen=True)
class PublisherKey:
    """A publisher's Ed25519 public key (32 raw bytes): what a consumer trusts."""

    raw: bytes

    @classmethod
    def load(cls, path: str | Path) -> PublisherKey:
        """The public key in the file ``path``: PEM (a private key's file gives its public half) or base64
        of the 32 raw bytes. Raises :class:`InputError` naming the file."""
        data, raw = _read(path)
        if raw is not None:
            return cls(raw)
        ed25519, ser = _crypto()
        for loader in (ser.load_pem_public_key, lambda d: ser.load_pem_private_key(d, password=None).public_key()):
            try:
                key = loader(data)
            except Exception:  # not PEM, encrypted, or an algorithm cryptography does not support
                continue
            if isinstance(key, ed25519.Ed25519PublicKey):
                return cls(key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))
        raise InputError(f"the key file {path} holds no Ed25519 public key (PEM or base64; kv-rag keygen writes one)")

    @property
    def b64(self) -> str:
        """The raw key in base64 (as ``ArtifactMeta.signer`` holds it)."""
        return base64.b64encode(self.raw).decode()

    def verify(self, message: bytes, signature: str) -> bool:
        """Whether ``signature`` (base64) is this key's signature of ``message``."""
        ed25519 = _crypto()[0]
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(
                base64.b64decode(signature, validate=True), message
            )
        except Exception:  # not base64, or cryptography's InvalidSignature
            return False
        return True


class SigningKey:
    """A publisher's Ed25519 private key: signs artifacts (:meth:`sign`). Keep its file private."""

    def __init__(self, private: Any) -> None:
        """Wrap a ``cryptography`` ``Ed25519PrivateKey`` (see :meth:`generate` and :meth:`load`)."""
        ser = _crypto()[1]
        self._private = private
        #: the public half, for consumers to trust
        self.public_key = PublisherKey(private.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(_crypto()[0].Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        """The private key in the file ``path`` (unencrypted PKCS#8 PEM, or base64 of the 32-byte seed)."""
        data, raw = _read(path)
        ed25519, ser = _crypto()
        try:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(raw) if raw else ser.load_pem_private_key(data, None)
        except Exception:  # not PEM, encrypted, or an algorithm cryptography does not support
            key = None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise InputError(f"the key file {path} holds no unencrypted Ed25519 private key (kv-rag keygen makes one)")
        return cls(key)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the private key to ``path`` (PKCS#8 PEM, mode 0600) and the public key to ``path.pub``
        (PEM); returns the latter. An existing ``path`` is an :class:`InputError` unless ``overwrite``."""
        _, ser = _crypto()
        path = Path(path)
        pem = self._private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL), 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # an overwritten file keeps its mode otherwise
                f.write(pem)
            pub = path.with_name(path.name + ".pub")
            pub.write_bytes(
                self._private.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
            )
        except FileExistsError:
            raise InputError(f"{path} exists: remove it or choose another name (a key is not overwritten)") from None
        except OSError as exc:
            raise InputError(f"cannot write the key file {exc.filename or path} ({exc.strerror or exc})") from None
        return pub

    def sign(self, artifact: Artifact) -> Artifact:
        """A copy of ``artifact`` (sealed) whose metadata carries this key, the tensor digest and the signature."""
        art = artifact if artifact.meta.checksum else artifact.sealed()
        meta = replace(art.meta, signer=self.public_key.b64, tensor_digest=tensor_digest(art), signature="")
        signature = self._private.sign(signed_message(meta))
        return replace(art, meta=replace(meta, signature=base64.b64encode(signature).decode()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SigningKey) and other.public_key == self.public_key


class TrustPolicy:
    """The publishers whose artifacts a consumer loads: an artifact must be signed by one of ``trusted``
    (:class:`PublisherKey`, :class:`SigningKey`, a key file, or a list of them), signature and tensors intact."""

    def __init__(self, trusted: Any) -> None:
        keys: set[bytes] = set()
        todo: list[Any] = [trusted]
        while todo:
            item = todo.pop()
            if isinstance(item, (SigningKey, PublisherKey, str, Path)):
                key = item.public_key if isinstance(item, SigningKey) else item
                keys.add((key if isinstance(key, PublisherKey) else PublisherKey.load(key)).raw)
            elif isinstance(item, (TrustPolicy, Iterable)):
                todo += [PublisherKey(k) for k in item.keys] if isinstance(item, TrustPolicy) else list(item)
            else:
                raise InputError(f"trust takes public keys or key files (or a list); got {type(item).__name__}")
        if not keys:
            raise InputError("trust needs at least one public key (a .pub file that kv-rag keygen wrote)")
        #: the trusted public keys (raw bytes)
        self.keys: frozenset[bytes] = frozenset(keys)

    def check(self, artifact: Artifact, tensors: bool = True, stored_digest: str | None = None) -> str | None:
        """``None`` when ``artifact`` may be loaded, else why not: ``"unsigned"``, ``"signed by an untrusted
        key"`` or ``"tampered after signing"`` (signature invalid, or the tensors no longer match its digest).

        ``tensors=False`` leaves out hashing the tensors (for tensors held in this process since they were
        checked or computed); the signature over the metadata and the recorded digest is checked all the same.
        ``stored_digest``: the digest of the stored bytes ``artifact`` was decoded from, computed while a
        tier read them (:class:`kv_rag.digest.ReadHasher`); it stands for hashing the tensors again.
        """
        m = artifact.meta
        if not m.signature:
            return UNSIGNED
        raw = _raw_b64(m.signer.encode())
        if raw is None or raw not in self.keys:
            return UNTRUSTED_KEY
        if not PublisherKey(raw).verify(signed_message(m), m.signature):
            return TAMPERED
        if not tensors:
            return None
        if stored_digest is not None and m.tensor_digest.startswith(digest.PREFIX):
            return None if stored_digest == m.tensor_digest else TAMPERED
        if _digest_like(artifact, m.tensor_digest) != m.tensor_digest:
            return TAMPERED
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustPolicy) and other.keys == self.keys


def signer_of(spec: SigningKey | str | Path | None) -> SigningKey | None:
    """``Engine(sign_key=...)``: a :class:`SigningKey`, a key file, or ``None``."""
    if spec is None or isinstance(spec, SigningKey):
        return spec
    if isinstance(spec, (str, Path)):
        return SigningKey.load(spec)
    raise InputError(f"sign_key must be a kv_rag.SigningKey or a key file; got {type(spec).__name__}")


def trust_of(spec: Any, own: SigningKey | None = None) -> TrustPolicy | None:
    """``Engine(trust=...)``: ``None``, or a :class:`TrustPolicy` of ``spec`` (what it takes) and ``own``
    (the engine's signing key: what the engine signed, it loads)."""
    return None if spec is None else TrustPolicy([spec, own] if own is not None else spec)
