"""Move cached keys to other positions with the model's own rotary parameters.

RoPE rotates each pair of key dimensions by ``position * inv_freq``; the values carry no position.
A key cached at position ``p`` is moved to ``q`` by one more rotation by ``q - p``. The angle is not
taken as ``(q - p) * inv_freq`` but as the difference of the float32 angles that transformers itself
computes at ``q`` and at ``p`` (``float32(position) * inv_freq``, then cos/sin), so the shifted key
matches a key computed directly at ``q`` to float32 rounding even at large positions.

What is read from the model: its rotary embedding module's ``inv_freq`` (this already holds linear,
llama3 and yarn scaling, and has ``rotary_dim / 2`` entries for partial rotary models such as
GPT-NeoX or Phi). Yarn's attention factor multiplies cos and sin of both queries and keys at compute
time; a rotation commutes with that factor, so nothing is applied for it here. The dimension layout
(``rotate_half`` as in Llama, or interleaved pairs) is found by a probe on the model itself.

Refused with :class:`~kv_rag.errors.UnsupportedModelError` (the engine then prefills): dynamic NTK and
longrope scaling (the frequencies depend on the sequence length), no rotary embedding, several rotary
embeddings (per-layer-type RoPE), and sliding-window attention when the request is longer than the
window (see :func:`window_refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedModelError
from .runtime import ModelRuntime, build_cache, cache_layers

#: rope types whose frequencies do not depend on the sequence length
SHIFTABLE_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})

#: rope types that recompute their frequencies from the sequence length at run time
_LENGTH_DEPENDENT = {"dynamic": "dynamic NTK scaling", "longrope": "longrope scaling"}

_LAYOUTS = ("half", "interleaved")


@dataclass(frozen=True)
class RotaryShift:
    """Rotates cached keys ``[..., tokens, head_dim]`` from one start position to another.

    ``inv_freq`` (float32, ``rotary_dim / 2`` entries) comes from the model's rotary embedding;
    ``layout`` is ``"half"`` (``rotate_half``: dimension ``i`` pairs with ``i + rotary_dim/2``) or
    ``"interleaved"`` (dimension ``2i`` pairs with ``2i + 1``).
    """

    inv_freq: torch.Tensor
    rope_type: str = "default"
    layout: str = "half"

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dimensions that are rotated."""
        return 2 * int(self.inv_freq.numel())

    def angles(self, start: int, count: int) -> torch.Tensor:
        """float32 angles ``[count, rotary_dim/2]`` of positions ``start..start+count-1`` (as transformers)."""
        pos = torch.arange(start, start + count, dtype=torch.float32)
        return pos[:, None] * self.inv_freq.to("cpu", torch.float32)[None, :]

    def rotation(
        self, src: int, dst: int, count: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[count, rotary_dim/2]`` (float64) moving ``count`` tokens from ``src`` to ``dst``."""
        delta = self.angles(dst, count).double() - self.angles(src, count).double()
        return delta.cos().to(device), delta.sin().to(device)

    def shift(
        self,
        keys: torch.Tensor,
        src: int,
        dst: int,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``keys`` (``[..., tokens, head_dim]``, first token at position ``src``) moved to start at ``dst``.

        Returns a new tensor of the same dtype (``keys`` itself when ``src == dst``). Pass
        ``rotation`` (from :meth:`rotation`) to reuse it across layers.
        """
        if src == dst:
            return keys
        n = keys.shape[-2]
        rd = self.rotary_dim
        if rd > keys.shape[-1]:
            raise UnsupportedModelError(f"rotary dimension {rd} exceeds the key head dimension {keys.shape[-1]}")
        cos, sin = rotation if rotation is not None else self.rotation(src, dst, n, keys.device)
        work = torch.float64 if keys.dtype == torch.float64 else torch.float32
        cos = cos.to(keys.device, work)
        sin = sin.to(keys.device, work)
        k = keys[..., :rd].to(work)
        if self.layout == "half":
            h = rd // 2
            x1, x2 = k[..., :h], k[..., h:]
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = k[..., 0::2], k[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        out = keys.clone()
        out[..., :rd] = rotated.to(keys.dtype)
        return out


def rotary_module(model: Any) -> Any:
    """The model's single rotary embedding module (one with an ``inv_freq`` buffer).

    Raises :class:`UnsupportedModelError` when there is none or when several differ.
    """
    found: list[Any] = []
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and not any(inv is getattr(m, "inv_freq", None) for m in found):
            found.append(module)
    if not found:
        typed = sorted(
            {n.rsplit(".", 1)[-1][: -len("_inv_freq")] for n, _ in model.named_buffers() if n.endswith("_inv_freq")}
            - {""}
        )
        typed = [t for t in typed if not t.endswith("original")]
        if typed:  # e.g. Gemma 3: full_attention_inv_freq, sliding_attention_inv_freq
            window = sliding_window(model)
            raise UnsupportedModelError(
                f"{type(model).__name__} has a rotary embedding per layer type ({', '.join(typed)})"
                + (f" and sliding-window attention ({window} tokens)" if window else "")
                + ": cached keys cannot be moved with one rotation; stitching is not supported for it"
            )
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary position embedding (no inv_freq buffer): cached keys "
            "cannot be moved to other positions"
        )
    first = found[0].inv_freq
    for m in found[1:]:
        other = m.inv_freq
        if other.shape != first.shape or not torch.equal(other.cpu(), first.cpu()):
            raise UnsupportedModelError(
                f"{type(model).__name__} has several rotary embeddings with different frequencies "
                "(per-layer RoPE): stitching is not supported for it"
            )
    return found[0]


def rope_type_of(model: Any, module: Any) -> str:
    """The rope type (``default``, ``linear``, ``llama3``, ``yarn``, ``dynamic``…) of ``model``."""
    rt = getattr(module, "rope_type", None)
    if rt:
        return str(rt)
    cfg = model.config.get_text_config(decoder=True)
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict):
        return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def rotary_shift(model: Any, probe: bool = True, runtime: ModelRuntime | None = None) -> RotaryShift:
    """A :class:`RotaryShift` for ``model``, checked on the model itself.

    With ``probe`` (the default), a few tokens are run at position 0 and at a far position (through
    ``runtime``, the model's own when given) and the shifted first-layer keys must equal the directly
    computed ones (this also finds the layout). Raises :class:`UnsupportedModelError` with the
    reason when keys cannot be moved exactly.
    """
    module = rotary_module(model)
    rt = rope_type_of(model, module)
    if rt in _LENGTH_DEPENDENT:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses {_LENGTH_DEPENDENT[rt]}: its RoPE frequencies depend on the "
            "sequence length, so cached keys cannot be moved exactly"
        )
    if rt not in SHIFTABLE_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses RoPE type {rt!r}; kv-rag moves keys for "
            f"{', '.join(sorted(SHIFTABLE_ROPE_TYPES))} only"
        )
    inv = module.inv_freq.detach().to("cpu", torch.float32).clone()
    if not probe:
        return RotaryShift(inv, rt, "half")
    return _probe(model, inv, rt, runtime or ModelRuntime(model))


