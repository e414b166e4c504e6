"""Signed artifacts (issue 18, part 2): keys, what a signature covers, trust required or not, and the
forged "pier 7 -> pier 2" artifact refused as an ``untrusted`` miss and recomputed (embedded model)."""

from __future__ import annotations

import dataclasses
import json
import stat
import warnings
from pathlib import Path

import pytest
import torch
from test_artifact import make_artifact

from kv_rag import Artifact, Engine, InputError, MissReason, PublisherKey, SigningKey, TrustPolicy, digest
from kv_rag.cli import main
from kv_rag.models import LoadedModel
from kv_rag.signing import tensor_digest
from kv_rag.store import DiskTier, MemoryTier, Store

pytest.importorskip("cryptography")
pytest.importorskip("blake3")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def test_keygen_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = SigningKey.generate()
    pub = k.save(tmp_path / "pub.key")
    assert pub == tmp_path / "pub.key.pub"
    assert stat.S_IMODE((tmp_path / "pub.key").stat().st_mode) == 0o600
    assert SigningKey.load(tmp_path / "pub.key") == k
    assert PublisherKey.load(pub) == k.public_key == PublisherKey.load(tmp_path / "pub.key")  # PEM private: its half
    (tmp_path / "raw.pub").write_text(k.public_key.b64 + "\n")  # base64 of the raw 32 bytes
    assert PublisherKey.load(tmp_path / "raw.pub") == k.public_key
    with pytest.raises(InputError, match="exists"):
        k.save(tmp_path / "pub.key")  # a key is never overwritten by accident
    (tmp_path / "junk").write_text("not a key")
    for bad in (lambda: SigningKey.load(tmp_path / "junk"), lambda: PublisherKey.load(tmp_path / "junk")):
        with pytest.raises(InputError, match="junk"):
            bad()
    with pytest.raises(InputError, match="private key"):
        SigningKey.load(pub)
    with pytest.raises(InputError, match="cannot read"):
        TrustPolicy([tmp_path / "missing.pub"])

    # the command: OUT (0600) and OUT.pub; twice is exit 2 with one line
    out = tmp_path / "cli.key"
    assert main(["keygen", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert PublisherKey.load(str(out) + ".pub") == SigningKey.load(out).public_key
    capsys.readouterr()
    assert main(["keygen", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_bad_key_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("The ferry leaves from pier 7.")
    (tmp_path / "junk").write_text("not a key")
    store = str(tmp_path / "s")
    for args in (
        ["ask", "Where?", "--docs", str(doc), "--store", store, "--sign-key", str(tmp_path / "junk")],
        ["ask", "Where?", "--docs", str(doc), "--store", store, "--trust", str(tmp_path / "nope.pub")],
        ["publish", str(doc), "--store", store, "--trust", str(tmp_path / "junk")],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "key file" in err[0], err
    k = SigningKey.generate()
    pub = k.save(tmp_path / "k")
    assert main(["publish", str(doc), "--store", store, "--trust", str(pub)]) == 2  # would store nothing
    assert "--sign-key" in capsys.readouterr().err
    # verify --trust refuses an unsigned artifact file (exit 1) before recomputing anything
    (tmp_path / "art.kv").write_bytes(make_artifact().to_bytes())
    assert main(["verify", str(tmp_path / "art.kv"), "--store", store, "--trust", str(pub)]) == 1
    assert "untrusted: unsigned" in capsys.readouterr().out


def test_what_the_signature_covers(key: SigningKey) -> None:
    art = make_artifact(n=6, layers=3)
    signed = key.sign(art)
    trust = TrustPolicy([key.public_key])
    assert trust.check(signed) is None
    assert signed.meta.signed and signed.meta.tensor_digest == tensor_digest(art)
    hasher = digest.ReadHasher()  # the digest a tier takes while reading, fed in uneven pieces
    data = memoryview(bytearray(signed.to_bytes()))
    for got in (3, 8, 20, 500, len(data) - 7, len(data)):
        hasher.advance(data, got)
    assert hasher.result() == digest.of_bytes(data) == tensor_digest(art)
    for dtype in (torch.bfloat16, torch.float16):  # other dtypes: another order in the data section
        half = dataclasses.replace(
            art, keys=tuple(k.to(dtype) for k in art.keys), values=(art.values[0].to(dtype), *art.values[1:])
        )
        assert tensor_digest(half) == digest.of_bytes(half.to_bytes()) != tensor_digest(art)
    back = Artifact.from_bytes(signed.to_bytes(), expect_key=art.meta.key)  # kept through the bytes
    assert back.meta == signed.meta and trust.check(back) is None

    assert trust.check(art) == "unsigned"
    assert trust.check(SigningKey.generate().sign(art)) == "signed by an untrusted key"
    # tensors swapped or nudged after signing, the xxh3 checksum re-sealed: the checksum passes, the digest does not
    nudged = dataclasses.replace(signed, values=(signed.values[0] * 1.001, *signed.values[1:])).sealed()
    Artifact.from_bytes(nudged.to_bytes())
    assert trust.check(nudged) == "tampered after signing"
    ids = dataclasses.replace(signed, token_ids=signed.token_ids.flip(0)).sealed()
    assert trust.check(ids) == "tampered after signing"
    # metadata changed after signing: position, parent, key, fingerprints, dtype
    for change in ({"start": 0}, {"parent": "p" * 64}, {"key": "x" * 64}, {"model_digest": "m2"}, {"dtype": "bf16"}):
        forged = dataclasses.replace(signed, meta=dataclasses.replace(signed.meta, **change))
        assert trust.check(forged) == "tampered after signing", change
    # another signer's key put in place of the real one
    other = SigningKey.generate()
    relabeled = dataclasses.replace(signed, meta=dataclasses.replace(signed.meta, signer=other.public_key.b64))
    assert TrustPolicy([other.public_key]).check(relabeled) == "tampered after signing"
    # in-process tensors are not hashed again: a nudged tensor with an intact signature passes tensors=False
    assert trust.check(nudged, tensors=False) is None


def test_store_trust_skips_without_deleting(key: SigningKey, tmp_path: Path) -> None:
    art = make_artifact()
    k = art.meta.key
    disk = DiskTier(tmp_path / "s")
    Store([disk]).put(k, art)  # an unsigned artifact in a shared tier
    assert Store([MemoryTier(), DiskTier(tmp_path / "s")]).get(k) is not None  # no trust: loads as before
    strict = Store([MemoryTier(), DiskTier(tmp_path / "s")], trust=TrustPolicy([key]))
    with pytest.warns(UserWarning, match="unsigned"):
        assert strict.get(k) is None
    assert strict.why_missing(k) == MissReason.UNTRUSTED == "untrusted"
    assert k in disk  # kept: another consumer may trust it
    strict.put(k, art)  # trust and no signer: nothing is stored
    assert not disk.get(k).meta.signed  # type: ignore[union-attr]
    signer = Store([MemoryTier(), DiskTier(tmp_path / "s")], signer=key, trust=TrustPolicy([key]))
    signer.put(k, art)  # signed on the way in, overwriting
    assert disk.get(k).meta.signer == key.public_key.b64  # type: ignore[union-attr]
    hit = strict.get(k)
    assert hit is not None and hit.tier == "disk"
    assert strict.get(k).tier == "memory"  # type: ignore[union-attr]
    with pytest.raises(InputError, match="another trust"):
        strict.secure(trust=TrustPolicy([SigningKey.generate()]))


def _swap_layers(data: bytes) -> bytes:
    """``data`` with the byte ranges of ``v.0`` and ``v.1`` swapped in its header and the checksum in its
    metadata re-sealed to match: the data section is byte for byte the same, the tensors are not."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["v.0"]["data_offsets"], header["v.1"]["data_offsets"] = (
        header["v.1"]["data_offsets"],
        header["v.0"]["data_offsets"],
    )

    def packed(h: dict[str, object]) -> bytes:
        text = json.dumps(h, separators=(",", ":")).encode()
        return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]

    moved = Artifact.from_bytes(packed(header), checksum=False)
    meta = json.loads(header["__metadata__"]["kv_rag"])
    meta["checksum"] = moved.checksum()
    header["__metadata__"]["kv_rag"] = json.dumps(meta, sort_keys=True)
    return packed(header)


def test_a_trusted_disk_load_checks_the_bytes_it_read(key: SigningKey, tmp_path: Path) -> None:
    """Under trust the disk tier hashes the stored bytes while reading them, with no checksum pass:
    intact signed bytes load; a flipped byte is damage (dropped); tensors moved about in the header,
    the checksum re-sealed, the data section unchanged, is forgery (kept and refused)."""
    art = make_artifact(n=6, layers=3)
    k = art.meta.key
    trust = TrustPolicy([key])
    signed_bytes = key.sign(art).to_bytes()

    def load(data: bytes) -> tuple[Store, DiskTier, object]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        DiskTier(folder).put_bytes(k, data)
        disk = DiskTier(folder)
        store = Store([MemoryTier(), disk], trust=trust)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            return store, disk, store.get(k)

    store, disk, hit = load(signed_bytes)
    assert hit is not None and torch.equal(hit.artifact.values[1], art.values[1])  # type: ignore[attr-defined]
    got, stored = disk.get_digested(k)
    assert got is not None and stored == got.meta.tensor_digest and trust.check(got, stored_digest=stored) is None

    flipped = bytearray(signed_bytes)
    flipped[-5] ^= 0x40  # in the last tensor's bytes
    store, disk, hit = load(bytes(flipped))
    assert hit is None and k not in disk and store.why_missing(k) == MissReason.DAMAGED

    swapped = _swap_layers(signed_bytes)
    moved = Artifact.from_bytes(swapped)  # the checksum passes
    assert torch.equal(moved.values[0], art.values[1]) and not torch.equal(moved.values[0], art.values[0])
    store, disk, hit = load(swapped)
    assert hit is None and k in disk and store.why_missing(k) == MissReason.UNTRUSTED


FERRY_A = "The ferry leaves from pier 7."
FERRY_B = "The ferry leaves from pier 2."
QUESTION = "Which pier does the ferry leave from?"


def test_forged_pier_is_an_untrusted_miss(embedded: LoadedModel, key: SigningKey, tmp_path: Path) -> None:
    folder = tmp_path / "shared"

    def engine(**kw: object) -> Engine:  # a fresh process's view: own memory tier, the shared disk folder
        return Engine(None, store=Store([MemoryTier(), DiskTier(folder)]), device="cpu", dtype="float32", **kw)

    publisher = engine(sign_key=key)
    reports = publisher.publish([FERRY_A, FERRY_B])
    assert {r.tokens for r in reports} == {reports[0].tokens}  # the same length: a drop-in swap
    disk = publisher.store.tiers[-1]
    assert isinstance(disk, DiskTier)
    a, b = (disk.get(r.key) for r in reports)
    assert a is not None and b is not None and a.meta.signed

    consumer = engine(trust=[key.public_key])
    gen = consumer.generate(QUESTION, [FERRY_A], max_new_tokens=10)
    assert [(d.cache.value, d.reason) for d in gen.documents] == [("hit", None)]  # signed: loads
    full = consumer.generate(QUESTION, [FERRY_A], max_new_tokens=10, use_cache=False)
    assert "pier 7" in full.text and gen.token_ids == full.token_ids

    # the forgery: A's metadata and signature, B's KV, the xxh3 checksum re-sealed, written into the shared tier
    forged = dataclasses.replace(a, keys=b.keys, values=b.values).sealed()
    disk.put_bytes(reports[0].key, forged.to_bytes(), parent=a.meta.parent)
    naive = engine().generate(QUESTION, [FERRY_A], max_new_tokens=10)
    assert naive.documents[0].cache.value == "hit"  # without trust, the forged KV is used...
    assert naive.token_ids != full.token_ids  # ...and changes the answer (here: 'the pier called "Pier')

    consumer = engine(trust=[key.public_key])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = consumer.generate(QUESTION, [FERRY_A], max_new_tokens=10)
    assert [(d.cache.value, d.reason) for d in gen.documents] == [("miss", "untrusted")]
    assert any("tampered after signing" in str(w.message) for w in caught)
    assert gen.token_ids == full.token_ids  # recomputed: the answer of a full prefill
    assert torch.equal(disk.get(reports[0].key).keys[0], b.keys[0])  # type: ignore[union-attr]  # not deleted

    # a consumer with a key of its own stores its signed copy over the forgery; then everyone trusting it hits
    own = SigningKey.generate()
    with pytest.warns(UserWarning, match="tampered after signing"):
        engine(trust=[key.public_key], sign_key=own).generate(QUESTION, [FERRY_A], max_new_tokens=1)
    again = engine(trust=[key.public_key, own.public_key]).generate(QUESTION, [FERRY_A], max_new_tokens=10)
    assert [(d.cache.value, d.reason) for d in again.documents] == [("hit", None)]
    assert again.token_ids == full.token_ids


def test_the_read_hasher_works_in_a_forked_child(key: SigningKey, tmp_path: Path) -> None:
    """The hashing thread is started again in a child forked after the parent used it (no hang)."""
    import multiprocessing

    art = make_artifact(n=6, layers=3)
    DiskTier(tmp_path / "s").put(art.meta.key, key.sign(art))
    assert DiskTier(tmp_path / "s").get_digested(art.meta.key)[1] is not None  # the parent's pool is up
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        found = pool.apply_async(_digest_in_child, (str(tmp_path / "s"), art.meta.key)).get(timeout=60)
    assert found == art.meta.key and found is not None


def _digest_in_child(folder: str, k: str) -> str | None:
    art, stored = DiskTier(folder).get_digested(k)
    return art.meta.key if art is not None and stored == art.meta.tensor_digest else None
