"""Artifact codecs: zstd is lossless and byte-exact, int8 is close and smaller, damage is a miss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_artifact import make_artifact

from kv_rag import Artifact, ArtifactError, DiskTier, InputError, codec


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [0, 1, 7, 64, 1001])
def test_byte_planes_round_trip(width: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    planes = codec.split_planes(data, width)
    assert len(planes) == len(data)
    assert codec.join_planes(planes, width) == data


def test_byte_planes_group_bytes_by_position() -> None:
    data = bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert codec.split_planes(data, 4) == bytes([1, 5, 2, 6, 3, 7, 4, 8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zstd_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    art = make_artifact(n=50, layers=3, dtype=dtype)
    data = codec.encode(art, "zstd")
    assert codec.codec_of(data) == "zstd"
    back = codec.decode(data, expect_key=art.meta.key)
    assert back.meta == art.meta
    for a, b in zip((*art.keys, *art.values), (*back.keys, *back.values), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert codec.decompress(data) == art.to_bytes()


def test_zstd_compresses_smooth_values() -> None:
    art = make_artifact(n=400, layers=2)
    smooth = type(art)(tuple(torch.zeros_like(k) + 0.5 for k in art.keys), art.values, art.token_ids, art.meta).sealed()
    assert len(codec.encode(smooth, "zstd")) < 0.8 * len(smooth.to_bytes())


def _wide(n: int, head_dim: int = 64) -> Artifact:
    """An artifact with a realistic head size (the int8 scale is one float per row of head_dim values)."""
    art = make_artifact(n=n, layers=2)
    g = torch.Generator().manual_seed(1)
    keys = tuple(torch.randn(2, n, head_dim, generator=g) for _ in art.keys)
    values = tuple(torch.randn(2, n, head_dim, generator=g) for _ in art.values)
    return Artifact(keys, values, art.token_ids, art.meta).sealed()


def test_int8_is_close_smaller_and_resealed() -> None:
    art = _wide(200)
    data = codec.encode(art, "int8")
    assert codec.codec_of(data) == "int8"
    assert len(data) < 0.3 * len(art.to_bytes())
    back = codec.decode(data, expect_key=art.meta.key)
    for a, b in zip((*art.keys, *art.values), (*back.keys, *back.values), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        # absmax/127 per row: the error is at most half a step of the row's scale
        step = a.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((a - b).abs() <= step / 2 + 1e-7).all())
        assert not torch.equal(a, b)
    assert back.meta.checksum == back.checksum() != art.meta.checksum
    assert torch.equal(back.token_ids, art.token_ids)


@pytest.mark.parametrize("name", ["zstd", "int8"])
@pytest.mark.parametrize("where", [10, -5])
def test_damaged_coded_bytes_are_an_artifact_error(name: str, where: int) -> None:
    data = bytearray(codec.encode(make_artifact(n=60), name))
    data[where] ^= 0x5A
    with pytest.raises(ArtifactError):
        codec.decode(bytes(data))


@pytest.mark.parametrize("name", ["zstd", "int8"])
def test_truncated_coded_bytes_are_an_artifact_error(name: str) -> None:
    data = codec.encode(make_artifact(n=60), name)
    for keep in (3, 12, len(data) // 2):
        with pytest.raises(ArtifactError):
            codec.decode(data[:keep])


def test_wrong_key_is_an_artifact_error() -> None:
    data = codec.encode(make_artifact(), "int8")
    with pytest.raises(ArtifactError, match="key"):
        codec.decode(data, expect_key="x" * 64)


def test_unknown_codec_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="none, zstd, int8"):
        DiskTier(tmp_path, codec="lz4")


@pytest.mark.parametrize("name", ["none", "zstd", "int8"])
def test_disk_tier_codecs_and_mixed_folder(tmp_path: Path, name: str) -> None:
    art = make_artifact(n=80)
    tier = DiskTier(tmp_path / "d", codec=name)
    tier.put(art.meta.key, art)
    raw = tier.get_bytes(art.meta.key)
    assert raw is not None and codec.codec_of(raw) == name
    # a tier with another codec reads the entry too
    other = DiskTier(tmp_path / "d", codec="none")
    back = other.get(art.meta.key)
    assert back is not None
    if name != "int8":
        assert all(torch.equal(a, b) for a, b in zip(art.keys, back.keys, strict=True))


def test_damaged_entry_in_a_zstd_tier_is_a_miss(tmp_path: Path) -> None:
    art = make_artifact(n=80)
    tier = DiskTier(tmp_path, codec="zstd")
    data = bytearray(codec.encode(art, "zstd"))
    data[-10] ^= 0xFF
    tier.put_bytes(art.meta.key, bytes(data))
    with pytest.warns(UserWarning, match="dropping"):
        assert tier.get(art.meta.key) is None
    assert art.meta.key not in tier
