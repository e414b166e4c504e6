"""Artifact codecs for the disk tier: lossless zstd over byte planes, and an opt-in lossy int8.

A codec turns an artifact's safetensors bytes (:meth:`~kv_rag.artifact.Artifact.to_bytes`) into
stored bytes and back. Stored bytes start with a 4-byte magic, so a folder may hold entries
written with different codecs and :func:`decode` reads them all:

- ``"none"``: the safetensors bytes as they are (no magic).
- ``"zstd"`` (lossless, needs the ``zstandard`` package: ``pip install kv-rag[zstd]``): the
  safetensors header is kept as is; the tensor bytes are split into byte planes (byte 0 of every
  element, then byte 1, …) and the result is compressed with zstd. The exponent planes of float
  values compress well, the low mantissa planes hardly at all. The artifact's own checksum is
  verified after decoding, as for uncompressed entries.
- ``"int8"`` (lossy, opt-in): keys and values quantized to int8 with one float32 scale per
  (head, token) row (absmax / 127); about 0.27x the float32 size. Decoding dequantizes to the
  artifact's dtype and re-seals the artifact, so the returned KV is *not* the computed KV: answers
  may differ from a full prefill (the benchmark reports how often greedy tokens agree). The stored
  bytes carry an xxh3-64 checksum of their own, verified before decoding. A publisher's signature
  is not kept (it covers the computed KV, not the quantized one): int8 entries read as unsigned.

Any damage (bad magic payload, truncated frame, checksum mismatch) raises
:class:`~kv_rag.errors.ArtifactError`, which the disk tier treats as a miss.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .artifact import SIGNATURE_FIELDS, Artifact, ArtifactMeta
from .errors import ArtifactError, InputError

#: Codec names accepted by :func:`encode` and by ``DiskTier(codec=...)``.
CODECS = ("none", "zstd", "int8")

MAGIC_ZSTD = b"KVZ1"
MAGIC_INT8 = b"KVQ8"
_ZSTD_HEAD = struct.Struct("<4sBQQ")  # magic, plane width, safetensors header length, body length
_INT8_HEAD = struct.Struct("<4sQ")  # magic, xxh3-64 of the rest
_DTYPE_WIDTH = {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


def check_codec(name: str) -> str:
    """``name`` if it is a known codec, else :class:`InputError` listing the known ones."""
    if name not in CODECS:
        raise InputError(f"codec must be one of {', '.join(CODECS)}; got {name!r}")
    if name == "zstd":
        _zstd()
    return name


def encode(artifact: Artifact, codec: str = "none", level: int = 3) -> bytes:
    """The stored bytes of ``artifact`` under ``codec`` (see the module docstring)."""
    check_codec(codec)
    if codec == "int8":
        return encode_int8(artifact)
    data = artifact.to_bytes()
    return compress(data, level) if codec == "zstd" else data


def decode(data: bytes | bytearray | memoryview, expect_key: str | None = None, checksum: bool = True) -> Artifact:
    """The artifact held by stored bytes written with any codec. Raises :class:`ArtifactError` on damage.
    ``checksum=False``: see :meth:`Artifact.from_bytes` (plain safetensors only; the others check theirs)."""
    magic = bytes(data[:4])
    if magic == MAGIC_INT8:
        return decode_int8(data, expect_key)
    if magic == MAGIC_ZSTD:
        return Artifact.from_bytes(decompress(data), expect_key=expect_key)
    return Artifact.from_bytes(data, expect_key=expect_key, checksum=checksum)


def codec_of(data: bytes) -> str:
    """Which codec wrote ``data`` (by its magic)."""
    magic = bytes(data[:4])
    return {MAGIC_ZSTD: "zstd", MAGIC_INT8: "int8"}.get(magic, "none")


# ----------------------------------------------------------------------------- lossless
def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise InputError(
            "the zstd codec needs the zstandard package: pip install 'kv-rag[zstd]' (or zstandard)"
        ) from None
    return zstandard


def _plane_width(header: dict[str, Any]) -> int:
    widths = {_DTYPE_WIDTH.get(str(v.get("dtype")), 1) for k, v in header.items() if k != "__metadata__"}
    # the KV tensors dominate; token ids (I32) are few. Use the narrowest float width present.
    floats = {_DTYPE_WIDTH[str(v["dtype"])] for k, v in header.items() if k != "__metadata__" and k != "token_ids"}
    return min(floats or widths or {1})


def split_planes(body: bytes | memoryview, width: int) -> bytes:
    """Byte planes of ``body`` read as ``width``-byte elements (a trailing remainder stays last, as is)."""
    n = len(body) // width
    arr = np.frombuffer(body, dtype=np.uint8, count=n * width)
    planes = arr.reshape(n, width).T.tobytes()
    return planes + bytes(body[n * width :])


def join_planes(planes: bytes | memoryview, width: int) -> bytes:
    """Inverse of :func:`split_planes`."""
    n = len(planes) // width
    arr = np.frombuffer(planes, dtype=np.uint8, count=n * width)
    return arr.reshape(width, n).T.tobytes() + bytes(planes[n * width :])


def compress(data: bytes, level: int = 3) -> bytes:
    """zstd over byte planes of safetensors bytes (lossless; :func:`decompress` undoes it)."""
    zstd = _zstd()
    if len(data) < 8:
        raise ArtifactError("not safetensors bytes: shorter than a header")
    hlen = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:hlen])
    width = _plane_width(header)
    body = memoryview(data)[hlen:]
    payload = bytes(data[:hlen]) + split_planes(body, width)
    frame = zstd.ZstdCompressor(level=level, write_checksum=True, threads=-1).compress(payload)
    return _ZSTD_HEAD.pack(MAGIC_ZSTD, width, hlen, len(body)) + frame


def decompress(data: bytes | bytearray | memoryview) -> bytes:
    """Safetensors bytes from :func:`compress` output. Raises :class:`ArtifactError` on damage."""
    zstd = _zstd()
    try:
        magic, width, hlen, blen = _ZSTD_HEAD.unpack_from(data)
        if magic != MAGIC_ZSTD or width < 1:
            raise ArtifactError("not a zstd-coded artifact")
        payload = zstd.ZstdDecompressor().decompress(memoryview(data)[_ZSTD_HEAD.size :], max_output_size=hlen + blen)
    except ArtifactError:
        raise
    except Exception as exc:  # zstandard.ZstdError, struct.error
        raise ArtifactError(f"zstd-coded artifact cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if len(payload) != hlen + blen:
        raise ArtifactError(f"zstd-coded artifact decodes to {len(payload)} bytes, expected {hlen + blen}")
    view = memoryview(payload)
    return bytes(view[:hlen]) + join_planes(view[hlen:], width)


# ----------------------------------------------------------------------------- lossy int8
def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 values and one float32 scale per row of the last dimension (absmax / 127)."""
    x = t.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int8` (up to rounding)."""
    return (q.float() * scale).to(dtype)


def encode_int8(artifact: Artifact) -> bytes:
    """Lossy int8 stored bytes of ``artifact`` (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {"token_ids": artifact.token_ids.contiguous()}
    for i, (k, v) in enumerate(zip(artifact.keys, artifact.values, strict=True)):
        for name, t in (("k", k), ("v", v)):
            q, s = quantize_int8(t.detach().cpu())
            tensors[f"{name}.{i}.q"] = q.contiguous()
            tensors[f"{name}.{i}.s"] = s.contiguous()
    meta = json.dumps({k: v for k, v in artifact.meta.to_dict().items() if k not in SIGNATURE_FIELDS}, sort_keys=True)
    body = st_save(tensors, metadata={"kv_rag_int8": meta})
    return _INT8_HEAD.pack(MAGIC_INT8, xxhash.xxh3_64_intdigest(body)) + body


def decode_int8(data: bytes | bytearray | memoryview, expect_key: str | None = None) -> Artifact:
    """The (dequantized) artifact held by :func:`encode_int8` bytes. Raises :class:`ArtifactError` on damage."""
    try:
        magic, digest = _INT8_HEAD.unpack_from(data)
    except Exception as exc:
        raise ArtifactError(f"int8 artifact too short ({exc})") from exc
    body = memoryview(data)[_INT8_HEAD.size :]
    if magic != MAGIC_INT8 or xxhash.xxh3_64_intdigest(body) != digest:
        raise ArtifactError("int8 artifact checksum mismatch")
    try:
        raw = bytes(body)
        tensors = st_load(raw)
        hlen = int.from_bytes(raw[:8], "little")
        meta = ArtifactMeta(**json.loads(json.loads(raw[8 : 8 + hlen])["__metadata__"]["kv_rag_int8"]))
        n_layers = sum(1 for name in tensors if name.startswith("k.") and name.endswith(".q"))
        dtype = getattr(torch, meta.dtype.removeprefix("torch."))
        keys = tuple(dequantize_int8(tensors[f"k.{i}.q"], tensors[f"k.{i}.s"], dtype) for i in range(n_layers))
        values = tuple(dequantize_int8(tensors[f"v.{i}.q"], tensors[f"v.{i}.s"], dtype) for i in range(n_layers))
        token_ids = tensors["token_ids"]
    except Exception as exc:  # safetensors, json and KeyError/TypeError for a foreign payload
        raise ArtifactError(f"int8 artifact cannot be parsed ({type(exc).__name__}: {exc})") from exc
    if expect_key is not None and meta.key != expect_key:
        raise ArtifactError(f"artifact holds key {meta.key[:12]}…, expected {expect_key[:12]}…")
    if int(token_ids.numel()) != meta.num_tokens or any(k.shape[-2] != meta.num_tokens for k in keys):
        raise ArtifactError("artifact tensor shapes do not match its token count")
    art = Artifact(keys=keys, values=values, token_ids=token_ids, meta=replace(meta, checksum=""))
    return art.sealed()
