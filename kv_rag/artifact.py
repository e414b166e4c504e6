"""One document's KV cache: per-layer tensors plus metadata, serialized as safetensors.

The checksum (xxh3-128 over every tensor's bytes, in a fixed order) is written into the metadata
and verified by :meth:`Artifact.from_bytes`; a mismatch, a truncated file, another format version
or a missing field raises :class:`~kv_rag.errors.ArtifactError`, which callers treat as a miss.
The checksum finds damage, not forgery: anyone can re-seal it. A publisher's signature
(:mod:`kv_rag.signing`) is kept apart in the safetensors header (``kv_rag_sig``), so kv-rag versions
that predate signing still read signed artifacts, and unsigned artifacts read as before.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ArtifactError

FORMAT_VERSION = 1
_META_KEY = "kv_rag"
_SIG_KEY = "kv_rag_sig"
#: The metadata fields a signature adds (:mod:`kv_rag.signing`), stored under their own header entry.
SIGNATURE_FIELDS = ("signer", "signature", "tensor_digest")


@dataclass(frozen=True)
class ArtifactMeta:
    """What an artifact is: which model and tokenizer computed it, for which tokens, at which position."""

    key: str
    model_digest: str
    tokenizer_digest: str
    tokens_digest: str
    num_tokens: int
    start: int
    parent: str
    dtype: str
    model: dict[str, Any]
    rope: dict[str, Any]
    checksum: str = ""
    source: str = ""
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION
    #: the publisher's Ed25519 public key (raw, base64); empty: unsigned (see :mod:`kv_rag.signing`)
    signer: str = ""
    #: the publisher's signature (base64) over the tensor digest and the fields that place the KV
    signature: str = ""
    #: cryptographic digest of the tensors as stored (``blake3:<hex>``, :mod:`kv_rag.digest`), covered by the signature
    tensor_digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)

    @property
    def signed(self) -> bool:
        """Whether a publisher signed it (whether the signature holds: :class:`~kv_rag.signing.TrustPolicy`)."""
        return bool(self.signature)

    def header(self) -> dict[str, str]:
        """The safetensors header entries of this metadata: the signature, if any, under its own key."""
        core = {k: v for k, v in self.to_dict().items() if k not in SIGNATURE_FIELDS}
        out = {_META_KEY: json.dumps(core, sort_keys=True)}
        if self.signed:
            out[_SIG_KEY] = json.dumps({k: getattr(self, k) for k in SIGNATURE_FIELDS}, sort_keys=True)
        return out


@dataclass(frozen=True)
class Artifact:
    """Per-layer keys and values, each ``[kv_heads, tokens, head_dim]``, the token ids, and metadata."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor
    meta: ArtifactMeta

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.token_ids))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under their stored names: ``token_ids``, ``k.<layer>``, ``v.<layer>``."""
        return self._tensors()

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"token_ids": self.token_ids}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[f"k.{i}"] = k
            out[f"v.{i}"] = v
        return out

    def checksum(self) -> str:
        """xxh3-128 over every tensor's bytes in a fixed order."""
        return _checksum(self._tensors())

    def sealed(self) -> Artifact:
        """A copy whose metadata carries the tensors' checksum."""
        return replace(self, meta=replace(self.meta, checksum=self.checksum()))

    def to_bytes(self) -> bytes:
        """Safetensors bytes with the metadata (and checksum) in the header."""
        art = self if self.meta.checksum else self.sealed()
        tensors = {name: t.detach().contiguous().cpu() for name, t in art._tensors().items()}
        return st_save(tensors, metadata=art.meta.header())

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, expect_key: str | None = None, checksum: bool = True
    ) -> Artifact:
        """Parse and verify bytes written by :meth:`to_bytes`.

        Raises :class:`ArtifactError` (a miss) on truncation, a bad checksum, a foreign format
        or a key other than ``expect_key``. ``checksum=False`` leaves the checksum to the caller, who
        verifies the tensors otherwise (a signature's digest of the same bytes).
        """
        try:
            header = _read_header(data)
            raw = json.loads(_kv_rag_meta(header))
            raw.update(_signature_fields(header))
            tensors = _load_tensors(data, header)
        except ArtifactError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged input
            raise ArtifactError(f"artifact cannot be parsed ({type(exc).__name__}: {exc})") from exc
        if raw.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {raw.get('format_version')!r}, this kv-rag reads {FORMAT_VERSION}"
            )
        try:
            meta = ArtifactMeta(**raw)
            n_layers = sum(1 for name in tensors if name.startswith("k."))
            keys = tuple(tensors[f"k.{i}"] for i in range(n_layers))
            values = tuple(tensors[f"v.{i}"] for i in range(n_layers))
            token_ids = tensors["token_ids"]
        except (TypeError, KeyError) as exc:
            raise ArtifactError(f"artifact metadata or tensors incomplete: {exc}") from exc
        if expect_key is not None and meta.key != expect_key:
            raise ArtifactError(f"artifact holds key {meta.key[:12]}…, expected {expect_key[:12]}…")
        actual = _checksum(tensors) if checksum else meta.checksum
        if actual != meta.checksum:
            raise ArtifactError(f"artifact checksum mismatch: stored {meta.checksum}, computed {actual}")
        if int(token_ids.numel()) != meta.num_tokens or any(k.shape[-2] != meta.num_tokens for k in keys):
            raise ArtifactError("artifact tensor shapes do not match its token count")
        return cls(keys=keys, values=values, token_ids=token_ids, meta=meta)


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON header of safetensors ``data`` (``ArtifactError``/``ValueError`` when it is cut short)."""
    if len(data) < 8:
        raise ArtifactError("artifact shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("safetensors header runs past the end of the data")
    header = json.loads(bytes(data[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header


def _load_tensors(data: bytes | bytearray | memoryview, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``data`` (whose parsed ``header`` is given): views of it when it
    is a writable buffer (``bytearray`` or a writable ``memoryview``: a disk read lands once in
    memory), copies when it is immutable ``bytes``.

    Raises ``ValueError`` (or ``KeyError``/``json`` errors) on a malformed or truncated file.
    """
    if isinstance(data, memoryview) and data.readonly:
        data = data.tobytes()
    if not isinstance(data, bytearray | memoryview):
        return st_load(bytes(data))
    base = 8 + int.from_bytes(data[:8], "little")
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        start, end = (int(x) for x in info["data_offsets"])
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end or base + end > len(data) or numel * itemsize != end - start:
            raise ValueError(f"tensor {name!r} lies outside the data or has the wrong size")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start).view(shape)
    return out


def _kv_rag_meta(header: dict[str, Any]) -> str:
    """The kv-rag metadata string of a parsed safetensors header (``ArtifactError`` when absent)."""
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise ArtifactError("not a kv-rag artifact (no kv_rag metadata)")
    return str(meta[_META_KEY])


def _signature_fields(header: dict[str, Any]) -> dict[str, str]:
    """The signature fields of a parsed safetensors header (none when unsigned)."""
    sig = (header.get("__metadata__") or {}).get(_SIG_KEY)
    if sig is None:
        return {}
    fields = json.loads(sig)
    return {k: str(fields.get(k, "")) for k in SIGNATURE_FIELDS}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = xxhash.xxh3_128()
    names = ["token_ids", *sorted((n for n in tensors if n != "token_ids"), key=lambda n: (int(n.split(".")[1]), n[0]))]
    for name in names:
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()
