"""The engine's cache layer under transformers' cache operations, and lent buffers that must not be written."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from kv_rag import Engine
from kv_rag.runtime import PreallocatedLayer, build_cache, cache_kwarg


def _kv(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def _same(ours: PreallocatedLayer, ref: DynamicLayer) -> None:
    assert ours.get_seq_length() == ref.get_seq_length()
    assert ours.keys is not None and ref.keys is not None and ours.values is not None and ref.values is not None
    assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)


def test_transformers_cache_operations_go_through_the_buffers() -> None:
    """crop, beam reordering, batch selection and repetition, reset: then appending still lands in the right rows."""
    k, v = _kv(2, 6, 0)
    ours = build_cache([[k]], [[v]], 1, 10).layers[0]
    assert isinstance(ours, PreallocatedLayer)
    ref = DynamicLayer()
    ref.update(k, v)
    steps = [
        lambda layer: layer.crop(-2),
        lambda layer: layer.update(*_kv(2, 3, 1)),
        lambda layer: layer.reorder_cache(torch.tensor([1, 0])),
        lambda layer: layer.update(*_kv(2, 1, 2)),
        lambda layer: layer.batch_select_indices(torch.tensor([1])),
        lambda layer: layer.batch_repeat_interleave(3),
        lambda layer: layer.update(*_kv(3, 5, 3)),  # past the first buffer's capacity
        lambda layer: layer.offload(),
        lambda layer: layer.prefetch(),
        lambda layer: layer.update(*_kv(3, 1, 4)),
    ]
    for step in steps:
        step(ours)
        step(ref)
        _same(ours, ref)
    ours.reset()
    assert ours.get_seq_length() == 0
    ours.update(*_kv(3, 2, 5))
    assert ours.keys is not None and torch.equal(ours.keys, _kv(3, 2, 5)[0])


def test_keys_and_values_follow_rows_written_into_the_buffers_directly() -> None:
    """Steps that write rows into a layer's buffers and move its length (``filled_to``) see the new rows
    through ``keys``/``values``; replacing them by assignment is refused, not silently ignored."""
    kb, vb = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)
    layer = PreallocatedLayer(8, (kb, vb))
    assert layer.keys is not None and layer.keys.shape[-2] == 0
    kb[..., :3, :] = 1.0
    vb[..., :3, :] = 2.0
    layer.filled_to(3)
    assert layer.keys.shape[-2] == 3 and bool((layer.keys == 1.0).all())
    assert layer.values is not None and bool((layer.values == 2.0).all())
    assert layer.keys.data_ptr() == kb.data_ptr()  # a view, no copy
    layer.filled_to(5)
    assert layer.keys.shape[-2] == 5 and float(layer.keys[..., 4, :].sum()) == 0.0
    with pytest.raises(RuntimeError, match="views of its buffers"):
        layer.keys = torch.ones(1, 2, 5, 4)
    plain = PreallocatedLayer(4)  # no buffers yet: as transformers' own layers, keys start as None
    assert plain.keys is None and plain.values is None


def test_truncating_keeps_the_buffer() -> None:
    k, v = _kv(1, 6, 0)
    layer = build_cache([[k]], [[v]], 1, 10).layers[0]
    buf = layer.key_buffer
    layer.truncate(2)
    layer.update(*_kv(1, 3, 1))
    assert layer.key_buffer is buf and layer.get_seq_length() == 5


def test_a_lent_buffer_is_copied_before_anything_writes_below_its_rows() -> None:
    """A cache over a GPU-tier block (lent rows) never writes into those rows: truncate, crop and settle copy first."""
    block_k, block_v = _kv(1, 16, 0)
    saved_k, saved_v = block_k.clone(), block_v.clone()
    layer = PreallocatedLayer(16, (block_k, block_v))
    layer.filled_to(10)
    layer.lend(10)
    new_k, new_v = _kv(1, 2, 1)
    layer.update(new_k, new_v)  # after the lent rows: into the block's room, in place
    assert layer.key_buffer is block_k and torch.equal(block_k[..., 10:12, :], new_k)
    layer.settle(10, torch.tensor([3, 4]))  # recomputed tokens into rows 3 and 4: a copy first
    assert layer.key_buffer is not block_k
    assert torch.equal(block_k[..., :10, :], saved_k[..., :10, :]) and torch.equal(
        block_v[..., :10, :], saved_v[..., :10, :]
    )
    assert layer.keys is not None and torch.equal(layer.keys[..., 3:5, :], new_k)
    assert torch.equal(layer.keys[..., :3, :], saved_k[..., :3, :]) and layer.get_seq_length() == 10

    for cut in (lambda layer: layer.truncate(7), lambda layer: layer.crop(-3)):
        block_k, block_v = saved_k.clone(), saved_v.clone()
        layer = PreallocatedLayer(16, (block_k, block_v))
        layer.filled_to(10)
        layer.lend(10)
        cut(layer)
        layer.update(new_k, new_v)
        assert torch.equal(block_k, saved_k) and torch.equal(block_v, saved_v)
        assert layer.keys is not None and layer.get_seq_length() == 9
        assert torch.equal(layer.keys, torch.cat([saved_k[..., :7, :], new_k], dim=2))


def test_transformers_generate_continues_a_cropped_cache_hit(engine: Engine) -> None:
    """A hit's cache handed to ``model.generate``, cropped as assisted decoding does, gives the from-scratch answer."""
    doc = "The lighthouse keeper logs the weather at six every morning and at six every evening."
    prompt = engine.prompt("When does the keeper log the weather?", [doc])
    engine.publish([doc])
    ids = torch.tensor([list(engine.tokenize(prompt).ids)])
    model = engine.model
    kwargs = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        cold = model.generate(ids, **kwargs).tolist()
        for cut in (1, 9):  # generate computes the uncached prompt tokens itself
            pre = engine.prefill(prompt)
            assert pre.cached_tokens > 0
            pre.cache.crop(-cut)
            assert pre.cache.get_seq_length() == ids.shape[1] - cut
            warm = model.generate(ids, **{cache_kwarg(model): pre.cache}, **kwargs).tolist()
            assert warm == cold, cut
