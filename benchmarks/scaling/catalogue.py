"""The fleet's documents: a Zipf popularity over a catalogue, real-shaped KV of the embedded model.

Used by ``fleet.py`` (the documents its replicas ask for and publish) and ``extrapolate.py`` (the same
popularity and sizes in the hit-rate model). Run alone, it prints what a catalogue holds: its bytes,
the share of requests its most popular documents take, and the bytes that serve a given share.

    python benchmarks/scaling/catalogue.py --zipf 0.8,1.2 --catalogue 50,200,100000
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

#: SmolLM2-135M's KV geometry, used when the embedded model's config.json cannot be read
SMOLLM2 = {"layers": 30, "kv_heads": 3, "head_dim": 64}
F32 = I32 = 4  # bytes of a float32 value, of an int32 token id


def geometry() -> dict[str, Any]:
    """The embedded model's KV geometry (layers, KV heads, head size) and where it was read."""
    try:
        from kv_rag.models import embedded_model_path

        cfg = json.loads((embedded_model_path() / "config.json").read_text())
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_key_value_heads"])
        return {"layers": layers, "kv_heads": heads, "head_dim": int(head), "source": "embedded model config.json"}
    except Exception as exc:  # no embedded model here: its published shape
        return {**SMOLLM2, "source": f"built-in SmolLM2-135M shape ({type(exc).__name__})"}


class Catalogue:
    """``size`` documents ranked by popularity: Zipf weights, keys, lengths, artifacts of random KV.

    Documents of one length share their tensors (made once a process): only the key, token ids and
    metadata differ, which is all the store looks at.
    """

    def __init__(self, size: int, s: float, lengths: list[int], geo: dict[str, Any]) -> None:
        self.size, self.s, self.lengths, self.geo = size, s, lengths, geo
        weights = [1.0 / (k + 1) ** s for k in range(size)]
        self.cum = list(itertools.accumulate(weights))
        self.templates: dict[int, Any] = {}  # length -> (keys, values), made on first use

    def probabilities(self) -> list[float]:
        """Each rank's share of the requests."""
        total = self.cum[-1]
        return [(b - a) / total for a, b in zip([0.0, *self.cum[:-1]], self.cum, strict=True)]

    def draw(self, rng: random.Random) -> int:
        """A rank drawn from the Zipf popularity."""
        return min(bisect.bisect(self.cum, rng.random() * self.cum[-1]), self.size - 1)

    @staticmethod
    def key(rank: int) -> str:
        """The store key of the document of ``rank`` (sha256 hex, like a real key)."""
        return hashlib.sha256(f"kv-rag fleet document {rank}".encode()).hexdigest()

    def tokens(self, rank: int) -> int:
        """The document's length in tokens."""
        return self.lengths[rank % len(self.lengths)]

    def nbytes(self, rank: int) -> int:
        """Bytes of the document's artifact tensors (KV and token ids)."""
        g, n = self.geo, self.tokens(rank)
        return n * (g["layers"] * 2 * g["kv_heads"] * g["head_dim"] * F32 + I32)

    def total_bytes(self) -> int:
        """Bytes of every document's artifact tensors."""
        return sum(self.nbytes(k) for k in range(self.size))

    def artifact(self, rank: int) -> Any:
        """The document's artifact (unsealed: ``Store.put`` seals it, as when an engine publishes)."""
        import torch

        from kv_rag import Artifact, ArtifactMeta

        n, g = self.tokens(rank), self.geo
        if n not in self.templates:
            gen = torch.Generator().manual_seed(n)
            shape = (g["kv_heads"], n, g["head_dim"])
            self.templates[n] = [tuple(torch.randn(shape, generator=gen) for _ in range(g["layers"])) for _ in "kv"]
        keys, values = self.templates[n]
        meta = ArtifactMeta(
            key=self.key(rank),
            model_digest="fleet-simulation",
            tokenizer_digest="fleet-simulation",
            tokens_digest=hashlib.sha256(str(rank).encode()).hexdigest(),
            num_tokens=n,
            start=0,
            parent="",
            dtype="torch.float32",
            model={"architecture": "LlamaForCausalLM", **{k: g[k] for k in SMOLLM2}},
            rope={"rope_type": "default"},
            source=f"fleet document {rank}",
        )
        return Artifact(keys, values, torch.arange(n, dtype=torch.int32), meta)


def main(argv: list[str] | None = None) -> int:
    """Print each catalogue's bytes, its top documents' shares, and the bytes that serve a share."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zipf", default="0.8,1.2", help="Zipf exponents s (comma-separated)")
    ap.add_argument("--catalogue", default="50,200,100000", help="catalogue sizes (documents)")
    ap.add_argument("--lengths", default="128,512,1024", help="document lengths in tokens (rank modulo their number)")
    args = ap.parse_args(argv)
    geo, lengths = dict(SMOLLM2, source="SmolLM2-135M"), [int(x) for x in args.lengths.split(",")]
    print(f"KV geometry {geo}, float32; lengths {lengths}")
    for s in (float(x) for x in args.zipf.split(",")):
        for size in (int(x) for x in args.catalogue.split(",")):
            cat = Catalogue(size, s, lengths, geo)
            p = cat.probabilities()
            top = {f"top {k}": round(sum(p[:k]), 3) for k in (1, 10, 100) if k < size}
            served = {}
            for share in (0.5, 0.9, 0.99):
                k = bisect.bisect_left(list(itertools.accumulate(p)), share) + 1
                served[f"{share:.0%} of requests"] = f"{k} docs, {sum(cat.nbytes(r) for r in range(k)) / 1e9:.2f} GB"
            print(f"s={s} catalogue={size}: {cat.total_bytes() / 1e9:.2f} GB; shares {json.dumps(top)}; {served}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
