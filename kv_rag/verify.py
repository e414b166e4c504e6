"""Spot-check an artifact from a publisher you do not trust, at a fraction of the cost of prefill.

The checksum only proves that the bytes are the ones the publisher sealed; a dishonest or broken
publisher can seal wrong KV. :func:`verify_artifact` checks what the KV *is*:

0. First layer, at every position (:mod:`kv_rag.spotcheck`): its keys and values are those of the
   artifact's own token ids at its positions (they depend on nothing else), for about one layer's
   projections. Any forgery inconsistent with its token ids there is caught with certainty.
1. Metadata: model and tokenizer digests equal this engine's; the key equals the content address
   ``chain_key(parent, model, tokenizer, token_ids)``; the layer count and shapes fit the model.
2. Context: the tokens before the artifact (its parent chain: for a published document, the
   system prefix) are found by their keys, from the engine's own system prefix or by walking the
   ``parent`` links in the store, each link checked against its content address. Their KV is
   *recomputed* (it is short, and this keeps an untrusted parent out of the check).
3. Windows: the artifact's tokens are cut into windows of ``window`` tokens; ``k = ceil(fraction
   × N)`` of the ``N`` windows are drawn at random. Each drawn window is recomputed on top of the
   recomputed context plus the artifact's *own* KV before the window, and its keys and values in
   every layer are compared with the stored ones. Given the KV before it, a window's KV is a
   deterministic function of its tokens, so any change to stored KV inside a drawn window (any
   layer) beyond float noise is seen.

Detection: a tampered span of ``L`` contiguous tokens overlaps at least ``c = ceil(L / window)``
windows, so it is caught with probability at least ``1 - C(N-c, k) / C(N, k)``
(:func:`detection_probability`), about ``1 - (1 - fraction)^c``. Tampering in any layer but the
last also changes what the following windows compute, so they can catch it too: the bound is
exact only for the last layer. Cost: the context plus ``k × window`` tokens of forward passes, about
``fraction`` of a full prefill plus the (short) context.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .artifact import Artifact
from .errors import InputError
from .fingerprint import chain_key, tokens_digest
from .prompt import Prompt, chat_frame
from .runtime import build_cache, cache_layers
from .spotcheck import RTOL, first_layer_problem

if TYPE_CHECKING:
    from .engine import Engine
    from .store import Store

#: Tokens per recomputed window.
WINDOW = 16
#: Fraction of windows checked unless told otherwise.
FRACTION = 0.1
#: A window fails when some layer's max |recomputed - stored| exceeds this times the layer's max |stored|
#: (fp32: honest windows measure below 1e-5 relative on SmolLM2; half precision needs about 2e-2).


@dataclass(frozen=True)
class WindowCheck:
    """One recomputed window: tokens ``[start, end)`` of the artifact and the worst layer's error."""

    start: int
    end: int
    worst_layer: int
    rel_diff: float
    ok: bool


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_artifact`. ``ok`` is False when metadata or any window fails."""

    key: str
    ok: bool
    reason: str
    num_tokens: int
    context_tokens: int
    window: int
    windows_total: int
    windows_checked: int
    fraction: float
    tolerance: float
    cost_fraction: float
    seconds: float
    windows: list[WindowCheck] = field(default_factory=list)
    #: the first layer's check at every position (:mod:`kv_rag.spotcheck`): what it found
    first_layer: str = ""

    def detection_probability(self, span_tokens: int) -> float:
        """Lower bound on catching a tampered span of ``span_tokens`` tokens with this plan."""
        return detection_probability(self.num_tokens, self.window, self.windows_checked, span_tokens)

    def catches(self) -> dict[str, float]:
        """The chance that a check like this one catches each kind of tampering (the measured rates behind
        them: benchmarks/verify/README.md). Forgeries that do not fit their token ids in the first layer
        (another token's or another model's KV, scaled values) fail the first-layer check; a change to a
        whole layer or head shows in every window; a span confined to deeper layers only in the windows
        that hold it (or follow it): the bound."""
        first = 1.0 if self.first_layer.startswith("matches") else 0.0
        return {
            "another token's or model's KV, or scaled values (first layer)": first,
            "a whole layer or KV head changed (every window)": 1.0 if self.windows_checked else 0.0,
            f"a span of {self.window} tokens in deeper layers (at least)": self.detection_probability(self.window),
            f"a span of {4 * self.window} tokens in deeper layers (at least)": self.detection_probability(
                4 * self.window
            ),
        }

    def summary(self) -> str:
        """What ``kv-rag verify`` prints."""
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.reason}", f"  first layer: {self.first_layer}"]
        lines.append(
            f"  {self.windows_checked}/{self.windows_total} windows of {self.window} tokens, "
            f"{self.context_tokens} context tokens recomputed; cost {self.cost_fraction:.0%} of a full prefill "
            f"(in tokens), {self.seconds:.2f} s"
        )
        if self.ok:
            lines.append("  this check catches, with probability:")
            lines += [f"    {p:4.0%}  {kind}" for kind, p in self.catches().items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)


def plan_windows(num_tokens: int, fraction: float, window: int, rng: random.Random) -> list[tuple[int, int]]:
    """``ceil(fraction × N)`` (at least one) of the ``N`` windows ``[i·window, (i+1)·window)``, in order."""
    if not 0 < fraction <= 1:
        raise InputError(f"--fraction must be in (0, 1], got {fraction}")
    if window < 1:
        raise InputError(f"--window must be >= 1 token, got {window}")
    n_win = math.ceil(num_tokens / window)
    k = min(n_win, max(1, math.ceil(fraction * n_win)))
    picked = sorted(rng.sample(range(n_win), k))
    return [(i * window, min(num_tokens, (i + 1) * window)) for i in picked]


def detection_probability(num_tokens: int, window: int, windows_checked: int, span_tokens: int) -> float:
    """Lower bound on the chance that ``windows_checked`` random windows hit a tampered span.

    The span overlaps at least ``c = ceil(span_tokens / window)`` of the ``N`` windows; the chance
    that none of them is drawn is ``C(N-c, k) / C(N, k)``.
    """
    n_win = math.ceil(num_tokens / window)
    c = min(n_win, math.ceil(max(1, span_tokens) / window))
    k = min(n_win, windows_checked)
    return 1.0 - math.comb(n_win - c, k) / math.comb(n_win, k)


def verify_artifact(
    engine: Engine,
    artifact: Artifact,
    *,
    fraction: float = FRACTION,
    window: int = WINDOW,
    seed: int | None = None,
    store: Store | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Spot-check ``artifact`` against ``engine``'s model (see the module docstring).

    ``store`` (default: the engine's) is where the parent chain is looked up when it is not the
    engine's system prefix. Raises :class:`InputError` when the context cannot be found; returns a
    report with ``ok=False`` when the artifact is foreign or its KV does not match.
    """
    t0 = time.perf_counter()
    loaded = engine.loaded
    m = artifact.meta
    tol = rtol if rtol is not None else RTOL.get(m.dtype if m.dtype.startswith("torch.") else f"torch.{m.dtype}", 6e-2)
    windows = plan_windows(m.num_tokens, fraction, window, random.Random(seed))
    n_win = math.ceil(m.num_tokens / window)

    layer0 = "not checked"

    def report(ok: bool, reason: str, ctx: int = 0, checks: list[WindowCheck] | None = None) -> VerifyReport:
        checked = sum(c.end - c.start for c in checks or [])
        return VerifyReport(
            key=m.key,
            ok=ok,
            reason=reason,
            num_tokens=m.num_tokens,
            context_tokens=ctx,
            window=window,
            windows_total=n_win,
            windows_checked=len(windows),
            fraction=fraction,
            tolerance=tol,
            cost_fraction=(ctx + checked) / max(1, ctx + m.num_tokens),
            seconds=time.perf_counter() - t0,
            windows=checks or [],
            first_layer=layer0,
        )

    why = _metadata_problem(engine, artifact)
    if why:
        return report(False, why)
    t_layer0 = time.perf_counter()
    wrong = first_layer_problem(loaded, artifact)
    if loaded.runtime.decoder is None:
        layer0 = f"not checked ({loaded.name}'s architecture has no fast decoder)"
    else:
        layer0 = wrong or f"matches at all {m.num_tokens} positions ({time.perf_counter() - t_layer0:.3f} s)"
    if wrong:
        return report(False, f"first layer: {wrong}")
    ctx_ids = _context_ids(engine, m.parent, store if store is not None else engine.store)
    if len(ctx_ids) != m.start:
        return report(False, f"the artifact says it starts at {m.start} but its parent chain has {len(ctx_ids)} tokens")
    ids = [int(t) for t in artifact.token_ids.tolist()]
    device = loaded.device
    checks: list[WindowCheck] = []
    with loaded.lock, torch.inference_mode():
        ctx_k: list[torch.Tensor] = []
        ctx_v: list[torch.Tensor] = []
        if ctx_ids:
            cache = build_cache(None, None, loaded.num_layers, len(ctx_ids))
            loaded.runtime.forward(torch.tensor([ctx_ids], device=device), cache, 0)
            for k, v in cache_layers(cache):
                ctx_k.append(k.clone())
                ctx_v.append(v.clone())
        for a, b in windows:
            keys, values = [], []
            for layer in range(loaded.num_layers):
                ks = [ctx_k[layer]] if ctx_ids else []
                vs = [ctx_v[layer]] if ctx_ids else []
                if a:
                    ks.append(artifact.keys[layer][:, :a].to(device=device, dtype=loaded.model.dtype).unsqueeze(0))
                    vs.append(artifact.values[layer][:, :a].to(device=device, dtype=loaded.model.dtype).unsqueeze(0))
                keys.append(ks)
                values.append(vs)
            cache = build_cache(
                keys if ctx_ids or a else None, values if ctx_ids or a else None, loaded.num_layers, m.start + b
            )
            loaded.runtime.forward(torch.tensor([ids[a:b]], device=device), cache, m.start + a)
            worst, worst_layer = 0.0, 0
            for layer, (k, v) in enumerate(cache_layers(cache)):
                for new, old in (
                    (k[0, :, m.start + a : m.start + b], artifact.keys[layer][:, a:b]),
                    (v[0, :, m.start + a : m.start + b], artifact.values[layer][:, a:b]),
                ):
                    ref = old.to(device=device, dtype=torch.float32)
                    diff = (new.float() - ref).abs().max().item()
                    scale = max(ref.abs().max().item(), 1e-6)
                    rel = diff / scale if math.isfinite(diff) else math.inf
                    if not rel <= worst:  # also takes NaN
                        worst, worst_layer = rel if math.isfinite(rel) else math.inf, layer
            checks.append(WindowCheck(a, b, worst_layer, worst, worst <= tol))
    bad = [c for c in checks if not c.ok]
    if bad:
        first = bad[0]
        return report(
            False,
            f"{len(bad)} of {len(checks)} recomputed windows differ (first: tokens {first.start}-{first.end}, "
            f"layer {first.worst_layer}, relative error {first.rel_diff:.3g} > {tol:g})",
            len(ctx_ids),
            checks,
        )
    return report(True, f"{len(checks)} windows of {window} tokens match", len(ctx_ids), checks)


def _metadata_problem(engine: Engine, art: Artifact) -> str:
    loaded = engine.loaded
    fp, tok = loaded.fingerprint.digest, loaded.tokenizer_digest
    m = art.meta
    if m.model_digest != fp:
        return f"computed by another model ({m.model.get('architecture')}, {m.dtype}), not {loaded.name}"
    if m.tokenizer_digest != tok:
        return "made with another tokenizer"
    if art.num_layers != loaded.num_layers:
        return f"has {art.num_layers} layers, the model has {loaded.num_layers}"
    if m.tokens_digest != tokens_digest(art.token_ids):
        return "its token ids do not match its tokens digest"
    plain = chain_key(m.parent, fp, tok, art.token_ids)
    tenant = engine.tenant
    if m.key not in (plain, tenant.derive(plain) if tenant is not None else plain):
        whose = f" (for tenant {tenant.name})" if tenant is not None else ""
        return f"its key is not the content address of its parent and tokens{whose}"
    return ""


def _context_ids(engine: Engine, parent: str, store: Store) -> list[int]:
    """Token ids before an artifact whose parent chain key is ``parent`` (checked link by link)."""
    if not parent:
        return []
    fp, tok = engine.loaded.fingerprint.digest, engine.loaded.tokenizer_digest
    head = chat_frame(engine.tokenizer, engine.system_prompt)[0]
    head_ids = engine.tokenize(Prompt.from_parts(head, (), "")).ids
    head_key = chain_key("", fp, tok, head_ids)
    if parent in (head_key, engine.tenant.derive(head_key) if engine.tenant is not None else head_key):
        return list(head_ids)
    parts: list[list[int]] = []
    key = parent
    while key:
        hit = store.get(key)
        if hit is None:
            raise InputError(
                f"cannot verify: the context before the artifact (parent {key[:12]}…) is neither this "
                "engine's system prefix nor in the store; pass the --store that holds the parent chain"
            )
        m = hit.artifact.meta
        if chain_key(m.parent, fp, tok, hit.artifact.token_ids) != key:
            raise InputError(f"cannot verify: the parent artifact {key[:12]}… is not the content address of its tokens")
        parts.append([int(t) for t in hit.artifact.token_ids.tolist()])
        key = m.parent
    return [t for p in reversed(parts) for t in p]
