"""The CPU batched step with packed weights (kv_rag.runtime.cpu_pack): each request's logits are a
from-scratch forward's, on the real embedded model and on architectures with q/k norms and biases."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import tiny_model

from kv_rag.models import LoadedModel
from kv_rag.runtime import ModelRuntime


def _rows_against_full_forwards(model: Any, lengths: tuple[int, ...], vocab: int) -> tuple[ModelRuntime, float]:
    """Step caches of ``lengths`` tokens together (twice: a one-token step after a 3-token one); the
    largest logit difference against a from-scratch forward of each request's tokens."""
    rt = ModelRuntime(model)
    if rt.decoder is not None:
        rt.decoder.packed()  # packed now (the steps would otherwise use the plain weights until it is done)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]
    tails = [torch.randint(0, vocab, (3,), generator=g).tolist() for _ in lengths]
    nxt = [int(torch.randint(0, vocab, (1,), generator=g)) for _ in lengths]
    worst = 0.0
    with torch.inference_mode():
        caches = []
        for p in prompts:
            c = rt.new_cache(p.shape[1] + 8)
            rt.forward(p, c, 0)
            caches.append(c)
        first = rt.forward_batch([(t, c, p.shape[1]) for t, c, p in zip(tails, caches, prompts, strict=True)])
        second = rt.forward_batch([((x,), c, p.shape[1] + 3) for x, c, p in zip(nxt, caches, prompts, strict=True)])
        for j, p in enumerate(prompts):
            ids = torch.cat([p, torch.tensor([tails[j]]), torch.tensor([[nxt[j]]])], 1)
            ref = model(input_ids=ids).logits[0].float()
            for got, at in ((first[j], -2), (second[j], -1)):
                worst = max(worst, (got - ref[at]).abs().max().item())
                assert int(got.argmax()) == int(ref[at].argmax())
    return rt, worst


def test_the_embedded_models_batched_step_uses_packed_weights_and_matches_a_full_forward(
    embedded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KV_RAG_CPU_PACK", raising=False)
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    rt, worst = _rows_against_full_forwards(embedded.model, (40, 75, 130), len(embedded.tokenizer))
    assert rt.decoder is not None and rt.decoder.packed() is not None
    assert worst <= 1e-3


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_packed_weights_with_biases_and_qk_norms_match_a_full_forward(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KV_RAG_CPU_PACK", raising=False)
    model, tok = tiny_model(arch)
    rt, worst = _rows_against_full_forwards(model, (9, 17, 33), len(tok))
    assert rt.decoder is not None and rt.decoder.packed() is not None
    assert worst <= 1e-4


def test_packing_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_RAG_CPU_PACK", "0")
    model, tok = tiny_model("llama")
    rt, worst = _rows_against_full_forwards(model, (9, 17), len(tok))
    assert rt.decoder is not None and rt.decoder.packed() is None
    assert worst <= 1e-4