def _probe(model: Any, inv: torch.Tensor, rt: str, runtime: ModelRuntime) -> RotaryShift:
    """Find the layout for which first-layer keys shifted from 0 to a far position equal direct ones."""
    cfg = model.config.get_text_config(decoder=True)
    n_layers = int(cfg.num_hidden_layers)
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
    n = 8
    far = max(1, min(1000, limit - n - 1))
    vocab = int(cfg.vocab_size)
    device = next(model.parameters()).device
    ids = (torch.arange(n, device=device) * 7919 + 11).remainder(vocab).unsqueeze(0)
    with torch.inference_mode():
        near_cache = build_cache(None, None, n_layers, n)
        runtime.forward(ids, near_cache, 0)
        far_cache = build_cache(None, None, n_layers, n)
        runtime.forward(ids, far_cache, far)
    k0, v0 = cache_layers(near_cache)[0]
    k1, v1 = cache_layers(far_cache)[0]
    scale = float(k1.abs().max()) or 1.0
    tol = (1e-4 if k1.dtype in (torch.float32, torch.float64) else 3e-2) * max(1.0, scale)
    if float((v0.float() - v1.float()).abs().max()) > tol:
        raise UnsupportedModelError(
            f"{type(model).__name__}: first-layer values depend on the position (absolute position "
            "embeddings?): cached KV cannot be moved"
        )
    errors: dict[str, float] = {}
    for layout in _LAYOUTS:
        shifter = RotaryShift(inv, rt, layout)
        moved = shifter.shift(k0, 0, far)
        errors[layout] = float((moved.float() - k1.float()).abs().max())
        if errors[layout] <= tol:
            return shifter
    raise UnsupportedModelError(
        f"{type(model).__name__}: keys shifted with the model's RoPE frequencies do not match keys computed "
        f"at the target position (max abs error {min(errors.values()):.3g} > {tol:.3g}); stitching is refused"
    )


def sliding_window(model: Any) -> int | None:
    """The attention window of ``model`` if any layer uses one, else ``None``."""
    cfg = model.config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        used = any("sliding" in str(t) for t in layer_types)
    else:
        used = window is not None and bool(getattr(cfg, "use_sliding_window", True))
    return int(window) if used and window else None


def window_refusal(model: Any, total_tokens: int) -> str | None:
    """Why a request of ``total_tokens`` cannot be stitched on a sliding-window model, or ``None``.

    Keys cached in isolation attended to everything before them within the document; in a longer
    prompt the window hides part of that, so stitching is refused once the prompt exceeds the window.
    """
    window = sliding_window(model)
    if window is not None and total_tokens > window:
        return (
            f"{type(model).__name__} uses sliding-window attention ({window} tokens) and this prompt has "
            f"{total_tokens}: stitched keys would have seen tokens outside the window"
        )
    return None
