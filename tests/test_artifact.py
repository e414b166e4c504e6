"""Artifacts: round trip, and every kind of damage is detected as an ArtifactError (a miss)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save as st_save

from kv_rag import Artifact, ArtifactError, ArtifactMeta


def make_artifact(n: int = 5, layers: int = 2, dtype: torch.dtype = torch.float32) -> Artifact:
    g = torch.Generator().manual_seed(0)
    meta = ArtifactMeta(
        key="k" * 64,
        model_digest="m",
        tokenizer_digest="t",
        tokens_digest="d",
        num_tokens=n,
        start=3,
        parent="",
        dtype=str(dtype),
        model={"architecture": "X"},
        rope={"rope_type": "default"},
    )
    keys = tuple(torch.randn(2, n, 4, generator=g).to(dtype) for _ in range(layers))
    values = tuple(torch.randn(2, n, 4, generator=g).to(dtype) for _ in range(layers))
    return Artifact(keys, values, torch.arange(n, dtype=torch.int32), meta).sealed()


def _as(kind: str, data: bytes) -> bytes | bytearray | memoryview:
    """``data`` as the disk tier (writable memoryview), a caller (bytes) or a bytearray would pass it."""
    if kind == "memoryview":
        return memoryview(bytearray(data))
    return bytearray(data) if kind == "bytearray" else data


KINDS = ["bytes", "bytearray", "memoryview"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype: torch.dtype, kind: str) -> None:
    art = make_artifact(dtype=dtype)
    back = Artifact.from_bytes(_as(kind, art.to_bytes()), expect_key=art.meta.key)
    assert back.meta == art.meta
    for a, b in zip((*art.keys, *art.values), (*back.keys, *back.values), strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    assert torch.equal(back.token_ids, art.token_ids)


def test_flipped_tensor_byte_is_caught() -> None:
    data = bytearray(make_artifact().to_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes
    with pytest.raises(ArtifactError, match="checksum"):
        Artifact.from_bytes(bytes(data))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_bytes_are_caught(keep: int, kind: str) -> None:
    data = make_artifact().to_bytes()
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(_as(kind, data[:keep] if keep >= 0 else data[:-1]))


def test_bytearray_is_read_without_copying() -> None:
    """A disk read lands in a bytearray once; the artifact's tensors are views of it."""
    data = bytearray(make_artifact(n=64).to_bytes())
    back = Artifact.from_bytes(data)
    lo = memoryview(data).cast("B")
    addr = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for t in (*back.keys, *back.values):
        assert addr <= t.data_ptr() < addr + len(lo)
    data[-3] ^= 0x40  # the views see later changes to the buffer: the checksum then catches them
    with pytest.raises(ArtifactError, match="checksum"):
        Artifact.from_bytes(data)


def test_foreign_bytes_are_caught() -> None:
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(b"not a safetensors file at all" * 10)
    plain = st_save({"x": torch.zeros(3)})
    with pytest.raises(ArtifactError, match="not a kv-rag artifact"):
        Artifact.from_bytes(plain)


def test_other_format_version_and_wrong_key_are_caught() -> None:
    art = make_artifact()
    newer = dataclasses.replace(art, meta=dataclasses.replace(art.meta, format_version=99))
    with pytest.raises(ArtifactError, match="format version"):
        Artifact.from_bytes(newer.to_bytes())
    with pytest.raises(ArtifactError, match="expected"):
        Artifact.from_bytes(art.to_bytes(), expect_key="other")


def test_tampered_values_with_stale_checksum_are_caught() -> None:
    art = make_artifact()
    bad_keys = (art.keys[0] * 1.01, *art.keys[1:])
    tampered = dataclasses.replace(art, keys=bad_keys)  # keeps the old checksum in meta
    with pytest.raises(ArtifactError, match="checksum"):
        Artifact.from_bytes(tampered.to_bytes())
