"""The check of an artifact's first layer against its own token ids, at every position.

A decoder's first layer computes each token's key and value from that token's embedding and its
position alone (no attention), so recomputing them costs about one layer's key and value
projections for every token: well under 5% of a prefill. A forgery whose KV does not belong to its
token ids (another document's KV under these ids, another model's, scaled or random values) fails
it with certainty; tampering confined to deeper layers does not, which is what
:func:`kv_rag.verify.verify_artifact`'s recomputed windows are for.
"""

from __future__ import annotations

from typing import Any

import torch

from .artifact import Artifact

#: A recomputed value differs when max |recomputed - stored| exceeds this times the layer's max |stored|
#: (fp32: honest artifacts measure below 1e-5 relative on SmolLM2; half precision needs about 2e-2).
RTOL = {"torch.float32": 1e-3, "torch.float16": 3e-2, "torch.bfloat16": 6e-2}
#: The tolerance for artifacts read from a lossy (int8) entry (about 0.4% of each row's largest value).
LOSSY_RTOL = 2e-2


def first_layer_problem(loaded: Any, artifact: Artifact, rtol: float | None = None) -> str | None:
    """Whether ``artifact``'s first-layer keys and values are those of its own token ids at its positions
    (``loaded``: the :class:`~kv_rag.models.LoadedModel`). Returns the reason, or ``None`` when they
    match or cannot be checked here (another model's artifact, which the metadata checks refuse; an
    architecture without a :class:`~kv_rag.runtime.FastDecoder`)."""
    dec = loaded.runtime.decoder
    m = artifact.meta
    if dec is None or m.model_digest != loaded.fingerprint.digest or artifact.num_layers != loaded.num_layers:
        return None
    tol = rtol if rtol is not None else RTOL.get(m.dtype if m.dtype.startswith("torch.") else f"torch.{m.dtype}", 6e-2)
    if not m.checksum:  # read back from a lossy (int8) entry
        tol = max(tol, LOSSY_RTOL)
    dev = loaded.device
    ids = artifact.token_ids.to(device=dev, dtype=torch.long).view(1, -1)
    pos = torch.arange(m.start, m.start + ids.shape[1], device=dev).unsqueeze(0)
    with torch.inference_mode():
        h, cos, sin = dec.embed(ids, pos)
        _, k, v = dec.pre_rows(0, h, cos.transpose(1, 2), sin.transpose(1, 2))  # [1, n, kv_heads, dim]
        pairs = (("keys", k[0].transpose(0, 1), artifact.keys[0]), ("values", v[0].transpose(0, 1), artifact.values[0]))
        for name, new, old in pairs:
            ref = old.to(device=dev, dtype=torch.float32)
            if ref.shape != new.shape:
                return f"its first layer's {name} have shape {tuple(ref.shape)}, the model computes {tuple(new.shape)}"
            err = (new.float() - ref).abs().amax(dim=(0, 2))  # per token
            rel = err / max(ref.abs().max().item(), 1e-6)
            bad = (~(rel <= tol)).nonzero()  # NaN counts as bad
            if len(bad):
                t = int(bad[0, 0])
                return (
                    f"its first layer's {name} are not those of its own token ids: {len(bad)} of {len(rel)} "
                    f"positions differ (first: token {t}, relative error {float(rel[t]):.3g} > {tol:g})"
                )
    return None
