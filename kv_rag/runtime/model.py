"""The hot path of one model: its forward step over kv-rag's cache, the fast decoder and the static pool.

:class:`ModelRuntime` is made once per loaded model (:attr:`kv_rag.models.LoadedModel.runtime`) and
holds what used to be found by string keys and attributes set on the model: the name of the
forward argument that takes the cache, the :class:`~kv_rag.runtime.decoder.FastDecoder` (or that
there is none) and the :class:`~kv_rag.runtime.pool.StaticPool`. Not thread-safe by itself: the
engine calls it under the model's lock.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ..layout import block_rows
from .batch import PREFILL_CONTEXT, PREFILL_TOKENS, Arena, batch_slots, prefill_bucket
from .cache import KVCache, Pieces, build_cache, lend_cache, move_to_slot
from .decoder import HALF_DTYPES, MAX_FAST_TOKENS, FastDecoder, fast_path_enabled
from .pool import StaticPool


def cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes the KV cache for ``model`` (``cache`` or ``past_key_values``).

    transformers 5.x renamed ``past_key_values`` to ``cache`` (5.2x); the GPU machine runs 5.17.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ModelRuntime:
    """Forward steps of ``model`` on a :class:`~kv_rag.runtime.cache.KVCache`, and the caches to run them on."""

    def __init__(self, model: Any) -> None:
        self.model = model
        #: the forward argument that takes the cache
        self.cache_kwarg = cache_kwarg(model)
        self._decoder: FastDecoder | None = None
        self._decoder_built = False
        self._pool: StaticPool | None = None
        #: requests :meth:`forward_batch` ran, by how: ``graph:N`` (a batched CUDA graph of an arena of N
        #: slots; every arena's graphs run the same rows), ``ragged`` (the CPU's ragged step), ``eager`` (one
        #: request's own forward); a request that took another path alone than with others may round its
        #: logits differently (reports, benchmarks)
        self.batch_paths: Counter[str] = Counter()

    # ------------------------------------------------------------------ parts
    @property
    def decoder(self) -> FastDecoder | None:
        """The model's :class:`FastDecoder` (made on first use), or ``None`` for an architecture it does not handle."""
        if not self._decoder_built:
            self._decoder = FastDecoder.build(self.model)
            self._decoder_built = True
        return self._decoder

    def pool(self, device: torch.device) -> StaticPool | None:
        """The static KV pool on ``device`` when whole-step graphs apply to this model, else ``None``.

        They apply on CUDA, to half-precision models the fast decoder handles with flash attention,
        under the ``KV_RAG_FAST`` switch.
        """
        if device.type != "cuda" or not torch.cuda.is_available() or not fast_path_enabled(device):
            return None
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        if weight is None or weight.device.type != "cuda" or weight.dtype not in HALF_DTYPES:
            return None
        dec = self.decoder
        if dec is None or not dec.flash:
            return None
        if self._pool is None:
            self._pool = StaticPool(dec, weight.device, weight.dtype)
        return self._pool

    # ------------------------------------------------------------------ caches
    def new_cache(
        self,
        capacity: int,
        keys: Pieces | None = None,
        values: Pieces | None = None,
        *,
        lend: bool = False,
    ) -> KVCache:
        """A cache holding ``keys``/``values`` (per layer, pieces in order; ``None``: empty) with room for
        ``capacity`` tokens.

        On CUDA with a half-precision model the buffers come from the static pool, so that whole
        steps on the cache replay as one CUDA graph. ``lend``: when the last piece of every layer
        lies in one cache-shaped block of the GPU tier at the row where it belongs (see
        :mod:`kv_rag.layout`), with room for ``capacity`` tokens and a padded step, and no other live
        cache uses that block, the cache takes the block's layers as its buffers and the last piece
        is not copied at all; only for callers that never write below the cache's length (the
        block's artifact stays valid because the cache writes only the rows before and after it).
        The cache holds the same tokens either way.
        """
        num_layers = self.num_layers
        cache = KVCache()
        pool = self.pool(self._device())
        if pool is None or num_layers != len(pool.dec.inner.layers):
            return build_cache(keys, values, num_layers, capacity, cache=cache)
        if lend and keys is not None and values is not None and keys and keys[0]:
            lent = self._lend(pool, cache, capacity, keys, values)
            if lent is not None:
                return lent
        slot = pool.acquire(cache, capacity, pool.dtype)
        if slot is None:
            return build_cache(keys, values, num_layers, capacity, cache=cache)
        cache.slot = slot
        return build_cache(keys, values, num_layers, capacity, list(zip(slot.k, slot.v, strict=True)), cache)

    def _lend(self, pool: StaticPool, cache: KVCache, capacity: int, keys: Pieces, values: Pieces) -> KVCache | None:
        """``cache`` over the GPU tier's block that holds the last piece, or ``None`` (then copy as usual)."""
        start = sum(int(p.shape[-2]) for p in keys[0][:-1])
        n = int(keys[0][-1].shape[-2])
        kb = block_rows([ks[-1] for ks in keys], start)
        vb = block_rows([vs[-1] for vs in values], start)
        dtype = pool.dtype
        if kb is None or vb is None or kb.shape != vb.shape or kb.dtype != dtype or vb.dtype != dtype:
            return None
        if kb.device != pool.device or kb.shape[3] < start + n or kb.shape[3] < capacity + MAX_FAST_TOKENS:
            return None
        if pool.max_bytes <= 0:  # KV_RAG_STATIC_BYTES=0: whole-step graphs are off
            return None
        slot = pool.adopt(cache, kb, vb)
        if slot is None:
            return None
        cache.slot = slot
        buffers = list(zip(kb.unbind(0), vb.unbind(0), strict=True))
        return lend_cache(cache, buffers, start, keys, values, capacity)

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor, cache: Any, start: int, logits_to_keep: int = 1) -> torch.Tensor:
        """Run the model on ``input_ids`` (``[1, n]``) at positions ``start..start+n-1`` on top of ``cache``.

        Returns the logits of the last ``logits_to_keep`` positions as float32 ``[n_keep, vocab]``;
        ``cache`` is extended in place. Short steps of supported models on CUDA go through the
        :class:`FastDecoder` (same weights, same cache, fewer launches; see ``KV_RAG_FAST``).
        """
        n = input_ids.shape[1]
        if n <= MAX_FAST_TOKENS and fast_path_enabled(input_ids.device):
            fast = self.decoder
            if fast is not None:
                return fast.forward(input_ids, cache, start, logits_to_keep)
        position_ids = torch.arange(start, start + n, device=input_ids.device).unsqueeze(0)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_kwarg: cache},
        )
        return out.logits[0].float()

    def forward_batch(self, items: Sequence[tuple[Sequence[int], Any, int]]) -> torch.Tensor:
        """One step of several requests, each on its own cache: float32 logits ``[B, vocab]`` of each
        request's last token.

        ``items``: ``(ids, cache, start)`` per request. On the CPU, several requests on a model the
        :class:`FastDecoder` handles run as one ragged step (:meth:`FastDecoder.forward_ragged`: the
        weights are read once for all of them). On CUDA, one-token steps of caches on the static
        pool run as one batched graph per arena (:class:`~kv_rag.runtime.batch.BatchStep`, lone
        requests too, so that answers do not depend on the load). Otherwise each request runs
        through :meth:`forward` in turn.
        """
        device = self._device()
        if device.type == "cuda" and self._pool is not None:
            return self._forward_batch_cuda(self._pool, items, device)
        tensors = [torch.tensor(ids, dtype=torch.long, device=device) for ids, _, _ in items]
        dec = self.decoder if len(items) > 1 and device.type == "cpu" else None
        if dec is not None and all(t.numel() <= MAX_FAST_TOKENS for t in tensors):
            self.batch_paths["ragged"] += len(items)
            return dec.forward_ragged([(t, c, s) for t, (_, c, s) in zip(tensors, items, strict=True)])
        self.batch_paths["eager"] += len(items)
        outs = [self.forward(t.unsqueeze(0), c, s)[-1] for t, (_, c, s) in zip(tensors, items, strict=True)]
        return torch.stack(outs)

    def _forward_batch_cuda(
        self, pool: StaticPool, items: Sequence[tuple[Sequence[int], Any, int]], device: torch.device
    ) -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[tuple[int, int], tuple[Arena, list[int]]] = {}
        for j, (ids, cache, _) in enumerate(items):
            size = 1 if len(ids) == 1 else self._prefill_size(cache, len(ids))
            arena = self._arena_for(pool, cache, size) if size else None
            if arena is not None:
                groups.setdefault((id(arena), size), (arena, []))[1].append(j)
        for (_, size), (arena, idx) in groups.items():
            if size == 1:
                step = arena.step()
                if step is not None:
                    logits = step.run([(items[j][0][0], items[j][1], items[j][2]) for j in idx])
                    for row, j in enumerate(idx):
                        out[j] = logits[row]
                continue
            rows = arena.prefill_rows(size)
            for at in range(0, len(idx), rows):
                part = idx[at : at + rows]
                prefill = arena.prefill(size, len(part))
                if prefill is None:
                    break
                logits = prefill.run([items[j] for j in part])
                for row, j in enumerate(part):
                    out[j] = logits[row]
        for arena, idx in groups.values():  # by the arena's rows: its graphs' matrix products have that shape
            self.batch_paths[f"graph:{arena.n}"] += sum(out[j] is not None for j in idx)
        self.batch_paths["eager"] += sum(o is None for o in out)
        for j, (ids, cache, start) in enumerate(items):
            if out[j] is None:
                t = torch.tensor([list(ids)], dtype=torch.long, device=device)
                out[j] = self.forward(t, cache, start)[-1]
        return torch.stack(out)  # type: ignore[arg-type]

    def warm_up(self, length: int, reserve: int = 64, tails: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> None:
        """Run once the steps that serving a prompt of ``length`` tokens (and ``reserve`` new tokens) uses,
        on a scratch cache, so that the CUDA graphs of its arena (the batched decode step, the batched
        prefills of prompt tails of ``tails`` tokens) are captured and the layer functions compiled now
        rather than in the first requests. Nothing is stored. On the CPU it starts packing the weights of
        the batched step (:meth:`FastDecoder.packed`). Call holding the model's lock, in inference mode."""
        device, dec = self._device(), self.decoder
        if device.type != "cuda":
            if dec is not None:
                dec.packed(wait=False)
            return
        longest = max(tails)
        cache = self.new_cache(length + reserve)  # the capacity, hence the arena, a request of that length gets
        if getattr(cache, "slot", None) is None:  # no static pool: nothing to capture ahead
            return
        base = max(1, length - longest)  # the tails end within the prompt's length
        self.forward(torch.zeros((1, base), dtype=torch.long, device=device), cache, 0)
        layers: list[Any] = list(cache.layers)  # PreallocatedLayer
        for t in sorted(set(tails)):
            self.forward_batch([((0,) * t, cache, base)])
            for layer in layers:
                layer.truncate(base)

    @staticmethod
    def _prefill_size(cache: Any, n: int) -> int:
        """Tokens per request of the batched prefill that runs ``n`` prompt tokens on ``cache`` (0: none;
        the choice depends on the request alone, never on the others, so answers do not depend on the load)."""
        if n > PREFILL_TOKENS // 4 or int(cache.layers[0].length) > PREFILL_CONTEXT:
            return 0
        return prefill_bucket(n)

    @staticmethod
    def _arena_for(pool: StaticPool, cache: Any, size: int = 1) -> Arena | None:
        """The arena whose batched graphs can run ``size`` tokens on ``cache`` (a cache on a lent block is
        moved into one first)."""
        slot = getattr(cache, "slot", None)
        if slot is None or batch_slots() < 2:
            return None
        if slot.arena is None:  # a block lent by the GPU tier: copy into an arena slot (once), if one is free
            layer = cache.layers[0]
            if layer.key_buffer is None or layer.key_buffer.data_ptr() != slot.k_ptr:
                return None
            new = pool.acquire(cache, max(int(layer.capacity), int(layer.length) + size), pool.dtype)
            if new is None:
                return None
            move_to_slot(cache, new)
            slot = new
        layer, arena = cache.layers[0], slot.arena
        kb = layer.key_buffer
        if arena is None or kb is None or kb.data_ptr() != slot.k_ptr or layer.length + size > slot.cap:
            return None
        return arena

    def forward_at(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Run the model on ``input_ids`` (``[1, n]``) at arbitrary ``positions`` (``[n]``) with a custom mask.

        ``attention_mask`` is an additive float mask ``[1, 1, n, cached + n]`` (0 where a query may
        attend, the dtype's minimum where not), passed to the model as a prepared 4D mask. The new
        tokens are appended to ``cache`` after what it holds. Returns float32 logits of the last
        ``logits_to_keep``.
        """
        out = self.model(
            input_ids=input_ids,
            position_ids=positions.to(input_ids.device).unsqueeze(0),
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_kwarg: cache},
        )
        return out.logits[0].float()

    # ------------------------------------------------------------------ facts
    @property
    def num_layers(self) -> int:
        """Number of decoder layers (cache layers)."""
        return int(self.model.config.get_text_config(decoder=True).num_hidden_layers)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
