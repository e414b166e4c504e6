"""What makes two KV caches interchangeable.

Two artifacts may be exchanged only if the model that computed them has the same architecture,
configuration, weights and dtype, and the tokenizer maps text to the same ids. Each fingerprint
reduces to a short hex digest that goes into artifact keys and metadata.
"""

from __future__ import annotations

import functools
import hashlib
import json
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import xxhash

# Config entries that do not change what the model computes.
_CONFIG_NOISE = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "architectures",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
    }
)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def rope_parameters(config: Any) -> dict[str, Any]:
    """The model's rotary parameters as a plain dict (``rope_type``, ``rope_theta`` and scaling entries)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        scaling = getattr(config, "rope_scaling", None) or {}
        params = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")), **scaling}
        theta = getattr(config, "rope_theta", None)
        if theta is not None:
            params["rope_theta"] = theta
    params = dict(params)
    prf = getattr(config, "partial_rotary_factor", None)
    if prf is not None:
        params.setdefault("partial_rotary_factor", prf)
    return json.loads(json.dumps(params, default=str))


def weights_digest(model: torch.nn.Module) -> str:
    """xxh3-128 over every tensor of the state dict, in name order (about 10 GB/s on a CPU)."""
    h = xxhash.xxh3_128()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelFingerprint:
    """Architecture, configuration, weights, dtype and rotary parameters of a model."""

    architecture: str
    config_digest: str
    weights_digest: str
    dtype: str
    rope: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def digest(self) -> str:
        """Short hex digest of the whole fingerprint (computed once)."""
        return _sha(asdict(self))[:32]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON metadata."""
        return asdict(self)


def model_fingerprint(model: torch.nn.Module) -> ModelFingerprint:
    """Fingerprint of a loaded transformers model (hashes its weights: call once and keep the result)."""
    config: Any = model.config
    cfg = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
    dtype = next(model.parameters()).dtype
    return ModelFingerprint(
        architecture=type(model).__name__,
        config_digest=_sha(cfg)[:32],
        weights_digest=weights_digest(model),
        dtype=str(dtype).removeprefix("torch."),
        rope=rope_parameters(config),
    )


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of what maps text to ids: the serialized fast tokenizer, or the vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        {
            "class": type(tokenizer).__name__,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        },
        sort_keys=True,
    )
    return hashlib.sha256((data + extra).encode()).hexdigest()[:32]


def token_bytes(ids: Any) -> bytes:
    """Token ids as little-endian int64 bytes: the form that digests and id checks compare."""
    if isinstance(ids, torch.Tensor):
        return bytes(ids.to(torch.int64).contiguous().cpu().numpy().data)
    return array("q", ids).tobytes()  # the same bytes without building a tensor (fast for long prompts)


def tokens_digest(ids: Any) -> str:
    """Digest of a sequence of token ids (or of their :func:`token_bytes`)."""
    data = ids if isinstance(ids, bytes) else token_bytes(ids)
    return xxhash.xxh3_128(data).hexdigest()


def chain_key(parent: str, model_digest: str, tokenizer_digest: str, ids: Any) -> str:
    """Content-addressed key of a span of ``ids`` that follows the context whose key is ``parent``.

    ``parent`` is ``""`` for a span at position 0. Anything that changes the span's KV (model,
    tokenizer, the span's ids, any earlier token) changes the key.
    """
    return chain_key_of_digest(parent, model_digest, tokenizer_digest, tokens_digest(ids))


def chain_key_of_digest(parent: str, model_digest: str, tokenizer_digest: str, ids_digest: str) -> str:
    """:func:`chain_key` from the span's :func:`tokens_digest` (computed once per span by callers)."""
    payload = f"kv-rag/1|{model_digest}|{tokenizer_digest}|{parent}|{ids_digest}"
    return hashlib.sha256(payload.encode()).hexdigest()
